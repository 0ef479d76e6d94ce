"""One `avsiam` program: every subcommand answers --help; errors are one clear line."""

import subprocess
import sys

import pytest

from avsiam.cli.main import build_parser

SUBCOMMANDS = [["presets"], ["synth"], ["stage"], ["train", "pretrain"], ["train", "finetune"], ["evaluate"], ["launch"],
               ["compare"], ["plan"], ["serve"]]


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
