"""Small launches of every nanfuse kernel configuration family, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python -m nanfuse.benchmark.kernel_smoke --device cuda

Each call goes through the public API on tiny tensors with odd sizes (partial blocks, unaligned rows, a
row split over programs, non-finite values), so the sanitizer sees every kernel's masks and tails. It
checks nothing numerically (the test suite does); it exits 0 when every call returned.
"""

import argparse
import math

import torch

import nanfuse


def _cross_entropy_calls(device):
    def logits(n, c, dtype=torch.float32):
        return (torch.randn(n, c, device=device) * 3).to(dtype).requires_grad_()

    target = torch.randint(0, 1001, (37,), device=device)
    target[::5] = -100
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for reduction in ("mean", "sum", "none"):
            x = logits(37, 1001, dtype)
            loss = nanfuse.cross_entropy(x, target, reduction=reduction)
            (loss.sum() * 0.5).backward()
    x = logits(37, 1001)
    weight = torch.rand(1001, device=device)
    nanfuse.cross_entropy(x, target, weight=weight, label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
                          logit_scale=0.5).backward()
    probabilities = torch.softmax(torch.randn(37, 1001, device=device), dim=1)
    nanfuse.cross_entropy(logits(37, 1001), probabilities, label_smoothing=0.05).backward()
    wide = logits(3, 70_000, torch.bfloat16)  # few rows, many classes: each row split over programs
    nanfuse.cross_entropy(wide, torch.randint(0, 70_000, (3,), device=device)).backward()
    inner = logits(37, 1001).clone()  # not a leaf: in-place backward is allowed
    (nanfuse.cross_entropy(inner, target, inplace_backward=True) * 2.0).backward()
    masked = logits(5, 300)
    with torch.no_grad():
        masked[1] = -math.inf
        masked[2, 7] = math.nan
    nanfuse.cross_entropy(masked, torch.tensor([1, -100, 3, 4, 5], device=device)).backward()


def _softmax_calls(device):
    for dtype in (torch.float32, torch.bfloat16):
        for n, c in [(7, 1001), (2, 70_000)]:
            x = (torch.randn(n, c, device=device) * 3).to(dtype).requires_grad_()
            for fn in (nanfuse.softmax, nanfuse.log_softmax):
                fn(x, dim=-1).backward(torch.randn(n, c, device=device).to(dtype))


def _clip_calls(device):
    for norm_type in (2.0, 1.0, 3.5, math.inf):
        params = []
        for i, n in enumerate([1, 7, 4097, 70_001, 513]):
            dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
            p = torch.nn.Parameter(torch.randn(n, device=device, dtype=dtype))
            p.grad = torch.randn(n, device=device, dtype=dtype)
            params.append(p)
        nanfuse.clip_grad_norm_(params, 0.1, norm_type)
        params[3].grad[5] = math.nan
        nanfuse.clip_grad_norm_(params, 0.1, norm_type)


def run(device):
    """Every kernel family once on `device`; returns how many groups of calls ran."""
    device = torch.device(device)
    groups = [_cross_entropy_calls, _softmax_calls, _clip_calls]
    for calls in groups:
        calls(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(groups)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to launch (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    print(f"kernel smoke: {run(args.device)} groups of calls on {args.device} returned")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
