"""Fused softmax-cross-entropy: loss and gradient from one online log-sum-exp per row.

For row i with transformed logits x (logit_scale, then softcap), lse = logsumexp(x), per-class
coefficients a_c (target weight, smoothing, probability targets) and A = sum_c a_c:
    loss_i = sum_c a_c (lse - x_c) + z_loss lse^2,     dloss_i/dx_c = A p_c - a_c + 2 z_loss lse p_c.

Memory passes over N x C logits of B bytes (all math in fp32, no N x C fp32 buffer):
- forward with the gradient (fp32 reduction mean/sum): a program streams its row twice back to back
  (per-lane max and sum-exp, then loss and gradient) and writes the gradient once. The second read comes
  from L2 only while the rows in flight fit there: at 16 warps and about 40 registers, 3 programs per SM,
  396 rows on an H100 (50 MB L2), 324 on an A100 (40 MB). DRAM bytes at N = 8192:
    bf16 C = 32,000 (B = 0.52 GB): 396 x 64 KB = 25 MB in flight, 2B = 1.05 GB;
    bf16 C = 50,257 (B = 0.82 GB): 40 MB, at the L2's size: between 2B and 3B (1.6-2.5 GB);
    bf16 C = 128,256 (B = 2.1 GB): 396 x 256 KB = 102 MB, the second read misses: 3B = 6.3 GB;
    fp32 C = 32,000 (B = 1.05 GB): 51 MB: close to 3B = 3.1 GB.
  (Rows in flight sized from the L2, a persistent row loop, would bring the large vocabularies to 2B.)
- forward without the gradient: B (2B, as above, with label smoothing or probability targets).
- backward that recomputes the gradient (reduction='none', and half-precision mean/sum with the upstream
  factor folded in before the one rounding): B read + B written, from the saved per-row max and sum-exp.
  An ignored row's gradient is written as zeros without reading its logits.
Per element the main loops cost about 12 SASS instructions for the statistics (one MUFU.EX2: exp2 with
log2(e) folded in) and 8 for the gradient, 20 in all against 38 before (kernels/aot_check.py counts them);
the target's -a_y is applied once per row, after the sweep.
When there are too few rows to fill the GPU, rows are split into column chunks: one launch writes
each chunk's max and sum-exp, the second combines them per row (the partials are N x chunks floats).
lse is kept as (max, log sum-exp) throughout, so lse - x stays exact for large logits.
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    Launch,
    cdiv,
    combine_softmax_stats,
    lane_softmax_stats,
    next_power_of_2,
    tanh,
    warps_for_block,
)


@triton.jit
def _load_logits(row_ptr, cols, mask, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Logits of `cols` in fp32, scaled then soft-capped; masked lanes read as -inf."""
    x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_SOFTCAP:
        # tanh(-inf) is -1: a masked class or a padding lane would become the finite logit -softcap
        # and take probability mass. Keep -inf as -inf. The scale goes inside tanh in one factor, so a finite
        # logit whose scaled value overflows fp32 still caps to +-softcap (and is not taken for a masked one).
        x = tl.where(x == float("-inf"), x, softcap * tanh(x * (logit_scale / softcap)))
    else:
        x = x * logit_scale
    return x


@triton.jit
def _dense_coef(target_row_ptr, weight_ptr, cols, mask, smoothing, n_classes,
                PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """a_c spread over every class: w_c((1-eps) t_c + eps/C) for probability targets, w_c eps/C otherwise."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(mask, 1.0, 0.0)
    if PROB_TARGET:
        t = tl.load(target_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        return w * ((1.0 - smoothing) * t + smoothing / n_classes)
    return w * (smoothing / n_classes)


@triton.jit
def _chunk_stats(logits_row_ptr, target_row_ptr, weight_ptr, col_start, col_end, n_classes,
                 smoothing, logit_scale, softcap,
                 HAS_SOFTCAP: tl.constexpr, HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr):
    """Max m and sum_c exp(x_c - m) of columns [col_start, col_end) (m = -inf and sum 0 when all are -inf); for
    probability targets, sum_c a_c. Each lane keeps its own running max and sum (one exp2 per element), combined
    once after the loop: no block-wide reduction per block."""
    m_lane = tl.full([BLOCK_SIZE], -3.4028234663852886e38, tl.float32)
    s_lane = tl.zeros([BLOCK_SIZE], tl.float32)
    mass = tl.full([], 0.0, tl.float32)
    for start in range(col_start, col_end, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < col_end
        x = _load_logits(logits_row_ptr, cols, mask, logit_scale, softcap, HAS_SOFTCAP)
        m_lane, s_lane = lane_softmax_stats(m_lane, s_lane, x)
        if PROB_TARGET:
            # reduced per block: a third per-lane vector spills with triton 3.6 (fp16, sm_90)
            mass += tl.sum(_dense_coef(target_row_ptr, weight_ptr, cols, mask, smoothing, n_classes,
                                       PROB_TARGET, HAS_WEIGHT), 0)
    m, s = combine_softmax_stats(m_lane, s_lane)
    return m, s, mass


@triton.jit
def _gradient(x, a, shift, log_s2, grad_p, grad_a, softcap, HAS_SOFTCAP: tl.constexpr, DENSE: tl.constexpr):
    """dloss/dlogit = (grad_p p - grad_a a) (1 - tanh^2 with a softcap), p = exp2((x - shift) log2(e) - log_s2);
    grad_p and grad_a carry the reduction's factor, logit_scale and a bad target's NaN."""
    g = grad_p * tl.exp2((x - shift) * LOG2E - log_s2)
    if DENSE:
        g -= grad_a * a
    if HAS_SOFTCAP:
        # d softcap*tanh(u/softcap) / du = 1 - tanh^2; zero where x was -inf
        g *= tl.where(x == float("-inf"), 0.0, 1.0 - (x / softcap) * (x / softcap))
    return g


@triton.jit
def _weighted_gap(a, shift, x, log_s):
    """a * (lse - x) with lse - x = (shift - x) + log_s, finite whenever the exact product fits in fp32: for
    finite logits lse - x alone may overflow (x = -3e38 against a max of 3e38), so there it is formed halved."""
    gap = (shift - x) + log_s
    half = (0.5 * shift - 0.5 * x) + 0.5 * log_s
    return tl.where((gap == float("inf")) & (x != float("-inf")), 2.0 * (a * half), a * gap)


@triton.jit
def _row_lse(m, s):
    """lse = shift + log_s, kept as two fp32 numbers: x - lse as (x - shift) - log_s stays exact for large logits.

    An all -inf row has shift 0 and log_s -inf.
    """
    return tl.where(m == float("-inf"), 0.0, m), tl.log(s)


@triton.jit
def cross_entropy_stats_kernel(
    logits_ptr,  # (N, C), classes contiguous
    target_ptr,  # (N, C) probabilities (PROB_TARGET), else unused
    weight_ptr,  # (C,) class weights (HAS_WEIGHT)
    part_max_ptr,  # fp32 (N, n_chunks) out: max of each column chunk
    part_sum_ptr,  # fp32 (N, n_chunks) out: sum of exp(x - max) of each column chunk
    part_mass_ptr,  # fp32 (N, n_chunks) out: sum_c a_c of each chunk (PROB_TARGET)
    n_classes, chunk_size, logits_row_stride, target_row_stride,
    smoothing, logit_scale, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Grid (N, n_chunks): partial row statistics of one column chunk, for rows split across programs."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    col_start = chunk * chunk_size
    col_end = tl.minimum(col_start + chunk_size, n_classes)
    m, s, mass = _chunk_stats(logits_ptr + row * logits_row_stride, target_ptr + row * target_row_stride,
                             weight_ptr, col_start, col_end, n_classes, smoothing, logit_scale, softcap,
                             HAS_SOFTCAP, HAS_WEIGHT, PROB_TARGET, BLOCK_SIZE)
    part = row * tl.num_programs(1) + chunk
    tl.store(part_max_ptr + part, m)
    tl.store(part_sum_ptr + part, s)
    if PROB_TARGET:
        tl.store(part_mass_ptr + part, mass)


@triton.jit
def cross_entropy_kernel(
    # data
    logits_ptr,  # (N, C), classes contiguous, rows logits_row_stride apart
    target_ptr,  # (N,) class indices, or (N, C) probabilities (PROB_TARGET)
    weight_ptr,  # (C,) class weights (HAS_WEIGHT)
    scalars_ptr,  # fp32 [ce_norm, z_norm, weight_sum] on the device: reduction normalisers and sum_c w_c
    row_scale_ptr,  # fp32 upstream gradient per row (HAS_ROW_SCALE), row_scale_stride apart (0: broadcast)
    part_max_ptr,  # fp32 (N, n_parts) partial maxima to combine (read unless COMPUTE_STATS)
    part_sum_ptr,  # fp32 (N, n_parts) partial sums of exp(x - max) (read unless COMPUTE_STATS)
    part_mass_ptr,  # fp32 (N, n_parts) partial sum_c a_c (PROB_TARGET, read unless COMPUTE_STATS)
    max_ptr,  # fp32 (N,) out: row max (WRITE_LOSS)
    sum_ptr,  # fp32 (N,) out: row sum of exp(x - max) (WRITE_LOSS)
    mass_ptr,  # fp32 (N,) out: row sum_c a_c (WRITE_LOSS and PROB_TARGET)
    loss_ptr,  # fp32 (N, n_chunks) out: each chunk's share of the normalised row loss (WRITE_LOSS)
    grad_ptr,  # (N, C) out: gradient in the logits' dtype, rows grad_row_stride apart (WRITE_GRAD)
    # shapes and strides
    n_classes, chunk_size, n_parts, logits_row_stride, target_row_stride, grad_row_stride,
    row_scale_stride,
    # runtime scalars
    ignore_index, smoothing, z_loss, logit_scale, softcap,
    # constants
    HAS_SOFTCAP: tl.constexpr, HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr,
    SMOOTHING: tl.constexpr, COMPUTE_STATS: tl.constexpr, WRITE_LOSS: tl.constexpr,
    WRITE_GRAD: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, GRAD_IN_PLACE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Grid (N, n_chunks): loss share and gradient of one column chunk of one row.

    COMPUTE_STATS (one chunk per row) computes the row's max and sum-exp here; otherwise the row's
    n_parts partials (from the stats kernel, or the row statistics saved by forward) are combined first.
    """
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 for large N x C
    chunk = tl.program_id(1)
    col_start = chunk * chunk_size
    col_end = tl.minimum(col_start + chunk_size, n_classes)
    logits_row_ptr = logits_ptr + row * logits_row_stride
    target_row_ptr = target_ptr + row * target_row_stride

    # 1. the row's target
    if PROB_TARGET:
        valid = row >= 0  # every row counts; ignore_index does not apply to probabilities
        in_range = valid
        target_coef = 0.0
    else:
        y = tl.load(target_ptr + row)
        valid = y != ignore_index
        in_range = (y >= 0) & (y < n_classes)
        y = tl.where(in_range, y, 0).to(tl.int32)  # never read out of bounds; the row is poisoned below
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y).to(tl.float32)
        else:
            w_y = 1.0
        target_coef = w_y * (1.0 - smoothing)  # a_y gets this on top of the dense part

    # 2. row statistics: max, sum-exp and A = sum_c a_c
    if COMPUTE_STATS:
        m, s, mass = _chunk_stats(logits_row_ptr, target_row_ptr, weight_ptr, 0, n_classes, n_classes,
                                 smoothing, logit_scale, softcap,
                                 HAS_SOFTCAP, HAS_WEIGHT, PROB_TARGET, BLOCK_SIZE)
    else:
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        mass = tl.full([], 0.0, tl.float32)
        for k in range(0, n_parts):
            part_max = tl.load(part_max_ptr + row * n_parts + k)
            m_new = tl.maximum(m, part_max)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = (s * tl.exp2((m - shift) * LOG2E)
                 + tl.load(part_sum_ptr + row * n_parts + k) * tl.exp2((part_max - shift) * LOG2E))
            m = m_new
            if PROB_TARGET:
                mass += tl.load(part_mass_ptr + row * n_parts + k)
    shift, log_s = _row_lse(m, s)
    lse = shift + log_s
    if not PROB_TARGET:
        mass = target_coef
        if SMOOTHING:  # only then: a NaN or Inf weight of a class no target uses must not reach the row
            mass += smoothing * tl.load(scalars_ptr + 2) / n_classes

    ce_scale = tl.load(scalars_ptr)
    z_scale = tl.load(scalars_ptr + 1)
    if HAS_ROW_SCALE:
        upstream = tl.load(row_scale_ptr + row * row_scale_stride).to(tl.float32)
        ce_scale *= upstream
        z_scale *= upstream
    p_coef = ce_scale * mass + 2.0 * z_scale * z_loss * lse  # dloss/dx_c = p_coef p_c - ce_scale a_c
    poison = tl.where(in_range | ~valid, 0.0, float("nan"))  # bad target: NaN, never a finite guess
    grad_p = p_coef * logit_scale + poison
    grad_a = ce_scale * logit_scale + poison
    log_s2 = log_s * LOG2E
    if not PROB_TARGET and GRAD_IN_PLACE:
        # the sweep overwrites the logits with the gradient: read the target's logit first (otherwise it is
        # read after the sweep, so that it does not hold a register across the loop)
        x_y = _load_logits(logits_row_ptr, y, y < n_classes, logit_scale, softcap, HAS_SOFTCAP)
        # other warps of this program store into the row below: order this load before all of them
        tl.debug_barrier()

    # 3. one sweep over the chunk: dense loss terms and the gradient (an ignored row's is 0, its logits unread)
    # per lane and reduced once, except for fp32 probability targets, where that vector spills (unaligned rows,
    # triton 3.9) and the loss is reduced per block (doing that everywhere spills elsewhere with triton 3.6)
    PER_BLOCK: tl.constexpr = PROB_TARGET and logits_ptr.dtype.element_ty == tl.float32
    if PER_BLOCK:
        dense_loss = tl.full([], 0.0, tl.float32)
    else:
        dense_loss = tl.zeros([BLOCK_SIZE], tl.float32)
    grad_row_ptr = grad_ptr + row * grad_row_stride
    if valid:
        if WRITE_GRAD or SMOOTHING or PROB_TARGET:
            for start in range(col_start, col_end, BLOCK_SIZE):
                cols = start + tl.arange(0, BLOCK_SIZE)
                mask = cols < col_end
                x = _load_logits(logits_row_ptr, cols, mask, logit_scale, softcap, HAS_SOFTCAP)
                a = 0.0
                if SMOOTHING or PROB_TARGET:
                    a = _dense_coef(target_row_ptr, weight_ptr, cols, mask, smoothing, n_classes,
                                    PROB_TARGET, HAS_WEIGHT)
                    # a_c = 0 adds nothing, also where x_c = -inf (0 * inf is NaN)
                    gap = tl.where(a != 0.0, _weighted_gap(a, shift, x, log_s), 0.0)
                    if PER_BLOCK:
                        dense_loss += tl.sum(gap, 0)
                    else:
                        dense_loss += gap
                if WRITE_GRAD:
                    g = _gradient(x, a, shift, log_s2, grad_p, grad_a, softcap, HAS_SOFTCAP, SMOOTHING or PROB_TARGET)
                    tl.store(grad_row_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
    elif WRITE_GRAD:
        for start in range(col_start, col_end, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            tl.store(grad_row_ptr + cols, tl.zeros([BLOCK_SIZE], grad_ptr.dtype.element_ty), mask=cols < col_end)
    if not PROB_TARGET:
        if not GRAD_IN_PLACE:
            x_y = _load_logits(logits_row_ptr, y, y < n_classes, logit_scale, softcap, HAS_SOFTCAP)
        if WRITE_GRAD:
            # the target's -a_y, once per row: the sweep stored its element without it
            a_y = target_coef
            if SMOOTHING:
                a_y += _dense_coef(target_row_ptr, weight_ptr, y, y < n_classes, smoothing, n_classes,
                                   PROB_TARGET, HAS_WEIGHT)
            g_y = _gradient(x_y, a_y, shift, log_s2, grad_p, grad_a, softcap, HAS_SOFTCAP, True)
            tl.debug_barrier()  # after every warp's stores of the sweep
            tl.store(grad_row_ptr + y, g_y.to(grad_ptr.dtype.element_ty),
                     mask=valid & in_range & (y >= col_start) & (y < col_end))

    # 4. this chunk's share of the row loss, already normalised for the reduction
    if WRITE_LOSS:
        if PER_BLOCK:
            ce = dense_loss
        else:
            ce = tl.sum(dense_loss, 0)
        if not PROB_TARGET:
            owns_target = (y >= col_start) & (y < col_end) & (target_coef != 0.0)
            ce += tl.where(owns_target, _weighted_gap(target_coef, shift, x_y, log_s), 0.0)
        loss = tl.where(ce_scale != 0.0, ce_scale * ce, 0.0)
        if chunk == 0:
            loss += tl.where(z_scale != 0.0, z_scale * z_loss * lse * lse, 0.0)
        loss = tl.where(valid, loss + poison, 0.0)
        tl.store(loss_ptr + row * tl.num_programs(1) + chunk, loss)
        if chunk == 0:
            tl.store(max_ptr + row, m)
            tl.store(sum_ptr + row, s)
            if PROB_TARGET:
                tl.store(mass_ptr + row, mass)


class LaunchConfig(NamedTuple):
    block_size: int
    num_warps: int
    n_chunks: int
    chunk_size: int


MAX_BLOCK_SIZE = 4096


def launch_config(n_rows: int, n_classes: int, n_sms: int, fewer_warps: bool = False) -> LaunchConfig:
    """Block size, warps and row split for an N x C problem on a device with n_sms multiprocessors.

    One program per row once there are two rows per SM; fewer rows are split into column chunks
    (whole blocks each) so that about 4 programs per SM are in flight. fewer_warps (set for weights,
    smoothing, softcap, probability targets, or a gradient written in place) halves the warps of a wide
    block: at 16 warps ptxas spills those configurations on sm_90 or sm_80 (kernels/aot_check.py shows
    it), at 8 it does not.
    """
    block_size = min(MAX_BLOCK_SIZE, max(16, next_power_of_2(n_classes)))
    n_chunks = 1
    if n_rows < 2 * n_sms:
        n_chunks = min(cdiv(n_classes, block_size), cdiv(4 * n_sms, max(n_rows, 1)))
    chunk_size = cdiv(cdiv(n_classes, n_chunks), block_size) * block_size
    num_warps = warps_for_block(block_size) // (2 if fewer_warps and block_size >= 2048 else 1)
    return LaunchConfig(block_size, num_warps, cdiv(n_classes, chunk_size), chunk_size)


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter on CPU tensors: few enough "SMs" that small tests exercise the row split


def _fewer_warps(weight, prob_target, opts, in_place):
    return weight is not None or prob_target or opts.label_smoothing > 0 or opts.softcap is not None or in_place


def _flags(weight, prob_target, opts):
    return dict(HAS_SOFTCAP=opts.softcap is not None, HAS_WEIGHT=weight is not None, PROB_TARGET=prob_target,
                SMOOTHING=opts.label_smoothing > 0, smoothing=opts.label_smoothing, logit_scale=opts.logit_scale,
                softcap=1.0 if opts.softcap is None else opts.softcap)


def empty_stats(logits, target):
    """The row statistics forward saves for backward: rows of max, sum-exp and A (probability targets)."""
    return torch.empty(3 if target.dim() == 2 else 2, logits.shape[0], device=logits.device, dtype=torch.float32)


def plan_forward(logits, target, weight, scalars, opts, grad, n_sms):
    """(launches, per-chunk losses (N, chunks), row statistics) of the forward; `grad` gets the gradient.

    logits: (N, C) with contiguous classes; target: (N,) int64 or (N, C) probabilities.
    """
    n_rows, n_classes = logits.shape
    prob_target = target.dim() == 2
    cfg = launch_config(n_rows, n_classes, n_sms, _fewer_warps(weight, prob_target, opts, grad is logits))
    f32 = dict(device=logits.device, dtype=torch.float32)
    loss = torch.empty(n_rows, cfg.n_chunks, **f32)
    stats = empty_stats(logits, target)
    if n_rows == 0:
        return [], loss, stats
    flags = _flags(weight, prob_target, opts)
    weight = logits if weight is None else weight  # never read without HAS_WEIGHT
    target_row_stride = target.stride(0) if prob_target else 0
    launches, parts = [], stats
    grid = (n_rows, cfg.n_chunks)
    if cfg.n_chunks > 1:
        parts = torch.empty(stats.shape[0], n_rows, cfg.n_chunks, **f32)
        stats_flags = {k: v for k, v in flags.items() if k not in ("SMOOTHING",)}
        launches.append(Launch(cross_entropy_stats_kernel, grid, dict(
            logits_ptr=logits, target_ptr=target, weight_ptr=weight, part_max_ptr=parts[0], part_sum_ptr=parts[1],
            part_mass_ptr=parts[-1], n_classes=n_classes, chunk_size=cfg.chunk_size,
            logits_row_stride=logits.stride(0), target_row_stride=target_row_stride,
            BLOCK_SIZE=cfg.block_size, **stats_flags), cfg.num_warps))
    launches.append(Launch(cross_entropy_kernel, grid, dict(
        logits_ptr=logits, target_ptr=target, weight_ptr=weight, scalars_ptr=scalars, row_scale_ptr=scalars,
        part_max_ptr=parts[0], part_sum_ptr=parts[1], part_mass_ptr=parts[-1],
        max_ptr=stats[0], sum_ptr=stats[1], mass_ptr=stats[-1], loss_ptr=loss,
        grad_ptr=logits if grad is None else grad,
        n_classes=n_classes, chunk_size=cfg.chunk_size, n_parts=cfg.n_chunks, logits_row_stride=logits.stride(0),
        target_row_stride=target_row_stride, grad_row_stride=0 if grad is None else grad.stride(0),
        row_scale_stride=0, ignore_index=opts.ignore_index, z_loss=opts.z_loss,
        COMPUTE_STATS=cfg.n_chunks == 1, WRITE_LOSS=True, WRITE_GRAD=grad is not None, HAS_ROW_SCALE=False,
        GRAD_IN_PLACE=grad is logits, BLOCK_SIZE=cfg.block_size, **flags), cfg.num_warps))
    return launches, loss, stats


def plan_backward(logits, target, weight, scalars, opts, stats, grad_output, grad, n_sms):
    """Launches of the recomputing backward: `grad` from the saved row statistics and the upstream gradient per
    row (N,) (stride 0: one factor for all rows), one read, one write."""
    n_rows, n_classes = logits.shape
    if n_rows == 0:
        return []
    prob_target = target.dim() == 2
    cfg = launch_config(n_rows, n_classes, n_sms, _fewer_warps(weight, prob_target, opts, grad is logits))
    return [Launch(cross_entropy_kernel, (n_rows, cfg.n_chunks), dict(
        logits_ptr=logits, target_ptr=target, weight_ptr=logits if weight is None else weight,
        scalars_ptr=scalars, row_scale_ptr=grad_output, part_max_ptr=stats[0], part_sum_ptr=stats[1],
        part_mass_ptr=stats[-1], max_ptr=stats[0], sum_ptr=stats[1], mass_ptr=stats[-1], loss_ptr=stats,
        grad_ptr=grad, n_classes=n_classes, chunk_size=cfg.chunk_size, n_parts=1,
        logits_row_stride=logits.stride(0), target_row_stride=target.stride(0) if prob_target else 0,
        grad_row_stride=grad.stride(0), row_scale_stride=grad_output.stride(0), ignore_index=opts.ignore_index,
        z_loss=opts.z_loss, COMPUTE_STATS=False, WRITE_LOSS=False, WRITE_GRAD=True, HAS_ROW_SCALE=True,
        GRAD_IN_PLACE=grad is logits, BLOCK_SIZE=cfg.block_size, **_flags(weight, prob_target, opts)),
        cfg.num_warps)]


def cross_entropy_forward(logits, target, weight, scalars, opts, grad=None):
    """Row losses (normalised for the reduction) and row statistics for backward; writes `grad` if given."""
    launches, loss, stats = plan_forward(logits, target, weight, scalars, opts, grad,
                                         multiprocessor_count(logits.device))
    for launch in launches:
        launch.run()
    return (loss[:, 0] if loss.shape[1] == 1 else loss.sum(1)), stats


def cross_entropy_backward(logits, target, weight, scalars, opts, stats, grad_output, grad):
    """Gradient of reduction='none' into `grad` from the saved row statistics: one read, one write."""
    for launch in plan_backward(logits, target, weight, scalars, opts, stats, grad_output, grad,
                                multiprocessor_count(logits.device)):
        launch.run()
    return grad
