"""NanReport: where a non-finite value started, which of the four causes it was, and what to do about it."""

import dataclasses

CAUSES = {
    "bad input data": (
        "the batch held NaN/Inf before the model ran",
        "clean or drop those samples: nanfuse.sanitize_batch(inputs, target) trains on the good rows"),
    "unstable activation": (
        "a module turned finite inputs into NaN/Inf (an exp or softmax overflowing, a division by ~0, a log of "
        "0, a half-precision overflow)",
        "make that op safe: a max-subtracted softmax (nanfuse.softmax), a clamped denominator or log argument, "
        "fp32 for that module, or a lower learning rate if the weights grew"),
    "unstable loss": (
        "the model's outputs were finite but the loss or its gradient was not (e.g. log(softmax(x)) on a "
        "saturated row, or a NaN/Inf in a target or loss weight: the watch sees only the model's arguments, "
        "`rows` says which samples' gradient it was)",
        "use a fused, max-subtracted loss: nanfuse.cross_entropy or nanfuse.log_softmax, never log(softmax(x)); "
        "or clean those samples' targets"),
    "exploding gradients": (
        "forward and loss were finite; the gradients overflowed or jumped in backward",
        "lower the learning rate or add warm-up, clip (NanGuard(max_norm=...)), or fix that layer's backward"),
    "loss-scale overflow": (
        "forward and loss were finite, and the GradScaler's scale made the scaled fp16 gradients overflow: routine "
        "for dynamic loss scaling (not one of the four causes); the step was skipped and the scaler lowers its "
        "scale",
        "nothing, unless it repeats step after step with the scale falling: then look for exploding gradients"),
    "not reproduced": (
        "replaying the step with the same batch, RNG state and parameters gave finite values: a non-deterministic "
        "op, a race or a hardware fault, or gradients that did not come from the model's call",
        "rerun the step to tell a fault from the data; check gradients set or modified by hand"),
    "could not localise": (
        "the step's gradients were non-finite, but replaying it with hooks on raised an error, so where the value "
        "started is unknown",
        "read the error: a model the per-module hooks cannot replay (please report it); the guard still skipped "
        "the step"),
    "not localised": (
        "the step's gradients were non-finite, but its batch was released before the flag reached the host (the "
        "device ran more than `keep` steps behind)",
        "raise NanWatch(keep=...), or call watch.report() soon after a skipped step"),
    "not kept": (
        "the step was bad (non-finite gradients or a norm jump) and was replayed, but more bad steps waited for "
        "report() than the watch keeps (the first and the latest are kept)",
        "call watch.report() (or watch.reports()) more often"),
}


@dataclasses.dataclass
class NanReport:
    """One event found by a NanWatch. `module` is a qualified name from model.named_modules() ("" is the model's
    own forward code, outside any submodule); `tensor` says which of its inputs/outputs/gradients."""
    step: int  # the guard step (0-based) it happened in
    phase: str | None  # "input", "forward", "loss", "backward"; None when not localised
    cause: str  # a key of CAUSES
    module: str | None
    tensor: str | None
    count: int  # non-finite values in that tensor (0 for a finite norm jump)
    explanation: str
    remedy: str
    rows: list | None = None  # bad input data / unstable loss: the samples (indices along sample_dim of the input /
    # of the gradient arriving at the output) holding a non-finite value
    passed_on: list = dataclasses.field(default_factory=list)  # modules after it that only passed it on
    numbers: dict = dataclasses.field(default_factory=dict)  # norm jump: norm, median, ratio
    call: int | None = None  # which call of the model in the step (0-based; gradient accumulation makes several)
    sample_dim: int = 0  # the input dim that `rows` index (NanWatch(sample_dim=...))

    def __str__(self):
        where = "the model's own forward code" if self.module == "" else f"`{self.module}`"
        head = f"step {self.step}: {self.cause}"
        if self.phase == "input":
            head += f" (input phase: the model's {self.tensor} holds {self.count} non-finite values)"
        elif self.phase is not None:
            head += f" ({self.phase} phase, in {where}, {self.tensor}: {self.count} non-finite values)"
        lines = [head, f"  why: {self.explanation}", f"  fix: {self.remedy}"]
        if self.rows is not None:
            of = "the gradient arriving at the output of " if self.phase == "loss" else ""
            lines.insert(1, f"  samples: {self.rows} (dim {self.sample_dim} of {of}call {self.call} of the model)")
        if self.passed_on:
            lines.insert(1, f"  passed on by: {', '.join(self.passed_on)}")
        return "\n".join(lines)


def make_report(step, phase, cause, module, tensor, count, detail="", **extra):
    explanation, remedy = CAUSES[cause]
    return NanReport(step, phase, cause, module, tensor, int(count), explanation + detail, remedy, **extra)
