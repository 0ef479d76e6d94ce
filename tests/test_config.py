"""Presets reproduce Tables 4-6; overrides and errors behave."""

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avsiam.config import RECIPES, ConfigError, LrSchedule, all_presets, preset_summary, resolve_recipe
from avsiam.config.presets import load_recipe_file

# (lr, head multiplier, decay start, rate, step, epochs, batch/GPU, GPUs, GPU, balanced, mixup, loss)
TABLES = {
    ("base", "pretrain_as2m"): (1e-4, None, 10, 0.5, 5, 20, 96, 16, "A5000", False, False, "cl+mae"),
    ("base", "finetune_as20k"): (1e-4, 100, 2, 0.75, 1, 15, 8, 4, "A5000", False, True, "bce"),
    ("base", "finetune_as2m"): (5e-6, 50, 5, 0.75, 1, 15, 32, 4, "A5000", True, True, "bce"),
    ("base", "finetune_vggsound"): (5e-5, 10, 2, 0.75, 1, 15, 32, 4, "A5000", True, True, "ce"),
    ("large", "pretrain_as2m"): (1e-4, None, 10, 0.5, 5, 20, 48, 32, "A5000", False, False, "cl+mae"),
    ("large", "finetune_as20k"): (5e-5, 100, 2, 0.75, 1, 15, 8, 4, "A5000", False, True, "bce"),
    ("large", "finetune_as2m"): (5e-6, 50, 2, 0.5, 1, 15, 16, 8, "A5000", True, True, "bce"),
    ("large", "finetune_vggsound"): (5e-6, 50, 2, 0.5, 1, 15, 16, 8, "A5000", True, True, "ce"),
    ("huge", "pretrain_as2m"): (1e-4, None, 10, 0.5, 5, 20, 24, 64, "V100", False, False, "cl+mae"),
    ("huge", "finetune_as20k"): (1e-5, 100, 5, 0.5, 1, 15, 4, 8, "A5000", False, True, "bce"),
    ("huge", "finetune_as2m"): (5e-6, 50, 2, 0.5, 1, 15, 4, 8, "A5000", True, True, "bce"),
    ("huge", "finetune_vggsound"): (5e-6, 50, 2, 0.5, 1, 15, 4, 8, "A5000", True, True, "ce"),
}
FIELDS = ("lr", "head_lr_multiplier", "lr_decay_start_epoch", "lr_decay_rate", "lr_decay_step", "epochs",
          "batch_size_per_gpu", "num_gpus", "gpu_type", "class_balanced_sampling", "mixup", "loss")


@pytest.mark.parametrize(("size", "recipe"), sorted(TABLES))
def test_presets_match_the_papers_tables(size, recipe):
    cfg = resolve_recipe(size, recipe)
    assert tuple(getattr(cfg, f) for f in FIELDS) == TABLES[size, recipe]
    assert cfg.optimizer == "adam" and cfg.weight_decay == 5e-7 and cfg.betas == (0.95, 0.999)
    assert cfg.random_time_shift is True
    assert (cfg.input_norm_mean, cfg.input_norm_std) == (-5.081, 4.485)
    assert cfg.precision == ("fp16" if cfg.gpu_type == "V100" else "bf16")  # V100 has no bf16


def test_presets_json_cli_lists_every_recipe_with_the_interface_keys():
    out = subprocess.run([sys.executable, "-m", "avsiam.cli.main", "presets", "--json"], check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    assert {(r["model"], r["recipe"]) for r in rows} >= set(TABLES)
    assert {(r["model"], r["recipe"]) for r in rows if r["model"] == "tiny"} == {("tiny", r) for r in RECIPES}
    keys = {"model", "stage", "dataset", "optimizer", "weight_decay", "betas", "lr", "head_lr_multiplier",
            "lr_decay_start_epoch", "lr_decay_rate", "lr_decay_step", "epochs", "batch_size_per_gpu", "num_gpus",
            "gpu_type", "class_balanced_sampling", "mixup", "random_time_shift", "loss", "input_norm_mean",
            "input_norm_std", "lr_schedule"}
    for r in rows:
        assert keys <= r.keys()
        assert len(r["lr_schedule"]) == r["epochs"]
        assert r["betas"] == [0.95, 0.999]
        assert (r["head_lr_multiplier"] is None) == (r["stage"] == "pretrain")


def test_lr_schedule_follows_the_published_step_decay():
    base_pt = resolve_recipe("base", "pretrain_as2m")
    assert base_pt.lr_schedule == [1e-4] * 10 + [5e-5] * 5 + [2.5e-5] * 5
    base_ft = resolve_recipe("base", "finetune_as20k")
    assert base_ft.lr_schedule[:2] == [1e-4, 1e-4]
    assert base_ft.lr_schedule[2] == pytest.approx(1e-4 * 0.75)
    assert base_ft.lr_schedule[14] == pytest.approx(1e-4 * 0.75**13)


@given(
    start=st.integers(0, 12), step=st.integers(1, 6), rate=st.floats(0.05, 1.0), epochs=st.integers(1, 30),
)
def test_lr_schedule_matches_multisteplr(start, step, rate, epochs):
    import torch

    cfg = resolve_recipe("tiny", "finetune_as20k", [("lr_decay_start_epoch", start), ("lr_decay_step", step),
                                                    ("lr_decay_rate", rate), ("epochs", epochs)])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(range(start, 1000, step)), gamma=rate)
    expected = []
    for _ in range(epochs):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert cfg.lr_schedule == pytest.approx(expected, rel=1e-9)


def test_overrides_flat_and_dotted():
    cfg = resolve_recipe("tiny", "pretrain_as2m", ["epochs=1", "batch_size_per_gpu=4", "max_steps=20",
                                                   "checkpoint_every=5", "seed=3", "arch.depth=2", "betas=[0.9, 0.99]"])
    assert (cfg.epochs, cfg.batch_size_per_gpu, cfg.max_steps, cfg.checkpoint_every, cfg.seed) == (1, 4, 20, 5, 3)
    assert cfg.arch.depth == 2 and cfg.betas == (0.9, 0.99)


@pytest.mark.parametrize(("override", "expected"), [
    ("epoch=1", "unknown key 'epoch'.*did you mean 'epochs'"),
    ("arch.deepth=2", "unknown key 'deepth' in arch"),
    ("loss=focal", "loss.*'cl\\+mae', 'bce' or 'ce'.*focal"),
    ("epochs=zero", "epochs"),
    ("lr", "expected key=value"),
    ("epochs.x=1", "'epochs' is not a section"),
    ("head_lr_multiplier=3", "head_lr_multiplier must be null for pretraining"),
    ("lr=.inf", "lr: .*finite"),
    ("lr=.nan", "lr: .*finite"),
    ("arch.mlp_ratio=.inf", "mlp_ratio: .*finite"),
])
def test_bad_overrides_name_the_key_and_allowed_values(override, expected):
    with pytest.raises(ConfigError, match=expected):
        resolve_recipe("base", "pretrain_as2m", [override])


def test_unknown_size_and_recipe_list_the_allowed_values():
    with pytest.raises(ConfigError, match="allowed: tiny, base, large, huge"):
        resolve_recipe("giant", "pretrain_as2m")
    with pytest.raises(ConfigError, match="unknown recipe 'pretrain_as20k'.*allowed: pretrain_as2m"):
        resolve_recipe("base", "pretrain_as20k")


def test_saved_config_round_trips_and_rejects_unknown_keys(tmp_path):
    import yaml

    cfg = resolve_recipe("base", "finetune_vggsound")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_recipe_file(path) == cfg
    data = cfg.model_dump(mode="json")
    data["arch"]["dept"] = 3
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"config.yaml: arch.dept: unknown key; did you mean 'depth'"):
        load_recipe_file(path)
    path.write_text("lr: [unclosed")
    with pytest.raises(ConfigError, match="config.yaml: invalid YAML"):
        load_recipe_file(path)


def test_every_preset_validates_and_summarises():
    presets = all_presets()
    assert len(presets) == 16
    for cfg in presets:
        summary = preset_summary(cfg)
        assert summary["lr_schedule"][0] == cfg.lr
        assert LrSchedule.of(cfg).epoch_lr(cfg.epochs) == summary["lr_schedule"][-1]


def test_architectures_of_the_paper_sizes():
    from avsiam.config import arch_config

    assert arch_config("base").audio_grid == (8, 64) and arch_config("base").visual_grid == (14, 14)
    assert arch_config("huge").audio_grid == (9, 73) and arch_config("huge").visual_grid == (16, 16)
    assert (arch_config("large").embed_dim, arch_config("large").depth) == (1024, 24)


def test_table3_variants_are_configurations():
    from avsiam.config.presets import variants

    assert set(variants()) == {"cav", "cav_mae", "cav_mae_multi_ratio", "published"}
    cav = resolve_recipe("base", "pretrain_as2m", variant="cav")
    assert (cav.arch.encoder, cav.use_mae, cav.contrastive_mask_ratios) == ("separate", False, [0.75])
    multi = resolve_recipe("base", "pretrain_as2m", ["temperature=0.07"], variant="cav_mae_multi_ratio")
    assert multi.use_mae and multi.contrastive_mask_ratios == [0.0, 0.2, 0.4, 0.6, 0.8] and multi.temperature == 0.07
    with pytest.raises(ConfigError, match="unknown variant 'cav2'"):
        resolve_recipe("base", "pretrain_as2m", variant="cav2")


def test_the_published_variant_reproduces_the_published_architecture_and_initialisation():
    default = resolve_recipe("base", "pretrain_as2m").arch
    published = resolve_recipe("base", "pretrain_as2m", variant="published").arch
    assert (default.input_doubling, default.block_norm_eps, default.audio_pos_init, default.fusion_init) == (
        False, 1e-6, "bicubic", "last_blocks")
    assert (published.input_doubling, published.block_norm_eps, published.audio_pos_init, published.fusion_init) == (
        True, 1e-5, "nearest_1d", "last_block")
    assert published.model_dump(exclude={"input_doubling", "block_norm_eps", "audio_pos_init", "fusion_init"}) == \
        default.model_dump(exclude={"input_doubling", "block_norm_eps", "audio_pos_init", "fusion_init"})


def test_result_neutral_fields_leave_the_result_key_and_resumable_fields_include_them():
    from avsiam.config import RESULT_NEUTRAL_FIELDS, RESUMABLE_FIELDS, RecipeConfig

    assert RESULT_NEUTRAL_FIELDS < RESUMABLE_FIELDS <= set(RecipeConfig.model_fields)
    base = resolve_recipe("tiny", "finetune_vggsound")
    neutral = resolve_recipe("tiny", "finetune_vggsound", ["num_workers=0", "checkpoint_every=3", "keep_checkpoints=7"])
    assert neutral.result_key() == base.result_key() and neutral != base
    for changed in ("max_steps=5", "seed=1", "arch.depth=2", "lr=0.0123"):
        assert resolve_recipe("tiny", "finetune_vggsound", [changed]).result_key() != base.result_key(), changed
