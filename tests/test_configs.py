"""Every YAML config parses against the CLI's typed arguments; no arguments means configs/default.yaml."""

from pathlib import Path

import pytest
import yaml

from durian_lightning.cli import run_cli
from durian_lightning.settings import LoraSettings, LossSettings

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def printed_config(capsys, args) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_no_arguments_run_the_embedded_default_from_any_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: configs/default.yaml is found from the package
    printed = printed_config(capsys, ["fit", "--print_config"])
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    for section in ("model", "data"):
        for key, value in default[section].items():
            if isinstance(value, dict):  # a settings group: every key it sets
                for inner, inner_value in value.items():
                    assert printed[section][key][inner] == inner_value, f"{section}.{key}.{inner}"
            else:
                assert printed[section][key] == value, f"{section}.{key}"
    assert printed["seed_everything"] == default["seed_everything"]
    assert "model_name_or_path" not in printed["data"]  # linked to model.model_name_or_path, not set on its own


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(capsys, config):
    printed = printed_config(capsys, ["fit", "--config", str(config), "--print_config"])
    written = yaml.safe_load(config.read_text())
    for key, value in written["model"].items():
        expected = {**printed["model"][key], **value} if isinstance(value, dict) else value
        assert printed["model"][key] == expected, f"{config.name}: model.{key}"


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_mirror_the_papers_setup(capsys, config):
    # Qwen2.5-VL-7B-Instruct, G = 8, 512 prompts per rollout batch and 128 per optimizer step over 8 GPUs; as the paper
    # ran it (every weight trained, sharded, lr 1e-6) or, named *_lora, with a LoRA adapter under DDP at LoRA's 1e-5
    printed = printed_config(capsys, ["fit", "--config", str(config), "--print_config"])
    model, trainer = printed["model"], printed["trainer"]
    lora = config.stem.endswith("_lora")
    assert model["model_name_or_path"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed"
    assert trainer["strategy"] == ("ddp" if lora else "fsdp2") and model["lora"]["enabled"] == lora
    assert model["dtype"] == ("bfloat16" if lora else "float32")  # full fine-tuning: float32 weights, bf16 compute
    assert model["optimization"]["learning_rate"] == (1e-5 if lora else 1e-6)
    assert model["gradient_checkpointing"] is True
    assert printed["validate_before_fit"] is True  # the starting accuracy, as verl and EasyR1 log it
    assert model["rollout"]["num_generations"] == 8
    assert printed["data"]["batch_size"] * trainer["devices"] == 512
    assert model["optimization"]["mini_batch_size"] * trainer["devices"] == 128
    # the file name says the method: durian_*, dr_grpo, and grpo / dapo (GRPO's per-prompt std)
    name = config.stem.removeprefix("qwen2_5_vl_7b_").removesuffix("_lora")
    estimator = "durian" if name.startswith("durian") else "dr_grpo" if name == "dr_grpo" else "grpo"
    assert model["advantages"]["estimator"] == estimator
    if estimator == "durian":
        assert model["advantages"]["alphas"] == [0.1, 0.2, 0.7]
    dapo = "dapo" in config.name
    assert (model["loss"]["preset"] == "dapo") == dapo and model["optimization"]["dynamic_sampling"] == dapo
    # the recipe gets exactly what it names plus the classes' defaults, never the offline default's overrides
    # (configs/default.yaml sets kl_coef 0 and adapts the MLP too): the grpo preset's KL 0.01 stays
    loss = LossSettings(**model["loss"]).resolve(model["rollout"]["max_new_tokens"])
    assert loss.kl_coef == (0.0 if dapo else 0.01)
    assert model["lora"]["target_modules"] == LoraSettings().target_modules
    assert (loss.rollout_correction, loss.rollout_correction_cap) == ("token", 2.0)  # bf16: see docs/method.md


@pytest.mark.parametrize("args, kl_coef", [
    (["--model.loss.preset", "grpo"], 0.01),  # default.yaml's kl_coef 0.0 belonged to its own preset choice
    (["--model.loss.preset=grpo"], 0.01),
    (["--model.loss.kl_coef", "0.05", "--model.loss.preset", "grpo"], 0.05),  # a value named here still applies
    (["--model.loss.preset", "grpo", "--model.loss.kl_coef", "0.05"], 0.05),
    ([], 0.0),  # no preset named: default.yaml's choice stands
])
def test_a_preset_named_on_the_command_line_sets_its_own_values(capsys, args, kl_coef):
    printed = printed_config(capsys, ["fit", *args, "--print_config"])
    loss = LossSettings(**printed["model"]["loss"]).resolve(printed["model"]["rollout"]["max_new_tokens"])
    assert loss.kl_coef == kl_coef
    assert printed["model"]["rollout"]["num_generations"] == 8  # the rest of default.yaml still applies


def test_metrics_csv_is_written_whatever_logger_packages_are_installed(tmp_path):
    # Lightning's own default switches to TensorBoard *instead of* CSV when tensorboard is importable
    import importlib.util

    from durian_lightning.cli import default_loggers

    loggers = default_loggers(str(tmp_path))
    assert type(loggers[0]).__name__ == "CSVLogger"  # first: the trainer's log_dir is its folder
    has_tensorboard = any(importlib.util.find_spec(n) for n in ("tensorboard", "tensorboardX"))
    assert [type(x).__name__ for x in loggers[1:]] == (["TensorBoardLogger"] if has_tensorboard else [])
    assert all(x.version == loggers[0].version for x in loggers)


def test_the_entropy_precompute_runs_the_encoder_in_the_models_dtype(tmp_path):
    from durian_lightning.cli import DurianCLI
    from durian_lightning.data import MultimodalReasoningDataModule
    from durian_lightning.module import DurianGRPO

    cli = DurianCLI(DurianGRPO, MultimodalReasoningDataModule, run=False, save_config_callback=None,
                    args=["--model.dtype", "bfloat16", "--data.entropy_method", "pixel",
                          f"--trainer.default_root_dir={tmp_path}"])
    assert cli.datamodule.hparams.dtype == "bfloat16"
