"""durian-lightning: Durian (difficulty-aware group normalization) for RL of vision-language models, on Lightning.

The math lives in plain modules that import without Lightning or a model:
:mod:`~durian_lightning.core.difficulty`, :mod:`~durian_lightning.core.advantages`, :mod:`~durian_lightning.core.losses`,
:mod:`~durian_lightning.core.rewards`.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``durian_lightning.DurianGRPO`` without importing Lightning for users of the math alone."""
    if name == "DurianGRPO":
        from durian_lightning.module import DurianGRPO

        return DurianGRPO
    if name == "MultimodalReasoningDataModule":
        from durian_lightning.data import MultimodalReasoningDataModule

        return MultimodalReasoningDataModule
    raise AttributeError(f"module 'durian_lightning' has no attribute {name!r}")
