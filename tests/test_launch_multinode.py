"""Two "nodes" on loopback: two ``deepspeed --no_ssh --node_rank {0,1}`` launchers built by the
hostfile backend, one rank each, rendezvous into one world of 2 and train the tiny model with
ZeRO-2 to the same per-step losses as a single-node 2-rank run."""

import json
import subprocess
import sys
import threading

import pytest

from avsiam.launch.hostfile import HostfileBackend
from avsiam.launch.local import free_port
from avsiam.launch.spec import LaunchSpec
from avsiam.train.metrics_log import read_jsonl

pytestmark = pytest.mark.slow

RUN = ["batch_size_per_gpu=4", "num_workers=0", "arch.depth=2", "max_steps=3", "zero_stage=2"]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}


def pretrain_args(manifest, out):
    return ["train", "pretrain", "--model", "tiny", "--data", str(manifest), "--output", str(out), *RUN]


def test_two_nodes_train_to_the_losses_of_one_node(staged_single, tmp_path):
    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "avsiam.cli.main", *pretrain_args(staged_single, single), "--nproc", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    two = tmp_path / "two_nodes"
    spec = LaunchSpec.create(pretrain_args(staged_single, two), nodes=2, gpus_per_node=1)
    port = free_port()
    logs: dict[int, list[str]] = {0: [], 1: []}
    codes: dict[int, int] = {}

    def node(rank: int) -> None:
        backend = HostfileBackend(no_ssh=True, node_rank=rank, master_addr="127.0.0.1", master_port=port)
        codes[rank] = backend.run(spec, log_line=logs[rank].append, wall_clock_limit_s=500)

    nodes = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for t in nodes:
        t.start()
    for t in nodes:
        t.join()
    assert codes == {0: 0, 1: 0}, "\n".join(f"--- node {r}\n" + "\n".join(lines[-60:]) for r, lines in logs.items())
    assert (two / "deepspeed_hostfile").read_text() == "node-0 slots=1\nnode-1 slots=1\n"
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    expected, got = losses(single), losses(two)
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"
    print("single-node losses:", expected, "two-node losses:", got)
