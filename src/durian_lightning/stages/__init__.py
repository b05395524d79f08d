"""The stages of a training step, one per module, passing typed dataclasses (rollout -> scoring -> dynamic sampling
-> global batch -> update; evaluation beside them), and the fast paths they take where the conformance suite shows
them exact: each image encoded once per step (:mod:`.image_features`), each prompt's prefill run once
(:mod:`.shared_prefill`). The LightningModule calls them in order."""
