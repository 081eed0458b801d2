"""The prepared GPU check (bench/gpu-check.sh -> `nanfuse gpu-check`) as a dry run on the CPU, so it cannot rot
before a GPU is lent; and the command line's argument checks."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from nanfuse.__main__ import main
from nanfuse.benchmark import gpu_check

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_dry_run_writes_the_report(tmp_path):
    # the script runs `python3`: this interpreter's, even where its venv is not activated
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, OUT=str(tmp_path), NANFUSE_BACKEND="torch", PATH=path)
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu-check.sh"), "--dry-run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = (tmp_path / "cpu-dry-run.md").read_text()
    assert "| memcheck | kernel smoke without the sanitizer: exit 0 |" in report
    assert "| bench | exit 0 |" in report and "| nanfuse | 8x300 mean | float32 |" in report
    env_info = json.loads((tmp_path / "env.json").read_text())
    assert env_info["torch"] and env_info["triton"]


def test_report_summaries():
    log = "FAILED tests/test_a.py::test_x[cuda] - boom\nERROR tests/test_b.py\n= 1 failed, 9 passed in 3.1s ="
    assert gpu_check._test_summary(log) == ("1 failed, 9 passed in 3.1s", ["tests/test_a.py::test_x[cuda]",
                                                                           "tests/test_b.py"])
    assert gpu_check._test_summary("Killed") == ("no closing line (killed or crashed)", [])
    assert gpu_check._sanitizer_summary("========= ERROR SUMMARY: 0 errors") == "0 errors"
    assert gpu_check.card_slug({"card": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"


@pytest.mark.parametrize("argv, complaint", [
    (["demo", "--steps", "0"], "--steps: must be an integer >= 1"),
    (["demo", "--steps", "-1"], "--steps: must be an integer >= 1"),
    (["demo", "--lr", "-1"], "--lr: must be a finite number > 0"),
    (["demo", "--device", "nonsense"], "--device: not a device"),
    (["demo", "--out", str(REPO / "README.md" / "out")], "--out: "),
    (["bench", "--device", "nonsense"], "--device: not a device"),
])
def test_bad_options_fail_before_any_work(argv, complaint, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and complaint in capsys.readouterr().err


def test_cuda_without_cuda_is_refused(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        main(["demo", "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_help_gives_every_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps help at the terminal width
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 300)" in text and "(default: nanfuse-demo)" in text and "no progress bar (" not in text


def test_version_and_info():
    done = subprocess.run([sys.executable, "-m", "nanfuse", "--version"], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.startswith("nanfuse ")
    done = subprocess.run([sys.executable, "-m", "nanfuse", "info"], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, NANFUSE_BACKEND="torch"))
    assert done.returncode == 0, done.stderr
    assert "cpu:" in done.stdout and "pure PyTorch -- NANFUSE_BACKEND=torch" in done.stdout
