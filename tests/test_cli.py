"""One `avsiam` program: every subcommand answers --help; errors are one clear line."""

import subprocess
import sys

import pytest

from avsiam.cli.main import build_parser

SUBCOMMANDS = [["presets"], ["synth"], ["stage"], ["train", "pretrain"], ["train", "finetune"], ["evaluate"], ["launch"],
               ["compare"], ["plan"], ["predict"], ["serve"], ["tracking", "sync"]]


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=[" ".join(a) for a in SUBCOMMANDS])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    assert "usage: avsiam" in capsys.readouterr().out


def test_console_script_reports_bad_input_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "avsiam.cli.main", "stage", "--labels", str(tmp_path / "missing.csv"),
                           "--videos", str(tmp_path), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "missing.csv" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--weights", "w.safetensors"], "pass --model and --recipe, or --config"),
    (["--config", "config.yaml", "--model", "tiny", "--weights", "w.safetensors", "arch.depth=2"],
     "--config config.yaml is the whole recipe; drop --model, overrides"),
])
def test_evaluate_takes_presets_or_a_runs_config_not_both(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "avsiam.cli.main", "evaluate", *args, "--data", str(tmp_path), "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_bad_staging_options_are_named_without_a_traceback(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("a,1,dog,train\n")
    proc = subprocess.run([sys.executable, "-m", "avsiam.cli.main", "stage", "--labels", str(labels), "--videos", str(tmp_path),
                           "--out", str(tmp_path / "out"), "--silence-threshold-dbfs", "6", "--max-bad-fraction", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--max-bad-fraction: Input should be less than or equal to 1" in proc.stderr
    assert "--silence-threshold-dbfs: Input should be less than or equal to 0" in proc.stderr
