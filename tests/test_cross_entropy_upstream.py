"""The gradient under every upstream factor a training loop applies (a GradScaler's loss scale, loss / k for
gradient accumulation, a summed loss divided by num_items_in_batch), for every dtype: its error against the
float64 reference is at most 2x that of PyTorch's own recipe (F.cross_entropy under autocast, whose fp32
gradient is rounded once to the logits' dtype), and it has no more exact zeros.

fp16 is where this bites: 1/N times a probability of 1e-9 is below fp16's smallest subnormal, so a
gradient stored as p/N in fp16 is 0 there before backward multiplies it by the scale.
"""

import pytest
import torch
import torch.nn.functional as F
from reference import cross_entropy_ref

import nanfuse
from nanfuse._backend import registered_ops

# enough rows and classes for p / N to fall below fp16's subnormals (the interpreter, which runs every program
# in Python: fewer, with the same effect)
N_ROWS, N_CLASSES = (32, 2048) if nanfuse.current_backend() == "interpret" else (256, 4096)
N_ITEMS = 3 * N_ROWS - 7  # num_items_in_batch: the non-ignored targets of three accumulated micro-batches

# (reduction, upstream factor): the loss scale of torch.amp.GradScaler, loss / k for k = 4 accumulation
# steps, loss / 29, and Transformers' summed loss divided by num_items_in_batch; with and without a scale
FACTORS = {
    "scale": ("mean", 65536.0),
    "accumulate": ("mean", 1 / 4),
    "divide-by-29": ("mean", 1 / 29),
    "num-items": ("sum", 1 / N_ITEMS),
    "num-items-scaled": ("sum", 65536.0 / N_ITEMS),
    "one": ("mean", 1.0),
}


def pytorch_recipe_grad(logits, target, reduction, factor):
    """PyTorch's AMP recipe: F.cross_entropy under autocast (fp32 math), the loss times the factor, backward."""
    x = logits.clone().requires_grad_()
    with torch.autocast("cpu", dtype=logits.dtype, enabled=logits.dtype != torch.float32):
        loss = F.cross_entropy(x, target, reduction=reduction)
    (loss * factor).backward()
    if nanfuse.current_backend() == "interpret" and logits.dtype == torch.bfloat16:
        # the Triton interpreter casts fp32 to bf16 by truncation where a GPU rounds to nearest: the same
        # recipe with that cast is what the interpreted kernel can be held to
        x32 = logits.float().requires_grad_()
        (F.cross_entropy(x32, target, reduction=reduction) * factor).backward()
        return (x32.grad.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return x.grad


def nanfuse_grad(logits, target, reduction, factor):
    x = logits.clone().requires_grad_()
    (nanfuse.cross_entropy(x, target, reduction=reduction) * factor).backward()
    return x.grad


def l1_relative_error(grad, ref):
    return ((grad.double() - ref).abs().sum() / ref.abs().sum()).item()


CASES = [(dtype, name, False) for dtype in (torch.float16, torch.bfloat16, torch.float32) for name in FACTORS]
CASES += [(torch.float16, name, True) for name in ("scale", "num-items")]  # what torch.compile runs


@pytest.mark.parametrize("dtype, name, through_op", CASES,
                         ids=lambda v: str(v).removeprefix("torch.") if not isinstance(v, bool) else "op" * v)
def test_gradient_error_at_most_twice_pytorchs_recipe(dtype, name, through_op):
    reduction, factor = FACTORS[name]
    logits = (torch.randn(N_ROWS, N_CLASSES) * 3).to(dtype)
    target = torch.randint(0, N_CLASSES, (N_ROWS,))
    target[:5] = -100
    x_ref = logits.double().requires_grad_()
    (cross_entropy_ref(x_ref, target, reduction=reduction) * factor).backward()
    ref = x_ref.grad
    theirs = pytorch_recipe_grad(logits, target, reduction, factor)
    with registered_ops(through_op):
        ours = nanfuse_grad(logits, target, reduction, factor)
    assert ours.dtype == dtype
    assert l1_relative_error(ours, ref) <= 2 * l1_relative_error(theirs, ref)
    assert (ours == 0).sum() <= (theirs == 0).sum()
