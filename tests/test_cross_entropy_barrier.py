"""The in-place cross-entropy kernel orders its read of the target's logit before the stores of the gradient
into the same row by other warps (issue 12 item 11): the PTX of the in-place configuration has a barrier
that the out-of-place one does not. Compiled ahead of time for sm_90, with no GPU (kernels/aot_check.py)."""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("NANFUSE_BACKEND") == "interpret",
    reason="under the interpreter the kernels are not compiled; the default pass runs this check")


def forward_ptx(in_place):
    import triton
    from nanfuse.kernels import aot_check, cross_entropy
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nanfuse.cross_entropy import CrossEntropyOptions

    logits = torch.empty(8192, 32_000, dtype=torch.float32, device="meta")  # fp32 writes in forward
    grad = logits if in_place else torch.empty_like(logits)
    target = torch.empty(8192, dtype=torch.int64, device="meta")
    (launch,), _, _ = cross_entropy.plan_forward(logits, target, None, torch.empty(3, device="meta"),
                                                 CrossEntropyOptions(inplace_backward=in_place), grad, 132)
    signature, constexprs, attrs = aot_check._specialize(launch.kernel, launch.args)
    compiled = triton.compile(ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": launch.num_warps})
    return compiled.asm["ptx"]


def test_in_place_kernel_has_a_barrier_after_the_target_logit_load():
    in_place, out_of_place = forward_ptx(True), forward_ptx(False)
    assert in_place.count("bar.sync") > out_of_place.count("bar.sync")
