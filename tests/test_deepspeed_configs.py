"""deepspeed_configs/: generated from the presets, consistent with them, and parsed by DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avsiam.config import RECIPES, resolve_recipe
from avsiam.config.presets import PAPER_SIZES
from avsiam.plan.cluster_configs import CONFIG_ROOT, CPU_ZERO_STAGES, cluster_name, cpu_recipe, stale_files
from avsiam.plan.compute import count_parameters
from avsiam.plan.hardware import cluster_gpu
from avsiam.plan.planner import choose_memory_plan, memory_plan
from avsiam.train.ds_config import deepspeed_config

PAPER_RUNS = [(size, name) for size in PAPER_SIZES for name in RECIPES]


def paper_config_path(size: str, name: str) -> Path:
    return CONFIG_ROOT / size / f"{name}.{cluster_name(resolve_recipe(size, name))}.json"


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def all_keys(node) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for value in node.values() for k in all_keys(value)}
    return set()


@pytest.fixture
def parse_with_world_size(monkeypatch):
    """``DeepSpeedConfig(config, mpu=None)`` takes the world size from ``deepspeed.comm`` (1 when
    no process group exists) and asserts the batch arithmetic against it. Answer for a process
    group of the cluster's size instead of starting one."""
    from deepspeed.runtime import config as ds_runtime_config

    def parse(config: dict, world_size: int):
        monkeypatch.setattr(ds_runtime_config.dist, "get_rank", lambda group=None: 0)
        monkeypatch.setattr(ds_runtime_config.dist, "get_world_size", lambda group=None: world_size)
        return ds_runtime_config.DeepSpeedConfig(config, mpu=None)

    return parse


def test_committed_configs_and_readme_table_equal_the_generated_ones():
    stale = stale_files()
    assert not stale, f"regenerate with `python -m avsiam.plan.cluster_configs`: {stale}"


def test_paper_configs_are_named_after_their_clusters():
    names = sorted(str(p.relative_to(CONFIG_ROOT)) for p in CONFIG_ROOT.glob("[blh]*/*.json"))
    assert names == sorted([
        "base/pretrain_as2m.16xA5000.json", "base/finetune_as20k.4xA5000.json",
        "base/finetune_as2m.4xA5000.json", "base/finetune_vggsound.4xA5000.json",
        "large/pretrain_as2m.32xA5000.json", "large/finetune_as20k.4xA5000.json",
        "large/finetune_as2m.8xA5000.json", "large/finetune_vggsound.8xA5000.json",
        "huge/pretrain_as2m.64xV100.json", "huge/finetune_as20k.8xA5000.json",
        "huge/finetune_as2m.8xA5000.json", "huge/finetune_vggsound.8xA5000.json",
    ])  # fmt: skip


@pytest.mark.parametrize(("size", "name"), PAPER_RUNS)
def test_paper_config_follows_its_preset(size, name):
    recipe = resolve_recipe(size, name)
    config = load(paper_config_path(size, name))
    micro, accumulation = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    assert micro == recipe.batch_size_per_gpu and accumulation == recipe.gradient_accumulation_steps
    assert config["train_batch_size"] == micro * accumulation * recipe.num_gpus
    # Epochs and the per-epoch lr decay live in the preset; the training loop drives them.
    assert not {k for k in all_keys(config) if "epoch" in k or "scheduler" in k}
    assert config["optimizer"] == {
        "type": "Adam",
        "params": {
            "lr": recipe.lr,
            "betas": list(recipe.betas),
            "eps": 1e-8,
            "weight_decay": recipe.weight_decay,
            "adam_w_mode": False,
        },
    }
    assert config["gradient_clipping"] == 0.0  # DeepSpeed's default would clip at 1.0
    if recipe.gpu_type == "V100":  # no bf16 on Volta: fp16 with dynamic loss scaling
        assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0 and "bf16" not in config
    else:
        assert config["bf16"] == {"enabled": True} and "fp16" not in config


@pytest.mark.parametrize(("size", "name"), PAPER_RUNS)
def test_paper_config_memory_settings_are_the_planners_first_fit(size, name):
    recipe = resolve_recipe(size, name)
    config = load(paper_config_path(size, name))
    gpu, params = cluster_gpu(recipe.gpu_type), count_parameters(recipe)
    chosen = choose_memory_plan(recipe, params, gpu, recipe.num_gpus)
    assert chosen.fits
    assert config["zero_optimization"]["stage"] == chosen.zero_stage
    assert ("activation_checkpointing" in config) == chosen.activation_checkpointing
    if chosen.activation_checkpointing:  # checkpointing only where the preset's stage alone does not fit
        assert not memory_plan(recipe, params, gpu, recipe.num_gpus, chosen.zero_stage, False).fits


@pytest.mark.parametrize(("size", "name"), PAPER_RUNS)
def test_training_engine_builds_the_same_config_apart_from_checkpointing(size, name):
    """``avsiam train`` on the cluster builds its config with ``deepspeed_config``: the same
    settings, except the activation checkpointing the engine does not wire yet."""
    recipe = resolve_recipe(size, name)
    config = load(paper_config_path(size, name))
    config.pop("activation_checkpointing", None)
    assert config == deepspeed_config(recipe, recipe.num_gpus, on_cpu=False)


@pytest.mark.parametrize(("size", "name"), PAPER_RUNS)
def test_deepspeed_parses_paper_config(size, name, parse_with_world_size):
    from deepspeed.runtime.activation_checkpointing.config import ACT_CHKPT_DEFAULT

    recipe = resolve_recipe(size, name)
    config = load(paper_config_path(size, name))
    parsed = parse_with_world_size(config, recipe.num_gpus)
    assert parsed.world_size == recipe.num_gpus
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (
        recipe.batch_size_per_gpu * recipe.num_gpus, recipe.batch_size_per_gpu, 1,
    )  # fmt: skip
    assert parsed.zero_optimization_stage == config["zero_optimization"]["stage"]
    assert parsed.optimizer_name == "adam" and parsed.optimizer_params["adam_w_mode"] is False
    assert parsed.scheduler_name is None and parsed.gradient_clipping == 0.0
    assert parsed.float16_config.enabled == (recipe.gpu_type == "V100")
    assert parsed.bfloat16_config.enabled == (recipe.gpu_type == "A5000")
    if recipe.gpu_type == "V100":
        assert parsed.float16_config.loss_scale == 0  # dynamic
    # DeepSpeed reads the activation checkpointing block leniently: check its keys ourselves.
    assert set(config.get("activation_checkpointing", {})) <= set(ACT_CHKPT_DEFAULT)


def test_deepspeed_rejects_a_config_on_the_wrong_world_size(parse_with_world_size):
    config = load(paper_config_path("huge", "pretrain_as2m"))
    with pytest.raises(AssertionError, match="Check batch related parameters"):
        parse_with_world_size(config, 8)


@pytest.mark.parametrize("stage", CPU_ZERO_STAGES)
def test_cpu_configs_are_tiny_fp32_torch_adam(stage, parse_with_world_size):
    recipe = cpu_recipe(stage)
    config = load(CONFIG_ROOT / "cpu" / f"tiny_pretrain_as2m.zero{stage}.2xCPU.json")
    assert "fp16" not in config and "bf16" not in config  # fp32: DeepSpeed's CPU accelerator has no fp16
    assert config["optimizer"]["params"]["torch_adam"] is True and config["optimizer"]["params"]["adam_w_mode"] is False
    parsed = parse_with_world_size(config, recipe.num_gpus)
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_batch_size == recipe.batch_size_per_gpu * recipe.num_gpus
