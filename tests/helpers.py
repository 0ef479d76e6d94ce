"""Helpers shared by test modules: the ``avsiam`` command in a subprocess, staging a synthetic
dataset with the library, a real MLflow server that a test can stop and start, a model's
weights saved under the published AVSiam names."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from avsiam.data.staging import StagingRequest, stage_dataset
from avsiam.launch.local import free_port


def avsiam(*args, check=True, **kw) -> subprocess.CompletedProcess:
    """Run ``avsiam ARGS`` as users do; with ``check``, fail the test with its output tail."""
    proc = subprocess.run([sys.executable, "-m", "avsiam.cli.main", *map(str, args)], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"avsiam {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def stage_synthetic(ds, out: Path, clips_per_shard: int = 8, workers: int = 1) -> Path:
    """Stage a ``generate_synthetic_dataset`` result into ``out`` with the library's staging
    (shards in this process, or in ``workers`` processes); returns the staged folder."""
    labels = [ds.train_segments_csv, ds.eval_segments_csv] if ds.multi_label else [ds.labels_csv]
    request = StagingRequest(labels=labels, out=out, videos=ds.videos_dir, classes_csv=ds.class_labels_indices_csv,
                             clips_per_shard=clips_per_shard)
    if workers == 1:
        stage_dataset(request)
        return out
    # spawn, not fork: this process holds torch threads, which do not survive a fork.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        stage_dataset(request, map_shards=pool.map)
    return out


SERVER_START_TIMEOUT_S = 120


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=1).ok
    except requests.RequestException:
        return False


class MlflowServer:
    """A real ``mlflow server`` (sqlite backend, proxied artifacts) on ``port``; stop and start
    it again on the same port and database to make an outage."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # The server's job runner (extra worker processes) is not needed for tracking.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        log_path = self.root / "server.log"
        with log_path.open("a") as log:
            self.process = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("mlflow")),
                    "server",
                    "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
                    "--artifacts-destination", str(self.root / "artifacts"),
                    "--host", "127.0.0.1",
                    "--port", str(self.port),
                    "--workers", "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
                # Its own process group, so that stopping it also stops the workers it spawns.
                start_new_session=True,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mlflow server did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


def published_checkpoint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights under the published AVSiam names, with the published extras."""
    arch_depth = len(model.encoder.blocks)
    dim = model.encoder.embed_dim
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}

    def put(published: str, tensor: torch.Tensor) -> None:
        out[f"module.{published}"] = tensor.clone()

    for kind in ("weight", "bias"):
        put(f"vit_base.patch_embed.proj.{kind}", ours[f"encoder.patch_embed.visual.proj.{kind}"])
        put(f"vit_base.patch_embed_a.proj.{kind}", ours[f"encoder.patch_embed.audio.proj.{kind}"])
        put(f"vit_base.norm.{kind}", ours[f"encoder.norm.visual.{kind}"])
        put(f"vit_base.norm_a.{kind}", ours[f"encoder.norm.audio.{kind}"])
        for i in range(arch_depth):
            for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                put(f"vit_base.blocks.{i}.{layer}.{kind}", ours[f"encoder.blocks.{i}.{layer}.{kind}"])
                put(f"my_blocks.{i}.{layer}.{kind}", ours[f"encoder.blocks.{i}.{layer}.{kind}"])
            for n in (1, 2):
                put(f"vit_base.blocks.{i}.norm{n}_a.{kind}", ours[f"encoder.blocks.{i}.norm{n}.audio.{kind}"])
                put(f"vit_base.blocks.{i}.norm{n}_v.{kind}", ours[f"encoder.blocks.{i}.norm{n}.visual.{kind}"])
                put(f"vit_base.blocks.{i}.norm{n}.{kind}", torch.randn(dim))
        for j in range(len(model.fusion)):
            for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                put(f"mm_layer_{j + 1}.{layer}.{kind}", ours[f"fusion.{j}.{layer}.{kind}"])
            for n in (1, 2):
                put(f"mm_layer_{j + 1}.norm{n}_a.{kind}", ours[f"fusion.{j}.norm{n}.{kind}"])
                put(f"mm_layer_{j + 1}.norm{n}_v.{kind}", torch.randn(dim))
                put(f"mm_layer_{j + 1}.norm{n}.{kind}", torch.randn(dim))
        for published, head in (("mlp_head", "visual"), ("mlp_head_a", "audio"), ("mlp_head_mm", "multimodal")):
            for index in (0, 1):
                put(f"{published}.{index}.{kind}", ours[f"heads.{head}.{index}.{kind}"])
    put("vit_base.cls_token", torch.randn(1, 1, dim))
    put("vit_base.pos_embed", torch.cat([torch.randn(1, 1, dim), ours["encoder.pos_embed.visual"]], dim=1))
    put("vit_base.pos_embed_a", ours["encoder.pos_embed.audio"])
    extras = [
        "vit_base.head.weight", "my_patch_embed.proj.weight", "my_patch_embed_a.proj.weight",
        "ast_base.blocks.0.attn.qkv.weight", "decoder_embed.weight", "decoder_pos_embed_a", "decoder_pred_v.bias",
        "mask_token", "mlp_head_mm_v2.1.weight",
    ]
    for name in extras:
        put(name, torch.randn(3))
    return out
