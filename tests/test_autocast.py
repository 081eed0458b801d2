"""Under torch.autocast nanfuse.cross_entropy takes half-precision logits as they are: no fp32 copy of
the N x C logits (or of their softmax or gradient) is ever allocated, and the loss is fp32.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from reference import cross_entropy_ref
from torch.utils._python_dispatch import TorchDispatchMode

import nanfuse
from nanfuse._backend import registered_ops

N_ROWS, N_CLASSES = 64, 65_536  # 4M logits: twice the CPU path's chunk, so a chunk-sized temporary is smaller


class Float32Allocations(TorchDispatchMode):
    """Every op output that is an fp32 tensor of at least `numel` elements, as (op, shape)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.found = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.numel:
                self.found.append((func.__name__, tuple(t.shape)))
        return out


def train_step(loss_fn, dtype):
    torch.manual_seed(0)
    head = torch.nn.Linear(32, N_CLASSES)
    hidden = torch.randn(N_ROWS, 32)
    target = torch.randint(0, N_CLASSES, (N_ROWS,))
    target[0] = -100
    with Float32Allocations(N_ROWS * N_CLASSES) as trace:
        with torch.autocast("cpu", dtype=dtype):
            logits = head(hidden)
            loss = loss_fn(logits, target)
        loss.backward()
    return logits, target, loss, trace.found


@pytest.mark.parametrize("through_op", [False, True], ids=["eager", "registered-op"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_allocates_no_fp32_logits(dtype, through_op):
    with registered_ops(through_op):  # the registered op is what torch.compile calls
        logits, target, loss, found = train_step(nanfuse.cross_entropy, dtype)
    assert logits.dtype == dtype and loss.dtype == torch.float32
    assert found == []
    assert_close(loss, cross_entropy_ref(logits.detach().double(), target), torch.float32, "loss")


def test_the_allocation_trace_sees_pytorchs_fp32_copy():
    # the control: autocast runs F.cross_entropy in fp32, so it copies the logits to fp32 and keeps an fp32 softmax
    _, _, _, found = train_step(F.cross_entropy, torch.bfloat16)
    assert ("_to_copy.default", (N_ROWS, N_CLASSES)) in found and ("_log_softmax.default", (N_ROWS, N_CLASSES)) in found
