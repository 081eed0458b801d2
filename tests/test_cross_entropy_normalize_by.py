"""normalize_by: the reduced loss divided by a number or a 0-dim tensor inside forward, so that the gradient
forward writes is final and loss.backward() moves nothing more. Against the float64 oracle, for every reduction
and option, on the path this run tests (NANFUSE_BACKEND), eager and through the registered ops."""

import pytest
import torch
from helpers import assert_close
from reference import cross_entropy_ref

import nanfuse
from nanfuse._backend import registered_ops

N_ROWS, N_CLASSES = 7, 13

OPTIONS = {
    "plain": {},
    "ignored rows": {"ignore_index": 2},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.2},
    "z_loss, softcap, scale": {"z_loss": 1e-2, "softcap": 4.0, "logit_scale": 0.7},
    "probabilities": {"probabilities": True},
    "everything": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 6.0, "logit_scale": 1.3},
}
DIVISORS = {
    "number": lambda: 37,
    "float tensor": lambda: torch.tensor(11.5),
    "int tensor": lambda: torch.tensor(53),  # num_items_in_batch as Trainer gives it
}


def _problem(options, dtype):
    logits = (torch.randn(N_ROWS, N_CLASSES) * 3).to(dtype)
    if options.get("probabilities"):
        target = torch.softmax(torch.randn(N_ROWS, N_CLASSES), 1).to(dtype)
    else:
        target = torch.randint(0, N_CLASSES, (N_ROWS,))
        target[1] = options.get("ignore_index", -100)
    kwargs = {k: v for k, v in options.items() if k not in ("weight", "probabilities")}
    weight = torch.rand(N_CLASSES) + 0.5 if options.get("weight") else None
    return logits, target, weight, kwargs


@pytest.mark.parametrize("through_op", [False, True], ids=["eager", "registered_op"])
@pytest.mark.parametrize("divisor", DIVISORS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_the_oracle_divided(reduction, option, divisor, through_op):
    dtype = torch.float32
    logits, target, weight, kwargs = _problem(OPTIONS[option], dtype)
    normalize_by = DIVISORS[divisor]()
    x = logits.clone().requires_grad_()
    with registered_ops(through_op):
        loss = nanfuse.cross_entropy(x, target, weight, reduction=reduction, normalize_by=normalize_by, **kwargs)
    x_ref = logits.double().requires_grad_()
    ref = cross_entropy_ref(x_ref, target, weight, reduction=reduction, normalize_by=normalize_by, **kwargs)
    assert_close(loss, ref, torch.float32, "loss")
    upstream = torch.rand(N_ROWS) + 0.5 if reduction == "none" else torch.ones(())
    loss.backward(upstream)
    ref.backward(upstream.double())
    assert_close(x.grad, x_ref.grad, dtype, "gradient")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_other_dtypes_fold_it_in_before_the_one_rounding(dtype, reduction):
    # half precision recomputes in backward: the divisor and the upstream factor are applied in fp32, once
    logits, target, weight, kwargs = _problem(OPTIONS["everything"], dtype)
    x = logits.clone().requires_grad_()
    loss = nanfuse.cross_entropy(x, target, weight, reduction=reduction, normalize_by=torch.tensor(64), **kwargs)
    x_ref = logits.double().requires_grad_()
    ref = cross_entropy_ref(x_ref, target, weight, reduction=reduction, normalize_by=64, **kwargs)
    assert_close(loss, ref, torch.float64 if dtype == torch.float64 else torch.float32, "loss")
    (loss * 1024.0).backward()  # a GradScaler's loss scale on top
    (ref * 1024.0).backward()
    assert_close(x.grad, x_ref.grad, dtype, "gradient")


def test_dividing_the_returned_loss_afterwards_gives_the_same_gradient():
    logits, target, _, _ = _problem({}, torch.float32)
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    (nanfuse.cross_entropy(x, target, reduction="sum") / 29).backward()
    nanfuse.cross_entropy(y, target, reduction="sum", normalize_by=29).backward()
    assert_close(x.grad, y.grad, torch.float32)


def test_a_divisor_on_another_device_or_with_grad_is_taken_as_a_constant():
    logits, target, _, _ = _problem({}, torch.float32)
    divisor = torch.tensor(5.0, requires_grad=True)
    loss = nanfuse.cross_entropy(logits.requires_grad_(), target, normalize_by=divisor)
    loss.backward()
    assert divisor.grad is None


@pytest.mark.parametrize("bad", [0, 0.0, float("nan"), float("inf"), 10**400, True, "3", torch.ones(2),
                                 torch.ones(1, 1)], ids=lambda bad: repr(bad)[:24])
def test_a_bad_normalize_by_is_refused_naming_it(bad):
    logits, target, _, _ = _problem({}, torch.float32)
    with pytest.raises(ValueError, match="normalize_by"):
        nanfuse.cross_entropy(logits, target, normalize_by=bad)
