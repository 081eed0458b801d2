"""One optimizer step of a PyTorch fused optimizer given a device grad_scale and found_inf: shared by NanGuard
(nanfuse/guard.py) and the registered op nanfuse::fused_optimizer_step (nanfuse/_ops.py). No pass of its own
over the gradients (the optimizer's kernel divides by grad_scale) and no host sync after the first step."""

import torch

# the state entry a fused optimizer's first step creates for a parameter (Adagrad creates its state in __init__)
_FIRST_STEP_KEY = {torch.optim.Adam: "exp_avg", torch.optim.AdamW: "exp_avg", torch.optim.SGD: "momentum_buffer"}


def _creates_state(optimizer):
    """True when optimizer.step() would create state for a parameter that has a gradient (its first step):
    checked per parameter (an entry that was only read, and so exists empty, still counts as missing)."""
    key = next((k for cls, k in _FIRST_STEP_KEY.items() if isinstance(optimizer, cls)), None)
    stateful = [group for group in optimizer.param_groups
                if not (isinstance(optimizer, torch.optim.SGD) and group["momentum"] == 0)]  # SGD keeps none
    return any(p.grad is not None and (key not in optimizer.state[p] if key and p in optimizer.state
                                       else not optimizer.state.get(p))
               for group in stateful for p in group["params"])


def fused_step(optimizer, grad_scale, found_inf):
    """optimizer.step() of a PyTorch fused optimizer: it divides the gradients by `grad_scale` inside its
    kernel and skips the update on the device where `found_inf` is 1. A step that would create state reads
    the flag once and is not taken when it is set (PyTorch creates the state before it reads found_inf)."""
    if _creates_state(optimizer) and bool(found_inf):  # the first step only: one host read
        return None
    optimizer.grad_scale, optimizer.found_inf = grad_scale, found_inf
    try:
        return optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
