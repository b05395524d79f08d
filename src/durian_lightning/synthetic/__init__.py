"""The synthetic shapes world: the bundled data's scenes (:mod:`.scenes`), the same scenes in words for pretraining
the tiny default model (:mod:`.scene_text`), and the script that writes ``data/synthetic`` (:mod:`.dataset`)."""
