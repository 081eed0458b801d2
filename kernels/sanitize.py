"""Find the samples of a batch tensor that hold a NaN or Inf and replace those values in place: one read.

sanitize_kernel streams the tensor (viewed as N samples of `row_len` values) once. A block with no
non-finite value writes nothing; in a block that has some, only those values are overwritten with `fill`
and the flag of each sample they belong to is set to 1. Bytes moved: B read (B the tensor's size), plus
the few bad values written.
"""

import triton
import triton.language as tl

from .common import Launch, cdiv, warps_for_block

BLOCK_SIZE = 4096


@triton.jit
def sanitize_kernel(
    x_ptr,  # (N * row_len,) the batch tensor, contiguous, modified in place
    bad_rows_ptr,  # uint8 (N,) per-sample flag: set to 1 where the sample holds a non-finite value
    n_elements,  # N * row_len
    row_len,  # values per sample (the product of the dims after the first)
    fill,  # fp32 runtime scalar: the value written over each NaN/Inf
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_range = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    bad = in_range & ((x != x) | (tl.abs(x) == float("inf")))
    if tl.max(bad.to(tl.int32), axis=0) > 0:  # rare: only blocks holding a bad value write anything
        replacement = tl.zeros([BLOCK_SIZE], dtype=tl.float32) + fill
        tl.store(x_ptr + offsets, replacement.to(x_ptr.dtype.element_ty), mask=bad)
        tl.store(bad_rows_ptr + offsets // row_len, tl.full([BLOCK_SIZE], 1, dtype=tl.uint8), mask=bad)


def plan_sanitize(x, bad_rows, fill):
    """Launches that sanitize the contiguous tensor x (dim 0 = sample) in place and flag its bad samples."""
    n = x.numel()
    if not n:
        return []
    return [Launch(sanitize_kernel, (cdiv(n, BLOCK_SIZE),),
                   dict(x_ptr=x, bad_rows_ptr=bad_rows, n_elements=n, row_len=n // x.shape[0], fill=float(fill),
                        BLOCK_SIZE=BLOCK_SIZE), warps_for_block(BLOCK_SIZE))]


def sanitize_(x, bad_rows, fill):
    for launch in plan_sanitize(x, bad_rows, fill):
        launch.run()
    return x
