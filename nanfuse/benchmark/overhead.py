"""Eager per-call cost of each op with and without the torch.library registration.

On tiny inputs an op's own work is a few microseconds, so time per call is the cost of getting there:
Python, argument checks, autograd and, for the registered op, the dispatcher (custom_op's Python
wrapper, schema parsing of the arguments, the autograd and fake registrations). nanfuse's eager calls
take the autograd Functions directly and only torch.compile goes through the ops, so the "registered
op" column is what eager calls would cost had every call gone through them.
"""

import contextlib
import math
import time

import torch
import torch.nn.functional as F

import nanfuse

from .. import _backend

CALLS = 300


def _block_us(fn, device, calls):
    """Mean microseconds per call over one block of `calls` calls (device synced)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls * 1e6


def _per_call_us(runs, device, calls=None, samples=11):
    """Microseconds per call of each (function, context) in `runs`: the fastest of `samples` blocks. The runs'
    blocks take turns, so a machine that speeds up or slows down over the run (a shared host, clock changes)
    weighs on all of them alike; on a shared machine the least disturbed block is the closest to a call's cost."""
    calls = calls or CALLS  # read at call time, so the tests' smaller CALLS takes effect
    for fn, context in runs:  # warm-up
        with context():
            fn()
    best = [math.inf] * len(runs)
    for _ in range(samples):
        for i, (fn, context) in enumerate(runs):
            with context():
                best[i] = min(best[i], _block_us(fn, device, calls))
    return best


def cases(device):
    """(name, nanfuse call, PyTorch call): tiny inputs, so what is timed is the cost of getting to the work."""
    logits = torch.randn(8, 128, device=device, requires_grad=True)
    target = torch.randint(0, 128, (8,), device=device)
    scores = torch.randn(8, 128, device=device, requires_grad=True)
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in (64, 128, 32, 256)]
    for p in params:
        p.grad = torch.randn_like(p)

    def fwd_bwd(loss_fn, x):
        def run():
            loss_fn().backward()
            x.grad = None
        return run

    guard_case = _guard_step_case(device)
    loop_case = _training_loop_case(device)
    return [
        ("cross_entropy fwd+bwd, 8x128", fwd_bwd(lambda: nanfuse.cross_entropy(logits, target), logits),
         fwd_bwd(lambda: F.cross_entropy(logits, target), logits)),
        ("softmax fwd+bwd, 8x128", fwd_bwd(lambda: nanfuse.softmax(scores).sum(), scores),
         fwd_bwd(lambda: torch.softmax(scores, -1).sum(), scores)),
        ("clip_grad_norm_, 4 tensors", lambda: nanfuse.clip_grad_norm_(params, 1e6),
         lambda: torch.nn.utils.clip_grad_norm_(params, 1e6)),
        ("NanGuard.step vs clip + step, fused AdamW, MLP", *guard_case),
        ("training step: MLP, 64x92 logits, AdamW", *loop_case),
    ]


def _mlp(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 92)).to(device)


def _adamw(model, device):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)


def _guard_step_case(device):
    """guard.step() against clip_grad_norm_ + optimizer.step(), both a fused AdamW on the same small MLP's
    gradients (set once: the step is what is timed)."""
    ours, theirs = _mlp(device), _mlp(device)
    for model in (ours, theirs):
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    guard = nanfuse.NanGuard(_adamw(ours, device), max_norm=1.0)
    optimizer = _adamw(theirs, device)

    def theirs_step():
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        optimizer.step()

    return guard.step, theirs_step


def _training_loop_case(device):
    """One training step of a small MLP on 64x92 logits with AdamW (fused), as a new user writes it: nanfuse's
    cross_entropy + NanGuard against F.cross_entropy + clip_grad_norm_ + optimizer.step()."""
    x = torch.randn(64, 32, device=device)
    y = torch.randint(0, 92, (64,), device=device)
    ours, theirs = _mlp(device), _mlp(device)
    guard = nanfuse.NanGuard(_adamw(ours, device), max_norm=1.0)
    optimizer = _adamw(theirs, device)

    def ours_step():
        guard.zero_grad()
        nanfuse.cross_entropy(ours(x), y).backward()
        guard.step()

    def theirs_step():
        optimizer.zero_grad()
        F.cross_entropy(theirs(x), y).backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        optimizer.step()

    return ours_step, theirs_step


def measure(device):
    """Rows (op, nanfuse eager us, through the registered op us, PyTorch us) on `device`."""
    rows = []
    with _backend.without_interpreter():
        for name, ours, theirs in cases(device):
            eager, registered, torch_us = _per_call_us(
                [(ours, contextlib.nullcontext), (ours, _backend.registered_ops), (theirs, contextlib.nullcontext)],
                device)
            rows.append(dict(op=name, eager_us=eager, registered_us=registered, torch_us=torch_us))
    return rows


def format_table(rows, device_label):
    lines = [f"### eager per-call cost on {device_label} (microseconds per call, tiny inputs)", "",
             "| op | nanfuse eager (autograd.Function) | nanfuse through the registered op | added by the op "
             "| PyTorch |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['eager_us']:.1f} | {r['registered_us']:.1f} | "
                     f"{r['registered_us'] - r['eager_us']:+.1f} | {r['torch_us']:.1f} |")
    return "\n".join(lines)
