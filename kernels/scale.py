"""Scale the rows of a gradient by a factor that lives on the device: one read and one write, none when it is
done in place and the factor is exactly 1 (read on the device). A small persistent grid (a few programs per
multiprocessor, each looping over blocks), so a factor of 1 costs a handful of programs that read it and exit,
not one program per block of the gradient."""

import triton
import triton.language as tl

from .common import Launch, cdiv, next_power_of_2, warps_for_block

BLOCK_SIZE = 4096
PROGRAMS_PER_SM = 4


@triton.jit
def _scale_block(x_ptr, out_ptr, factor, row, col_block, n_cols, x_row_stride, out_row_stride,
                 BLOCK_SIZE: tl.constexpr):
    cols = col_block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (x * factor).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scale_kernel(
    x_ptr,  # (N, C), classes contiguous, rows x_row_stride apart
    out_ptr,  # (N, C) out, rows out_row_stride apart; x_ptr itself when IN_PLACE
    factor_ptr,  # 0-dim factor on the device
    n_cols, x_row_stride, out_row_stride,
    blocks_per_row,  # cdiv(n_cols, BLOCK_SIZE)
    total_blocks,  # n_rows * blocks_per_row
    IN_PLACE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Grid (programs,): out = x * factor, formed in fp32 and rounded once; program p takes blocks p,
    p + programs, ... of the row-major block order."""
    factor = tl.load(factor_ptr).to(tl.float32)
    if not IN_PLACE or factor != 1.0:  # in place, no memory traffic at all for a factor of 1
        for block in range(tl.program_id(0).to(tl.int64), total_blocks, tl.num_programs(0)):
            row = block // blocks_per_row  # int64: row * stride passes 2**31 for large N x C
            _scale_block(x_ptr, out_ptr, factor, row, block - row * blocks_per_row, n_cols, x_row_stride,
                         out_row_stride, BLOCK_SIZE)


def plan_scale(x, out, factor, n_sms):
    """Launches for out = x * factor without a host sync; x, out: (N, C) with contiguous classes and any row
    stride (out may be x: in place), factor: a 0-dim device tensor; at most PROGRAMS_PER_SM * n_sms programs."""
    n_rows, n_cols = x.shape
    if not n_rows or not n_cols:
        return []
    block_size = min(BLOCK_SIZE, max(16, next_power_of_2(n_cols)))
    blocks_per_row = cdiv(n_cols, block_size)
    total_blocks = n_rows * blocks_per_row
    return [Launch(scale_kernel, (min(total_blocks, PROGRAMS_PER_SM * n_sms),), dict(
        x_ptr=x, out_ptr=out, factor_ptr=factor, n_cols=n_cols, x_row_stride=x.stride(0),
        out_row_stride=out.stride(0), blocks_per_row=blocks_per_row, total_blocks=total_blocks,
        IN_PLACE=out is x, BLOCK_SIZE=block_size), warps_for_block(block_size))]
