"""The capacity planner: parameters, ZeRO model states against DeepSpeed's estimators,
activations, fit, FLOPs and GPU-hours, and the ``avsiam plan`` command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from avsiam.cli import main as cli_main
from avsiam.cli import plan_command
from avsiam.config import ConfigError, resolve_recipe
from avsiam.model import build_pretrain_model
from avsiam.model.flops import flops_summary
from avsiam.plan.compute import TRAIN_CLIPS, count_parameters, predicted_gpu_hours
from avsiam.plan.hardware import GIB, KNOWN_GPUS, gpu_of_device, gpu_spec
from avsiam.plan.memory import activation_bytes, block_runs, model_state_bytes
from avsiam.plan.planner import capacity_plan

V100 = KNOWN_GPUS["v100-32gb"]
A5000 = KNOWN_GPUS["a5000"]


def huge_pretraining_plan(**options) -> dict:
    return capacity_plan(resolve_recipe("huge", "pretrain_as2m"), V100, num_gpus=64, zero_stage=2, **options)


@pytest.fixture
def avsiam_main(monkeypatch):
    """``avsiam`` with the plan command registered (whether or not main.py lists it yet)."""
    if plan_command not in cli_main.COMMANDS:
        monkeypatch.setattr(cli_main, "COMMANDS", (*cli_main.COMMANDS, plan_command))
    return cli_main.main


def test_plan_has_the_documented_keys_and_is_json():
    plan = huge_pretraining_plan()
    assert {
        "params", "trainable_params", "model_state_bytes_per_gpu", "activation_bytes_per_gpu", "fits",
        "flops_per_sample", "predicted_gpu_hours", "paper_gpu_hours", "gpu_memory_bytes", "utilisation",
        "samples_per_epoch", "required_bytes_per_gpu", "model_state_bytes_per_gpu_by_zero_stage",
    } <= set(plan)  # fmt: skip
    assert json.loads(json.dumps(plan)) == plan


def test_parameters_are_counted_on_the_real_model():
    recipe = resolve_recipe("base", "pretrain_as2m")
    with torch.device("meta"):
        model = build_pretrain_model("base")
    encoder_and_fusion = sum(p.numel() for m in (model.encoder, model.fusion) for p in m.parameters())
    assert encoder_and_fusion / 1e6 == pytest.approx(100.65, rel=1e-3)  # the paper's "100M"
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert count_parameters(recipe).total == encoder_and_fusion + decoder

    def heads(num_classes: int, d: int = 768) -> int:  # LayerNorm + Linear: multimodal (2D wide), audio, visual
        return (2 * 2 * d + 2 * d * num_classes + num_classes) + 2 * (2 * d + d * num_classes + num_classes)

    assert count_parameters(resolve_recipe("base", "finetune_as2m")).total == encoder_and_fusion + heads(527)
    assert count_parameters(resolve_recipe("base", "finetune_vggsound")).total == encoder_and_fusion + heads(309)


# (recipe, GPUs per node, nodes): the paper's clusters.
CLUSTERS = [(("huge", "pretrain_as2m"), 8, 8), (("large", "pretrain_as2m"), 8, 4), (("base", "finetune_as2m"), 4, 1)]


@pytest.mark.parametrize(("run", "per_node", "nodes"), CLUSTERS)
def test_zero2_model_states_equal_deepspeeds_estimate(run, per_node, nodes):
    """2 P (16-bit weights) + 18 P / N (16-bit gradients, their fp32 copy, fp32 master weights,
    Adam m and v): the GPU part of DeepSpeed's estimate without offload."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params = count_parameters(resolve_recipe(*run))
    _, deepspeed_gpu = estimate_zero2_model_states_mem_needs(params.total, per_node, nodes, cpu_offload=False)
    ours = model_state_bytes(params.total, params.largest_layer, 2, per_node * nodes)
    assert abs(ours - deepspeed_gpu) <= 18  # DeepSpeed pads each rank's partition to ceil(P / N)


@pytest.mark.parametrize(("run", "per_node", "nodes"), CLUSTERS)
def test_zero3_model_states_are_deepspeeds_estimate_plus_the_weight_shard(run, per_node, nodes):
    """DeepSpeed's stage-3 estimate (4 x largest layer + 18 P / N) leaves out the 16-bit weight
    shard every rank holds (2 P / N); the planner counts it."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    params = count_parameters(resolve_recipe(*run))
    world = per_node * nodes
    _, deepspeed_gpu, _ = estimate_zero3_model_states_mem_needs(
        params.total, params.largest_layer, per_node, nodes, cpu_offload=False, cpu_offload_params=False
    )
    ours = model_state_bytes(params.total, params.largest_layer, 3, world)
    assert abs(ours - deepspeed_gpu - 2 * params.total / world) <= 20


def test_printed_all_cold_zero2_estimate_matches_the_plan(capsys):
    """``estimate_zero2_model_states_mem_needs_all_cold`` prints GiB per GPU to two decimals."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    plan = huge_pretraining_plan()
    estimate_zero2_model_states_mem_needs_all_cold(plan["params"], num_gpus_per_node=8, num_nodes=8)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.endswith("offload_optimizer=none"))
    per_gpu_gib = float(row.split("|")[1].strip().removesuffix("GB"))
    assert per_gpu_gib == pytest.approx(plan["model_state_bytes_per_gpu"] / GIB, abs=0.005)


def test_model_states_shrink_with_each_zero_stage():
    plan = huge_pretraining_plan()
    by_stage = [plan["model_state_bytes_per_gpu_by_zero_stage"][str(s)] for s in range(4)]
    assert by_stage[0] == 20 * plan["params"]  # nothing partitioned
    assert by_stage[0] > by_stage[1] > by_stage[2] > by_stage[3]
    assert plan["model_state_bytes_per_gpu"] == by_stage[2]


def test_activations_follow_the_per_block_estimate():
    """Base finetuning (multimodal head, the largest step): 12 blocks on 512 audio and on 196
    visual tokens, 2 fusion blocks on 708; 34 N D + 5 heads N^2 bytes per block per clip."""
    recipe = resolve_recipe("base", "finetune_as2m")
    micro = recipe.batch_size_per_gpu

    def block(n: int) -> int:
        return 34 * n * 768 + 5 * 12 * n**2

    assert activation_bytes(block_runs(recipe), micro, checkpointing=False) == micro * (
        12 * (block(512) + block(196)) + 2 * block(708)
    )
    inputs = micro * 2 * 768 * (12 * (512 + 196) + 2 * 708)
    assert activation_bytes(block_runs(recipe), micro, checkpointing=True) == inputs + micro * block(708)


@pytest.mark.parametrize("run", [("base", "pretrain_as2m"), ("large", "finetune_as2m"), ("huge", "finetune_vggsound")])
def test_activation_checkpointing_trades_memory_for_recomputation(run):
    recipe = resolve_recipe(*run)
    plain = capacity_plan(recipe, A5000, fused_attention=False)
    checkpointed = capacity_plan(recipe, A5000, activation_checkpointing=True, fused_attention=False)
    fused = capacity_plan(recipe, A5000)
    assert checkpointed["activation_bytes_per_gpu"] < plain["activation_bytes_per_gpu"] / 4
    assert fused["activation_bytes_per_gpu"] < plain["activation_bytes_per_gpu"]
    assert checkpointed["model_state_bytes_per_gpu"] == plain["model_state_bytes_per_gpu"]
    # One more forward of every block the backward needs (all of them in finetuning; not the
    # MAE encoder, which runs without autograd, in pretraining): up to a third more compute.
    assert plain["recompute_flops_per_sample"] == 0
    assert 0.85 < checkpointed["recompute_flops_per_sample"] / (plain["flops_per_sample"] / 3) <= 1
    assert checkpointed["predicted_gpu_hours"] > plain["predicted_gpu_hours"]


def test_huge_pretraining_on_64_v100_32gb_with_zero2_fits_with_fused_attention_or_checkpointing():
    """Model states are small at ZeRO 2 (1.5 GiB: 2 x 698 M 16-bit weights + 18 bytes x 698 M / 64),
    but one micro-batch of 24 clips stores ~45 GiB of activations by the standard estimate:
    32 shared blocks over all five contrastive buckets, and the 913-token decoder, whose 16 heads'
    attention scores alone are ~0.5 GiB per clip. Without the N^2 scores (fused attention, which
    timm's Attention uses on a GPU) they drop to ~20 GiB and it fits; with activation
    checkpointing, to ~3 GiB."""
    plain = huge_pretraining_plan(fused_attention=False)
    assert plain["model_state_bytes_per_gpu"] / GIB == pytest.approx(1.48, abs=0.01)
    assert plain["activation_bytes_per_gpu"] > V100.memory_bytes and not plain["fits"]
    fused = huge_pretraining_plan()  # the default: what timm's attention runs on a V100
    assert fused["fits"] and "memory-efficient kernel" in fused["attention"]
    assert 20 * GIB < fused["required_bytes_per_gpu"] < 28 * GIB
    checkpointed = huge_pretraining_plan(activation_checkpointing=True, fused_attention=False)
    assert checkpointed["fits"] and checkpointed["required_bytes_per_gpu"] < V100.memory_bytes / 4


def test_flops_and_gpu_hours():
    recipe = resolve_recipe("huge", "pretrain_as2m")
    plan = huge_pretraining_plan()
    assert plan["flops_per_sample"] == pytest.approx(flops_summary(recipe.arch, recipe.contrastive_mask_ratios)["pretrain_train"])
    expected = TRAIN_CLIPS["as2m"] * 20 * plan["flops_per_sample"] / (125e12 * 0.35) / 3600
    assert plan["predicted_gpu_hours"] == pytest.approx(expected)
    assert predicted_gpu_hours(recipe, plan["flops_per_sample"], 125e12, 0.35) == pytest.approx(expected)
    # Device-hours do not depend on the GPU count; the wall clock does.
    half = capacity_plan(recipe, V100, num_gpus=32)
    assert half["predicted_gpu_hours"] == pytest.approx(plan["predicted_gpu_hours"])
    assert half["predicted_wall_clock_hours"] == pytest.approx(2 * plan["predicted_wall_clock_hours"])
    assert [h["gpu_hours"] for h in plan["paper_gpu_hours"]] == [800]
    assert 0.5 < plan["predicted_gpu_hours"] / 800 < 1.5
    assert capacity_plan(resolve_recipe("huge", "finetune_as2m"), A5000)["paper_gpu_hours"] == []


def test_precision_follows_the_card():
    base = resolve_recipe("base", "pretrain_as2m")  # bf16 on its A5000s
    on_v100, on_a5000 = capacity_plan(base, V100), capacity_plan(base, A5000)
    assert (on_v100["precision"], on_v100["peak_flops_per_gpu"]) == ("fp16", 125e12)
    assert (on_a5000["precision"], on_a5000["peak_flops_per_gpu"]) == ("bf16", 111.1e12)
    with pytest.raises(ConfigError, match="fp32"):
        capacity_plan(resolve_recipe("tiny", "pretrain_as2m"), A5000)


def test_unknown_gpu_is_an_error_listing_the_known_ones(avsiam_main, capsys):
    with pytest.raises(ConfigError) as error:
        gpu_spec("rtx4090")
    assert all(name in str(error.value) for name in KNOWN_GPUS)
    assert avsiam_main(["plan", "--model", "base", "--stage", "pretrain_as2m", "--gpu", "rtx4090"]) == 2
    assert "unknown GPU 'rtx4090'" in capsys.readouterr().err


def test_cli_json_output_parses(avsiam_main, capsys):
    argv = ["plan", "--model", "huge", "--stage", "pretrain_as2m", "--gpu", "v100-32gb", "--gpus", "64", "--zero", "2"]
    assert avsiam_main([*argv, "--activation-checkpointing", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["gpu"], plan["num_gpus"], plan["zero_stage"], plan["fits"]) == ("v100-32gb", 64, 2, True)
    assert plan == huge_pretraining_plan(activation_checkpointing=True)
    assert avsiam_main([*argv, "--attention", "standard"]) == 0
    assert "short" in capsys.readouterr().out  # the text table says how much memory is missing


def test_cli_defaults_to_the_recipes_cluster(avsiam_main, capsys):
    assert avsiam_main(["plan", "--model", "large", "--stage", "finetune_as20k", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["gpu"], plan["num_gpus"], plan["zero_stage"], plan["precision"]) == ("a5000", 4, 2, "bf16")
    assert math.isclose(plan["utilisation"], 0.35)


@pytest.mark.parametrize("size", ["base", "large", "huge"])
def test_every_shipped_paper_config_plans_as_fitting_by_default(size):
    from avsiam.config.presets import RECIPES
    from avsiam.plan.cluster_configs import cluster_run
    from avsiam.plan.hardware import attention_kernel, cluster_gpu

    for name in RECIPES:
        recipe, chosen = cluster_run(size, name)
        gpu = cluster_gpu(recipe.gpu_type)
        plan = capacity_plan(recipe, gpu, activation_checkpointing=chosen.activation_checkpointing)
        assert plan["fits"], (size, name, plan["required_bytes_per_gpu"] / GIB)
        assert attention_kernel(gpu) in plan["attention"]


def test_the_plan_says_which_attention_it_assumes(avsiam_main, capsys):
    argv = ["plan", "--model", "huge", "--stage", "pretrain_as2m", "--gpu", "v100-32gb", "--gpus", "64", "--zero", "2", "--json"]
    assert avsiam_main(argv) == 0
    fused = json.loads(capsys.readouterr().out)
    assert fused["fits"] and fused["attention"].startswith("fused: scaled_dot_product_attention, memory-efficient kernel")
    assert avsiam_main([*argv, "--attention", "standard"]) == 0
    standard = json.loads(capsys.readouterr().out)
    assert not standard["fits"] and standard["attention"].startswith("standard estimate")
    assert avsiam_main(["plan", "--model", "base", "--stage", "finetune_as20k", "--gpu", "h100", "--json"]) == 0
    assert "flash kernel" in json.loads(capsys.readouterr().out)["attention"]


@pytest.mark.parametrize(
    ("device_name", "memory_gib", "expected"),
    [
        ("Tesla V100-SXM2-32GB", 31.7, "v100-32gb"),
        ("Tesla V100-SXM2-16GB", 15.8, "v100-16gb"),
        ("NVIDIA RTX A5000", 23.6, "a5000"),
        ("NVIDIA A100-PCIE-40GB", 39.4, "a100-40gb"),
        ("NVIDIA A100-SXM4-80GB", 79.2, "a100-80gb"),
        ("NVIDIA H100 80GB HBM3", 79.1, "h100"),
        ("NVIDIA H200", 139.8, "h200"),
    ],
)
def test_the_card_behind_a_cuda_device(device_name: str, memory_gib: float, expected: str) -> None:
    assert gpu_of_device(device_name, int(memory_gib * GIB)).name == expected


def test_an_unknown_cuda_device_is_named() -> None:
    with pytest.raises(ConfigError, match="'NVIDIA L4'.*--gpu"):
        gpu_of_device("NVIDIA L4", 24 * GIB)
