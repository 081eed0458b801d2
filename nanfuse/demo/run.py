"""`nanfuse demo`: one small character-level language model trained three ways through the events that
make real training runs go NaN, and what happened to each run.

Runs, all with the same seed, data, model and learning-rate schedule:
  plain    PyTorch as its documentation shows it: F.cross_entropy, clip_grad_norm_, optimizer.step();
  careful  the same plus the check a careful user adds by hand: skip the step when the loss or the
           returned norm is not finite (one host sync per step);
  nanfuse  nanfuse.cross_entropy and NanGuard around a fused AdamW (clip, check and skip on the
           device, no host sync), with a NanWatch naming the cause of each bad step; with --sanitize,
           nanfuse.sanitize_batch cleans each batch first, so batches with a few NaN rows train on the rest.
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
    causes: dict = dataclasses.field(default_factory=dict)  # step -> what the NanWatch reported
    sanitized: dict = dataclasses.field(default_factory=dict)  # step -> samples cleaned by sanitize_batch

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
        watch = nanfuse.NanWatch(model)
        guard = nanfuse.NanGuard(optimizer, max_norm=args.max_norm, watch=watch)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr)
    losses, reports, finite, skipped, cleaned = [], [], [], {}, []
    start = time.perf_counter()
    for step in range(args.steps):
        active = {e.name for e in events if step in e.steps}
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (100 if "lr spike" in active else 1)
        inputs, targets = _batch(ids, vocab, step, args.batch_size, args.context, device)
        if "NaN inputs" in active:
            inputs[0, 5:9] = float("nan")
            inputs[3, 0] = float("nan")
        if run == "nanfuse" and args.sanitize:
            cleaned.append(nanfuse.sanitize_batch(inputs, targets).bad_count)  # a device tensor: no sync
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
    causes = {}
    if run == "nanfuse":
        causes = {event.step: _cause(event) for event in watch.reports()}
        watch.remove()
    sanitized = {step: n for step, n in enumerate(torch.stack(cleaned).tolist() if cleaned else []) if n}
    # read back once, after the run (timed above), for the table
    return RunResult(run, torch.stack(losses).tolist(), skipped, torch.stack(finite).tolist(), wall, causes,
                     sanitized)


def _cause(report):
    """One line for the summary from a NanReport."""
    if report.cause == "bad input data":
        return f"bad input data (samples {report.rows})"
    if report.numbers:
        return (f"exploding gradients (norm {report.numbers['norm']:.3g} = {report.numbers['ratio']:.3g}x the "
                f"median; most in `{report.numbers.get('largest', '?')}`)")
    where = "the model's forward code" if report.module == "" else f"`{report.module}`"
    return f"{report.cause} ({report.phase}, {where})" if report.phase else report.cause


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
    cleaned = [s for s in steps if s in result.sanitized]
    if cleaned:
        parts.append(f"trained {len(cleaned)} step(s) on their good rows ({result.sanitized[cleaned[0]]} "
                     "sample(s) cleaned each)")
    causes = [result.causes[s] for s in steps if s in result.causes]
    if causes:
        parts.append("watch: " + causes[0] + (f" (and {len(causes) - 1} more step(s))" if len(causes) > 1 else ""))
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
    """One panel per run (so none hides another), the same log scale on each: the events shaded and named,
    skipped steps marked along the bottom, and where the parameters became NaN."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.3 * len(results) + 0.8), sharex=True, sharey=True)
    finite = [v for r in results for v in r.losses if math.isfinite(v) and v > 0]
    low, high = (min(finite), max(finite)) if finite else (1e-2, 1e2)
    colors = ["#7f8c8d", "#2e86c1", "#c0392b"]
    for ax, r, color in zip(axes, results, colors):
        for event, shade in zip(events, ["#f4d03f", "#e74c3c", "#5dade2"]):
            ax.axvspan(event.steps.start - 0.5, event.steps.stop - 0.5, color=shade, alpha=0.25)
            if r is results[0]:
                ax.annotate(event.name, (event.steps.start, high * 1.5), fontsize=8, annotation_clip=False)
        ax.plot(range(len(r.losses)), [v if math.isfinite(v) else float("nan") for v in r.losses], color=color,
                linewidth=1.2)
        if r.skipped:
            ax.plot(sorted(r.skipped), [low] * len(r.skipped), "v", color="black", markersize=5,
                    label=f"skipped step ({len(r.skipped)})")
        if r.sanitized:
            ax.plot(sorted(r.sanitized), [low] * len(r.sanitized), "o", color="green", markersize=4,
                    label=f"trained on good rows ({len(r.sanitized)})")
        first = r.first_nonfinite()
        if first is not None and not r.params_finite[-1]:
            ax.axvspan(first - 0.5, len(r.losses), color="black", alpha=0.12, label="parameters NaN")
        ax.set_yscale("log")
        ax.set_ylim(low / 2, high * 3)
        ax.set_ylabel("loss")
        ax.set_title(f"{r.name}: final loss {r.final_loss():.3g}", fontsize=9, loc="left")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("step")
    fig.suptitle("nanfuse demo: the same model trained three ways (shaded: the events)", fontsize=10)
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
    parser.add_argument("--sanitize", action="store_true",
                        help="the nanfuse run cleans each batch with sanitize_batch (NaN rows ignored, not skipped)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
