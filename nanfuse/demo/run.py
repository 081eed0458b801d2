"""`nanfuse demo`: one small character-level language model trained three ways through the events that
make real training runs go NaN, and what happened to each run.

Runs, all with the same seed, data, model and learning-rate schedule:
  plain    PyTorch as its documentation shows it: F.cross_entropy, clip_grad_norm_, optimizer.step();
  careful  the same plus the check a careful user adds by hand: skip the step when the loss or the
           returned norm is not finite (one host sync per step);
  nanfuse  nanfuse.cross_entropy and NanGuard around a fused AdamW (clip, check and skip on the
           device, no host sync).
Events, each on by default: a learning-rate spike (exploding updates), batches whose inputs hold
NaN (bad data), and an output layer run in float16 with a large logit scale (half-precision logits
of large magnitude: values past 65504 become Inf).
"""

import dataclasses
import math
import pathlib
import time

import torch
import torch.nn.functional as F

import nanfuse
from nanfuse import _backend

from .._cli_types import available_device, non_negative_int, positive_float, positive_int, writable_folder
from .text import training_text

RUNS = ("plain", "careful", "nanfuse")


@dataclasses.dataclass
class Event:
    name: str
    steps: range
    what: str


def schedule(steps, lr_spike=True, nan_data=True, half_logits=True):
    """Where the events fall, as fractions of the run, so --steps keeps them in place."""
    def window(start, length):
        first = int(start * steps)
        return range(first, min(steps, first + max(1, length)))

    events = []
    if lr_spike:
        events.append(Event("lr spike", window(0.25, steps // 20), "learning rate x100"))
    if nan_data:
        events.append(Event("NaN inputs", window(0.45, 3), "3 batches with NaN in their input features"))
    if half_logits:
        events.append(Event("fp16 logits", window(0.7, steps // 20), "output layer in float16, logits x3000"))
    return events


class CharModel(torch.nn.Module):
    """One-hot characters (float inputs, so bad data can carry NaN) -> linear -> GRU -> linear head."""

    def __init__(self, vocab, width=32, hidden=64):
        super().__init__()
        self.embed = torch.nn.Linear(vocab, width)
        self.gru = torch.nn.GRU(width, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, inputs, half_logits=False, logit_scale=1.0):
        hidden, _ = self.gru(self.embed(inputs))
        if half_logits:  # as under float16 autocast, with a mis-set logit scale
            return F.linear(hidden.half(), self.head.weight.half(), self.head.bias.half()) * logit_scale
        return self.head(hidden)


def _batch(ids, vocab, step, batch_size, context, device):
    generator = torch.Generator().manual_seed(step)
    starts = torch.randint(0, len(ids) - context - 1, (batch_size,), generator=generator)
    windows = torch.stack([ids[s:s + context + 1] for s in starts.tolist()])  # host-side data, no device
    inputs = F.one_hot(windows[:, :-1], vocab).float()
    return inputs.to(device), windows[:, 1:].to(device)


@dataclasses.dataclass
class RunResult:
    name: str
    losses: list  # float per step (NaN/Inf as they came)
    skipped: dict  # step -> why
    params_finite: list  # bool per step, after the step
    wall_s: float

    def first_nonfinite(self):
        for step, (loss, ok) in enumerate(zip(self.losses, self.params_finite)):
            if not math.isfinite(loss) or not ok:
                return step
        return None

    def final_loss(self):
        return self.losses[-1] if self.losses else float("nan")


def train(run, ids, vocab, args, events, device, tick):
    torch.manual_seed(args.seed)
    model = CharModel(vocab).to(device)
    params = list(model.parameters())
    if run == "nanfuse":
        optimizer = torch.optim.AdamW(params, lr=args.lr, fused=True)
        guard = nanfuse.NanGuard(optimizer, max_norm=args.max_norm)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr)
    losses, reports, finite, skipped = [], [], [], {}
    start = time.perf_counter()
    for step in range(args.steps):
        active = {e.name for e in events if step in e.steps}
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (100 if "lr spike" in active else 1)
        inputs, targets = _batch(ids, vocab, step, args.batch_size, args.context, device)
        if "NaN inputs" in active:
            inputs[0, 5:9] = float("nan")
        logits = model(inputs, half_logits="fp16 logits" in active, logit_scale=3000.0)
        logits, targets = logits.reshape(-1, vocab), targets.reshape(-1)
        optimizer.zero_grad(set_to_none=True)
        if run == "nanfuse":
            loss = nanfuse.cross_entropy(logits, targets)
            loss.backward()
            reports.append(guard.step())  # read after the run: nothing syncs during it
        else:
            loss = F.cross_entropy(logits, targets)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, args.max_norm)
            if run == "careful" and not (torch.isfinite(loss) and torch.isfinite(norm)):  # one host sync
                skipped[step] = "non-finite loss" if not torch.isfinite(loss) else "non-finite gradient norm"
            else:
                optimizer.step()
        losses.append(loss.detach().float())
        finite.append(torch.stack([torch.isfinite(p).all() for p in params]).all())
        tick()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    for step, report in enumerate(reports):  # read back after the run, for the table only
        if report.found_inf.item():
            skipped[step] = f"{report.nonfinite_count.item()} non-finite gradient values"
    # read back once, after the run (timed above), for the table
    return RunResult(run, torch.stack(losses).tolist(), skipped, torch.stack(finite).tolist(), wall)


def describe(result, event):
    """What one event did to one run, in words."""
    steps = event.steps
    if result.first_nonfinite() is not None and result.first_nonfinite() < steps.start and \
            not all(result.params_finite[s] for s in range(steps.start)):
        return "already dead (NaN parameters)"
    window_losses = [result.losses[s] for s in steps]
    skipped = [s for s in steps if s in result.skipped]
    bad_loss = [s for s in steps if not math.isfinite(result.losses[s])]
    died = [s for s in steps if not result.params_finite[s]]
    if died:
        return f"parameters became NaN at step {died[0]}; the run never recovers"
    parts = []
    if skipped:
        parts.append(f"skipped {len(skipped)} step(s) ({result.skipped[skipped[0]]})")
    if bad_loss:
        parts.append(f"non-finite loss at {len(bad_loss)} step(s)")
    finite = [v for v in window_losses if math.isfinite(v)]
    if finite:
        parts.append(f"loss up to {max(finite):.3g}")
    return "survived: " + ", ".join(parts) if parts else "survived"


def table(results, events):
    lines = ["| run | steps completed | first non-finite loss or parameter | steps skipped (why) | final loss | "
             "wall time |", "|---|---|---|---|---|---|"]
    for r in results:
        first = r.first_nonfinite()
        reasons = sorted(set(r.skipped.values()))
        skipped = f"{len(r.skipped)} ({'; '.join(reasons)})" if r.skipped else "0"
        lines.append(f"| {r.name} | {len(r.losses)} | {'none' if first is None else f'step {first}'} | {skipped} | "
                     f"{r.final_loss():.4g} | {r.wall_s:.1f} s |")
    lines += ["", "| event | steps | " + " | ".join(r.name for r in results) + " |",
              "|---|---|" + "---|" * len(results)]
    for event in events:
        lines.append(f"| {event.name}: {event.what} | {event.steps.start}-{event.steps.stop - 1} | "
                     + " | ".join(describe(r, event) for r in results) + " |")
    return "\n".join(lines)


def plot(results, events, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(10, 5))
    for event, color in zip(events, ["#f4d03f", "#e74c3c", "#5dade2"]):
        ax.axvspan(event.steps.start - 0.5, event.steps.stop - 0.5, color=color, alpha=0.25, label=event.name)
    for r, style in zip(results, ["-", "--", "-"]):
        ax.plot(range(len(r.losses)), [v if math.isfinite(v) else float("nan") for v in r.losses], style,
                label=r.name, linewidth=1.2)
        first = r.first_nonfinite()
        if first is not None and not r.params_finite[-1]:
            ax.axvline(first, color="black", linestyle=":", linewidth=1)
            ax.annotate(f"{r.name}: NaN from here", (first, ax.get_ylim()[1] * 0.9), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (gaps: NaN/Inf)")
    ax.set_title("nanfuse demo: the same model trained three ways")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _progress_bar(total):
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="step", desc="training")
        return bar.update, bar.close
    except ImportError:  # the demo extra brings tqdm; without it, a line every tenth of the way
        state = {"done": 0}

        def tick():
            state["done"] += 1
            if state["done"] % max(1, total // 10) == 0:
                print(f"  {state['done']}/{total} steps", flush=True)

        return tick, lambda: None


def main(args, echo=print):
    """Run the demo; returns (exit code, results, events). Exit code 0 when nanfuse's run ends finite."""
    device = torch.device(args.device)
    text = training_text(seed=args.seed)
    vocab_chars = sorted(set(text))
    ids = torch.tensor([vocab_chars.index(c) for c in text])
    events = schedule(args.steps, not args.no_lr_spike, not args.no_nan_data, not args.no_half_logits)
    echo(f"nanfuse demo: a GRU character model on {len(text):,} characters of generated text, "
         f"{args.steps} steps per run, device {device}")
    for event in events:
        echo(f"  event '{event.name}' at steps {event.steps.start}-{event.steps.stop - 1}: {event.what}")
    tick, close = _progress_bar(len(RUNS) * args.steps) if args.progress else (lambda: None, lambda: None)
    with _backend.without_interpreter():
        results = [train(run, ids, len(vocab_chars), args, events, device, tick) for run in RUNS]
    close()
    report = table(results, events)
    echo("\n" + report)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(report + "\n")
    if plot(results, events, out / "loss.png"):
        echo(f"\nplot: {(out / 'loss.png').resolve()}")
    else:
        echo("\nno plot: matplotlib is not installed (pip install 'nanfuse[demo]')")
    echo(f"summary: {(out / 'summary.md').resolve()}")
    ok = results[-1].params_finite[-1]
    return (0 if ok else 1), results, events


def add_arguments(parser):
    parser.add_argument("--steps", type=positive_int, default=300, help="training steps per run")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="base learning rate of AdamW")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the model, data and text")
    parser.add_argument("--out", type=writable_folder, default="nanfuse-demo",
                        help="folder for loss.png and summary.md")
    parser.add_argument("--device", type=available_device, default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="sequences per batch")
    parser.add_argument("--context", type=positive_int, default=32, help="characters per sequence")
    parser.add_argument("--max-norm", type=positive_float, default=1.0, help="gradient-norm clip limit")
    parser.add_argument("--no-lr-spike", action="store_true", help="leave out the learning-rate spike")
    parser.add_argument("--no-nan-data", action="store_true", help="leave out the batches with NaN inputs")
    parser.add_argument("--no-half-logits", action="store_true", help="leave out the float16 large logits")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
