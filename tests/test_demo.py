"""`nanfuse demo` with few steps: its summary, not its timing."""

import argparse
import math

import pytest
import torch

from nanfuse.__main__ import main
from nanfuse.demo import run as demo
from nanfuse.demo.text import training_text


def demo_args(*argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_demo_summary(tmp_path):
    args = demo_args("--steps", "40", "--out", str(tmp_path), "--no-progress")
    code, results, events = demo.main(args, echo=lambda *a: None)
    plain, careful, nanfuse_run = results
    nan_event = next(e for e in events if e.name == "NaN inputs")
    assert code == 0 and [r.name for r in results] == ["plain", "careful", "nanfuse"]
    assert not plain.params_finite[-1] and plain.first_nonfinite() == nan_event.steps.start
    assert set(nanfuse_run.skipped) >= set(nan_event.steps)  # every bad batch skipped
    assert all(nanfuse_run.params_finite) and math.isfinite(nanfuse_run.final_loss())
    assert all(careful.params_finite)
    assert all(nanfuse_run.causes[s] == "bad input data (samples [0, 3])" for s in nan_event.steps)
    summary = (tmp_path / "summary.md").read_text()
    assert "never recovers" in summary and "| nanfuse | 40 |" in summary
    assert "watch: bad input data (samples [0, 3])" in summary
    for event in events:
        assert event.name in summary


def test_demo_command_writes_the_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs the demo extra: pip install 'nanfuse[demo]'")
    assert main(["demo", "--steps", "20", "--out", str(tmp_path), "--no-progress", "--no-lr-spike"]) == 0
    assert (tmp_path / "loss.png").stat().st_size > 10_000


def test_demo_sanitize_trains_nan_batches_on_their_good_rows():
    # the nanfuse run alone (the others do not sanitize), NaN batches only
    args = demo_args("--steps", "16", "--no-lr-spike", "--no-half-logits", "--sanitize")
    text = training_text(seed=args.seed)
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    (nan_event,) = events = demo.schedule(args.steps, False, True, False)
    result = demo.train("nanfuse", ids, len(chars), args, events, torch.device("cpu"), lambda: None)
    assert not result.skipped and not result.causes and all(result.params_finite)
    assert result.sanitized == {step: 2 for step in nan_event.steps}
    assert all(math.isfinite(loss) for loss in result.losses)
    assert demo.describe(result, nan_event).startswith("survived: trained 3 step(s) on their good rows")
