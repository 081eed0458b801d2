"""Row softmax and log-softmax, forward and backward, with online max subtraction in fp32.

A row whose entries are all -inf gives softmax 0 (gradient 0) and log_softmax -inf (gradient
equal to the upstream one), never NaN. Passes over an N x C input of B bytes:
- forward reads the row twice (per-lane max and sum-exp, one exp2 per element, reduced once per row; then
  the output) and writes once: 2B from DRAM while the rows in flight fit in L2 (64 rows: up to 64 x 512 KB
  = 33 MB for fp32 C = 128,256; 3B at C = 262,144 fp32, 67 MB).
- backward: a row of up to 4,096 columns reads y and dy once (held in registers) and writes dx: 3B. A
  longer row reads both twice (dot product per lane, reduced once, then dx): 5B of traffic, 3B from DRAM
  while the rows in flight fit in L2 (64 rows x 2 x 64 KB = 8 MB at bf16 C = 32,000).
"""

import triton
import triton.language as tl

from .common import (
    Launch,
    combine_softmax_stats,
    lane_softmax_stats,
    load_fp32,
    next_power_of_2,
    store_rounded,
    warps_for_block,
)

MAX_BLOCK_SIZE = 4096


@triton.jit
def softmax_forward_kernel(
    x_ptr,  # (N, C) input, classes contiguous, rows x_row_stride apart
    y_ptr,  # (N, C) out: softmax (or log_softmax if LOG), contiguous
    n_cols, x_row_stride,
    LOG: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row_ptr = x_ptr + row * x_row_stride
    y_row_ptr = y_ptr + row * n_cols
    m_lane = tl.full([BLOCK_SIZE], -3.4028234663852886e38, tl.float32)
    s_lane = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        m_lane, s_lane = lane_softmax_stats(m_lane, s_lane, load_fp32(x_row_ptr + cols, cols < n_cols, float("-inf")))
    m, s = combine_softmax_stats(m_lane, s_lane)
    # x - lse as (x - shift) - log_s: exact for large logits. An all -inf row has s = 0: shift and
    # log_s are 0 there, so softmax is exp(-inf) = 0 and log_softmax is -inf.
    shift = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.where(s == 0.0, 0.0, tl.log(s))
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        x = load_fp32(x_row_ptr + cols, mask, float("-inf"))
        # tl.exp, not exp2 with log2(e) folded in: the output must be right to the last bit also where it is
        # subnormal (a rounded exp2 argument of -100 is off by ~1e-5 relative)
        y = (x - shift) - log_s if LOG else tl.exp((x - shift) - log_s)
        store_rounded(y_row_ptr + cols, y, mask)


@triton.jit
def _softmax_grad(y, dy, dot, LOG: tl.constexpr):
    return dy - tl.exp(y) * dot if LOG else y * (dy - dot)


@triton.jit
def softmax_backward_kernel(
    y_ptr,  # (N, C) saved forward output, contiguous
    dy_ptr,  # (N, C) upstream gradient, rows dy_row_stride apart, classes contiguous
    dx_ptr,  # (N, C) out, contiguous
    n_cols, dy_row_stride,
    LOG: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """softmax: dx = y (dy - sum(dy y));  log_softmax: dx = dy - exp(y) sum(dy).

    A row of at most BLOCK_SIZE columns is read once and held in registers; a longer one is read twice (the
    second time from L2 while the rows in flight fit there), its dot product kept per lane and reduced once.
    """
    row = tl.program_id(0).to(tl.int64)
    y_row_ptr = y_ptr + row * n_cols
    dy_row_ptr = dy_ptr + row * dy_row_stride
    dx_row_ptr = dx_ptr + row * n_cols
    if n_cols <= BLOCK_SIZE:
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        dy = load_fp32(dy_row_ptr + cols, mask, 0.0)
        y = load_fp32(y_row_ptr + cols, mask, 0.0)
        dot = tl.sum(dy if LOG else dy * y, 0)
        store_rounded(dx_row_ptr + cols, _softmax_grad(y, dy, dot, LOG), mask)
    else:
        dot_lane = tl.zeros([BLOCK_SIZE], tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            dy = load_fp32(dy_row_ptr + cols, mask, 0.0)
            if LOG:
                dot_lane += dy
            else:
                dot_lane += dy * load_fp32(y_row_ptr + cols, mask, 0.0)
        dot = tl.sum(dot_lane, 0)
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            dy = load_fp32(dy_row_ptr + cols, mask, 0.0)
            y = load_fp32(y_row_ptr + cols, mask, 0.0)
            store_rounded(dx_row_ptr + cols, _softmax_grad(y, dy, dot, LOG), mask)


def _block(n_cols):
    block_size = min(MAX_BLOCK_SIZE, max(16, next_power_of_2(n_cols)))
    return block_size, warps_for_block(block_size)


def plan_forward(x, y, log):
    """Launches for y = softmax(x) or log_softmax(x) over the last dim of 2-D x; y contiguous."""
    n_rows, n_cols = x.shape
    if not (n_rows and n_cols):
        return []
    block_size, num_warps = _block(n_cols)
    return [Launch(softmax_forward_kernel, (n_rows,), dict(x_ptr=x, y_ptr=y, n_cols=n_cols, x_row_stride=x.stride(0),
                                                          LOG=log, BLOCK_SIZE=block_size), num_warps)]


def plan_backward(y, dy, dx, log):
    """Launches for dx from the saved output y and upstream dy (classes contiguous); dx contiguous."""
    n_rows, n_cols = y.shape
    if not (n_rows and n_cols):
        return []
    block_size, num_warps = _block(n_cols)
    return [Launch(softmax_backward_kernel, (n_rows,), dict(y_ptr=y, dy_ptr=dy, dx_ptr=dx, n_cols=n_cols,
                                                           dy_row_stride=dy.stride(0), LOG=log,
                                                           BLOCK_SIZE=block_size), num_warps)]


def softmax_forward(x, y, log):
    for launch in plan_forward(x, y, log):
        launch.run()
    return y


def softmax_backward(y, dy, dx, log):
    for launch in plan_backward(y, dy, dx, log):
        launch.run()
    return dx
