"""Symmetric InfoNCE and the gradient-carrying all-gather over ranks."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from avsiam.launch.local import free_port
from avsiam.model.contrastive import gather_with_grad, info_nce


def test_info_nce_matches_the_symmetric_cross_entropy() -> None:
    a, v = torch.randn(5, 8), torch.randn(5, 8)
    loss, accuracy = info_nce(a, v, 0.05)
    logits = F.normalize(a, dim=-1) @ F.normalize(v, dim=-1).T / 0.05
    expected = -(logits.log_softmax(dim=0).diag().mean() + logits.log_softmax(dim=1).diag().mean()) / 2
    torch.testing.assert_close(loss, expected)
    assert info_nce(a, a, 0.05)[1] == 1.0


WORLD, LOCAL_BATCH = 2, 2


def _rank_gradient(rank: int, port: int, features: torch.Tensor) -> tuple[float, torch.Tensor]:
    """This rank's slice of the global batch through gather + InfoNCE: (loss, slice gradient)."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        local = features[:, rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH].clone().requires_grad_(True)
        loss, _ = info_nce(gather_with_grad(local[0]), gather_with_grad(local[1]), 0.05)
        loss.backward()
        return loss.item(), local.grad
    finally:
        dist.destroy_process_group()


def _second_rank(port: int, features: torch.Tensor, queue) -> None:
    loss, grad = _rank_gradient(1, port, features)
    queue.put((loss, grad.tolist()))  # plain lists: shared tensors would not outlive this process


def test_global_batch_gather_gives_the_exact_gradient_after_ddp_averaging() -> None:
    """Rank 0 is this process, rank 1 a spawned one (forking after torch's thread pools start
    can deadlock)."""
    features = torch.randn(2, WORLD * LOCAL_BATCH, 6)  # (audio, visual) x global batch x dim
    reference = features.clone().requires_grad_(True)
    expected_loss, _ = info_nce(reference[0], reference[1], 0.05)
    expected_loss.backward()
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_second_rank, args=(port, features, queue))
    child.start()
    try:
        results = [_rank_gradient(0, port, features)]
        loss, grad = queue.get(timeout=60)
        results.append((loss, torch.tensor(grad)))
    finally:
        child.join(timeout=30)
    for rank, (loss, grad) in enumerate(results):
        assert loss == pytest.approx(expected_loss.item(), rel=1e-5)
        # each rank's gradient is world x the true one; DDP's averaging over ranks divides it out
        torch.testing.assert_close(grad / WORLD, reference.grad[:, rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH])
