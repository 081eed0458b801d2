"""NanGuard: clip, check and step, skipping a step whose gradients hold a NaN or Inf.

One guard.step(), with G the bytes of all gradients:
1. one norm-and-check pass over all gradients (nanfuse.clip), G read. With an enabled GradScaler the
   gradients are read as they are (still loss-scaled): the norm is of the gradients times 1 / scale,
   so the unscale, the norm, the non-finite check and the clip share this one pass and at most one
   scaling pass, where scaler.unscale_ + clip_grad_norm_ take two or three (5G against 3G).
2. the optimizer step, only if every gradient was finite:
   - PyTorch's fused optimizers (Adam, AdamW, SGD, Adagrad with fused=True) get the combined factor as
     `grad_scale` (they divide by it inside their own kernel) and the flag as `found_inf` (they skip
     the update on the device): no scaling pass and no host sync, except on a step that would create
     optimizer state (the first): PyTorch creates it before it looks at found_inf (fused SGD's momentum
     buffer from empty_like: garbage), so that step reads the flag once and is not taken at all if set;
   - any other optimizer: the gradients are scaled by (1 / scale) * clip coefficient in one pass (2G),
     then one host read of the flag decides the step, as scaler.step does;
   - LBFGS (its step re-evaluates the closure): every evaluation is checked and clipped; a non-finite one
     stops the step, and parameters and state are put back from a copy taken before it;
3. with a GradScaler, its state is advanced exactly as unscale_/step/update would (same scale, same
   growth tracker); the skipped-step counter is advanced on the device. Guards that share one GradScaler
   (one per optimizer, PyTorch's multi-optimizer AMP recipe) are made with update_scaler=False and the
   caller runs scaler.update() once after all of them, as after several scaler.step() calls.
A skipped step leaves parameters and optimizer state bit-for-bit as they were.
Under torch.compile the norm, the scaling and the fused optimizer's step go through the registered
ops (nanfuse/_ops.py), so guard.step() compiles with fullgraph=True.
"""

import collections.abc
import copy
import weakref

import torch
from torch.amp.grad_scaler import OptState

from . import _backend, _ops
from ._grad_norm_impl import norm_kind
from ._optimizer_step import fused_step
from .clip import GradNormReport, _gradients, check_max_norm, norm_check_scale

FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)
SMALLEST_FACTOR = 2.0**-100  # a fused optimizer's grad_scale is 1 / factor, in fp32: it must stay finite


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


_UPDATING_GUARDS = weakref.WeakKeyDictionary()  # GradScaler -> the live guards that call its update()


def _count(value, key):
    """A state_dict count (int, integral float, or one-element tensor of such) as an int >= 0, or a ValueError
    naming `key`."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()  # load_state_dict only, never in a step
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"state_dict[{key!r}] must be an integral number >= 0, got {value!r}")
    return value


def _nothing_but_the_step(report):
    """True where reading the report is free (CPU, eager) and it has every gradient finite and a coefficient of 1:
    then a fused optimizer's step needs no grad_scale or found_inf (fewer ops, same update)."""
    return (_backend.may_read_values(report.found_inf) and report.found_inf.item() == 0.0
            and report.clip_coef.item() == 1.0)


class _NonFiniteEvaluation(Exception):
    """Raised from inside LBFGS's step by a closure evaluation whose gradients are not all finite."""


class NanGuard:
    """Wraps an optimizer: guard.step() clips and checks all gradients, then steps only if all are finite.

    update_scaler=False leaves scaler.update() to the caller (guards sharing a GradScaler); only one live
    guard per GradScaler may update it (ValueError otherwise). watch: a nanfuse.NanWatch fed each step's report."""

    def __init__(self, optimizer, max_norm=None, norm_type=2.0, *, scaler=None, process_group=None,
                 update_scaler=True, watch=None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, torch.optim.SparseAdam):
            raise ValueError("optimizer: SparseAdam takes sparse gradients; nanfuse's clip needs dense ones")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        if scaler is not None and isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("scaler: a GradScaler does not support closures, which LBFGS needs")
        if scaler is not None and update_scaler:
            if any(guard is not self for guard in _UPDATING_GUARDS.get(scaler, ())):
                raise ValueError("scaler: another NanGuard already calls scaler.update() on this GradScaler; guards "
                                 "sharing one must be made with update_scaler=False, and scaler.update() called "
                                 "once per iteration after every guard.step()")
            _UPDATING_GUARDS.setdefault(scaler, weakref.WeakSet()).add(self)
        self.optimizer = optimizer
        self.max_norm = check_max_norm(max_norm)
        self.norm_type = norm_kind(norm_type)[0]
        self.scaler = scaler
        self.process_group = process_group
        self.update_scaler = bool(update_scaler)
        if watch is not None and not callable(getattr(watch, "observe", None)):
            raise TypeError(f"watch must be a nanfuse.NanWatch or None, got {type(watch).__name__}")
        self.watch = watch  # a NanWatch: it gets each step's report (nanfuse/watch), and localises bad steps
        self.steps = 0
        self.skipped_steps = torch.zeros((), dtype=torch.int64)  # moved to the gradients' device on use
        self.last_report: GradNormReport | None = None
        self._register()

    def _register(self):
        self._optimizer_key = _ops.remember_optimizer(self.optimizer)

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_optimizer_key"]  # a copy steps its own optimizer: it registers it under a key of its own
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._register()

    @property
    def last_norm(self):
        """Total gradient norm seen by the last step (a device tensor), or None before the first."""
        return None if self.last_report is None else self.last_report.total_norm

    def _fused(self):
        return isinstance(self.optimizer, FUSED_OPTIMIZERS) and all(
            group.get("fused") for group in self.optimizer.param_groups)

    def _params(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, closure=None):
        """Clip, check and step (or skip); returns the GradNormReport of this step (device tensors).

        With a closure it is evaluated first (under enable_grad) and its gradients checked; LBFGS, which
        evaluates the closure itself, has every evaluation checked and clipped."""
        if closure is not None and isinstance(self.optimizer, torch.optim.LBFGS):
            return self._closure_step(closure)
        if closure is not None:
            if self.scaler is not None and self.scaler.is_enabled():
                raise RuntimeError("closure: a GradScaler does not support closures")
            with torch.enable_grad():
                closure()
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        state = _scaler_state(scaler, self.optimizer) if scaler is not None else None
        inv_scale = None if scaler is None else scaler._scale.double().reciprocal().float()
        report, scale_all = norm_check_scale(_gradients(self._params(), True), self.max_norm, self.norm_type,
                                             self.process_group, inv_scale)
        found_inf = report.found_inf
        if self.watch is not None:  # the scale tells a routine loss-scale overflow from a cause (nanfuse/watch)
            self.watch.observe(report, None if scaler is None else scaler._scale, source=self)
        fused = self._fused()
        if fused and inv_scale is None and _nothing_but_the_step(report):
            # CPU, eager: the flag and the coefficient were read for free and ask for nothing but the step itself
            self.optimizer.step()
        elif fused:
            factor = report.clip_coef.double() if inv_scale is None else report.clip_coef.double() * inv_scale
            if self.max_norm is not None:  # a factor below 2**-100 (norms near 1e38) is applied in a pass first
                kept = factor.clamp(min=SMALLEST_FACTOR)
                scale_all((factor / kept).to(report.clip_coef.dtype))  # exactly 1 otherwise: free on CPU, in the kernel
                factor = kept
            # the optimizer divides by grad_scale (fp32 for PyTorch's fused kernels): g * (1 / scale) * coef
            self._fused_step((1.0 / factor).float(), found_inf)
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
        if scaler is not None and self.update_scaler:
            scaler.update()
        self.steps += 1
        self.last_report = report
        return report

    def _closure_step(self, closure):
        """LBFGS: step with a closure whose every evaluation is checked and clipped; a non-finite evaluation
        stops the step and puts parameters and state back as they were (a copy of both is taken first)."""
        params = self._params()
        saved_params = [p.detach().clone() for p in params]
        keys = list(self.optimizer.state.keys())
        saved_state = copy.deepcopy([self.optimizer.state[k] for k in keys])
        reports = []

        def checked_closure():
            with torch.enable_grad():
                loss = closure()
            report, scale_all = norm_check_scale(_gradients(params, True), self.max_norm, self.norm_type,
                                                 self.process_group)
            reports.append(report)
            if bool(report.found_inf):  # LBFGS reads the loss on the host anyway
                raise _NonFiniteEvaluation
            if self.max_norm is not None:
                scale_all(report.clip_coef)
            return loss

        try:
            self.optimizer.step(checked_closure)
            skipped = 0
        except _NonFiniteEvaluation:
            with torch.no_grad():
                for p, saved in zip(params, saved_params):
                    p.copy_(saved)
            self.optimizer.state.clear()
            self.optimizer.state.update(zip(keys, saved_state))
            skipped = 1
        self.skipped_steps = self.skipped_steps + skipped
        self.steps += 1
        self.last_report = reports[-1]
        if self.watch is not None:  # the evaluation that stopped the step, or the last one
            self.watch.observe(self.last_report, source=self)
        return self.last_report

    def _fused_step(self, grad_scale, found_inf):
        skipped = self.skipped_steps.to(found_inf.device)
        if _backend.through_registered_ops():
            self.skipped_steps = _ops.fused_optimizer_step(self._optimizer_key, grad_scale, found_inf, skipped)
        else:
            fused_step(self.optimizer, grad_scale, found_inf)
            self.skipped_steps = skipped + found_inf.to(torch.int64)

    def _count_skipped(self, found_inf):
        self.skipped_steps = self.skipped_steps.to(found_inf.device) + found_inf.to(torch.int64)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        """The step count, the skipped-step counter and the last report (tensors, ints and None only, so
        torch.load(weights_only=True) reads it back)."""
        report = None if self.last_report is None else {k: v.clone() for k, v in self.last_report._asdict().items()}
        return {"steps": self.steps, "skipped_steps": self.skipped_steps.clone(), "last_report": report}

    def load_state_dict(self, state_dict):
        """Restore what state_dict() saved; a ValueError names what is missing or malformed."""
        if not isinstance(state_dict, collections.abc.Mapping):
            raise ValueError(f"state_dict must be a dict from NanGuard.state_dict(), got {type(state_dict).__name__}")
        for key in ("steps", "skipped_steps"):
            if key not in state_dict:
                raise ValueError(f"state_dict has no {key!r}: expected a dict from NanGuard.state_dict()")
        steps, skipped = _count(state_dict["steps"], "steps"), _count(state_dict["skipped_steps"], "skipped_steps")
        report = state_dict.get("last_report")
        if report is not None:
            if not isinstance(report, collections.abc.Mapping) or set(report) != set(GradNormReport._fields):
                raise ValueError(f"state_dict['last_report'] must be None or a dict of {GradNormReport._fields}")
            for key, value in report.items():
                if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)) or (
                        isinstance(value, torch.Tensor) and (value.numel() != 1 or value.is_complex())):
                    raise ValueError(f"state_dict['last_report'][{key!r}] must be a number or a one-element "
                                     f"tensor, got {value!r}")
            report = GradNormReport(**{k: torch.as_tensor(v).reshape(()).clone() for k, v in report.items()})
        self.steps = steps
        self.skipped_steps = torch.tensor(skipped, dtype=torch.int64)
        self.last_report = report
