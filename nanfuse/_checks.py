"""Argument checks shared by every backend: a clear Python error that names the argument."""

import math
import operator

import torch

REDUCTIONS = ("mean", "sum", "none")


class UnsupportedInputError(TypeError, NotImplementedError):
    """An input dtype or layout an op does not take (integer, complex, float8, sparse): a TypeError, and the
    NotImplementedError PyTorch raises."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong dtype where PyTorch raises RuntimeError: an instance of both."""


def check_logits(name, tensor):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise UnsupportedInputError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if tensor.layout != torch.strided:
        raise UnsupportedInputError(f"{name} must be a dense (strided) tensor, got layout {tensor.layout}")


class ArgumentError(ValueError, RuntimeError):
    """A bad argument where PyTorch raises RuntimeError: an instance of both, so either except clause catches it."""


class TargetIndexError(ValueError, IndexError):
    """A class index outside [0, C) where PyTorch raises IndexError: an instance of both."""


def check_ignore_index(ignore_index):
    """ignore_index as a Python int, by PyTorch's rules: an integer (or 0-dim integer tensor) that fits in int64."""
    if isinstance(ignore_index, bool) or isinstance(ignore_index, float) or (
            isinstance(ignore_index, torch.Tensor) and ignore_index.is_floating_point()):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    try:
        value = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}") from None
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"ignore_index={value} does not fit in int64")
    return value


def check_cross_entropy_args(input, target, weight, opts, compute_grad=False, grad_enabled=False):
    """Raise, naming the argument, where an argument is malformed or PyTorch raises. compute_grad: a gradient of
    input will be computed; grad_enabled: autograd records this call."""
    check_logits("input", input)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if input.dim() == 0:
        raise ArgumentError("input must have a class dimension: shape (C,), (N, C) or (N, C, d1, ...), got a scalar")
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if n_classes == 0:
        raise ArgumentError(f"input has no classes: shape {tuple(input.shape)}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ArgumentError(f"target of class probabilities must have input's shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        if opts.ignore_index != -100:
            raise ArgumentError(f"ignore_index is not supported for floating point target (got ignore_index="
                                f"{opts.ignore_index}, as in PyTorch)")
    elif target.dtype in (torch.bool, torch.complex64, torch.complex128) or target.is_complex():
        raise ArgumentTypeError(f"target must hold integer class indices or float probabilities, got {target.dtype}")
    else:
        expected = input.shape[1:] if input.dim() == 1 else input.shape[:1] + input.shape[2:]
        expected = () if input.dim() == 1 else expected
        if tuple(target.shape) != tuple(expected):
            raise ArgumentError(f"target of class indices must have shape {tuple(expected)} for input of shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError("weight must be a floating-point tensor of one weight per class")
        if weight.shape != (n_classes,):
            raise ArgumentError(f"weight must have shape ({n_classes},), one per class, got {tuple(weight.shape)}")
        if weight.device != input.device:
            raise ValueError(f"weight is on {weight.device} but input is on {input.device}")
        if grad_enabled and weight.requires_grad and not target.is_floating_point():
            raise ArgumentError("cross_entropy with class-index targets is not differentiable with respect to "
                                "argument 'weight' (as in PyTorch): pass a weight that does not require grad")
    if opts.reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {opts.reduction!r}")
    if not 0.0 <= opts.label_smoothing <= 1.0:
        raise ArgumentError(f"label_smoothing must be in [0, 1], got {opts.label_smoothing}")
    # chained comparisons, not math.isfinite: they are False for NaN too, and Dynamo traces them with dynamic=True
    if opts.softcap is not None and not 0 < opts.softcap < math.inf:
        raise ValueError(f"softcap must be a finite number > 0 or None, got {opts.softcap}")
    if not 0 < opts.logit_scale < math.inf:
        raise ValueError(f"logit_scale must be a finite number > 0, got {opts.logit_scale}")
    if not 0 <= opts.z_loss < math.inf:
        raise ValueError(f"z_loss must be a finite number >= 0, got {opts.z_loss}")
    if opts.inplace_backward and compute_grad:
        if input.is_leaf:
            raise ArgumentError("inplace_backward=True would overwrite input, a leaf that requires grad, with its "
                                "own gradient; pass inplace_backward=False")
        base = input._base  # a view's root: writing the view writes the leaf (PyTorch refuses it in place too)
        if base is not None and base.is_leaf and base.requires_grad:
            raise ArgumentError("inplace_backward=True would overwrite input, a view of a leaf that requires grad, "
                                "and so the leaf itself, with the gradient; pass inplace_backward=False")
        if input.dim() > 2 or (input.shape[-1] > 1 and input.stride(-1) != 1):
            raise ValueError("inplace_backward=True needs input of shape (C,) or (N, C) with contiguous classes; "
                             f"got shape {tuple(input.shape)} and strides {input.stride()}")
        if input.dim() == 2 and input.shape[0] > 1 and input.stride(0) < input.shape[1]:
            raise ValueError("inplace_backward=True needs rows that do not overlap in memory (an expanded or "
                             f"overlapping view cannot hold one gradient per row); got strides {input.stride()}")
        if target.is_floating_point() and target.requires_grad:
            raise ValueError("inplace_backward=True overwrites the logits that the gradient of target needs; "
                             "pass inplace_backward=False")
        if weight is not None and weight.requires_grad:
            raise ValueError("inplace_backward=True overwrites the logits that the gradient of weight needs; "
                             "pass inplace_backward=False")
