"""``avsiam launch``: what each backend renders (golden files), safe quoting, and the Slurm and
Kubernetes job life cycles against fake ``sbatch``/``squeue``/``sacct``/``scancel`` and
``kubectl`` executables on PATH, so the real subprocess path runs.

Regenerate the golden files (tests/golden/ and the rendered examples in infra/) with
``AVSIAM_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_launch.py``.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from avsiam.cli import launch_command
from avsiam.launch.backends import LocalBackend, launch, make_backend
from avsiam.launch.hostfile import HostfileBackend
from avsiam.launch.kubernetes import KubernetesBackend
from avsiam.launch.local import free_port, rank_environments
from avsiam.launch.slurm import SlurmBackend
from avsiam.launch.spec import LaunchSpec, job_name_for
from avsiam.launch.supervisor import WallClockLimitExceeded, run_supervised

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
VENV_BIN = str(Path(sys.executable).parent)

HUGE_PRETRAIN = ["train", "pretrain", "--model", "huge", "--data", "/data/as2m", "--output", "/runs/huge"]
HUGE_FINETUNE = ["train", "finetune", "--model", "huge", "--recipe", "finetune_as2m", "--init", "/runs/huge/weights.safetensors",
                 "--data", "/data/as2m", "--output", "/runs/huge-ft-as2m"]
SITE_ENV = {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000", "NCCL_DEBUG": "WARN"}
V100_PARTITION = dict(partition="v100", account="avsiam", time_limit="72:00:00", env_file="/shared/avsiam/site.env",
                      cpus_per_task=40)


def check_golden(path: Path, text: str) -> None:
    if os.environ.get("AVSIAM_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.is_file(), f"{path} is missing: AVSIAM_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_launch.py writes it"
    assert text == path.read_text(), f"{path} differs; if the change is intended, regenerate with AVSIAM_UPDATE_GOLDEN=1"


def avsiam_launch(*argv: str) -> int:
    """``avsiam launch ...`` through the subcommand's own register(), as main.py wires it."""
    parser = argparse.ArgumentParser(prog="avsiam")
    launch_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["launch", *argv])
    return args.handler(args)


# -- rendering: golden files ------------------------------------------------------------------

def test_sbatch_script_for_huge_pretraining_on_8x8_v100():
    spec = LaunchSpec.create(HUGE_PRETRAIN, nodes=8, gpus_per_node=8, env=SITE_ENV)
    check_golden(GOLDEN / "slurm_pretrain_huge_8x8.sbatch", SlurmBackend(**V100_PARTITION).render(spec))


@pytest.mark.parametrize("api", ["trainjob", "pytorchjob"])
def test_kubernetes_manifests_for_huge_pretraining_on_8x8(api):
    spec = LaunchSpec.create(HUGE_PRETRAIN, nodes=8, gpus_per_node=8, env=SITE_ENV)
    text = KubernetesBackend(k8s_api=api, image="registry.internal/avsiam:cu126", cpu="64", memory="480Gi").render(spec)
    check_golden(GOLDEN / f"{api}_pretrain_huge_8x8.yaml", text)
    manifest = yaml.safe_load(text)
    if api == "trainjob":
        trainer = manifest["spec"]["trainer"]
        assert (trainer["numNodes"], trainer["numProcPerNode"]) == (8, 8)
        assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
        assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "avsiam"
        assert trainer["command"] + trainer["args"] == ["torchrun", "--module", "avsiam.cli.main", *HUGE_PRETRAIN]
    else:
        replicas = manifest["spec"]["pytorchReplicaSpecs"]
        assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 7)
        assert manifest["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == 8
        assert "elasticPolicy" not in manifest["spec"]
        pod = replicas["Worker"]["template"]["spec"]
        assert pod["schedulerName"] == "volcano" and pod["containers"][0]["name"] == "pytorch"


def test_dry_run_of_the_cli_prints_the_sbatch_script_for_8x8(capsys):
    assert avsiam_launch("--backend", "slurm", "--nodes", "8", "--gpus-per-node", "8", "--dry-run", "--", *HUGE_PRETRAIN) == 0
    out = capsys.readouterr().out
    check_golden(GOLDEN / "cli_dry_run_slurm_8x8.txt", out)
    assert out.startswith("#!/bin/bash\n") and "#SBATCH --nodes=8\n" in out and "--nproc_per_node=8" in out


def test_hostfile_argv_for_ssh_and_per_node_launches(tmp_path):
    spec = LaunchSpec.create(HUGE_PRETRAIN, nodes=8, gpus_per_node=8)
    pdsh = HostfileBackend(hostfile=Path("/shared/avsiam/hostfile"), master_addr="gpu-node-01")
    node3 = HostfileBackend(no_ssh=True, node_rank=3, master_addr="gpu-node-01", master_port=29600)
    text = pdsh.render(spec) + node3.render(spec)
    check_golden(GOLDEN / "hostfile_argv.txt", text.replace(VENV_BIN, "$VENV_BIN"))
    assert node3.command(spec)[-len(HUGE_PRETRAIN) - 3:] == ["--no_local_rank", "--module", "avsiam.cli.main", *HUGE_PRETRAIN]


def test_the_infra_examples_are_what_the_backends_render():
    """The examples in infra/ are rendered by the code, so they cannot drift from it."""
    pretrain = LaunchSpec.create(HUGE_PRETRAIN, nodes=8, gpus_per_node=8, env=SITE_ENV)
    finetune = LaunchSpec.create(HUGE_FINETUNE, nodes=1, gpus_per_node=8, env=SITE_ENV)
    a5000 = dict(V100_PARTITION, partition="a5000", time_limit="24:00:00", cpus_per_task=32)
    check_golden(ROOT / "infra/slurm/pretrain-huge-8x8-v100.sbatch", SlurmBackend(**V100_PARTITION).render(pretrain))
    check_golden(ROOT / "infra/slurm/finetune-huge-1x8-a5000.sbatch", SlurmBackend(**a5000).render(finetune))
    for api in ("trainjob", "pytorchjob"):
        k8s = KubernetesBackend(k8s_api=api, image="registry.internal/avsiam:cu126", cpu="64", memory="480Gi")
        check_golden(ROOT / f"infra/k8s/{api}-pretrain-huge-8x8.yaml", k8s.render(pretrain))


# -- quoting --------------------------------------------------------------------------------

NASTY = ["train", "pretrain", "--model", "tiny", "--data", "/data/my data/manifest.json", "--output", "/runs/it's a \"run\"",
         "note=$(touch /tmp/pwned) `id` ; rm -rf / & echo $HOME", "multi\nline", "glob=*", ""]


def fake_executable(folder: Path, name: str, body: str) -> None:
    """A tiny Python program called ``name`` in ``folder`` (which the test puts on PATH)."""
    path = folder / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)


def test_sbatch_script_passes_every_value_through_unchanged(tmp_path):
    """Run the rendered script itself under bash with fake scontrol/srun/torchrun: torchrun
    must receive exactly the avsiam arguments, and the job exactly the environment values."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_executable(bin_dir, "scontrol", "print('gpu-node-07')\nprint('gpu-node-08')\n")
    fake_executable(bin_dir, "srun", """
        import json, os, sys
        args = sys.argv[1:]
        json.dump(args, open(os.environ["RECORD"] + ".srun", "w"))
        while args[0].startswith("--"):
            args.pop(0)
        os.execvp(args[0], args)
    """)
    fake_executable(bin_dir, "torchrun", """
        import json, os, sys
        env = {k: os.environ[k] for k in ("MASTER_ADDR", "WEIRD", "FROM_FILE")}
        json.dump({"argv": sys.argv[1:], "env": env}, open(os.environ["RECORD"], "w"))
    """)
    env_file = tmp_path / "site env"
    env_file.write_text("FROM_FILE='a b'\n")
    out = tmp_path / "runs" / "my run"  # it goes into #SBATCH --output too, where quotes are refused
    nasty = [*NASTY[:7], str(out), *NASTY[8:]]
    spec = LaunchSpec.create(nasty, nodes=2, gpus_per_node=4, env={"WEIRD": "x'y\"z $HOME `id`\nnext"})
    script = SlurmBackend(env_file=str(env_file), job_name="avsiam test").render(spec)
    record = tmp_path / "record.json"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "77", "SLURM_CPUS_ON_NODE": "16", "SLURM_JOB_NODELIST": "gpu-node-[07-08]"}
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got = json.loads(record.read_text())
    assert got["argv"] == ["--nnodes=2", "--nproc_per_node=4", "--rdzv_id=77", "--rdzv_backend=c10d",
                           "--rdzv_endpoint=gpu-node-07:29500", "--module", "avsiam.cli.main", *nasty]
    assert got["env"] == {"MASTER_ADDR": "gpu-node-07", "WEIRD": "x'y\"z $HOME `id`\nnext", "FROM_FILE": "a b"}
    srun = json.loads(Path(f"{record}.srun").read_text())
    assert srun[:3] == ["--ntasks-per-node=1", "--cpus-per-task=16", "--kill-on-bad-exit=1"]
    assert "#SBATCH --job-name='avsiam test'\n" in script
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize("options, output", [
    ({"job_name": "x\n#SBATCH --qos=high"}, "/runs/a"), ({"partition": "v100'"}, "/runs/a"), ({"account": 'a"b'}, "/runs/a"),
    ({}, "/runs/it's"),
])
def test_values_that_cannot_go_into_an_sbatch_directive_are_refused(options, output):
    spec = LaunchSpec.create([*HUGE_PRETRAIN[:-1], output])
    with pytest.raises(ValueError, match="cannot go into an #SBATCH line"):
        SlurmBackend(**options).render(spec)


def test_kubernetes_manifest_keeps_every_value_intact():
    spec = LaunchSpec.create(NASTY, env={"WEIRD": "x'y\"z: {a: [1]}\nnext"})
    manifest = yaml.safe_load(KubernetesBackend(job_name="avsiam-test").render(spec))
    assert manifest["spec"]["trainer"]["args"] == NASTY
    assert manifest["spec"]["trainer"]["env"] == [{"name": "WEIRD", "value": "x'y\"z: {a: [1]}\nnext"}]


@pytest.mark.parametrize("api", ["trainjob", "pytorchjob"])
def test_kubernetes_jobs_take_credentials_from_a_secret_never_from_values(api):
    spec = LaunchSpec.create(HUGE_PRETRAIN, env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    text = KubernetesBackend(k8s_api=api, job_name="avsiam-test", credentials_secret="avsiam-credentials").render(spec)
    manifest = yaml.safe_load(text)
    env = (manifest["spec"]["trainer"]["env"] if api == "trainjob"
           else manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"])
    assert env[0] == {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"}
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env[1:]}
    assert set(refs) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_USERNAME",
                         "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"}
    assert all(r == {"name": "avsiam-credentials", "key": k, "optional": True} for k, r in refs.items())


def test_hostfile_argv_is_a_list_and_its_rendering_round_trips():
    spec = LaunchSpec.create(NASTY, nodes=2)
    backend = HostfileBackend(hostfile=Path("/shared/hosts file"))
    assert shlex.split(backend.render(spec)) == backend.command(spec)
    assert backend.command(spec)[-len(NASTY):] == NASTY


# -- options and errors ---------------------------------------------------------------------

def test_options_of_another_backend_and_bad_values_are_clear_errors(capsys):
    assert avsiam_launch("--backend", "local", "--partition", "v100", "--dry-run", "--", *HUGE_PRETRAIN) == 2
    assert "--partition does not apply to the local backend" in capsys.readouterr().err
    assert avsiam_launch("--backend", "local", "--nodes", "2", "--dry-run", "--", *HUGE_PRETRAIN) == 2
    assert "the local backend runs on this node only" in capsys.readouterr().err
    assert avsiam_launch("--backend", "slurm", "--dry-run", "--", "train", "pretrain") == 2
    assert "pass --output" in capsys.readouterr().err
    assert avsiam_launch("--backend", "hostfile", "--dry-run", "--", *HUGE_PRETRAIN) == 2
    assert "needs --hostfile" in capsys.readouterr().err
    assert avsiam_launch("--backend", "hostfile", "--no-ssh", "--node-rank", "2", "--master-addr", "a", "--nodes", "2",
                         "--dry-run", "--", *HUGE_PRETRAIN) == 2
    assert "--node-rank 2 is outside 0..1" in capsys.readouterr().err
    assert avsiam_launch("--backend", "kubernetes", "--env", "1BAD=x", "--dry-run", "--", *HUGE_PRETRAIN) == 2
    assert "not an environment variable name" in capsys.readouterr().err
    assert avsiam_launch("--backend", "local", "--dry-run") == 2
    assert "nothing to launch" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("ray")


def test_backend_options_given_as_text_take_their_field_types():
    """The flow's launcher options come from a form or a YAML profile as strings."""
    slurm = make_backend("slurm", cpus_per_task="40", poll_interval_s="0.5", template="/site/train.sbatch.j2")
    assert (slurm.cpus_per_task, slurm.poll_interval_s, slurm.template) == (40, 0.5, Path("/site/train.sbatch.j2"))
    node = make_backend("hostfile", no_ssh="true", node_rank="1", master_addr="gpu-01", master_port="29600")
    assert (node.no_ssh, node.node_rank, node.master_port) == (True, 1, 29600)
    with pytest.raises(ValueError, match="--cpus-per-task: 'many' is not a number"):
        make_backend("slurm", cpus_per_task="many")


def test_local_backend_starts_the_ranks_itself_or_through_deepspeed_or_torchrun(capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert avsiam_launch("--backend", "local", "--gpus-per-node", "2", "--master-port", "29911", "--dry-run", "--",
                         *HUGE_PRETRAIN) == 0
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert [shlex.split(line) for line in capsys.readouterr().out.splitlines()] == [
        [f"RANK={rank}", f"LOCAL_RANK={rank}", "WORLD_SIZE=2", "LOCAL_WORLD_SIZE=2", "LOCAL_SIZE=2", "MASTER_ADDR=127.0.0.1",
         "MASTER_PORT=29911", f"OMP_NUM_THREADS={threads}", sys.executable, "-u", "-m", "avsiam.cli.main", *HUGE_PRETRAIN]
        for rank in (0, 1)]
    spec = LaunchSpec.create(HUGE_PRETRAIN, gpus_per_node=2, env={"OMP_NUM_THREADS": "6"})
    assert all("OMP_NUM_THREADS" not in env for _, env in LocalBackend().processes(spec))  # the spec's 6 stays
    ((argv, extra),) = LocalBackend(launcher="deepspeed", master_port=29911).processes(spec)
    assert extra == {} and argv[:5] == [sys.executable, "-u", "-m", "deepspeed.launcher.launch", argv[4]]
    assert argv[5:] == ["--master_addr=127.0.0.1", "--master_port=29911", "--no_local_rank", "--module", "avsiam.cli.main",
                        *HUGE_PRETRAIN]
    # --world_info (this host's devices) exactly as the `deepspeed` command encodes it for its launcher.
    from deepspeed.launcher.runner import encode_world_info

    assert argv[4] == f"--world_info={encode_world_info({'localhost': [0, 1]})}"
    assert LocalBackend(launcher="torchrun", master_port=29912).processes(spec) == [([
        f"{VENV_BIN}/torchrun", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", "29912",
        "--module", "avsiam.cli.main", *HUGE_PRETRAIN], {})]
    # One process without a launcher: how the flow runs evaluations, through the same launch().
    one = LaunchSpec.create(HUGE_PRETRAIN)
    assert LocalBackend(launcher="python").processes(one) == [([sys.executable, "-m", "avsiam.cli.main", *HUGE_PRETRAIN], {})]
    with pytest.raises(ValueError, match="runs one process"):
        LocalBackend(launcher="python").processes(spec)


# Each rank writes its own file: ranks share the launcher's stdout, where their lines can interleave.
PROBE = textwrap.dedent("""
    import json, os, sys
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")
    with open(os.path.join(sys.argv[1], f"rank-{os.environ['RANK']}.json"), "w") as f:
        json.dump({name: os.environ.get(name) for name in names}, f)
""")


def probed(commands, out: Path) -> dict[str, dict]:
    out.mkdir()
    lines = []
    assert run_supervised([(argv + [str(out)], env) for argv, env in commands], log_line=lines.append) == 0, lines
    seen = [json.loads(path.read_text()) for path in sorted(out.glob("rank-*.json"))]
    return {env["RANK"]: env for env in seen}


@pytest.mark.slow
def test_ranks_started_directly_get_the_environment_torchrun_and_deepspeed_give_them(tmp_path):
    """The oracles: torch's and DeepSpeed's launchers, each running the same probe on 2 ranks."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    port = free_port()
    direct = probed([([sys.executable, str(script)], {**os.environ, **env}) for env in rank_environments(2, port, os.environ)],
                    tmp_path / "direct")
    torchrun = probed([([f"{VENV_BIN}/torchrun", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                         "--master_port", str(port), str(script)], None)], tmp_path / "torchrun")
    world_info = LocalBackend(launcher="deepspeed", master_port=port).processes(LaunchSpec.create(["x"], gpus_per_node=2))[0][0][4]
    deepspeed = probed([([sys.executable, "-m", "deepspeed.launcher.launch", world_info, "--master_addr=127.0.0.1",
                          f"--master_port={port}", "--no_local_rank", str(script)], None)], tmp_path / "deepspeed")
    assert set(direct) == set(torchrun) == set(deepspeed) == {"0", "1"}
    for rank in direct:
        assert direct[rank] == {**torchrun[rank], "LOCAL_SIZE": "2"}
        assert direct[rank] == {**deepspeed[rank], "LOCAL_WORLD_SIZE": "2"}


def test_the_first_process_to_fail_ends_the_others_with_everything_they_started(tmp_path):
    """A rank that fails (a diverged run's status 3) stops its peers, blocked in a collective
    here played by a sleep, and their children (DataLoader workers), and its status is returned."""
    pids = tmp_path / "pids"
    peer = textwrap.dedent(f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        with open({str(pids)!r}, "a") as f:
            f.write(f"{{os.getpid()}} {{child.pid}}\\n")
        time.sleep(300)
    """)
    failing = "import os, sys, time\nwhile not os.path.exists(%r): time.sleep(0.05)\nprint('rank 1 failed', flush=True)\nsys.exit(3)" % str(pids)
    lines = []
    assert run_supervised([([sys.executable, "-c", peer], None), ([sys.executable, "-c", failing], None)],
                          log_line=lines.append, grace_seconds=5) == 3
    assert "rank 1 failed" in lines
    for pid in map(int, pids.read_text().split()):
        with pytest.raises(ProcessLookupError):  # gone (the direct child is reaped; the worker's orphan reaped by init)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.05)
    ok = []
    assert run_supervised([([sys.executable, "-c", f"print({rank})"], None) for rank in range(2)], log_line=ok.append) == 0
    assert sorted(ok) == ["0", "1"]


def test_a_finished_process_stops_its_loaders_workers_and_flushes_before_it_exits():
    """A finished rank skips the interpreter's teardown; a DataLoader whose persistent workers
    are only reachable through a reference cycle still has them stopped (not left alive, to
    their 5 s parent watchdog), and what it printed comes out."""
    child = textwrap.dedent("""
        import multiprocessing, sys
        from torch.utils.data import DataLoader
        from avsiam.launch.distributed import exit_finished_process
        loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
        next(iter(loader))
        loader.itself = loader  # a cycle: its workers outlive the name
        del loader
        sys.stdout.write(" ".join(str(p.pid) for p in multiprocessing.active_children()))
        exit_finished_process()
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    workers = [int(pid) for pid in done.stdout.split()]
    assert len(workers) == 2
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["direct", "torchrun"])
def test_local_backend_runs_its_command_supervised(launcher):
    """The local path end to end with a quick command: 2 ranks of `avsiam presets`."""
    one, lines = [], []
    assert launch("local", ["presets", "--model", "tiny", "--json"], launcher="python", log_line=one.append) == 0
    code = launch("local", ["presets", "--model", "tiny", "--json"], gpus_per_node=2, launcher=launcher, log_line=lines.append)
    tiny = '"model": "tiny"'
    assert code == 0 and sum(tiny in line for line in lines) == 2 * sum(tiny in line for line in one) > 0


def test_job_names_are_stable_rfc1035_labels():
    name = job_name_for(Path("/runs/Huge_AS2M run"))
    assert name == job_name_for(Path("/runs/Huge_AS2M run")) != job_name_for(Path("/other/Huge_AS2M run"))
    assert name.startswith("avsiam-huge-as2m-run-") and len(name) <= 63


# -- Slurm life cycle against fake executables ----------------------------------------------

@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Fake sbatch/squeue/sacct/scancel. ``squeue`` prints the first line of ``states`` and drops
    it while more remain (the last line sticks; an empty line means "left the queue");
    ``sacct`` prints ``sacct``; ``scancel`` marks the job cancelled. Every call is logged."""
    state, bin_dir = tmp_path / "fake_slurm", tmp_path / "fake_slurm" / "bin"
    bin_dir.mkdir(parents=True)

    def fake(name, body):
        log_call = (f"import json, pathlib, sys\nstate = pathlib.Path({str(state)!r})\n"
                    f"with (state / 'calls.jsonl').open('a') as f:\n    f.write(json.dumps([{name!r}, *sys.argv[1:]]) + '\\n')\n")
        fake_executable(bin_dir, name, log_call + textwrap.dedent(body))

    fake("sbatch", """
        import re
        script = pathlib.Path(sys.argv[-1]).read_text()
        job_id = str(4242 + len(list(state.glob("submitted-*"))))
        (state / f"submitted-{job_id}").write_text(script)
        log = re.search(r"^#SBATCH --output=(.*)$", script, re.M).group(1).replace("%j", job_id)
        pathlib.Path(log).write_text("job started\\nstep 1 loss 5.07\\n")
        print(f"{job_id};cluster")
    """)
    fake("squeue", """
        lines = (state / "states").read_text().split("\\n")
        print(lines[0])
        if len(lines) > 1:
            (state / "states").write_text("\\n".join(lines[1:]))
    """)
    fake("sacct", "print((state / 'sacct').read_text())\n")
    fake("scancel", """
        (state / "states").write_text("")
        (state / "sacct").write_text("CANCELLED by 0|0:15")
    """)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    class Fake:
        dir = state

        @staticmethod
        def script(states, sacct="COMPLETED|0:0"):
            (state / "states").write_text("\n".join(states))
            (state / "sacct").write_text(sacct)

        @staticmethod
        def calls(command=None):
            path = state / "calls.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
            return rows if command is None else [r for r in rows if r[0] == command]

    return Fake


def slurm_spec(tmp_path, *extra):
    return LaunchSpec.create([*HUGE_PRETRAIN[:-1], str(tmp_path / "run"), *extra], nodes=2, gpus_per_node=8)


def test_slurm_submits_polls_streams_the_log_and_returns_the_exit_code(fake_slurm, tmp_path):
    fake_slurm.script(["PENDING", "RUNNING", "RUNNING", ""])
    lines = []
    spec = slurm_spec(tmp_path)
    assert SlurmBackend(poll_interval_s=0.01).run(spec, log_line=lines.append) == 0
    run = tmp_path / "run"
    assert fake_slurm.calls("sbatch") == [["sbatch", "--parsable", str(run / "slurm_job.sbatch")]]
    assert (fake_slurm.dir / "submitted-4242").read_text() == (run / "slurm_job.sbatch").read_text()
    assert json.loads((run / "slurm_job.json").read_text())["job_id"] == "4242"
    assert [line for line in lines if line.startswith("slurm job 4242:")] == [
        "slurm job 4242: PENDING", "slurm job 4242: RUNNING", "slurm job 4242: COMPLETED"]
    assert "step 1 loss 5.07" in lines and "submitted slurm job 4242" in lines[0]
    sacct = ["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", "4242", "--format", "State,ExitCode"]
    assert sacct in fake_slurm.calls()


@pytest.mark.parametrize("sacct, code", [("FAILED|3:0", 3), ("TIMEOUT|0:0", 1), ("OUT_OF_MEMORY|0:125", 1), ("NODE_FAIL|1:0", 1)])
def test_slurm_failures_give_a_nonzero_exit_code(fake_slurm, tmp_path, sacct, code):
    fake_slurm.script(["RUNNING", ""], sacct)
    assert SlurmBackend(poll_interval_s=0.01).run(slurm_spec(tmp_path), log_line=lambda _: None) == code


def test_slurm_reattaches_to_a_running_job_instead_of_submitting_again(fake_slurm, tmp_path):
    spec, backend = slurm_spec(tmp_path), SlurmBackend(poll_interval_s=0.01)
    fake_slurm.script(["RUNNING"])
    backend.submit(spec, backend.render(spec), lambda _: None)  # an earlier attempt, then its worker died
    fake_slurm.script(["RUNNING", "RUNNING", ""])
    lines = []
    assert backend.run(spec, log_line=lines.append) == 0
    assert len(fake_slurm.calls("sbatch")) == 1
    assert "re-attaching to slurm job 4242 (RUNNING)" in lines


def test_slurm_submits_a_new_job_when_the_recorded_one_has_ended(fake_slurm, tmp_path):
    spec, backend = slurm_spec(tmp_path), SlurmBackend(poll_interval_s=0.01)
    fake_slurm.script([""], "FAILED|1:0")
    backend.submit(spec, backend.render(spec), lambda _: None)
    assert backend.run(spec, log_line=lambda _: None) == 1  # job 4242 failed, so 4243 was submitted: also FAILED here
    assert len(fake_slurm.calls("sbatch")) == 2
    assert json.loads((tmp_path / "run" / "slurm_job.json").read_text())["job_id"] == "4243"


def test_slurm_refuses_to_reattach_to_a_job_running_another_script(fake_slurm, tmp_path):
    backend = SlurmBackend(poll_interval_s=0.01)
    fake_slurm.script(["RUNNING"])
    backend.submit(slurm_spec(tmp_path), backend.render(slurm_spec(tmp_path)), lambda _: None)
    changed = slurm_spec(tmp_path, "lr=0.1")
    with pytest.raises(RuntimeError, match="runs a different script"):
        backend.run(changed, log_line=lambda _: None)
    assert len(fake_slurm.calls("sbatch")) == 1 and not fake_slurm.calls("scancel")


def test_slurm_wall_clock_limit_cancels_the_job(fake_slurm, tmp_path):
    fake_slurm.script(["RUNNING"])
    with pytest.raises(WallClockLimitExceeded):
        SlurmBackend(poll_interval_s=0.01).run(slurm_spec(tmp_path), log_line=lambda _: None, wall_clock_limit_s=0.2)
    assert fake_slurm.calls("scancel") == [["scancel", "4242"]]


def test_slurm_cancel_of_the_recorded_job(fake_slurm, tmp_path):
    """What a Prefect on_cancellation hook calls when the follower runs in a worker thread."""
    spec, backend = slurm_spec(tmp_path), SlurmBackend()
    fake_slurm.script(["PENDING"])
    backend.submit(spec, backend.render(spec), lambda _: None)
    backend.cancel(spec, log_line=lambda _: None)
    assert fake_slurm.calls("scancel") == [["scancel", "4242"]]


FOLLOWER = """
import sys
from avsiam.launch.backends import launch
sys.exit(launch({backend!r}, {args!r}, nodes=2, gpus_per_node=8, poll_interval_s=0.05, **{options!r}))
"""


def follow_then_signal(tmp_path, backend, args, started: Path, signum, options=None):
    """Run a follower in its own process, wait until it submitted, then send it ``signum``."""
    proc = subprocess.Popen([sys.executable, "-c", FOLLOWER.format(backend=backend, args=args, options=options or {})],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not started.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the follower never submitted"
        time.sleep(0.05)
    time.sleep(0.3)  # let it reach its polling loop
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_follower_scancels_the_job(fake_slurm, tmp_path, signum):
    fake_slurm.script(["RUNNING"])
    state_file = tmp_path / "run" / "slurm_job.json"
    code, out = follow_then_signal(tmp_path, "slurm", slurm_spec(tmp_path).entry_args, state_file, signum)
    assert code != 0 and "cancelling (KeyboardInterrupt" in out
    assert fake_slurm.calls("scancel") == [["scancel", "4242"]]


# -- Kubernetes life cycle against a fake kubectl -------------------------------------------

@pytest.fixture
def fake_kubectl(tmp_path, monkeypatch):
    """A fake kubectl holding one object in ``object.json``. ``get`` adds the next status
    conditions from ``conditions.jsonl`` (the last line sticks)."""
    state, bin_dir = tmp_path / "fake_k8s", tmp_path / "fake_k8s" / "bin"
    bin_dir.mkdir(parents=True)
    fake_executable(bin_dir, "kubectl", f"""
        import json, pathlib, sys, yaml
        state = pathlib.Path({str(state)!r})
        args = sys.argv[1:]
        with (state / "calls.jsonl").open("a") as f:
            f.write(json.dumps(args) + "\\n")
        obj_path = state / "object.json"
        if args[0] == "apply":
            obj = yaml.safe_load(sys.stdin.read())
            obj_path.write_text(json.dumps(obj))
            print(f"{{obj['kind'].lower()}}/{{obj['metadata']['name']}} created")
        elif args[0] == "get":
            if not obj_path.exists():
                sys.exit(f'Error from server (NotFound): "{{args[2]}}" not found')
            obj = json.loads(obj_path.read_text())
            queue = (state / "conditions.jsonl").read_text().splitlines()
            obj["status"] = {{"conditions": json.loads(queue[0])}}
            if len(queue) > 1:
                (state / "conditions.jsonl").write_text("\\n".join(queue[1:]))
            print(json.dumps(obj))
        elif args[0] == "delete":
            obj_path.unlink(missing_ok=True)
    """)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    class Fake:
        dir = state

        @staticmethod
        def script(*condition_types):
            rows = [[{"type": t, "status": "True"}] if t else [] for t in condition_types]
            (state / "conditions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

        @staticmethod
        def calls(verb=None):
            rows = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
            return rows if verb is None else [r for r in rows if r[0] == verb]

    return Fake


def k8s_spec(tmp_path):
    return LaunchSpec.create([*HUGE_PRETRAIN[:-1], str(tmp_path / "run")], nodes=2, gpus_per_node=8)


@pytest.mark.parametrize("api, conditions, code", [
    ("trainjob", ["", "Created", "Complete"], 0),
    ("pytorchjob", ["Created", "Running", "Failed"], 1),
    ("pytorchjob", ["Running", "Succeeded"], 0),
])
def test_kubernetes_applies_then_follows_to_the_end(fake_kubectl, tmp_path, api, conditions, code):
    fake_kubectl.script(*conditions)
    spec, backend = k8s_spec(tmp_path), KubernetesBackend(k8s_api=api, poll_interval_s=0.01)
    lines = []
    assert backend.run(spec, log_line=lines.append) == code
    assert json.loads((fake_kubectl.dir / "object.json").read_text()) == backend.manifest(spec)
    resource = {"trainjob": "trainjobs.trainer.kubeflow.org", "pytorchjob": "pytorchjobs.kubeflow.org"}[api]
    name = backend.name_for(spec)
    assert fake_kubectl.calls("apply") == [["apply", "--filename", "-"]]
    assert ["get", resource, name, "--namespace", "avsiam", "--output", "json"] in fake_kubectl.calls()
    assert f"{api} {name}: {conditions[-1]}" in lines


def test_kubernetes_reattaches_replaces_or_refuses_an_existing_job(fake_kubectl, tmp_path):
    spec, backend = k8s_spec(tmp_path), KubernetesBackend(poll_interval_s=0.01)
    (fake_kubectl.dir / "object.json").write_text(json.dumps(backend.manifest(spec)))
    fake_kubectl.script("Running", "Running", "Complete")
    lines = []
    assert backend.run(spec, log_line=lines.append) == 0
    assert not fake_kubectl.calls("apply") and f"re-attaching to trainjob {backend.name_for(spec)} (Running)" in lines

    fake_kubectl.script("Failed", "", "Complete")  # it ended earlier: delete it, apply it again
    assert backend.run(spec, log_line=lambda _: None) == 0
    assert len(fake_kubectl.calls("delete")) == 1 and len(fake_kubectl.calls("apply")) == 1

    fake_kubectl.script("Running")
    other = KubernetesBackend(image="avsiam:other", poll_interval_s=0.01)
    with pytest.raises(RuntimeError, match="runs a different spec"):
        other.run(spec, log_line=lambda _: None)


def test_a_signal_to_the_follower_deletes_the_kubernetes_job(fake_kubectl, tmp_path):
    fake_kubectl.script("Running")
    spec = k8s_spec(tmp_path)
    started = fake_kubectl.dir / "object.json"
    code, out = follow_then_signal(tmp_path, "kubernetes", spec.entry_args, started, signal.SIGTERM, {"k8s_api": "pytorchjob"})
    assert code != 0 and "cancelling" in out
    name = KubernetesBackend().name_for(spec)
    assert fake_kubectl.calls("delete") == [["delete", "pytorchjobs.kubeflow.org", name, "--namespace", "avsiam",
                                             "--ignore-not-found", "--wait=false"]]
    assert not started.exists()


# -- infra ----------------------------------------------------------------------------------

def test_compose_stack_is_complete_and_its_variables_are_defined():
    """What `docker compose config` would check where the compose plugin is missing (here)."""
    compose_dir = ROOT / "infra" / "compose"
    text = (compose_dir / "docker-compose.yml").read_text()
    example = dict(line.split("=", 1) for line in (compose_dir / ".env.example").read_text().splitlines()
                   if "=" in line and not line.startswith("#"))
    used = set(re.findall(r"\$\{([A-Z0-9_]+)\}", text))
    assert used <= example.keys(), f"not in .env.example: {sorted(used - example.keys())}"
    services = yaml.safe_load(re.sub(r"\$\{([A-Z0-9_]+)\}", lambda m: example[m.group(1)], text))["services"]
    assert {"prefect-db", "prefect-server", "mlflow-db", "mlflow", "s3", "create-buckets", "prefect-worker"} <= services.keys()
    for name, service in services.items():
        assert service.get("image") or service.get("build"), name
        if "image" in service:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), f"{name}: pin the image"
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        if "build" in service:
            assert (compose_dir / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
    mlflow = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri postgresql://" in mlflow and "--artifacts-destination s3://mlflow-artifacts" in mlflow
    assert "--host 0.0.0.0" in mlflow and "--allowed-hosts mlflow,mlflow:5000,localhost" in mlflow
    worker = " ".join(services["prefect-worker"]["command"])
    assert "prefect worker start --pool avsiam-local" in worker


def compose_plugin_missing() -> bool:
    return not shutil.which("docker") or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0


@pytest.mark.skipif(compose_plugin_missing(), reason="the docker compose plugin is not installed here")
def test_docker_compose_config_accepts_the_stack():
    compose_dir = ROOT / "infra" / "compose"
    done = subprocess.run(["docker", "compose", "--env-file", ".env.example", "config", "--quiet"], cwd=compose_dir,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_prefect_kubernetes_base_job_template_and_manifests_parse():
    template = json.loads((ROOT / "infra/k8s/prefect-base-job-template.json").read_text())
    assert set(template) == {"job_configuration", "variables"}
    job = template["job_configuration"]["job_manifest"]
    assert job["kind"] == "Job" and job["spec"]["template"]["spec"]["containers"][0]["image"] == "{{ image }}"
    assert set(template["variables"]["properties"]) >= {"image", "namespace", "service_account_name", "env"}
    for path in (ROOT / "infra" / "k8s").glob("*.yaml"):
        assert all(doc.get("kind") for doc in yaml.safe_load_all(path.read_text()) if doc), path


def test_ray_staging_cluster_definitions_are_coherent():
    """The KubeRay RayCluster and the Slurm Ray job of infra/ (no cluster here: their shape)."""
    cluster = yaml.safe_load((ROOT / "infra/k8s/raycluster-staging.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["authOptions"]["mode"] == "token"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = [g["template"]["spec"]["containers"][0] for g in cluster["spec"]["workerGroupSpecs"]]
    assert all(w["image"] == head["image"] for w in workers)  # shard tasks import the flow's avsiam
    assert {"containerPort": 10001, "name": "client"} in head["ports"]  # the ray:// address the flow uses
    sbatch = ROOT / "infra/slurm/ray-staging.sbatch"
    assert subprocess.run(["bash", "-n", str(sbatch)], capture_output=True).returncode == 0
    text = sbatch.read_text()
    assert "ray start --head" in text and "avsiam stage --address" in text


@pytest.mark.parametrize(
    ("given", "readable"),
    [
        ("9.0a", "9.0"),  # what the lent H200's CUDA 13 image sets
        ("8.0;9.0a;10.0a+PTX", "8.0;9.0;10.0+PTX"),
        ("12.0f;12.0", "12.0"),
        ("7.0 8.0+PTX", "7.0 8.0+PTX"),  # already readable: left as the user wrote it
    ],
)
def test_arch_lists_deepspeed_cannot_parse_are_rewritten(monkeypatch, given, readable):
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder  # the CUDA builder, also on a CPU machine

    from avsiam.launch.distributed import deepspeed_readable_arch_list

    builder = FusedAdamBuilder()
    builder.jit_mode = True  # FusedAdam's first use builds it just in time, parsing the list
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", given)
    if given != readable:
        with pytest.raises(ValueError, match="invalid literal"):
            builder.compute_capability_args()
    deepspeed_readable_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == readable
    builder.compute_capability_args()  # DeepSpeed's own parser now reads it
