"""Global gradient norm with non-finite check in pure PyTorch: the CPU path of kernels/grad_norm.py.

Same outputs and numerics strategy: every piece of the gradients is described by a pair (scale, sum)
in fp64 with norm = scale * sum ** (1 / p): its max |g| and the sum of (|g| / max) ** p over its
finite values, which can neither overflow nor underflow over the whole finite range (subnormals
included), for any p. Pairs are combined like the kernel's partials, and the final norm is formed in
log space, so it saturates instead of overflowing. In eager mode on CPU (where reading a value is
free) the pieces' norms come first from PyTorch's norms, one read of G bytes: gradients of at most
ROW elements (WHOLE_IN_FP64 in fp64 where that is exact enough) in one fused foreach pass, larger ones as
rows of ROW elements (PyTorch accumulates a
norm in order, so fp32 over millions of values errs by 1e-3 and more; over 256, within 3e-6); only
gradients with a piece whose direct norm may have overflowed, underflowed or met a NaN/Inf are read
again, scaled. Elsewhere (CUDA with NANFUSE_BACKEND=torch, or under torch.compile) every tensor is one
piece and takes the branch-free scaled path: NaN and Inf counts, max, scaled sum (in fp64), each one
pass.
"""

import math

import torch

from .._backend import may_read_values

# a direct sum of p-th powers S is trusted when S >= numel * SAFE_SUM[acc]: every term that lost bits to
# underflow (each off by less than the smallest normal) then changes S by under 2**-26 of itself
SAFE_SUM = {torch.float32: 2.0**-100, torch.float64: 2.0**-960}
ROW = 256  # elements per piece: PyTorch's CPU norms accumulate in order, over 256 values within 3e-6
FP64_MAX = torch.finfo(torch.float64).max
WHOLE_IN_FP64 = 1 << 14  # up to this many elements an fp64-accumulated norm costs what ROW pieces do (CPU)
# half-precision gradients are widened to fp32 this many elements (a multiple of ROW) at a time: one buffer the size
# of a whole large gradient costs more in page faults than the widening itself (CPU bf16 GPT-2 norm: 55 ms -> 24-30
# ms, PyTorch 24-25 ms; 2**16 or 2**22 elements: 70-80 ms)
WIDEN_ELEMENTS = 1 << 20
HOST_PIECES = 4096  # at most this many pieces' norms are checked and combined in Python floats (CPU, eager)


def norm_dtype(grads):
    """The dtype of the returned norm and coefficient, and of the accumulation: fp64 if any gradient is fp64,
    else fp32."""
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def _row_norms(g, norm_type, acc):
    """Norms (accumulated in acc) of g's runs of ROW elements, in order (g is copied where not contiguous)."""
    flat = g.reshape(-1)
    if flat.dtype != acc and flat.numel() > WIDEN_ELEMENTS:  # the same rows, widened to acc a part at a time
        return torch.cat([_row_norms(part, norm_type, acc) for part in flat.split(WIDEN_ELEMENTS)])
    cut = flat.numel() - flat.numel() % ROW
    rows = [torch.linalg.vector_norm(flat[:cut].view(-1, ROW), norm_type, dim=1, dtype=acc)] if cut else []
    if cut < flat.numel():
        rows.append(torch.linalg.vector_norm(flat[cut:], norm_type, dtype=acc).reshape(1))
    return torch.cat(rows) if len(rows) > 1 else rows[0]


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


def _direct_norms(grads, norm_type, acc):
    """(fp64 norms of pieces, owner: the gradient of each piece, suspects: indices of gradients that have a piece
    whose direct norm may be wrong (non-finite, or a sum of p-th powers too small to trust)). Gradients of at
    most ROW elements (WHOLE_IN_FP64 where accumulated in fp64) are one piece each, in one fused foreach pass;
    larger ones are pieces of ROW elements."""
    # fp32/fp16/bf16 values' squares (abs values, maxima) in fp64 neither overflow nor underflow and add up exactly
    # enough in any order: there, gradients up to WHOLE_IN_FP64 elements are one piece each (fewer, cheaper pieces)
    in_fp64 = acc == torch.float32 and norm_type in (1.0, 2.0, math.inf)
    whole = WHOLE_IN_FP64 if in_fp64 else ROW
    small = [i for i, g in enumerate(grads) if g.numel() <= whole]
    norms = [None] * len(grads)
    if small:
        for i, norm in zip(small, torch._foreach_norm([grads[i] for i in small], norm_type,
                                                      dtype=torch.float64 if in_fp64 else acc)):
            norms[i] = norm.reshape(1)
    for i, g in enumerate(grads):
        if g.numel() > whole:
            norms[i] = _row_norms(g, norm_type, acc)
    flat = torch.cat(norms).double() if len(norms) > 1 else norms[0].double()
    safe = 0.0 if norm_type == math.inf else ROW * SAFE_SUM[acc]  # the max is exact; sums of p-th powers can lose
    # tiny terms (ROW: a piece's most). Reading is free here: piece_pairs calls this only on CPU, in eager mode
    if flat.numel() <= HOST_PIECES:  # few pieces: checked in Python, where each tensor op costs more
        smallest = safe ** (1.0 / norm_type) if safe else 0.0  # v ** p >= safe, without overflowing v ** p
        if all(smallest <= v < math.inf for v in flat.tolist()):
            return flat, None, []
    suspect = ~torch.isfinite(flat)
    if safe:
        suspect |= flat.pow(norm_type) < safe
    if not suspect.any():
        return flat, None, []
    owner = torch.repeat_interleave(torch.arange(len(grads)), torch.tensor([len(n) for n in norms]))
    return flat, owner, owner[suspect].unique().tolist()


def piece_pairs(grads, norm_type, acc, direct=None):
    """(scales (K,) fp64, sums (K,) fp64, NaN count, Inf count) over the finite values of gradients on one
    device, as K pieces: whole tensors on the scaled path (its sums are fp64), runs of at most ROW elements
    on the direct one (which accumulates in acc; `direct`: _direct_norms's result where already formed)."""
    if not may_read_values(grads[0]):
        scales, sums, nans, infs = _robust_pairs(grads, norm_type, acc)
        return torch.stack(scales), torch.stack(sums), torch.stack(nans).sum(), torch.stack(infs).sum()
    scales, owner, suspects = direct or _direct_norms(grads, norm_type, acc)  # CPU, eager: reading is free
    sums = torch.ones_like(scales)  # a direct norm n is the pair (n, 1)
    if not suspects:
        return scales, sums, torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    # a NaN/Inf, or finite values whose p-th powers overflowed or underflowed: that gradient again, scaled
    scales = torch.where(torch.isin(owner, torch.tensor(suspects)), 0.0, scales)
    again = _robust_pairs([grads[i] for i in suspects], norm_type, acc)
    return (torch.cat([scales, torch.stack(again[0])]), torch.cat([sums, torch.stack(again[1])]),
            torch.stack(again[2]).sum(), torch.stack(again[3]).sum())


def grad_norm(grads, max_norm, norm_type):
    """(result [3]: norm, coef, found_inf, in norm_dtype; fp64 norm of the finite values; counts int64[2]:
    NaN, Inf) of one device's gradients."""
    dtype = norm_dtype(grads)
    grads = [g for g in grads if g.numel()]
    if not grads:
        return finish(torch.zeros((), dtype=torch.float64), torch.zeros(2, dtype=torch.int64), max_norm, dtype)
    direct = None
    if may_read_values(grads[0]):  # CPU, eager: the pieces' norms are read, and combined on the host if they can be
        direct = _direct_norms(grads, norm_type, dtype)
        if not direct[2] and direct[0].numel() <= HOST_PIECES:
            host = _host_result(direct[0], max_norm, norm_type, dtype)
            if host is not None:
                return host
    scales, sums, nans, infs = piece_pairs(grads, norm_type, dtype, direct)
    scale, total = combine_pairs(scales, sums, norm_type)
    return finish(pair_norm(scale, total, norm_type), torch.stack([nans, infs]), max_norm, dtype,
                  pair_log2(scale, total, norm_type))


def host_norm(grads, norm_type):
    """The norm of plain non-fp64 CPU gradients of at most WHOLE_IN_FP64 values each, in eager mode, as a Python
    float: one fp64-accumulated foreach norm read on the host (exact enough, see _direct_norms). None where that
    does not apply: another norm_type, device or dtype, a larger gradient, one autograd tracks (create_graph=True:
    the general path runs under no_grad), or a NaN/Inf (the general path counts them). The common small-model
    case of NanGuard.step(), with no tensor made beyond the norms."""
    if norm_type not in (1.0, 2.0, math.inf) or not may_read_values(grads[0]) or any(
            type(g) is not torch.Tensor or g.dtype == torch.float64 or not g.is_cpu or g.numel() > WHOLE_IN_FP64
            or g.requires_grad for g in grads):
        return None
    grads = [g for g in grads if g.numel()]  # an empty one has no infinity norm
    if not grads:
        return 0.0
    # CPU, eager only (checked above): reading is free; one read per norm costs less than stack + tolist
    values = [norm.item() for norm in torch._foreach_norm(grads, norm_type, dtype=torch.float64)]
    if not all(v < math.inf for v in values):  # a NaN or Inf (max() would pass over a NaN)
        return None
    top = max(values)
    if norm_type == math.inf or top == 0.0:
        return top
    return top * math.fsum((v / top) ** norm_type for v in values) ** (1.0 / norm_type)


def _host_result(norms, max_norm, norm_type, dtype):
    """grad_norm's result from the pieces' fp64 norms (all finite, none suspect) read into Python and combined
    there as combine_pairs and finish do (the largest, and the others' p-th powers relative to it), three small
    tensors made in all; None where the norm would leave fp64's range (the tensor path saturates it)."""
    values = norms.tolist()
    top = max(values)
    if norm_type == math.inf or top == 0.0:
        finite = top
    else:
        finite = top * math.fsum((v / top) ** norm_type for v in values) ** (1.0 / norm_type)
    if not finite < FP64_MAX:
        return None
    coef = 1.0 if max_norm is None else min(max_norm / (finite + 1e-6), 1.0)
    result = torch.tensor([min(finite, torch.finfo(dtype).max), coef, 0.0], dtype=dtype)
    return result, torch.tensor(finite, dtype=torch.float64), torch.zeros(2, dtype=torch.int64)


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
