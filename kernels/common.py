"""Small @triton.jit helpers shared by the kernels, and the launch heuristics they share."""

import os
import threading
from typing import NamedTuple

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# The Triton interpreter patches triton.language's module globals while a kernel runs, so two threads
# interpreting kernels at once corrupt each other's results: interpreted launches take turns.
_INTERPRETER_LOCK = threading.Lock()
# Compiled kernels round fp32 -> bf16 to nearest even with one hardware conversion; only the interpreter
# (whose cast truncates) needs the rounding done by hand. A constexpr, so compiled code never carries it.
INTERPRETING: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
# exp(x) = exp2(x log2(e)): tl.exp compiles to 5 SASS instructions (a non-flushing ex2 with range fix-ups),
# tl.exp2 of an argument scaled here to 1 MUFU.EX2 and the scaling multiply, often fused into an FFMA
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def tanh(y):
    """tanh in fp32 from exp, exact at +-inf; a short series near 0 avoids the 1 - e**-2|y| cancellation."""
    a = tl.abs(y)
    e = tl.exp2(a * (-2.0 * LOG2E))
    far = (1.0 - e) / (1.0 + e)
    y2 = y * y
    near = a * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0))))
    r = tl.where(a < 0.1, near, far)
    return tl.where(y < 0, -r, r)


@triton.jit
def lane_softmax_stats(m_lane, s_lane, x):
    """One step of a per-lane online softmax: each lane's running max and sum of exp(x - max) take x in.

    Per element one exp2: with d = x - m_lane, exp(-|d|) either rescales the lane's sum (d > 0: the max moves
    to x) or is x's term. Start from m_lane = -FLT_MAX (not -inf, so that d is never -inf - -inf) and s_lane = 0;
    combine the lanes once at the end with combine_softmax_stats.
    """
    d = x - m_lane
    e = tl.exp2(tl.abs(d) * -LOG2E)
    return tl.maximum(m_lane, x), tl.where(d > 0.0, s_lane * e + 1.0, s_lane + e)


@triton.jit
def combine_softmax_stats(m_lane, s_lane):
    """(max, sum of exp(x - max)) of everything the lanes took in; the max is -inf where that was all -inf."""
    m = tl.max(m_lane, 0)
    s = tl.sum(s_lane * tl.exp2((m_lane - m) * LOG2E), 0)
    return tl.where(s == 0.0, float("-inf"), m), s


@triton.jit
def load_fp32(ptrs, mask, other):
    """Load as fp32. bf16 is widened by its bits (a 16-bit shift, what the hardware does): Triton 3.9's
    interpreter turns bf16 subnormals into wrong values when it converts them."""
    value = tl.load(ptrs, mask=mask, other=other)
    if ptrs.dtype.element_ty == tl.bfloat16:
        result = (value.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        result = value.to(tl.float32)
    return result


@triton.jit
def store_rounded(ptrs, value, mask):
    """Store fp32 `value` in the pointers' dtype, rounded to nearest even. Under the interpreter (whose
    fp32->bf16 cast truncates, and garbles subnormals) bf16 is rounded by its bits, so it stores what a GPU
    stores; NaN stays a quiet NaN of the same sign."""
    if INTERPRETING and ptrs.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        high = tl.where(value != value, (bits >> 16) | 0x40, rounded).to(tl.uint16)
        tl.store(ptrs, high.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints in plain Python (triton.cdiv costs microseconds per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), in plain Python."""
    return 1 << max(n - 1, 0).bit_length()


def warps_for_block(block_size: int) -> int:
    """Warps for a program that streams BLOCK_SIZE elements per step: 8 per thread, so the loop's vectors
    and accumulators fit in registers without spilling on sm_80 and sm_90 (see aot_check); the Triton
    softmax tutorial's ladder gives the same 16 warps for a 4096-wide block."""
    return max(1, min(16, block_size // 256))


class Launch(NamedTuple):
    """One kernel launch as a launcher plans it: run() executes it; the AOT check compiles the same thing."""
    kernel: object
    grid: tuple
    args: dict  # every kernel parameter by name, constexprs included
    num_warps: int

    def run(self):
        if isinstance(self.kernel, InterpretedFunction):
            with _INTERPRETER_LOCK:
                self.kernel[self.grid](**self.args, num_warps=self.num_warps)
        else:
            self.kernel[self.grid](**self.args, num_warps=self.num_warps)
