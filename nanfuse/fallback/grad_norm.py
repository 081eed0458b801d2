"""Global gradient norm with non-finite check in pure PyTorch: the CPU path of kernels/grad_norm.py.

Same outputs and numerics strategy: the norm of each tensor's finite values is its max |g| times the
norm of |g| / max, which can neither overflow nor underflow over the whole finite range (subnormals
included), kept in fp64; NaN/Inf counted. In eager mode on CPU (where reading a value is free) the
per-tensor norms come first from one fused foreach pass (G bytes read), and only tensors whose direct
norm may have overflowed, underflowed or met a NaN/Inf are read again, scaled; elsewhere (CUDA with
NANFUSE_BACKEND=torch, or under torch.compile) every tensor takes the branch-free scaled path: NaN and
Inf counts, max, scaled norm, each one pass over it.
"""

import math

import torch

from .._backend import may_read_values

# a direct sum of p-th powers S is trusted when S >= numel * SAFE_SUM[acc]: every term that lost bits to
# underflow (each off by less than the smallest normal) then changes S by under 2**-26 of itself
SAFE_SUM = {torch.float32: 2.0**-100, torch.float64: 2.0**-960}


def norm_dtype(grads):
    """The dtype of the returned norm and coefficient, and of the accumulation: fp64 if any gradient is fp64,
    else fp32."""
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def _scaled_norm(values, norm_type):
    """p-norm of a 1-D tensor of magnitudes >= 0, as max * ||values / max||_p: no overflow, no underflow."""
    top = values.amax() if values.numel() else values.new_zeros(())
    if norm_type == math.inf:
        return top
    safe = torch.where(top > 0, top, 1.0)  # a division (correctly rounded), not a reciprocal: fine if subnormal
    return torch.where(top > 0, top.double() * torch.linalg.vector_norm(values / safe, norm_type).double(), 0.0)


def _robust_norms(grads, norm_type, acc):
    """Per tensor: fp64 norm of its finite values (scaled, accumulated in acc), NaN count, Inf count."""
    norms, nans, infs = [], [], []
    for g in grads:
        g = g.detach().flatten()
        nans.append(torch.isnan(g).sum())
        infs.append(torch.isinf(g).sum())
        magnitude = torch.where(torch.isfinite(g), g.abs(), 0.0).to(acc)
        norms.append(_scaled_norm(magnitude, norm_type).double())
    return norms, nans, infs


def _direct_norms(grads, norm_type, acc):
    """(fp64 norms, suspects) from one fused foreach pass accumulating in acc; suspects are the indices of
    tensors whose direct norm may be wrong (non-finite, or a sum of p-th powers too small to trust)."""
    norms = torch.stack(torch._foreach_norm(grads, norm_type, dtype=acc)).double()
    suspect = ~torch.isfinite(norms)
    if norm_type != math.inf:  # the max is exact; sums of p-th powers can lose tiny terms
        numels = torch.tensor([g.numel() for g in grads], dtype=torch.float64)
        suspect |= norms.pow(norm_type) < numels * SAFE_SUM[acc]
    return norms, suspect.nonzero().flatten().tolist()


def tensor_norms(grads, norm_type, acc):
    """(finite norms (T,) fp64, NaN counts (T,), Inf counts (T,)) of gradients on one device, accumulated in acc."""
    if not may_read_values(grads[0]):
        norms, nans, infs = _robust_norms(grads, norm_type, acc)
        return torch.stack(norms), torch.stack(nans), torch.stack(infs)
    norms, suspects = _direct_norms(grads, norm_type, acc)  # CPU, eager: reading is free
    nans = torch.zeros(len(grads), dtype=torch.int64)
    infs = torch.zeros(len(grads), dtype=torch.int64)
    if suspects:  # a NaN/Inf, or finite values whose p-th powers overflowed or underflowed: again, scaled
        again = _robust_norms([grads[i] for i in suspects], norm_type, acc)
        for slot, (norm, nan, inf) in zip(suspects, zip(*again)):
            norms[slot], nans[slot], infs[slot] = norm, nan, inf
    return norms, nans, infs


def grad_norm(grads, max_norm, norm_type):
    """(result [3]: norm, coef, found_inf, in norm_dtype; fp64 norm of the finite values; counts int64[2]:
    NaN, Inf) of one device's gradients."""
    dtype = norm_dtype(grads)
    grads = [g for g in grads if g.numel()]
    if not grads:
        return finish(torch.zeros((), dtype=torch.float64), torch.zeros(2, dtype=torch.int64), max_norm, dtype)
    norms, nans, infs = tensor_norms(grads, norm_type, dtype)
    return finish(_scaled_norm(norms, norm_type), torch.stack([nans.sum(), infs.sum()]), max_norm, dtype)


def finish(finite_norm, counts, max_norm, dtype):
    """(result [3] in `dtype`: norm, clip coefficient, flag; finite_norm; counts) from the fp64 norm of the
    finite values and the NaN/Inf counts. The norm saturates at dtype's largest finite value; the
    coefficient comes from the unsaturated fp64 norm."""
    finite_norm = finite_norm.double().clamp(max=torch.finfo(torch.float64).max)  # fp64 gradients near 1e308
    norm = torch.where(counts[0] > 0, math.nan,
                       torch.where(counts[1] > 0, math.inf, finite_norm.clamp(max=torch.finfo(dtype).max)))
    found_inf = (counts.sum() > 0).double()
    coef = torch.ones_like(finite_norm)
    if max_norm is not None:
        coef = torch.where(found_inf == 0, torch.clamp(max_norm / (finite_norm + 1e-6), max=1.0), 1.0)
    return torch.stack([norm, coef, found_inf]).to(dtype), finite_norm, counts


def scale_(grads, coef):
    """Multiply the gradients by the 0-dim coef in place; skipped when it is 1 and reading it is free."""
    if may_read_values(coef) and coef.item() == 1.0:  # CPU, eager: reading is free and skips a pass
        return
    torch._foreach_mul_(grads, coef)
