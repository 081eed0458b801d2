"""Benchmark cases and the implementations compared on each: nanfuse, PyTorch eager, torch.compile, peers."""

import dataclasses
import importlib.util
import math

import torch
import torch.nn.functional as F

import nanfuse


@dataclasses.dataclass
class Case:
    op: str  # "cross_entropy", "softmax" or "clip"
    name: str  # what the row says about the shape
    dtype: torch.dtype
    size: int  # the x axis of the plot: vocabulary size or parameter count
    min_bytes: int  # the bytes the op must move at least
    setup: object  # setup(device) -> dict of implementation name -> zero-argument callable
    compile_ok: bool = True
    variant: str = ""  # what the plot draws as one line across sizes (reduction and options, or clip mode)
    min_reps: int = 5  # timed runs at least (after one warm-up): 1 for the cases that take seconds per run


def _with_compiled(impls, compile_ok, wrap, torch_fn):
    """impls plus, when compile_ok, torch.compile of the PyTorch function, wrapped as its eager entry is; each
    case compiles afresh instead of hitting the recompile limit."""
    if compile_ok:
        torch._dynamo.reset()
        impls["torch.compile"] = wrap(torch.compile(torch_fn, dynamic=False))
    return impls


# ---------------------------------------------------------------- cross-entropy

def _torch_cross_entropy(logits, target, reduction, z_loss, softcap):
    """The same math as nanfuse.cross_entropy's options, written with PyTorch ops (eager or compiled)."""
    x = logits.float()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    loss = F.cross_entropy(x, target, reduction=reduction)
    if z_loss:
        lse = torch.logsumexp(x, dim=-1)
        z = z_loss * lse.square()
        loss = loss + (z if reduction == "none" else z.mean())
    return loss


def _cross_entropy_setup(n_rows, n_classes, dtype, reduction, z_loss, softcap, compile_ok):
    def setup(device):
        logits = (torch.randn(n_rows, n_classes, device=device) * 2).to(dtype).requires_grad_()
        target = torch.randint(0, n_classes, (n_rows,), device=device)
        upstream = torch.rand(n_rows, device=device) if reduction == "none" else None

        def fwd_bwd(loss_fn):
            def run():
                loss = loss_fn(logits, target)
                loss.backward(upstream) if upstream is not None else loss.backward()
                logits.grad = None
            return run

        options = dict(reduction=reduction, z_loss=z_loss, softcap=softcap)
        impls = {
            "nanfuse": fwd_bwd(lambda x, t: nanfuse.cross_entropy(x, t, **options)),
            "torch eager": fwd_bwd(lambda x, t: _torch_cross_entropy(x, t, **options)),
        }
        if compile_ok:
            torch._dynamo.reset()  # each case compiles afresh instead of hitting the recompile limit
            compiled = torch.compile(_torch_cross_entropy, dynamic=False)
            impls["torch.compile"] = fwd_bwd(lambda x, t: compiled(x, t, **options))
        if device.type == "cuda" and not z_loss and not softcap and importlib.util.find_spec("liger_kernel"):
            from liger_kernel.transformers.functional import liger_cross_entropy

            impls["liger-kernel"] = fwd_bwd(lambda x, t: liger_cross_entropy(x, t, reduction=reduction))
        return impls

    return setup


def cross_entropy_case(n_rows, n_classes, dtype, reduction="mean", z_loss=0.0, softcap=None, compile_ok=True):
    itemsize = torch.finfo(dtype).bits // 8
    # fwd+bwd at least reads the logits once and writes their gradient once: 2 * N * V * itemsize,
    # plus the int64 targets and the fp32 per-row losses (and upstream gradient for 'none').
    min_bytes = 2 * n_rows * n_classes * itemsize + n_rows * (8 + 4 + (4 if reduction == "none" else 0))
    extras = "".join([f" z_loss={z_loss}" if z_loss else "", f" softcap={softcap}" if softcap else ""])
    return Case("cross_entropy", f"{n_rows}x{n_classes} {reduction}{extras}", dtype, n_classes, min_bytes,
                _cross_entropy_setup(n_rows, n_classes, dtype, reduction, z_loss, softcap, compile_ok),
                compile_ok, f"{reduction}{extras}")


# ---------------------------------------------------------------- gradient clip

def gpt2_shapes(n_layer=12, d=768, vocab=50257, n_ctx=1024):
    """Parameter shapes of GPT-2 (124M with the defaults), from its config: 148 tensors."""
    layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (n_ctx, d)] + layer * n_layer + [(d,), (d,)]


def llama_shapes(n_layer=16, d=2048, d_ff=8192, vocab=128256, n_heads=32, n_kv_heads=8):
    """Parameter shapes of a Llama-3.2-1B-style model (tied embeddings), from its config: 146 tensors."""
    kv = d // n_heads * n_kv_heads
    layer = [(d, d), (kv, d), (kv, d), (d, d), (d_ff, d), (d_ff, d), (d, d_ff), (d,), (d,)]
    return [(vocab, d)] + layer * n_layer + [(d,)]


def small_shapes(count=2000, numel=1024):
    return [(numel,)] * count


def _clip_setup(shapes, dtype, mode, compile_ok):
    def setup(device):
        # only .grad is read: the parameters themselves are stride-0 views of one element
        params = [torch.nn.Parameter(torch.empty(1, device=device, dtype=dtype).expand(shape)) for shape in shapes]
        for p, shape in zip(params, shapes):
            p.grad = (torch.randn(shape, device=device) * 1e-3).to(dtype)
        if mode == "nan":
            params[len(params) // 2].grad.view(-1)[0] = float("nan")
        norm = float(torch.linalg.vector_norm(torch.stack([g.grad.float().norm() for g in params])))
        # Clipping is idempotent, so to clip on every call the limit shrinks by 1e-4 per call: the coefficient
        # is 0.9999 each time (surely below 1 in fp32), and 100,000 calls scale the gradients by only 4.5e-5.
        limits = iter([norm * 0.9999**k for k in range(1, 10**6)]) if mode == "clip" else None
        max_norm_tensor = torch.tensor(1e9 if limits is None else norm, device=device)

        def next_limit():
            return 1e9 if limits is None else next(limits)

        def torch_clip(ps, limit):  # a tensor limit, so torch.compile does not recompile per value
            return torch.nn.utils.clip_grad_norm_(ps, limit, foreach=True)

        def torch_step(fn):
            def run():
                max_norm_tensor.fill_(next_limit())
                return fn(params, max_norm_tensor)
            return run

        impls = {"nanfuse": lambda: nanfuse.clip_grad_norm_(params, next_limit()),
                 "torch eager": torch_step(torch_clip)}
        return _with_compiled(impls, compile_ok, torch_step, torch_clip)

    return setup


def clip_case(label, shapes, dtype, mode, compile_ok=True):
    n_params = sum(math.prod(s) for s in shapes)
    itemsize = torch.finfo(dtype).bits // 8
    # norm and flag read every gradient once (G); clipping adds a read and a write (2G). With a NaN
    # the gradients must stay as they are, so G again.
    grad_bytes = n_params * itemsize
    min_bytes = 3 * grad_bytes if mode == "clip" else grad_bytes
    return Case("clip", f"{label} ({len(shapes)} tensors) {mode}", dtype, n_params, min_bytes,
                _clip_setup(shapes, dtype, mode, compile_ok), compile_ok, mode)


# ---------------------------------------------------------------- softmax

def _softmax_setup(n_rows, n_classes, dtype, log, compile_ok):
    def setup(device):
        x = (torch.randn(n_rows, n_classes, device=device) * 2).to(dtype).requires_grad_()
        upstream = torch.randn(n_rows, n_classes, device=device).to(dtype)

        def fwd_bwd(fn):
            def run():
                fn(x).backward(upstream)
                x.grad = None
            return run

        def torch_softmax(t):
            return (F.log_softmax if log else F.softmax)(t, dim=-1)

        impls = {
            "nanfuse": fwd_bwd(lambda t: (nanfuse.log_softmax if log else nanfuse.softmax)(t, dim=-1)),
            "torch eager": fwd_bwd(torch_softmax),
        }
        return _with_compiled(impls, compile_ok, fwd_bwd, torch_softmax)

    return setup


def softmax_case(n_rows, n_classes, dtype, log=False, compile_ok=True):
    itemsize = torch.finfo(dtype).bits // 8
    # forward reads x and writes y; backward reads y and dy and writes dx: 5 * N * C * itemsize
    min_bytes = 5 * n_rows * n_classes * itemsize
    name = "log_softmax" if log else "softmax"
    return Case("softmax", f"{n_rows}x{n_classes} {name}", dtype, n_classes, min_bytes,
                _softmax_setup(n_rows, n_classes, dtype, log, compile_ok), compile_ok, name)


# ---------------------------------------------------------------- fused linear + cross-entropy

def _linear_ce_setup(n_rows, n_features, n_classes, dtype, ignored, compile_ok):
    def setup(device):
        x = (torch.randn(n_rows, n_features, device=device) / 4).to(dtype).requires_grad_()
        w = (torch.randn(n_classes, n_features, device=device) / n_features**0.5).to(dtype).requires_grad_()
        target = torch.randint(0, n_classes, (n_rows,), device=device)
        target[: int(n_rows * ignored)] = -100

        def fwd_bwd(loss_fn):
            def run():
                loss_fn(x, w, target).backward()
                x.grad = w.grad = None
            return run

        def linear_then_cross_entropy(x, w, t):
            return F.cross_entropy(F.linear(x, w), t)

        impls = {"nanfuse": fwd_bwd(nanfuse.linear_cross_entropy),
                 "F.linear_cross_entropy": fwd_bwd(F.linear_cross_entropy)}
        if hasattr(torch.nn, "LinearCrossEntropyOptions"):  # PyTorch 2.13: its batch-chunked mode
            options = torch.nn.LinearCrossEntropyOptions()
            impls["F.linear_cross_entropy chunked"] = fwd_bwd(
                lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options))
        if device.type == "cuda" and importlib.util.find_spec("liger_kernel"):
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            impls["liger-kernel"] = fwd_bwd(lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t))
        return _with_compiled(impls, compile_ok, fwd_bwd, linear_then_cross_entropy)

    return setup


def linear_ce_case(n_rows, n_features, n_classes, dtype, ignored=0.0, compile_ok=True, min_reps=1):
    """Forward+backward of the loss head: logits = x W^T (N x V, never stored by nanfuse), then mean
    cross-entropy; `ignored` is the share of rows with target -100."""
    itemsize = torch.finfo(dtype).bits // 8
    # at least: read x and W, write their gradients (the N x V logits need not touch memory at all)
    min_bytes = 2 * (n_rows + n_classes) * n_features * itemsize + n_rows * 8
    extras = f" {ignored:.0%} ignored" if ignored else ""
    return Case("linear_ce", f"N={n_rows} D={n_features} V={n_classes}{extras}", dtype, n_classes, min_bytes,
                _linear_ce_setup(n_rows, n_features, n_classes, dtype, ignored, compile_ok), compile_ok,
                f"mean{extras}", min_reps)


def linear_ce_cases(device):
    """The loss-head shapes: CPU fp32 (logits 524 MB and 1.05 GB), and on GPU bf16 at 8192 tokens."""
    if device.type == "cuda":
        return [linear_ce_case(8192, 4096, 128_256, torch.bfloat16, min_reps=5),
                linear_ce_case(8192, 4096, 128_256, torch.bfloat16, ignored=0.9, compile_ok=False, min_reps=5)]
    return [linear_ce_case(4096, 1024, 32_000, torch.float32),
            linear_ce_case(4096, 1024, 32_000, torch.float32, ignored=0.9, compile_ok=False),
            linear_ce_case(2048, 2048, 128_256, torch.float32)]


# ---------------------------------------------------------------- the suites

def full_cases(device):
    on_gpu = device.type == "cuda"
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        for n_rows, n_classes in [(4096, 32_000), (8192, 128_256), (4096, 262_144), (64, 262_144)]:
            for reduction in ("mean", "none"):
                cases.append(cross_entropy_case(n_rows, n_classes, dtype, reduction))
        cases.append(cross_entropy_case(4096, 32_000, dtype, z_loss=1e-4, softcap=30.0))
    for dtype in (torch.float32, torch.bfloat16):
        for label, shapes in [("gpt2-124M", gpt2_shapes()), ("llama-1B", llama_shapes()),
                              ("2000 small", small_shapes()), ("200x250k", small_shapes(200, 250_000))]:
            for mode in ("no clip", "clip", "nan"):
                # a cold torch.compile of a 2,000-tensor clip takes minutes on CPU
                cases.append(clip_case(label, shapes, dtype, mode, compile_ok=on_gpu or label != "2000 small"))
    for dtype in (torch.bfloat16, torch.float32):
        for n_rows, n_classes in [(64, 32_000), (8192, 4096)]:
            cases += [softmax_case(n_rows, n_classes, dtype, log) for log in (False, True)]
    return cases + linear_ce_cases(device)


def gpu_check_cases(device):
    """The set the prepared GPU check runs (bench/gpu-check.sh): the shapes language models train at, in about
    three minutes on one GPU with torch.compile and Liger-Kernel beside nanfuse."""
    cases = [cross_entropy_case(n_rows, n_classes, torch.bfloat16)
             for n_rows, n_classes in [(8192, 32_000), (8192, 128_256), (32768, 1024)]]
    cases += [cross_entropy_case(8192, 32_000, torch.float32),
              cross_entropy_case(8192, 128_256, torch.bfloat16, "none"),
              cross_entropy_case(8192, 32_000, torch.bfloat16, z_loss=1e-4, softcap=30.0)]
    cases += [clip_case(label, shapes, torch.bfloat16 if label == "llama-1B" else torch.float32, mode)
              for label, shapes in [("gpt2-124M", gpt2_shapes()), ("llama-1B", llama_shapes())]
              for mode in ("no clip", "clip")]
    cases += [softmax_case(64, 32_000, torch.bfloat16), softmax_case(8192, 4096, torch.bfloat16),
              softmax_case(8192, 4096, torch.float32, log=True)]
    return cases


def quick_cases(device):
    """A reduced set that runs in under a minute on a 2-core CPU; no torch.compile (a cold one is ~20 s)."""
    return [
        cross_entropy_case(1024, 32_000, torch.float32, compile_ok=False),
        cross_entropy_case(256, 32_000, torch.bfloat16, "none", compile_ok=False),
        cross_entropy_case(16, 131_072, torch.float32, compile_ok=False),
        cross_entropy_case(512, 32_000, torch.float32, z_loss=1e-4, softcap=30.0, compile_ok=False),
        clip_case("gpt2-small-layers", gpt2_shapes(n_layer=2, vocab=8192), torch.float32, "no clip", False),
        clip_case("gpt2-small-layers", gpt2_shapes(n_layer=2, vocab=8192), torch.float32, "clip", False),
        clip_case("gpt2-small-layers", gpt2_shapes(n_layer=2, vocab=8192), torch.bfloat16, "nan", False),
        clip_case("200 small", small_shapes(200, 1024), torch.float32, "no clip", False),
        clip_case("200x250k", small_shapes(200, 250_000), torch.float32, "no clip", False),
        clip_case("200x250k", small_shapes(200, 250_000), torch.float32, "clip", False),
        softmax_case(1024, 4096, torch.float32, compile_ok=False),
    ]


def tiny_cases(device):
    """Smallest shapes, for the test of the runner itself."""
    return [
        cross_entropy_case(8, 300, torch.float32, compile_ok=False),
        clip_case("tiny", [(10,), (300,)], torch.float32, "clip", False),
        softmax_case(8, 300, torch.float32, compile_ok=False),
        linear_ce_case(8, 16, 300, torch.float32, compile_ok=False),
    ]
