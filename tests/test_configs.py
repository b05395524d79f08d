"""Every YAML config parses against the CLI's typed arguments; no arguments means configs/default.yaml."""

from pathlib import Path

import pytest
import yaml

from durian_lightning.cli import DEFAULT_CONFIG, run_cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def printed_config(capsys, args) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_the_default_config_is_the_one_in_configs():
    assert DEFAULT_CONFIG == REPO / "configs" / "default.yaml"


def test_no_arguments_run_the_embedded_default(capsys):
    printed = printed_config(capsys, ["fit", "--print_config"])
    default = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for section in ("model", "data"):
        for key, value in default[section].items():
            if section == "data" and key == "model_name_or_path":
                continue
            assert printed[section][key] == value, f"{section}.{key}"
    assert "model_name_or_path" not in printed["data"]  # linked to model.model_name_or_path, not set on its own


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(capsys, config):
    printed = printed_config(capsys, ["fit", "--config", str(config), "--print_config"])
    written = yaml.safe_load(config.read_text())
    for key, value in written["model"].items():
        assert printed["model"][key] == value, f"{config.name}: model.{key}"


def test_recipes_are_marked_as_needing_a_gpu_and_the_hub():
    for config in (REPO / "configs" / "recipes").glob("*.yaml"):
        assert "NEEDS A GPU AND THE HUGGING FACE HUB" in config.read_text(), config.name
