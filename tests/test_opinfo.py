"""PyTorch's own OpInfo samples (softmax, log_softmax, cross_entropy; their dtype= variants) and the
nn.CrossEntropyLoss ModuleInfo samples and error inputs, through nanfuse on the path under test.

Each sample runs three ways: PyTorch in the sample's dtype (for the output's dtype, shape and layout, and
which exception class), PyTorch on float64 copies (the values), and nanfuse. Outputs and the gradients of
every tensor that requires grad (input, probability target, weight) are compared; nanfuse's documented
deviations from PyTorch are asserted where a sample meets them.
"""

import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCES, assert_close
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import module_db

import nanfuse

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
OPS = {("softmax", ""): nanfuse.softmax, ("softmax", "with_dtype"): nanfuse.softmax,
       ("log_softmax", ""): nanfuse.log_softmax, ("log_softmax", "with_dtype"): nanfuse.log_softmax,
       ("nn.functional.cross_entropy", ""): nanfuse.cross_entropy}
OPINFOS = {(op.name, op.variant_test_name): op for op in op_db if (op.name, op.variant_test_name) in OPS}
CROSS_ENTROPY_LOSS = next(m for m in module_db if m.module_cls is torch.nn.CrossEntropyLoss)
# The Triton interpreter runs one program per row, one after another (~20 ms each): under it the ModuleInfo
# samples of more than MAX_INTERPRETED_ROWS rows are left to the PyTorch path. The kernels see every input
# flattened to (rows, classes), so more rows exercise nothing new; the smaller samples cover every option.
MAX_INTERPRETED_ROWS = 5
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Hundreds of tiny ops: on a loaded 2-core machine intra-op threads cost ~50 ms a backward, one costs 0.1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _op_samples(name, variant, dtype):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return list(OPINFOS[name, variant].sample_inputs("cpu", dtype, requires_grad=dtype.is_floating_point))


@functools.cache
def _module_samples(dtype):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return list(CROSS_ENTROPY_LOSS.module_inputs_func(CROSS_ENTROPY_LOSS, device="cpu", dtype=dtype,
                                                          requires_grad=True, training=True))


def _op_cases():
    for name, variant in OPS:
        for dtype in DTYPES:
            for index, sample in enumerate(_op_samples(name, variant, dtype)):
                for layout in ("contiguous", "noncontiguous"):
                    yield f"{name}-{variant or 'plain'}-{str(dtype)[6:]}-{index}-{layout}"


def _rows(input):
    return 1 if input.dim() == 1 else input.shape[0] * math.prod(input.shape[2:])


def _module_cases():
    for dtype in DTYPES:
        for sample in _module_samples(dtype):
            if INTERPRETING and _rows(sample.forward_input.args[0]) > MAX_INTERPRETED_ROWS:
                continue
            yield f"CrossEntropyLoss-{str(dtype)[6:]}-{sample.desc}"


def _copy(value, double=False, requires_grad=None):
    """A fresh leaf with value's requires_grad (or the one given); float64 when double and floating."""
    if not isinstance(value, torch.Tensor):
        return value
    copy = value.detach().clone()
    if double and copy.is_floating_point():
        copy = copy.double()
    wants_grad = value.requires_grad if requires_grad is None else requires_grad
    return copy.requires_grad_(wants_grad and copy.is_floating_point())


def _run(fn, args, kwargs, upstream):
    """fn's output and the gradients of its tensor arguments that require grad (None for the others)."""
    out = fn(*args, **kwargs)
    leaves = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    grads = [None] * len(leaves)
    if wanted and out.requires_grad:
        found = torch.autograd.grad(out, wanted, upstream.to(out.dtype), allow_unused=True)
        by_id = {id(leaf): grad for leaf, grad in zip(wanted, found)}
        grads = [by_id.get(id(leaf)) for leaf in leaves]
    return out, grads


def _assert_grad_close(ours, ref, dtype, what):
    if dtype in (torch.float16, torch.bfloat16):
        # a half-precision gradient is rounded from a cancelling difference (softmax's dy - sum(dy y)):
        # allow a few roundings of the row's largest entry
        rtol, atol = TOLERANCES[dtype]
        scale = ref.abs().max().item() if ref.numel() else 0.0
        torch.testing.assert_close(ours.double(), ref, rtol=rtol, atol=atol + 4 * torch.finfo(dtype).eps * scale,
                                   msg=lambda m: f"{what}: {m}")
    else:
        assert_close(ours, ref, dtype, what)


def _every_target_weightless(args, kwargs):
    """True when the mean's denominator is 0: every class-index target ignored or of weight 0."""
    target = args[0] if args else kwargs.get("target")
    if target.is_floating_point() or kwargs.get("reduction", "mean") != "mean":
        return False
    weight = kwargs.get("weight")
    valid = target != kwargs.get("ignore_index", -100)
    if weight is None:
        return not valid.any().item()
    return not (weight.detach()[target.clamp(min=0)] * valid).ne(0).any().item()


def _check(ours_fn, torch_fn, input, args, kwargs, is_cross_entropy):
    upstream_shape = torch_fn(input.detach(), *[_copy(a, requires_grad=False) for a in args],
                              **{k: _copy(v, requires_grad=False) for k, v in kwargs.items()}).shape
    upstream = torch.randn(upstream_shape, dtype=torch.float64)
    theirs, _ = _run(torch_fn, [_copy(input), *map(_copy, args)], {k: _copy(v) for k, v in kwargs.items()}, upstream)
    ref, ref_grads = _run(torch_fn, [_copy(input, True), *[_copy(a, True) for a in args]],
                          {k: _copy(v, True) for k, v in kwargs.items()}, upstream)
    ours, grads = _run(ours_fn, [_copy(input), *map(_copy, args)], {k: _copy(v) for k, v in kwargs.items()}, upstream)
    assert ours.shape == theirs.shape and ours.is_contiguous() == theirs.is_contiguous()
    if is_cross_entropy and theirs.dtype in (torch.float16, torch.bfloat16):
        assert ours.dtype == torch.float32  # documented: the loss is fp32 for half-precision logits
    else:
        assert ours.dtype == theirs.dtype
    if is_cross_entropy and _every_target_weightless(args, kwargs):
        assert ref.isnan().all() and (ours == 0).all()  # documented: a zero denominator gives 0, not NaN
        assert all(g is None or (g == 0).all() for g in grads)
        return
    assert_close(ours, ref, ours.dtype if ours.dtype != torch.float32 else theirs.dtype, "output")
    names = ["input", *[f"args[{i}]" for i in range(len(args))], *kwargs]
    for name, grad, ref_grad, leaf in zip(names, grads, ref_grads, [input, *args, *kwargs.values()]):
        assert (grad is None) == (ref_grad is None), f"{name}: gradient {'missing' if grad is None else 'extra'}"
        if grad is not None:
            _assert_grad_close(grad, ref_grad, leaf.dtype, f"grad of {name}")


@pytest.mark.parametrize("case", list(_op_cases()))
def test_opinfo_sample(case):
    name, variant, dtype_name, index, layout = case.split("-")
    variant = "" if variant == "plain" else variant
    sample = _op_samples(name, variant, getattr(torch, dtype_name))[int(index)]
    if layout == "noncontiguous":
        sample = sample.noncontiguous()
    torch_fn = F.cross_entropy if name == "nn.functional.cross_entropy" else OPINFOS[name, variant].op
    _check(OPS[name, variant], torch_fn, sample.input, list(sample.args), dict(sample.kwargs),
           is_cross_entropy=torch_fn is F.cross_entropy)


@pytest.mark.parametrize("case", list(_module_cases()))
def test_cross_entropy_loss_module_sample(case):
    _, dtype_name, desc = case.split("-", 2)
    sample = next(s for s in _module_samples(getattr(torch, dtype_name)) if s.desc == desc)
    kwargs = dict(sample.constructor_input.kwargs)
    input, target = sample.forward_input.args

    def through_module(input, target, **kwargs):
        return nanfuse.CrossEntropyLoss(**kwargs)(input, target)

    _check(through_module, F.cross_entropy, input, [target], kwargs, is_cross_entropy=True)


def _error_inputs():
    if CROSS_ENTROPY_LOSS.module_error_inputs_func is None:  # torch 2.11 (the GPU image) lists none for it
        return []
    return list(CROSS_ENTROPY_LOSS.module_error_inputs_func(CROSS_ENTROPY_LOSS, device="cpu", dtype=torch.float32,
                                                            requires_grad=False, training=True))


@pytest.mark.parametrize("case", [f"CrossEntropyLoss-error-{i}" for i in range(len(_error_inputs()))])
def test_cross_entropy_loss_error_input(case):
    error_input = _error_inputs()[int(case.rsplit("-", 1)[1])]
    sample = error_input.module_error_input
    kwargs = dict(sample.constructor_input.kwargs)
    with pytest.raises(error_input.error_type):  # PyTorch's own expectation, checked here too
        torch.nn.CrossEntropyLoss(**kwargs)(*sample.forward_input.args)
    with pytest.raises(error_input.error_type):
        nanfuse.CrossEntropyLoss(**kwargs)(*sample.forward_input.args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weight_that_requires_grad_raises_like_pytorch(reduction, dtype):
    input, target = torch.randn(4, 5, dtype=dtype, requires_grad=True), torch.randint(0, 5, (4,))
    weight = torch.rand(5, dtype=dtype, requires_grad=True)
    try:
        F.cross_entropy(input, target, weight, reduction=reduction).sum().backward()
    except Exception as error:  # noqa: BLE001  PyTorch's exception class is the expectation
        expected = type(error)
    else:
        pytest.fail("PyTorch accepted a weight that requires grad")
    with pytest.raises(expected, match="weight"):
        nanfuse.cross_entropy(input, target, weight, reduction=reduction).sum().backward()
