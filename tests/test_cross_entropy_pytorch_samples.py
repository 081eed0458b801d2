"""PyTorch's own nn.CrossEntropyLoss ModuleInfo samples and error inputs (torch.testing._internal.common_modules)
run through nanfuse.CrossEntropyLoss: losses and gradients (of the input, and of probability targets, which the
samples make require grad) against PyTorch's module computing in float64 on the same values, errors matched by
exception class. nanfuse's documented deviations are asserted where a sample meets them.
"""

import pytest
import torch
from helpers import assert_close

import nanfuse

DTYPES = [torch.float32, torch.float64, torch.float16]  # the dtypes the ModuleInfo declares


def module_info():
    # imported after nanfuse: it imports triton, and NANFUSE_BACKEND=interpret must set TRITON_INTERPRET first
    from torch.testing._internal.common_modules import module_db

    return next(m for m in module_db if m.module_cls is torch.nn.CrossEntropyLoss)


# the interpreter runs every program of a launch in Python (about 1 s a sample here): it takes every 16th sample
EVERY = 16 if nanfuse.current_backend() == "interpret" else 1


def samples(dtype):
    torch.manual_seed(0)
    info = module_info()
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)[::EVERY]


def as_double(value):
    if not torch.is_tensor(value) or not value.is_floating_point():
        return value
    return value.detach().double().requires_grad_(value.requires_grad)


def run(module, args, upstream_seed=0):
    """The loss, and the gradients of every input that requires grad for a random upstream gradient."""
    loss = module(*args)
    inputs = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(upstream_seed)) + 0.5
    grads = torch.autograd.grad(loss, inputs, upstream.to(loss.dtype)) if inputs else ()
    return loss, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_module_info_samples_match_pytorch(dtype):
    checked = 0
    for sample in samples(dtype):
        ctor, fwd = sample.constructor_input, sample.forward_input
        # leaves of our own, so that both modules see the same values and the gradients do not mix
        inputs = [a.detach().clone().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in fwd.args]
        ours_module = nanfuse.CrossEntropyLoss(*ctor.args, **ctor.kwargs)
        theirs_module = torch.nn.CrossEntropyLoss(*ctor.args, **{k: as_double(v) for k, v in ctor.kwargs.items()})
        loss, grads = run(ours_module, inputs)
        ref_loss, ref_grads = run(theirs_module, [as_double(a) for a in inputs])
        what = f"{sample.desc} {dtype}"
        # deviation: the loss is fp32 for half-precision logits (fp64 for fp64), not the logits' dtype
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), what
        target = inputs[1]
        all_ignored = (not target.is_floating_point() and "ignore_index" in ctor.kwargs
                       and (target == ctor.kwargs["ignore_index"]).all())
        if all_ignored and ctor.kwargs.get("reduction", "mean") == "mean":
            # deviation: a zero denominator gives 0 with zero gradients, where PyTorch gives NaN
            assert ref_loss.isnan() and loss == 0 and all((g == 0).all() for g in grads), what
            continue
        assert_close(loss, ref_loss, loss.dtype, f"loss {what}")
        for grad, ref_grad, name in zip(grads, ref_grads, ["input", "target"]):
            assert_close(grad, ref_grad, dtype, f"d/d{name} {what}")
        checked += 1
    assert checked > 100 // EVERY


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_module_info_error_inputs_raise_pytorchs_exception_class(dtype):
    info = module_info()
    if info.module_error_inputs_func is None:
        pytest.skip("this torch (2.11, the GPU image's) lists no error inputs for CrossEntropyLoss")
    errors = info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)
    assert errors
    for error in errors:
        sample = error.module_error_input
        ctor, fwd = sample.constructor_input, sample.forward_input
        with pytest.raises(error.error_type):  # what PyTorch raises for it, by the ModuleInfo
            torch.nn.CrossEntropyLoss(*ctor.args, **ctor.kwargs)(*fwd.args, **fwd.kwargs)
        with pytest.raises(error.error_type):
            nanfuse.CrossEntropyLoss(*ctor.args, **ctor.kwargs)(*fwd.args, **fwd.kwargs)
