"""Every kernel configuration the launchers pick builds for sm_80 and sm_90, spills nothing, and streams
aligned data with 16-byte loads: compiled ahead of time, with no GPU (kernels/aot_check.py), by whichever
Triton is installed (.ci/compat runs it again under the oldest supported one)."""

import importlib.metadata
import os

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("NANFUSE_BACKEND") == "interpret",
    reason="under the interpreter the kernels are not compiled; the default pass runs this check")


@pytest.fixture(scope="module")
def reports():
    from nanfuse.kernels import aot_check

    # .ci/compat narrows it to sm_90 (the GPU image's H100) under the oldest Triton, to fit CI's time
    archs = tuple(int(a) for a in os.environ.get("NANFUSE_AOT_ARCHS", "90,80").split(","))
    return aot_check.check(archs=archs)


def describe(r):
    """What a failure names: the Triton version too, since .ci/compat runs this check under the oldest one."""
    return (f"triton {importlib.metadata.version('triton')}: {r.kernel} sm_{r.arch} {r.num_warps} warps, "
            f"{r.registers} registers, {r.spills} spills, {r.constants} for {r.examples[0]}")


def test_every_shipped_configuration_builds_for_both_architectures(reports):

    kernels = {r.kernel for r in reports}
    assert kernels == {"cross_entropy_kernel", "cross_entropy_stats_kernel", "softmax_forward_kernel",
                       "softmax_backward_kernel", "scale_kernel", "grad_norm_partials_kernel",
                       "grad_norm_finalize_kernel", "grad_scale_kernel", "sanitize_kernel", "normalizers_kernel"}
    for arch in {r.arch for r in reports}:
        assert {r.kernel for r in reports if r.arch == arch} == kernels


SHARED_MEMORY_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}  # the opt-in maxima of A100 and H100


def test_no_configuration_spills_or_overflows_shared_memory(reports):
    spilling = [describe(r) for r in reports if r.spills]
    too_big = [describe(r) for r in reports if r.shared_bytes > SHARED_MEMORY_PER_BLOCK[r.arch]]
    if spilling or too_big:  # pytest.fail: every configuration listed, where an assert's message is cut short
        pytest.fail("\n".join([f"{len(spilling)} configurations spill:", *spilling,
                                f"{len(too_big)} overflow shared memory:", *too_big]), pytrace=False)


def test_aligned_streams_use_16_byte_loads(reports):
    from nanfuse.kernels.aot_check import streams_aligned_data

    aligned = [r for r in reports if streams_aligned_data(r)]
    assert len(aligned) > len(reports) // 3
    narrow = [describe(r) for r in aligned if r.loads_16_byte == 0]
    assert not narrow, narrow


def test_unaligned_row_stride_is_reported_as_such(reports):
    # 1,001 classes: the row stride is not a multiple of 16 elements, so the compiler cannot vectorise
    odd = [r for r in reports if r.kernel == "cross_entropy_kernel" and any("x1001" in e for e in r.examples)]
    assert odd and all("logits_row_stride" not in r.aligned_args for r in odd)


def _plain(r):
    return not any(r.constants.get(k) for k in ("HAS_SOFTCAP", "HAS_WEIGHT", "PROB_TARGET", "SMOOTHING"))


def test_cross_entropy_main_loops_cost_at_most_27_instructions_per_element(reports):
    # issue 14: about 38 per element before (a 5-instruction tl.exp, block-wide max and sum reductions per block,
    # the target compared per element); 30 % fewer is at most 27
    fused = [r for r in reports if r.kernel == "cross_entropy_kernel" and r.constants.get("COMPUTE_STATS")
             and r.constants.get("WRITE_GRAD") and _plain(r) and "logits_row_stride" in r.aligned_args]
    assert fused
    costly = [(describe(r), r.loop_instructions) for r in fused if len(r.loop_instructions) != 2
              or r.instructions_per_element > 27]
    assert not costly, costly


def test_clip_partials_hot_loop_costs_at_most_10_instructions_per_element(reports):
    # issue 14: 423 per 16 bf16 elements (26 per element) before: NaN/Inf counters and two block reductions per
    # block; now a plain sum and max, the exact loop only re-run for a non-finite or out-of-range partial
    partials = [r for r in reports if r.kernel == "grad_norm_partials_kernel" and r.constants["NORM_KIND"] != 3
                and r.constants["ALIGNED"]]
    assert partials
    costly = [(describe(r), r.loop_instructions) for r in partials if r.loop_instructions[0] > 10]
    assert not costly, costly
