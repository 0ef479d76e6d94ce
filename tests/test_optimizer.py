"""The tables' optimizer: Adam with coupled L2 weight decay, not DeepSpeed's default AdamW."""

import copy

import pytest
import torch

from avsiam.config import resolve_recipe
from avsiam.train.ds_config import deepspeed_config


def test_deepspeed_config_pins_coupled_adam_and_the_batch_arithmetic():
    recipe = resolve_recipe("huge", "pretrain_as2m")
    cfg = deepspeed_config(recipe, world_size=64, on_cpu=False)
    assert cfg["optimizer"]["type"] == "Adam" and cfg["optimizer"]["params"]["adam_w_mode"] is False
    assert cfg["optimizer"]["params"]["betas"] == [0.95, 0.999] and cfg["optimizer"]["params"]["weight_decay"] == 5e-7
    assert cfg["train_batch_size"] == 24 * 64 and cfg["fp16"]["enabled"] and cfg["fp16"]["loss_scale"] == 0
    assert "scheduler" not in cfg  # the per-epoch step decay is driven by the training loop
    assert deepspeed_config(resolve_recipe("base", "finetune_as2m"), 4, on_cpu=False)["bf16"]["enabled"]


@pytest.fixture
def single_process_group(monkeypatch):
    import torch.distributed as dist

    from avsiam.launch.local import free_port

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_deepspeed_adam_steps_exactly_like_torch_adam_with_l2(single_process_group):
    """Same updates as ``torch.optim.Adam(weight_decay=wd)`` (coupled), and different from AdamW."""
    import deepspeed

    from avsiam.launch.distributed import init_distributed

    init_distributed()
    recipe = resolve_recipe("tiny", "pretrain_as2m", ["weight_decay=0.1", "zero_stage=2"])  # a large wd makes the mode visible
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    ref, adamw = copy.deepcopy(model), copy.deepcopy(model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[{"params": list(model.parameters()), "lr": recipe.lr}],
                                      config=deepspeed_config(recipe, 1, on_cpu=True))
    opt_ref = torch.optim.Adam(ref.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=0.1)
    opt_w = torch.optim.AdamW(adamw.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=0.1)
    for step in range(3):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
        engine.backward(engine(x).pow(2).sum())
        engine.step()
        for m, opt in ((ref, opt_ref), (adamw, opt_w)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    for p, r, w in zip(engine.module.parameters(), ref.parameters(), adamw.parameters()):
        assert torch.allclose(p, r, atol=1e-6)
        assert not torch.allclose(p, w, atol=1e-6)


@pytest.mark.parametrize(("recipe_name", "overrides", "expected"), [
    ("finetune_vggsound", [("fusion_lr_multiplier", None)], {"backbone": 1.0, "heads": 10.0, "fusion": 10.0}),  # unset: as the heads
    ("finetune_vggsound", [("fusion_lr_multiplier", 2.0)], {"backbone": 1.0, "heads": 10.0, "fusion": 2.0}),
    ("pretrain_as2m", [], {"backbone": 1.0}),  # pretraining: one group, its fusion layers included
])
def test_parameter_groups_scale_heads_and_fusion_and_hold_every_trainable_parameter(recipe_name, overrides, expected):
    from avsiam.model import build_finetune_model_from_recipe, build_pretrain_model_from_recipe
    from avsiam.train.tasks import FinetuneTask, PretrainTask

    recipe = resolve_recipe("tiny", recipe_name, overrides)
    if recipe.stage == "finetune":
        model, task = build_finetune_model_from_recipe(recipe, 5), FinetuneTask(recipe, index=None)
    else:
        model, task = build_pretrain_model_from_recipe(recipe), PretrainTask(recipe, index=None)
    groups = task.param_groups(model)
    assert {g["name"]: g["lr_scale"] for g in groups} == expected
    assert all(g["lr"] == pytest.approx(recipe.lr * g["lr_scale"]) for g in groups)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(n for n, p in model.named_parameters() if p.requires_grad)  # each exactly once
    by_group = {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}
    assert all(n.startswith("heads.") for n in by_group.get("heads", []))
    assert all(n.startswith("fusion.") for n in by_group.get("fusion", []))
