"""durian-lightning: Durian (difficulty-aware group normalization) for RL of vision-language models, on Lightning.

The math lives in plain modules that import without Lightning or a model:
:mod:`~durian_lightning.difficulty`, :mod:`~durian_lightning.advantages`, :mod:`~durian_lightning.losses`,
:mod:`~durian_lightning.rewards`.
"""

__version__ = "0.1.0"
