"""NanWatch: where a NaN/Inf started and which of four causes it was, with no host sync on clean steps.

Every step (cheap, no host sync): a forward pre-hook and a forward hook on the watched model keep a reference
to its call arguments, the RNG states (its modules' torch.Generator attributes too), the autocast state, its
modules' tensor attributes (a recurrent state kept across steps) and the gradient arriving at its outputs; the
guard hands over its non-finite flag and gradient norm (NanGuard(..., watch=watch)), and a device-side
history of the norm flags a norm that jumped past `jump_factor` times its recent median.
Only a bad step (non-finite gradients, or a norm jump) is localised: once its flag reaches the host (at
once for CPU tensors; on CUDA through an asynchronous copy, seen by the next step's forward or by report()),
the step is replayed with hooks on every submodule (nanfuse/watch/replay.py). A skipped step left the
parameters unchanged, so the replay computes what the step computed. report() reads everything in one sync.
"""

import collections
import dataclasses
import functools
import math
import warnings

import torch

from .. import _backend
from .localise import jump_report, nonfinite_report
from .replay import Capture, module_state, replay
from .report import CAUSES, NanReport, make_report
from .tree import map_tensors, tensors

# model calls kept for one step (gradient accumulation makes several) before the watch concludes that nothing
# calls observe() and drops the oldest: each holds a batch and the gradient at the model's outputs
MAX_CALLS_PER_STEP = 256
# replayed bad steps waiting for report(): the first half and the latest half of this many are kept, the others
# are reported as "not kept" (each holds a few device counts per module)
MAX_REPLAYS = 16
MAX_DROPPED = 1024  # step numbers of such replays, reported as "not kept"
UNEXPLAINED = ("could not localise", "not reproduced")  # what one call's replay may end in, most telling first

__all__ = ["CAUSES", "NanReport", "NanWatch"]


@dataclasses.dataclass
class _Step:
    """A step the guard has checked: its captures and its (found_inf, norm jump) flags on the device."""
    step: int
    captures: list
    flags: object  # non-finite gradients, norm jump, the norm, the median it was compared with, the GradScaler's
    # scale (NaN without one): a device fp64 (5,) tensor, or a list of floats where reading them was free (CPU)
    host_flags: torch.Tensor | None = None  # CUDA: a pinned copy, valid once `ready` has completed
    ready: object = None


def _keep_grad(grads, index, grad):
    # several backward calls through one output (two losses, retain_graph) add up, as .grad does
    grads[index] = grad if index not in grads else grads[index] + grad


def lower_median(values):
    """The median as torch.nanmedian defines it: the lower of the two middle values for an even count."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else float("nan")


def _cuda_devices(model, call_tensors):
    """Indices of the CUDA devices of the call's tensors and of the model's parameters and buffers."""
    found = {t.device for t in call_tensors}
    found.update(p.device for p in model.parameters())
    found.update(b.device for b in model.buffers())
    return {d.index or 0 for d in found if d.type == "cuda"}


class NanWatch:
    """Watches `model`: hand it to NanGuard(optimizer, ..., watch=watch), then read watch.report()."""

    def __init__(self, model, *, jump_factor=100.0, history=32, min_history=8, keep=2, copy_inputs=False,
                 sample_dim=0):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(jump_factor, bool) or not isinstance(jump_factor, (int, float)):
            raise TypeError(f"jump_factor must be a number, got {type(jump_factor).__name__}")
        if not isinstance(copy_inputs, bool):
            raise TypeError(f"copy_inputs must be a bool, got {type(copy_inputs).__name__}")
        if not 1 < jump_factor < math.inf:
            raise ValueError(f"jump_factor must be a finite number > 1, got {jump_factor}")
        for name, value in (("history", history), ("min_history", min_history), ("keep", keep),
                            ("sample_dim", sample_dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        if not 1 <= min_history <= history:
            raise ValueError(f"min_history must be in [1, history={history}], got {min_history}")
        if not keep >= 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if sample_dim < 0:
            raise ValueError(f"sample_dim must be >= 0, got {sample_dim}")
        self.model, self.jump_factor, self.min_history, self.keep = model, float(jump_factor), min_history, keep
        self.history_length, self.copy_inputs, self.sample_dim = history, copy_inputs, sample_dim
        self.steps, self._dropped = 0, []
        self._calls, self._pending, self._replays, self._reports = [], [], [], {}
        self._record = None
        # one norm history per guard observing the steps (two optimizers, two guards): id(guard) -> (device
        # history, finite norms written) and -> host deque (the norms, where reading them is free)
        self._histories, self._host_histories = {}, {}
        self._observer, self._step_observers, self._step_calls, self._last_replayed = None, set(), [], None
        self._replaying = self._warned_unobserved = False
        self._handles = [model.register_forward_pre_hook(self._capture_call, with_kwargs=True),
                         model.register_forward_hook(self._capture_output)]

    def remove(self):
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # every step: capture, and the guard's flag and norm
    def _capture_call(self, module, args, kwargs):
        if self._replaying or torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return  # a call under no_grad (evaluation) gives no gradients: nothing to keep
        self._resolve(wait=False)  # a previous bad step is replayed before this call changes anything
        if not self._calls:  # a new step: the last one's calls are no longer kept for a second guard
            self._step_calls = []
        if self.copy_inputs:
            args, kwargs = map_tensors(torch.clone, (args, kwargs))
        devices = _cuda_devices(module, tensors((args, kwargs))) if torch.cuda.is_initialized() else set()
        autocast = tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                         for d in ("cpu", "cuda") if d == "cpu" or devices)
        if len(self._calls) >= MAX_CALLS_PER_STEP:  # nothing observes the steps: keep memory bounded, say why
            if not self._warned_unobserved:
                self._warned_unobserved = True
                warnings.warn(f"NanWatch: {MAX_CALLS_PER_STEP} model calls and no step observed; pass watch= to "
                              "NanGuard (or call watch.observe(report) each step). Keeping only the latest calls.")
            del self._calls[0]
        attributes, generators = module_state(module)
        self._calls.append(Capture(args, kwargs, torch.get_rng_state(),
                                   {i: torch.cuda.get_rng_state(i) for i in devices}, autocast, attributes,
                                   [(g, g.get_state()) for _, _, g in generators]))

    def _capture_output(self, module, args, output):
        if self._replaying or torch.compiler.is_compiling() or not torch.is_grad_enabled() or not self._calls:
            return
        grads = self._calls[-1].output_grads
        for i, leaf in enumerate(tensors(output)):
            if leaf.requires_grad:
                leaf.register_hook(functools.partial(_keep_grad, grads, i))

    def observe(self, grad_report, scale=None, source=None):
        """Take one step's GradNormReport (NanGuard.step() calls this after its check, before the optimizer
        step, with itself as `source`) and the GradScaler's scale of the step if there is one (a tensor). Device
        ops only; a bad step is replayed here when its flag can be read for free (CPU)."""
        if torch.compiler.is_compiling():
            return
        self._observer = id(source)  # each guard has a norm history of its own
        if self._calls or not self._step_calls or self._observer in self._step_observers:  # a new training step
            step, self._step_calls, self._step_observers = self.steps, self._calls, {self._observer}
            self.steps += 1
        else:  # a second guard (over another optimizer's parameters) checking the same step: same step and calls
            step = self.steps - 1
            self._step_observers.add(self._observer)
        norm, found_inf = grad_report.total_norm, grad_report.found_inf
        free = _backend.may_read_values(norm) and _backend.may_read_values(found_inf)
        if free and (scale is None or _backend.may_read_values(scale)):  # CPU, eager: reading is free
            flags = self._host_records(norm.item(), found_inf.item() > 0)
            flags.append(float("nan") if scale is None else scale.item())
        else:
            flags = self._update_records(step, norm, found_inf, scale)
        pending = _Step(step, self._step_calls, flags)
        if isinstance(flags, torch.Tensor) and flags.is_cuda:
            pending.host_flags = torch.empty(5, dtype=flags.dtype, pin_memory=True)
            pending.host_flags.copy_(flags, non_blocking=True)
            pending.ready = torch.cuda.Event()
            pending.ready.record()
        self._calls = []
        self._pending.append(pending)
        self._resolve(wait=False)
        # unresolved steps older than `keep`: the device record still names them
        self._pending = [p for p in self._pending if p.step >= self.steps - self.keep]

    def _host_records(self, norm, found):
        """_update_records where the norm and flag are Python values: [found_inf, jump, norm, median] (the scale
        is appended by observe)."""
        kept = self._host_histories.setdefault(self._observer, collections.deque(maxlen=self.history_length))
        history = list(kept)
        median = lower_median(history)
        finite = -float("inf") < norm < float("inf")
        jump = len(history) >= self.min_history and finite and median > 0 and norm > self.jump_factor * median
        if finite:
            kept.append(norm)
        return [float(found), float(jump), norm, median]

    def _update_records(self, step, norm, found_inf, scale):
        """Norm history and the event record, on the device: (found_inf, jump, norm, median, scale) as fp64 (5,)."""
        norm = norm.detach().double()
        if self._record is None or self._record.device != norm.device:
            # first bad step, last bad step, last jump step, its norm, the median it was compared with
            self._record = torch.tensor([-1.0, -1.0, -1.0, float("nan"), float("nan")], dtype=torch.float64,
                                        device=norm.device)
            self._histories = {}
        if self._observer not in self._histories:  # the norms, and how many finite ones were written
            self._histories[self._observer] = (
                torch.full((self.history_length,), float("nan"), dtype=torch.float64, device=norm.device),
                torch.zeros(1, dtype=torch.int64, device=norm.device))
        history, written = self._histories[self._observer]
        finite = torch.isfinite(norm)
        median = history.nanmedian()
        enough = (~history.isnan()).sum() >= self.min_history
        jump = enough & finite & (median > 0) & (norm > self.jump_factor * median)
        found = found_inf.detach().to(norm.device) > 0
        # the latest `history` finite norms, as on the host: a skipped step does not advance the ring
        slot = written % self.history_length
        history.index_copy_(0, slot, torch.where(finite, norm, history.index_select(0, slot)))
        written += finite.long()
        at = torch.full((), float(step), dtype=torch.float64, device=norm.device)
        first_time = found & (self._record[0] < 0)
        self._record = torch.where(torch.stack([first_time, found, jump, jump, jump]),
                                   torch.stack([at, at, at, norm, median]), self._record)
        scale = torch.full((), float("nan"), dtype=torch.float64, device=norm.device) if scale is None else \
            scale.detach().double().reshape(()).to(norm.device)
        return torch.stack([found.double(), jump.double(), norm, median, scale])

    # localising a bad step
    def _resolve(self, wait):
        """Replay the pending steps whose flags the host can read without a sync (all of them if `wait`)."""
        while self._pending:
            pending = self._pending[0]
            if pending.ready is not None and not wait and not pending.ready.query():
                return
            if isinstance(pending.flags, torch.Tensor) and pending.ready is None and not wait:
                return  # CPU tensors with reading disabled behave as CUDA would: wait for report()
            self._pending.pop(0)
            if pending.ready is not None and wait:
                pending.ready.synchronize()  # report(): the one place that may wait for the device
            flags = pending.flags if pending.ready is None else pending.host_flags
            # host values already: a CPU tensor, or the pinned copy the event above says has landed
            found, jump, norm, median, scale = flags if isinstance(flags, list) else flags.tolist()
            if found or jump:
                self._replay(pending, ("nonfinite", None if math.isnan(scale) else scale) if found
                             else ("jump", norm, median))

    def _replay(self, pending, kind):
        if self._last_replayed == (pending.step, kind[0]):  # a second guard found the same step bad
            return
        self._last_replayed = (pending.step, kind[0])
        self._replaying = True
        try:
            replays = [replay(self.model, capture, i, self.sample_dim) for i, capture in enumerate(pending.captures)]
        finally:
            self._replaying = False
        self._replays.append((pending.step, kind, replays))
        if len(self._replays) > MAX_REPLAYS:  # keep the first (where it started) and the latest ones
            step, kind, _ = self._replays.pop(MAX_REPLAYS // 2)
            self._dropped.append((step, "nonfinite" if kind[0] == "nonfinite" else "jump"))
            del self._dropped[:-MAX_DROPPED]

    def reports(self):
        """Every event seen so far, oldest first (one host sync reads them all)."""
        self._resolve(wait=True)
        record = self._record
        if record is None:  # reading was free every step: everything is resolved already
            record = torch.tensor([-1.0, -1.0, -1.0, float("nan"), float("nan")], dtype=torch.float64)
        parts = [record] + [s for _, _, replays in self._replays for r in replays for s in r.slots.values]
        flat = torch.cat([p.to(record.device) for p in parts]).tolist()  # the one host read
        first_bad, last_bad, jump_step, jump_norm, jump_median = flat[:5]
        offset = 5
        for step, kind, replays in self._replays:
            found = unexplained = None
            for r in replays:
                values = []
                for value in r.slots.values:
                    values.append(flat[offset:offset + value.numel()])
                    offset += value.numel()
                if kind[0] == "nonfinite" and found is None:
                    report = nonfinite_report(step, r, values, kind[1])
                    if report.cause not in UNEXPLAINED:
                        found = report
                    elif unexplained is None or UNEXPLAINED.index(report.cause) < UNEXPLAINED.index(unexplained.cause):
                        unexplained = report  # a later call may explain it; a replay that raised says the most
                elif kind[0] != "nonfinite" and found is None:
                    found = jump_report(step, r, values, kind[1], kind[2], self.jump_factor)
            found = found or unexplained
            if found is None and kind[0] == "nonfinite":  # no captured call of the model in this step
                found = make_report(step, None, "not reproduced", None, None, 0, " (no call of the model captured)")
            if found is not None:
                self._reports.setdefault((step, kind[0]), found)
        self._replays = []
        for step, kind in self._dropped:
            self._reports.setdefault((step, kind), make_report(step, None, "not kept", None, None, 0))
        self._dropped = []
        for step in {int(first_bad), int(last_bad)} - {-1}:
            if (step, "nonfinite") not in self._reports:
                self._reports[(step, "nonfinite")] = make_report(step, None, "not localised", None, None, 0)
        if jump_step >= 0 and (int(jump_step), "jump") not in self._reports:
            self._reports[(int(jump_step), "jump")] = jump_report(int(jump_step), None, [], jump_norm, jump_median,
                                                                  self.jump_factor)
        return [self._reports[key] for key in sorted(self._reports)]

    def report(self):
        """The latest event (a NanReport), or None when every step so far was clean."""
        events = self.reports()
        return events[-1] if events else None
