"""Walk a model's arguments and outputs for their tensors: tensors, lists and tuples (named tuples too), dicts
(ModelOutput-like mappings too) and dataclass instances, nested in any way. One walker, so the order in which
a step's capture and its replay see the tensors is the same."""

import copy
import dataclasses
from collections.abc import Mapping

import torch


def _children(obj):
    """(name suffix, child) pairs of a container; None for a leaf."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(f".{f.name}", getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    if isinstance(obj, Mapping):
        return [(f"[{key!r}]", value) for key, value in obj.items()]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return [(f".{name}", value) for name, value in zip(obj._fields, obj)]
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", value) for i, value in enumerate(obj)]
    return None


def named_tensors(obj, path=""):
    """[(path, tensor)] for every tensor inside `obj`, depth first, in a fixed order."""
    found, stack, seen = [], [(path, obj)], set()
    while stack:
        name, item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append((name, item))
            continue
        children = _children(item)
        if children is None or id(item) in seen:
            continue
        seen.add(id(item))
        stack += [(name + suffix, child) for suffix, child in reversed(children)]
    return found


def tensors(obj):
    """The tensors inside `obj` (named_tensors without the names)."""
    return [t for _, t in named_tensors(obj)]


def map_tensors(fn, obj):
    """A copy of `obj`'s containers with fn(tensor) in place of each tensor (for copy_inputs)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = copy.copy(obj)
        for field in dataclasses.fields(obj):
            object.__setattr__(new, field.name, map_tensors(fn, getattr(obj, field.name)))
        return new
    if isinstance(obj, Mapping):
        new = copy.copy(obj)
        for key, value in obj.items():
            new[key] = map_tensors(fn, value)
        return new
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(fn, value) for value in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(fn, value) for value in obj)
    return obj
