"""Hugging Face Transformers with nanfuse (pip install "nanfuse[hf]"): the fused loss and the guarded step.

    from nanfuse.integrations.transformers import GuardedOptimizer, use_nanfuse_loss

    use_nanfuse_loss(model)  # a causal-LM model's loss through nanfuse.cross_entropy
    optimizer = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True), max_norm=1.0)
    trainer = Trainer(model, TrainingArguments(..., max_grad_norm=0), optimizers=(optimizer, None), ...)

max_grad_norm=0 leaves the clipping to the guard (Trainer would otherwise clip with PyTorch's
clip_grad_norm_ first). Trainer still computes a norm of its own for its logs; nanfuse leaves that alone.
This module imports nothing from transformers: it works with any model that calls
`self.loss_function(logits, labels, vocab_size, **kwargs)`, as transformers' causal-LM models do.
"""

import torch
import torch.nn.functional as F

from ..cross_entropy import cross_entropy
from ..guard import NanGuard


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                   **kwargs):
    """transformers' ForCausalLMLoss computed by nanfuse.cross_entropy: position t predicts labels[t + 1]
    (the last position has no target), `ignore_index` positions count for nothing, and with
    `num_items_in_batch` the summed loss is divided by it (Trainer passes the number of target tokens in
    all gradient-accumulation micro-batches, so accumulation equals one big batch), inside forward. The logits stay in
    their dtype: no fp32 copy (transformers' own loss upcasts them). Cost: one read of the logits, and
    one write of their gradient when they require grad.
    """
    if shift_labels is None:  # shift by padding the labels, not by slicing (and copying) the logits
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return cross_entropy(logits, shift_labels, ignore_index=ignore_index)
    if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() == 1:
        num_items_in_batch = num_items_in_batch.reshape(())  # DataParallel under Trainer: a (1, 1) per replica
    elif not isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch == 0:
        # an int 0 (every label ignored): what a tensor 0 gives, not normalize_by's refusal of a number 0
        num_items_in_batch = logits.new_zeros(())
    # divided inside forward: the gradient written there is final, and backward moves nothing more
    return cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction="sum",
                         normalize_by=num_items_in_batch)


def use_nanfuse_loss(model):
    """Make a transformers causal-LM model compute its training loss with causal_lm_loss; returns the model."""
    if not hasattr(model, "loss_function"):
        raise TypeError(f"{type(model).__name__} has no loss_function: expected a transformers PreTrainedModel")
    model.loss_function = causal_lm_loss
    return model


class GuardedOptimizer(torch.optim.Optimizer):
    """An optimizer whose step() is NanGuard(optimizer, max_norm, norm_type, scaler=..., update_scaler=...).step():
    clip, check and step, skipping a step with a NaN or Inf gradient (see nanfuse.NanGuard). Everything else
    (param_groups, state, zero_grad, LR schedulers) is the wrapped optimizer's own; state_dict() is the
    wrapped optimizer's with the guard's (step count, skipped steps, last report) under "nanfuse_guard".
    """

    GUARD_KEY = "nanfuse_guard"

    def __init__(self, optimizer, max_norm=None, norm_type=2.0, *, scaler=None, update_scaler=True):
        # Optimizer.__init__ is not called on purpose: the groups and state are the wrapped optimizer's
        self.guard = NanGuard(optimizer, max_norm, norm_type, scaler=scaler,  # checks the arguments
                              update_scaler=update_scaler)
        self.optimizer = optimizer

    def __getattr__(self, name):  # anything not defined here: the wrapped optimizer's
        if name in ("optimizer", "guard") or name.startswith("__"):  # not set yet (unpickling, copying)
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __getstate__(self):  # Optimizer's would save defaults/state/param_groups: here they are the wrapped one's
        return self.__dict__.copy()

    def __setstate__(self, state):
        self.__dict__.update(state)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    @property
    def skipped_steps(self):
        """How many steps were skipped for non-finite gradients (a device tensor)."""
        return self.guard.skipped_steps

    def step(self, closure=None):
        """The guarded step; returns this step's nanfuse.GradNormReport."""
        return self.guard.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        self.optimizer.add_param_group(param_group)

    def state_dict(self):
        return {**self.optimizer.state_dict(), self.GUARD_KEY: self.guard.state_dict()}

    def load_state_dict(self, state_dict):
        """Restore the wrapped optimizer and, when saved with it, the guard (a plain optimizer's dict loads too)."""
        state_dict = dict(state_dict)
        guard_state = state_dict.pop(self.GUARD_KEY, None)
        self.optimizer.load_state_dict(state_dict)
        if guard_state is not None:
            self.guard.load_state_dict(guard_state)

    def __repr__(self):
        return f"GuardedOptimizer(max_norm={self.guard.max_norm}, {self.optimizer!r})"
