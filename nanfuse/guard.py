"""NanGuard: clip, check and step, skipping a step whose gradients hold a NaN or Inf.

One guard.step(), with G the bytes of all gradients:
1. one norm-and-check pass over all gradients (nanfuse.clip), G read. With an enabled GradScaler the
   gradients are read as they are (still loss-scaled): the norm is of the gradients times 1 / scale,
   so the unscale, the norm, the non-finite check and the clip share this one pass and at most one
   scaling pass, where scaler.unscale_ + clip_grad_norm_ take two or three (5G against 3G).
2. the optimizer step, only if every gradient was finite:
   - PyTorch's fused optimizers (Adam, AdamW, SGD, Adagrad with fused=True) get the combined factor as
     `grad_scale` (they divide by it inside their own kernel) and the flag as `found_inf` (they skip
     the update on the device): no scaling pass and no host sync at all;
   - any other optimizer: the gradients are scaled by (1 / scale) * clip coefficient in one pass (2G),
     then one host read of the flag decides the step, as scaler.step does;
3. with a GradScaler, its state is advanced exactly as unscale_/step/update would (same scale, same
   growth tracker); the skipped-step counter is advanced on the device.
A skipped step leaves parameters and optimizer state bit-for-bit as they were.
Under torch.compile the norm, the scaling and the fused optimizer's step go through the registered
ops (nanfuse/_ops.py), so guard.step() compiles with fullgraph=True.
"""

import torch
from torch.amp.grad_scaler import OptState

from . import _backend
from .clip import GradNormReport, _gradients, norm_check_scale

FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def fused_step(optimizer, grad_scale, found_inf):
    """optimizer.step() of a PyTorch fused optimizer: it divides the gradients by `grad_scale` inside its
    kernel and skips the update on the device where `found_inf` is 1."""
    optimizer.grad_scale, optimizer.found_inf = grad_scale, found_inf
    try:
        return optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


def _scaler_state(scaler, optimizer):
    """GradScaler's record for this optimizer in this iteration. Private attributes of torch.amp.GradScaler
    (`_per_optimizer_states`, `_scale`, OptState): tests/test_guard.py pins that they behave as used here."""
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is not OptState.READY:
        raise RuntimeError("NanGuard unscales the gradients itself: call guard.step() instead of "
                           "scaler.unscale_(optimizer) / scaler.step(optimizer) in the same iteration")
    if scaler._scale is None:
        raise RuntimeError("the GradScaler has no scale yet: call scaler.scale(loss).backward() before guard.step()")
    return state


class NanGuard:
    """Wraps an optimizer: guard.step() clips and checks all gradients, then steps only if all are finite."""

    def __init__(self, optimizer, max_norm=None, norm_type=2.0, *, scaler=None, process_group=None, watch=None):
        if max_norm is not None and not float(max_norm) >= 0:
            raise ValueError(f"max_norm must be >= 0 or None, got {max_norm}")
        self.optimizer = optimizer
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scaler = scaler
        self.process_group = process_group
        self.watch = watch  # a NanWatch: it gets each step's report (nanfuse/watch), and localises bad steps
        self.steps = 0
        self.skipped_steps = torch.zeros((), dtype=torch.int64)  # moved to the gradients' device on use
        self.last_report: GradNormReport | None = None
        from . import _ops

        self._optimizer_key = _ops.remember_optimizer(optimizer)

    @property
    def last_norm(self):
        """Total gradient norm seen by the last step (a device tensor), or None before the first."""
        return None if self.last_report is None else self.last_report.total_norm

    def _fused(self):
        return isinstance(self.optimizer, FUSED_OPTIMIZERS) and all(
            group.get("fused") for group in self.optimizer.param_groups)

    def step(self, closure=None):
        """Clip, check and step (or skip); returns the GradNormReport of this step (device tensors)."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        state = _scaler_state(scaler, self.optimizer) if scaler is not None else None
        inv_scale = None if scaler is None else scaler._scale.double().reciprocal().float()
        report, scale_all = norm_check_scale(_gradients(params, True), self.max_norm, self.norm_type,
                                             self.process_group, inv_scale)
        found_inf = report.found_inf
        if self.watch is not None:
            self.watch.observe(report)
        if self._fused():
            # the optimizer divides by grad_scale: g / (scale / coef) = g * (1 / scale) * coef
            grad_scale = 1.0 / report.clip_coef if inv_scale is None else 1.0 / (inv_scale * report.clip_coef)
            self._fused_step(grad_scale, found_inf)
            if state is not None:
                state["found_inf_per_device"], state["stage"] = {found_inf.device: found_inf}, OptState.STEPPED
        else:
            self._count_skipped(found_inf)
            if inv_scale is not None:
                scale_all(report.clip_coef * inv_scale.to(report.clip_coef.device))
                state["found_inf_per_device"], state["stage"] = {found_inf.device: found_inf}, OptState.UNSCALED
                scaler.step(self.optimizer)  # steps unless found_inf (one host read, as PyTorch's)
            else:
                if self.max_norm is not None:
                    scale_all(report.clip_coef)
                if not bool(found_inf):  # the one host read per step
                    self.optimizer.step()
        if scaler is not None:
            scaler.update()
        self.steps += 1
        self.last_report = report
        return report

    def _fused_step(self, grad_scale, found_inf):
        skipped = self.skipped_steps.to(found_inf.device)
        if _backend.through_registered_ops():
            from . import _ops

            self.skipped_steps = _ops.fused_optimizer_step(self._optimizer_key, grad_scale, found_inf, skipped)
        else:
            fused_step(self.optimizer, grad_scale, found_inf)
            self.skipped_steps = skipped + found_inf.to(torch.int64)

    def _count_skipped(self, found_inf):
        self.skipped_steps = self.skipped_steps.to(found_inf.device) + found_inf.to(torch.int64)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"steps": self.steps, "skipped_steps": self.skipped_steps.clone()}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
        self.skipped_steps = state["skipped_steps"].clone()
