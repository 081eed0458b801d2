"""`nanfuse bench --only watch`: training steps per second on the demo's GRU model, side by side in one run:
plain (nanfuse.cross_entropy + NanGuard around a fused AdamW), the same with a NanWatch, and the same under
torch.autograd.detect_anomaly(). Clean steps only: that is what the watch costs while nothing goes wrong."""

import time

import torch

import nanfuse

from .. import _backend
from ..demo.run import CharModel, _batch
from ..demo.text import training_text

MODES = ("plain", "watch", "detect_anomaly")


def _trainer(mode, ids, vocab, device, batch_size, context):
    torch.manual_seed(0)
    model = CharModel(vocab).to(device)
    watch = nanfuse.NanWatch(model) if mode == "watch" else None
    guard = nanfuse.NanGuard(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), max_norm=1.0, watch=watch)
    batches = [_batch(ids, vocab, step, batch_size, context, device) for step in range(8)]

    def step(i):
        inputs, targets = batches[i % len(batches)]
        logits = model(inputs)
        nanfuse.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1)).backward()
        guard.step()
        guard.zero_grad()

    return step


def _steps_per_s(step, mode, device, steps):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        if mode == "detect_anomaly":
            with torch.autograd.detect_anomaly(check_nan=True):
                step(i)
        else:
            step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps / (time.perf_counter() - start)


def measure(device, threads=(1, None), steps=20, repeats=9, batch_size=32, context=32):
    """Rows (threads, mode, steps/s median and best, median relative to plain); modes interleaved per repeat, so
    a noisy neighbour slows all three alike; the best repeat is the least disturbed one."""
    text = training_text(seed=0)
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    rows, default_threads = [], torch.get_num_threads()
    with _backend.without_interpreter():
        for n in threads:
            torch.set_num_threads(n or default_threads)
            try:
                trainers = {mode: _trainer(mode, ids, len(chars), device, batch_size, context) for mode in MODES}
                for mode, step in trainers.items():  # warm-up
                    _steps_per_s(step, mode, device, 2)
                samples = {mode: [] for mode in MODES}
                for _ in range(repeats):
                    for mode, step in trainers.items():
                        samples[mode].append(_steps_per_s(step, mode, device, steps))
            finally:
                torch.set_num_threads(default_threads)
            medians = {mode: sorted(s)[len(s) // 2] for mode, s in samples.items()}
            for mode in MODES:
                rows.append(dict(threads=n or default_threads, mode=mode, steps_per_s=medians[mode],
                                 best_steps_per_s=max(samples[mode]), relative=medians[mode] / medians["plain"],
                                 best_relative=max(samples[mode]) / max(samples["plain"])))
    return rows


def format_table(rows, device_label):
    lines = [f"### NanWatch cost on {device_label}: the demo's GRU, training steps per second (median)", "",
             "| threads | mode | steps/s (median) | vs plain | step time added | steps/s (best) | best vs best plain |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['mode']} | {r['steps_per_s']:.1f} | {r['relative']:.2f}x | "
                     f"{1 / r['relative'] - 1:+.1%} | {r['best_steps_per_s']:.1f} | {r['best_relative']:.2f}x |")
    return "\n".join(lines)
