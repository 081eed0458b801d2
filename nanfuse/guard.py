"""NanGuard: clip, check and step, skipping a step whose gradients hold a NaN or Inf.

Order of one guard.step():
1. with a GradScaler: scaler.unscale_(optimizer) (gradients divided by the loss scale);
2. one norm-and-check pass over all gradients (nanfuse.clip), clipping to max_norm if given;
3. the optimizer step, only if every gradient was finite:
   - PyTorch's fused optimizers (Adam, AdamW, SGD, Adagrad with fused=True) get the inverse clip
     coefficient as `grad_scale` and the flag as `found_inf`: they scale inside their own kernel and
     skip the update on the device, so the clip costs no extra pass and nothing syncs;
   - with a GradScaler, scaler.step(optimizer) (skips on the scaler's own found-inf, the same
     condition) and scaler.update();
   - any other optimizer: one host read of the flag per step, as GradScaler does;
4. the skipped-step counter is advanced on the device.
A skipped step leaves parameters and optimizer state bit-for-bit as they were.
"""

import torch

from .clip import GradNormReport, clip_and_check_, grad_norm_check

FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


class NanGuard:
    """Wraps an optimizer: guard.step() clips and checks all gradients, then steps only if all are finite."""

    def __init__(self, optimizer, max_norm=None, norm_type=2.0, *, scaler=None, process_group=None):
        if max_norm is not None and not float(max_norm) >= 0:
            raise ValueError(f"max_norm must be >= 0 or None, got {max_norm}")
        self.optimizer = optimizer
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scaler = scaler
        self.process_group = process_group
        self.steps = 0
        self.skipped_steps = torch.zeros((), dtype=torch.int64)  # moved to the gradients' device on use
        self.last_report: GradNormReport | None = None

    @property
    def last_norm(self):
        """Total gradient norm seen by the last step (a device tensor), or None before the first."""
        return None if self.last_report is None else self.last_report.total_norm

    def _parameters(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _fused(self):
        return isinstance(self.optimizer, FUSED_OPTIMIZERS) and all(
            group.get("fused") for group in self.optimizer.param_groups)

    def step(self, closure=None):
        """Clip, check and step (or skip); returns the GradNormReport of this step."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        params = self._parameters()
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        if scaler is not None:
            scaler.unscale_(self.optimizer)
            report = clip_and_check_(params, self.max_norm, self.norm_type, process_group=self.process_group)
            scaler.step(self.optimizer)
            scaler.update()
        elif self._fused():
            report = grad_norm_check(params, self.max_norm, self.norm_type, process_group=self.process_group)
            self.optimizer.grad_scale = 1.0 / report.clip_coef  # fused kernels use grad / grad_scale
            self.optimizer.found_inf = report.found_inf
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        else:
            report = clip_and_check_(params, self.max_norm, self.norm_type, process_group=self.process_group)
            if not bool(report.found_inf):  # the one host read per step
                self.optimizer.step()
        self.steps += 1
        self.skipped_steps = self.skipped_steps.to(report.found_inf.device) + report.found_inf.to(torch.int64)
        self.last_report = report
        return report

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"steps": self.steps, "skipped_steps": self.skipped_steps.clone()}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
        self.skipped_steps = state["skipped_steps"].clone()
