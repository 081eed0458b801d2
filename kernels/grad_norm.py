"""Global gradient norm, non-finite check and clip over a list of tensors, in launches that do not grow
with the number of tensors.

Each dtype group of gradients is described by a device-side table (data pointers, sizes, first block
of each tensor, first tensor of each program). Per call, for G bytes of gradients:
1. grad_norm_partials_kernel, one launch per dtype group: each program walks a fixed run of blocks
   and writes its partial (max |g|, sum (|g| / max)**p) over finite values and its NaN/Inf counts. One
   read: G (GPT-2 small in bf16: 124 M gradients, 249 MB). The walk is a cheap loop (per lane a plain sum
   of |g| or g**2 and a max: about 6 SASS instructions per bf16 element against 26 before); a program
   whose partial comes out non-finite, or (p = 2) whose max is below 2**-40, re-reads its own range with
   the exact loop, so non-finite gradients cost up to 2G. A general p always takes the exact loop. There,
   scaling by the running max (an online norm, like the online softmax) keeps 1e38-sized gradients from
   overflowing the sum of p-th powers and tiny ones from underflowing it. 1 / max itself would overflow
   for a subnormal max, so |g| is first multiplied by a power of two (exact) that brings the max into
   [2**-64, 2**64], then by the reciprocal of the max so scaled.
2. grad_norm_finalize_kernel, one program: combines the partials in a fixed order (the norm is
   bit-for-bit the same every run; no float atomics) into the norm of the finite values (fp64: it may
   exceed fp32's range when the gradients are near 1e38), the fp32 norm (saturated at fp32's largest
   finite value), the clip coefficient (from the fp64 norm) and the found-inf flag.
3. grad_scale_kernel, one launch per dtype group: reads the coefficient on the device and returns at
   once when it is 1 (no clipping needed, or non-finite gradients: the step will be skipped);
   otherwise one read and one write: 2G.
Nothing is read back to the host.
"""

import functools
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from .common import Launch, cdiv, load_fp32, next_power_of_2, warps_for_block

BLOCK_SIZE = 4096
NORM_INF, NORM_1, NORM_2, NORM_P = 0, 1, 2, 3
TORCH_TO_TRITON = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _pow(y, norm_type, NORM_KIND: tl.constexpr):
    """y ** norm_type for y >= 0 (0 ** p = 0)."""
    if NORM_KIND == 1:
        return y
    elif NORM_KIND == 2:
        return y * y
    else:
        return tl.exp2(norm_type * tl.log2(y))


@triton.jit
def _normalizers(top):
    """(power of two, reciprocal) whose product with any 0 <= y <= top is y / top in [0, 1] without overflow:
    y * power is exact and top * power lies in [2**-64, 2**64], so its reciprocal is a normal fp32."""
    power = tl.where(top < 5.421010862427522e-20, 1.8446744073709552e19,
                     tl.where(top > 1.8446744073709552e19, 5.421010862427522e-20, 1.0))
    return power, tl.where(top > 0.0, tl.div_rn(1.0, top * power), 0.0)  # once per block: correctly rounded


@triton.jit
def _block_location(data_ptrs_ptr, numels_ptr, block_starts_ptr, t, block, DTYPE: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """(typed data pointer, offset of the block's first element, numel) of `block`, which lies in tensor t."""
    data = tl.load(data_ptrs_ptr + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # the table builder put only 16-byte-aligned tensors in this table
        data = tl.multiple_of(data, 16)
    first = (block - tl.load(block_starts_ptr + t)).to(tl.int64) * BLOCK_SIZE
    return data, first, tl.load(numels_ptr + t)


@triton.jit
def _load_block(data_ptrs_ptr, numels_ptr, block_starts_ptr, t, block, DTYPE: tl.constexpr,
                ALIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One block of tensor t in fp32; 0 past its end."""
    data, first, numel = _block_location(data_ptrs_ptr, numels_ptr, block_starts_ptr, t, block, DTYPE, ALIGNED,
                                         BLOCK_SIZE)
    offsets = first + tl.arange(0, BLOCK_SIZE)
    if first + BLOCK_SIZE <= numel:  # a whole block: no mask, so the compiler can use 16-byte loads
        g = load_fp32(data + offsets, None, None)
    else:
        g = load_fp32(data + offsets, offsets < numel, 0.0)
    return g


@triton.jit
def _walk_partials(data_ptrs_ptr, numels_ptr, block_starts_ptr, t, block, block_end, norm_type,
                   DTYPE: tl.constexpr, ALIGNED: tl.constexpr, NORM_KIND: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   EXACT: tl.constexpr):
    """(max |g|, sum, NaN count, Inf count) over blocks [block, block_end), which start in tensor t.

    EXACT: the sum is sum (|g| / max)**p over finite values (scaled by the running max, so nothing
    overflows or underflows) and NaN/Inf are counted. Otherwise the cheap loop: per lane a plain sum of
    |g| or g**2 (of 0 * |g| for the max norm) and a max; the sum comes out NaN or Inf if any value is one,
    and the counts are 0.
    """
    next_start = tl.load(block_starts_ptr + t + 1)
    running_max = tl.full([], 0.0, tl.float32)
    running_sum = tl.full([], 0.0, tl.float32)
    lane_max = tl.zeros([BLOCK_SIZE], tl.float32)
    lane_sum = tl.zeros([BLOCK_SIZE], tl.float32)
    nan_count = tl.full([], 0, tl.int32)
    inf_count = tl.full([], 0, tl.int32)
    while block < block_end:
        while block >= next_start:  # tables hold no empty tensor, but a program may start at a boundary
            t += 1
            next_start = tl.load(block_starts_ptr + t + 1)
        g = _load_block(data_ptrs_ptr, numels_ptr, block_starts_ptr, t, block, DTYPE, ALIGNED, BLOCK_SIZE)
        magnitude = tl.abs(g)
        if EXACT:
            is_nan = g != g
            is_inf = magnitude == float("inf")
            # both counts of the block in one reduction: at most BLOCK_SIZE each, so 2**16 * Inf + NaN fits int32
            counts = tl.sum(is_nan.to(tl.int32) + is_inf.to(tl.int32) * 65536, 0)
            nan_count += counts & 0xFFFF
            inf_count += counts >> 16
            magnitude = tl.where(is_nan | is_inf, 0.0, magnitude)
            new_max = tl.maximum(running_max, tl.max(magnitude, 0))
            if NORM_KIND != 0:
                power, inv_max = _normalizers(new_max)
                running_sum = (running_sum * _pow(running_max * power * inv_max, norm_type, NORM_KIND)
                               + tl.sum(_pow(magnitude * power * inv_max, norm_type, NORM_KIND), 0))
            running_max = new_max
        else:
            if NORM_KIND != 0:
                lane_sum += _pow(magnitude, norm_type, NORM_KIND)  # NaN or Inf if any value is
            else:
                lane_sum += magnitude * 0.0  # NaN where a value is NaN or Inf
            if ALIGNED:
                lane_max = tl.maximum(lane_max, magnitude)
            else:  # the per-element addresses of unaligned loads take the registers: the max reduced per block
                running_max = tl.maximum(running_max, tl.max(magnitude, 0))
        block += 1
    if not EXACT:
        running_max = tl.maximum(running_max, tl.max(lane_max, 0))
        running_sum = tl.sum(lane_sum, 0)
    return running_max, running_sum, nan_count, inf_count


@triton.jit
def grad_norm_partials_kernel(
    # the dtype group's table, int64
    data_ptrs_ptr,  # (T,) data pointer of each tensor
    numels_ptr,  # (T,) elements of each tensor
    block_starts_ptr,  # (T + 1,) index of each tensor's first block among all the group's blocks
    first_tensor_ptr,  # (P,) the tensor holding each program's first block
    # outputs, one slot per program
    partial_max_ptr,  # fp32 (P,) max |g| over finite values
    partial_sum_ptr,  # fp32 (P,) sum over finite values of (|g| / partial_max) ** norm_type
    nan_count_ptr,  # int32 (P,)
    inf_count_ptr,  # int32 (P,)
    total_blocks, blocks_per_program, norm_type,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, NORM_KIND: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """One program's partial over its run of blocks: first the cheap loop (plain sums); its range is read
    again by the exact loop only when that cannot be trusted: a non-finite value, a sum that overflowed, a max
    whose square may lose bits to underflow (p = 2 with max < 2**-40), or a general p (always exact)."""
    pid = tl.program_id(0)
    block = pid * blocks_per_program
    block_end = tl.minimum(block + blocks_per_program, total_blocks)
    t = tl.load(first_tensor_ptr + pid)
    if NORM_KIND == 3:
        top, total, nan_count, inf_count = _walk_partials(
            data_ptrs_ptr, numels_ptr, block_starts_ptr, t, block, block_end, norm_type, DTYPE, ALIGNED,
            NORM_KIND, BLOCK_SIZE, True)
    else:
        top, total, nan_count, inf_count = _walk_partials(
            data_ptrs_ptr, numels_ptr, block_starts_ptr, t, block, block_end, norm_type, DTYPE, ALIGNED,
            NORM_KIND, BLOCK_SIZE, False)
        trusted = (top <= 3.4028234663852886e38) & (total <= 3.4028234663852886e38)  # False for NaN
        if NORM_KIND == 2:
            trusted &= (top == 0.0) | (top >= 9.094947017729282e-13)
        if trusted:
            if NORM_KIND == 1:
                total = tl.where(top > 0.0, total / top, 0.0)
            elif NORM_KIND == 2:
                # (sum g**2) / max**2: max**2 is a normal fp32 (max >= 2**-40) and the sum finite
                total = tl.where(top > 0.0, total / (top * top), 0.0)
        else:
            top, total, nan_count, inf_count = _walk_partials(
                data_ptrs_ptr, numels_ptr, block_starts_ptr, t, block, block_end, norm_type, DTYPE, ALIGNED,
                NORM_KIND, BLOCK_SIZE, True)
    tl.store(partial_max_ptr + pid, top)
    tl.store(partial_sum_ptr + pid, total)
    tl.store(nan_count_ptr + pid, nan_count)
    tl.store(inf_count_ptr + pid, inf_count)


@triton.jit
def grad_norm_finalize_kernel(
    partial_max_ptr, partial_sum_ptr, nan_count_ptr, inf_count_ptr,  # (n_partials,) from the partials kernel
    result_ptr,  # fp32 (3,) out: total norm, clip coefficient, found-inf flag (0.0 or 1.0)
    finite_norm_ptr,  # fp64 () out: norm of the finite values, unsaturated
    counts_ptr,  # int64 (2,) out: NaN count, Inf count
    n_partials, max_norm, norm_type,
    NORM_KIND: tl.constexpr, CLIP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """One program: combine the partials in a fixed order (reproducible), then norm, coefficient, flag."""
    overall_max = tl.full([], 0.0, tl.float32)
    for start in range(0, n_partials, BLOCK_SIZE):
        idx = start + tl.arange(0, BLOCK_SIZE)
        overall_max = tl.maximum(overall_max, tl.max(tl.load(partial_max_ptr + idx, mask=idx < n_partials,
                                                             other=0.0), 0))
    power, inv_max = _normalizers(overall_max)
    total = tl.full([], 0.0, tl.float32)
    nan_count = tl.full([], 0, tl.int64)
    inf_count = tl.full([], 0, tl.int64)
    for start in range(0, n_partials, BLOCK_SIZE):
        idx = start + tl.arange(0, BLOCK_SIZE)
        mask = idx < n_partials
        part_max = tl.load(partial_max_ptr + idx, mask=mask, other=0.0)
        part_sum = tl.load(partial_sum_ptr + idx, mask=mask, other=0.0)
        total += tl.sum(part_sum * _pow(part_max * power * inv_max, norm_type, NORM_KIND), 0)
    for start in range(0, n_partials, BLOCK_SIZE):  # a loop of its own: fewer registers (no spill, triton 3.6)
        idx = start + tl.arange(0, BLOCK_SIZE)
        mask = idx < n_partials
        nan_count += tl.sum(tl.load(nan_count_ptr + idx, mask=mask, other=0).to(tl.int64), 0)
        inf_count += tl.sum(tl.load(inf_count_ptr + idx, mask=mask, other=0).to(tl.int64), 0)
    if NORM_KIND == 0:
        root = tl.full([], 1.0, tl.float64)
    elif NORM_KIND == 1:
        root = total.to(tl.float64)
    elif NORM_KIND == 2:
        root = tl.sqrt_rn(total).to(tl.float64)
    else:  # total ** (1 / p) as 2**f * 2**n: an integer n, built exactly in fp64, keeps a small p from overflowing
        log2_root = tl.log2(total).to(tl.float64) / norm_type
        exponent = tl.minimum(tl.maximum(tl.floor(log2_root), -1022.0), 1024.0)  # 1024: the bits of fp64's inf
        power = ((exponent.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
        root = tl.exp2((log2_root - exponent).to(tl.float32)).to(tl.float64) * power
    # in fp64 the product is exact and cannot overflow fp64 for fp32 maxima: the norm of 1e38-sized values is
    # above fp32's range; only a tiny p takes it past fp64's (Inf here: the coefficient is then 0 in fp32)
    finite_norm = tl.where(overall_max > 0.0, overall_max.to(tl.float64) * root, 0.0)
    saturated = tl.minimum(finite_norm, 3.4028234663852886e38).to(tl.float32)
    norm = tl.where(nan_count > 0, float("nan"), tl.where(inf_count > 0, float("inf"), saturated))
    found_inf = tl.where(nan_count + inf_count > 0, 1.0, 0.0)
    coef = 1.0
    if CLIP:
        coef = tl.where(found_inf == 0.0, tl.minimum(max_norm / (finite_norm + 1e-6), 1.0).to(tl.float32), 1.0)
    tl.store(result_ptr, norm)
    tl.store(result_ptr + 1, coef)
    tl.store(result_ptr + 2, found_inf)
    tl.store(finite_norm_ptr, tl.minimum(finite_norm, 1.7976931348623157e308))
    tl.store(counts_ptr, nan_count)
    tl.store(counts_ptr + 1, inf_count)


@triton.jit
def grad_scale_kernel(
    data_ptrs_ptr, numels_ptr, block_starts_ptr, first_tensor_ptr,  # the dtype group's table, as above
    coef_ptr,  # fp32 scalar on the device: the clip coefficient
    total_blocks, blocks_per_program,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """g *= coef over every tensor of the table; no memory traffic at all when coef is exactly 1."""
    coef = tl.load(coef_ptr)
    if coef != 1.0:
        pid = tl.program_id(0)
        block = pid * blocks_per_program
        block_end = tl.minimum(block + blocks_per_program, total_blocks)
        t = tl.load(first_tensor_ptr + pid)
        next_start = tl.load(block_starts_ptr + t + 1)
        while block < block_end:
            while block >= next_start:
                t += 1
                next_start = tl.load(block_starts_ptr + t + 1)
            data, first, numel = _block_location(data_ptrs_ptr, numels_ptr, block_starts_ptr, t, block, DTYPE,
                                                 ALIGNED, BLOCK_SIZE)
            offsets = first + tl.arange(0, BLOCK_SIZE)
            if first + BLOCK_SIZE <= numel:  # a whole block: no mask, so the compiler can use 16-byte accesses
                g = tl.load(data + offsets).to(tl.float32)
                tl.store(data + offsets, (g * coef).to(DTYPE))
            else:
                g = tl.load(data + offsets, mask=offsets < numel).to(tl.float32)
                tl.store(data + offsets, (g * coef).to(DTYPE), mask=offsets < numel)
            block += 1


class TensorTable(NamedTuple):
    """One group's device-side table (views into one int64 tensor) and its grid."""
    data_ptrs: torch.Tensor
    numels: torch.Tensor
    block_starts: torch.Tensor
    first_tensor: torch.Tensor
    total_blocks: int
    blocks_per_program: int
    n_programs: int
    dtype: torch.dtype
    aligned: bool  # every data pointer is a multiple of 16 bytes
    keep_alive: tuple  # the host buffer of a non-blocking upload stays referenced with the table


def programs_for(total_blocks: int, n_sms: int) -> tuple[int, int]:
    """(programs, blocks per program): about 4 programs per SM, each a contiguous run of blocks."""
    n_programs = max(1, min(total_blocks, 4 * n_sms))
    per_program = cdiv(total_blocks, n_programs)
    return cdiv(total_blocks, per_program), per_program


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter on CPU tensors


def build_tables(tensors, device, n_sms=None):
    """Tables for non-empty, contiguous tensors on one device, one per (dtype, 16-byte aligned or not).

    The upload is a non-blocking copy from pinned memory: no host sync.
    """
    groups = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.data_ptr() % 16 == 0), []).append(t)
    n_sms = n_sms or multiprocessor_count(device)
    return [_build_table(group, device, n_sms, aligned) for (_, aligned), group in groups.items()]


def _build_table(tensors, device, n_sms, aligned):
    numels = np.array([t.numel() for t in tensors], dtype=np.int64)
    blocks = (numels + BLOCK_SIZE - 1) // BLOCK_SIZE
    block_starts = np.concatenate([[0], np.cumsum(blocks)])
    total_blocks = int(block_starts[-1])
    n_programs, per_program = programs_for(total_blocks, n_sms)
    first_tensor = np.searchsorted(block_starts, np.arange(n_programs) * per_program, side="right") - 1
    host = np.concatenate([[t.data_ptr() for t in tensors], numels, block_starts, first_tensor]).astype(np.int64)
    host = torch.from_numpy(host)
    if device.type == "cuda":
        host = host.pin_memory()
    table = host.to(device, non_blocking=True)
    n = len(tensors)
    return TensorTable(table[:n], table[n:2 * n], table[2 * n:3 * n + 1], table[3 * n + 1:], total_blocks,
                       per_program, n_programs, tensors[0].dtype, aligned, (host,))


def _table_args(table):
    return dict(data_ptrs_ptr=table.data_ptrs, numels_ptr=table.numels, block_starts_ptr=table.block_starts,
                first_tensor_ptr=table.first_tensor, total_blocks=table.total_blocks,
                blocks_per_program=table.blocks_per_program, DTYPE=TORCH_TO_TRITON[table.dtype],
                ALIGNED=table.aligned, BLOCK_SIZE=BLOCK_SIZE)


def partials_warps(kind):
    """Warps of the partials kernel: a general p (exp2/log2 per element) needs the registers of 16 warps,
    the other norms spill there on sm_80 and run at 8 (kernels/aot_check.py shows both)."""
    return warps_for_block(BLOCK_SIZE) // (1 if kind == NORM_P else 2)


def plan_grad_norm(tables, max_norm, norm_type, kind):
    """(launches, result fp32[3]: norm, coef, found_inf; fp64 norm of the finite values; counts int64[2]: NaN, Inf)."""
    device = tables[0].data_ptrs.device
    n_partials = sum(table.n_programs for table in tables)
    partials = torch.empty(2, n_partials, dtype=torch.float32, device=device)
    counts = torch.empty(2, n_partials, dtype=torch.int32, device=device)
    launches, offset = [], 0
    for table in tables:
        span = slice(offset, offset + table.n_programs)
        launches.append(Launch(grad_norm_partials_kernel, (table.n_programs,), dict(
            partial_max_ptr=partials[0, span], partial_sum_ptr=partials[1, span], nan_count_ptr=counts[0, span],
            inf_count_ptr=counts[1, span], norm_type=norm_type, NORM_KIND=kind, **_table_args(table)),
            partials_warps(kind)))
        offset += table.n_programs
    result = torch.empty(3, dtype=torch.float32, device=device)
    finite_norm = torch.empty((), dtype=torch.float64, device=device)
    nonfinite = torch.empty(2, dtype=torch.int64, device=device)
    launches.append(Launch(grad_norm_finalize_kernel, (1,), dict(
        partial_max_ptr=partials[0], partial_sum_ptr=partials[1], nan_count_ptr=counts[0],
        inf_count_ptr=counts[1], result_ptr=result, finite_norm_ptr=finite_norm, counts_ptr=nonfinite,
        n_partials=n_partials,
        max_norm=0.0 if max_norm is None else max_norm, norm_type=norm_type, NORM_KIND=kind,
        CLIP=max_norm is not None, BLOCK_SIZE=min(1024, max(16, next_power_of_2(n_partials)))),
        8))  # at 4 warps the general-p finalize spills on sm_90 (kernels/aot_check.py)
    return launches, result, finite_norm, nonfinite


def plan_scale(tables, coef):
    """Launches that multiply every tensor of the tables by the device scalar coef (free when it is 1)."""
    return [Launch(grad_scale_kernel, (table.n_programs,), dict(coef_ptr=coef, **_table_args(table)),
                   warps_for_block(BLOCK_SIZE)) for table in tables]


def grad_norm(tables, max_norm, norm_type, kind):
    """Run plan_grad_norm: (result fp32[3], finite norm fp64, counts int64[2]) on the device, nothing read back."""
    launches, *outputs = plan_grad_norm(tables, max_norm, norm_type, kind)
    for launch in launches:
        launch.run()
    return tuple(outputs)


def scale_(tables, coef):
    for launch in plan_scale(tables, coef):
        launch.run()
