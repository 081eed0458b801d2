"""argparse types for the `nanfuse` command: a bad option fails at parse time, naming the option, before any
work is done."""

import argparse
import math
import os
import pathlib

import torch


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def available_device(text):
    """A device string torch accepts and this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda was asked for, but torch sees no CUDA device on this machine")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"nanfuse runs on cpu or cuda, got {text!r}")
    return text


def writable_folder(text):
    """A folder that exists or can be made, and can be written to."""
    path = pathlib.Path(text)
    existing = next((p for p in [path, *path.parents] if p.exists()), pathlib.Path("."))
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {text!r}: {existing} is not writable")
    return text
