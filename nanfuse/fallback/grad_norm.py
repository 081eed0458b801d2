"""Global gradient norm with non-finite check in pure PyTorch: the CPU path of kernels/grad_norm.py.

Same outputs and numerics strategy: every piece of the gradients (a tensor, or a run of CHUNK elements
of a large one) is described by a pair (scale, sum) in fp64 with norm = scale * sum ** (1 / p): its
max |g| and the sum of (|g| / max) ** p over its finite values, which can neither overflow nor
underflow over the whole finite range (subnormals included), for any p. Pairs are combined like the
kernel's partials, and the final norm is formed in log space, so it saturates instead of overflowing.
In eager mode on CPU (where reading a value is free) the pieces' norms come first from one fused
foreach pass (G bytes read; pieces of at most CHUNK elements keep fp32 accumulation within 2e-7), and
only pieces whose direct norm may have overflowed, underflowed or met a NaN/Inf are read again,
scaled; elsewhere (CUDA with NANFUSE_BACKEND=torch, or under torch.compile) every tensor is one piece
and takes the branch-free scaled path: NaN and Inf counts, max, scaled sum (in fp64), each one pass.
"""

import math

import torch

from .._backend import may_read_values

# a direct sum of p-th powers S is trusted when S >= numel * SAFE_SUM[acc]: every term that lost bits to
# underflow (each off by less than the smallest normal) then changes S by under 2**-26 of itself
SAFE_SUM = {torch.float32: 2.0**-100, torch.float64: 2.0**-960}
CHUNK = 1 << 16  # elements per piece: fp32 accumulation over 65,536 randn values errs by about 1.5e-7
FP64_MAX = torch.finfo(torch.float64).max


def norm_dtype(grads):
    """The dtype of the returned norm and coefficient, and of the accumulation: fp64 if any gradient is fp64,
    else fp32."""
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def _pieces(grads):
    """The gradients as pieces of at most CHUNK elements: small ones as they are, large ones as flat views
    (a copy where the gradient is not contiguous)."""
    pieces = []
    for g in grads:
        pieces.extend(g.reshape(-1).split(CHUNK) if g.numel() > CHUNK else (g,))
    return pieces


def combine_pairs(scales, sums, norm_type):
    """(scale, sum) fp64 0-dim pair of the norm of several pieces given as 1-D fp64 (scale, sum) pairs:
    the largest scale, and the sums reweighted by (scale_i / scale) ** p in log space (no underflow)."""
    top = scales.amax() if scales.numel() else scales.new_zeros(())
    if norm_type == math.inf:
        return top, torch.ones_like(top)
    positive = scales > 0
    log_ratio = torch.log2(torch.where(positive, scales, 1.0)) - torch.log2(torch.where(top > 0, top, 1.0))
    weights = torch.where(positive, torch.exp2(norm_type * log_ratio), 0.0)
    return top, (sums * weights).sum()


def pair_log2(scale, total, norm_type):
    """log2 of the norm scale * total ** (1 / p) (fp64; -inf for 0): it exists where the norm overflows."""
    if norm_type == math.inf:
        return torch.log2(scale)
    return torch.log2(scale) + torch.log2(total) / norm_type


def pair_norm(scale, total, norm_type):
    """The norm scale * total ** (1 / p) in fp64, saturated at fp64's largest finite value."""
    if norm_type == math.inf:
        return scale
    root = {1.0: total, 2.0: torch.sqrt(total)}.get(norm_type)
    if root is None:
        root = torch.exp2(torch.log2(total) / norm_type)
    return torch.where(scale > 0, scale * root, 0.0).clamp(max=FP64_MAX)


def _robust_pairs(pieces, norm_type, acc):
    """Per piece: (max |g| over finite values, sum of (|g| / max) ** p summed in fp64, NaN count, Inf count);
    the ratios are formed in acc."""
    scales, sums, nans, infs = [], [], [], []
    for g in pieces:
        nans.append(torch.isnan(g).sum())
        infs.append(torch.isinf(g).sum())
        magnitude = torch.where(torch.isfinite(g), g.abs(), 0.0).to(acc)
        top = magnitude.amax()
        # a division (correctly rounded), not a reciprocal: fine if top is subnormal
        ratio = magnitude / torch.where(top > 0, top, 1.0)
        scales.append(top.double())
        sums.append(torch.ones_like(top, dtype=torch.float64) if norm_type == math.inf
                    else ratio.pow(norm_type).sum(dtype=torch.float64))
    return scales, sums, nans, infs


def _direct_norms(pieces, norm_type, acc):
    """(fp64 norms, suspects) from one fused foreach pass accumulating in acc; suspects are the indices of
    pieces whose direct norm may be wrong (non-finite, or a sum of p-th powers too small to trust)."""
    norms = torch.stack(torch._foreach_norm(pieces, norm_type, dtype=acc)).double()
    suspect = ~torch.isfinite(norms)
    if norm_type != math.inf:  # the max is exact; sums of p-th powers can lose tiny terms
        numels = torch.tensor([g.numel() for g in pieces], dtype=torch.float64)
        suspect |= norms.pow(norm_type) < numels * SAFE_SUM[acc]
    return norms, suspect.nonzero().flatten().tolist()


def piece_pairs(grads, norm_type, acc):
    """(scales (K,) fp64, sums (K,) fp64, NaN count, Inf count) over the finite values of gradients on one
    device, as K pieces: whole tensors on the scaled path (its sums are fp64), runs of at most CHUNK elements
    on the direct one (which accumulates in acc)."""
    if not may_read_values(grads[0]):
        scales, sums, nans, infs = _robust_pairs(grads, norm_type, acc)
        return torch.stack(scales), torch.stack(sums), torch.stack(nans).sum(), torch.stack(infs).sum()
    pieces = _pieces(grads)  # CPU, eager: reading is free
    scales, suspects = _direct_norms(pieces, norm_type, acc)
    sums = torch.ones_like(scales)  # a direct norm n is the pair (n, 1)
    nans = infs = torch.zeros((), dtype=torch.int64)
    if suspects:  # a NaN/Inf, or finite values whose p-th powers overflowed or underflowed: again, scaled
        again = _robust_pairs([pieces[i] for i in suspects], norm_type, acc)
        index = torch.tensor(suspects)
        scales[index], sums[index] = torch.stack(again[0]), torch.stack(again[1])
        nans, infs = torch.stack(again[2]).sum(), torch.stack(again[3]).sum()
    return scales, sums, nans, infs


def grad_norm(grads, max_norm, norm_type):
    """(result [3]: norm, coef, found_inf, in norm_dtype; fp64 norm of the finite values; counts int64[2]:
    NaN, Inf) of one device's gradients."""
    dtype = norm_dtype(grads)
    grads = [g for g in grads if g.numel()]
    if not grads:
        return finish(torch.zeros((), dtype=torch.float64), torch.zeros(2, dtype=torch.int64), max_norm, dtype)
    scales, sums, nans, infs = piece_pairs(grads, norm_type, dtype)
    scale, total = combine_pairs(scales, sums, norm_type)
    return finish(pair_norm(scale, total, norm_type), torch.stack([nans, infs]), max_norm, dtype,
                  pair_log2(scale, total, norm_type))


def clip_coefficient(finite_norm, max_norm, log2_norm=None):
    """min(max_norm / (norm + 1e-6), 1) in fp64 from the saturated fp64 norm; where the norm saturated it
    comes from log2_norm (the unsaturated norm's log2), so it is right down to fp64's smallest subnormal."""
    direct = torch.clamp(max_norm / (finite_norm + 1e-6), max=1.0)
    if log2_norm is None:
        return direct
    from_log = torch.exp2(math.log2(max_norm) - log2_norm) if max_norm > 0 else torch.zeros_like(direct)
    return torch.where(finite_norm < FP64_MAX, direct, from_log.clamp(max=1.0))


def finish(finite_norm, counts, max_norm, dtype, log2_norm=None):
    """(result [3] in `dtype`: norm, clip coefficient, flag; finite_norm; counts) from the fp64 norm of the
    finite values (saturated at fp64's largest finite value; `log2_norm`, its unsaturated log2, where that may
    have happened) and the NaN/Inf counts. The norm saturates at dtype's largest finite value; the
    coefficient comes from the unsaturated norm."""
    finite_norm = finite_norm.double().clamp(max=FP64_MAX)
    norm = torch.where(counts[0] > 0, math.nan,
                       torch.where(counts[1] > 0, math.inf, finite_norm.clamp(max=torch.finfo(dtype).max)))
    found_inf = (counts.sum() > 0).double()
    coef = torch.ones_like(finite_norm)
    if max_norm is not None:
        coef = torch.where(found_inf == 0, clip_coefficient(finite_norm, max_norm, log2_norm), 1.0)
    return torch.stack([norm, coef, found_inf]).to(dtype), finite_norm, counts


def scale_(grads, coef):
    """Multiply the gradients by the 0-dim coef in place; skipped when it is 1 and reading it is free."""
    if may_read_values(coef) and coef.item() == 1.0:  # CPU, eager: reading is free and skips a pass
        return
    torch._foreach_mul_(grads, coef)
