"""nanfuse: Triton kernels that keep training free of NaNs, with a pure-PyTorch path for CPU tensors."""

from . import _backend  # noqa: F401  first: it sets TRITON_INTERPRET=1 for NANFUSE_BACKEND=interpret
from ._backend import current_backend, use_backend
from .clip import GradNormReport, clip_and_check_, clip_grad_norm_, grad_norm_check
from .cross_entropy import CrossEntropyLoss, cross_entropy
from .guard import NanGuard
from .linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy
from .sanitize import SanitizeResult, sanitize_batch
from .softmax import log_softmax, softmax
from .watch import NanReport, NanWatch

__all__ = ["CrossEntropyLoss", "GradNormReport", "NanGuard", "NanReport", "NanWatch", "SanitizeResult",
           "clip_and_check_", "clip_grad_norm_", "cross_entropy", "current_backend", "grad_norm_check", "log_softmax",
           "sanitize_batch", "softmax", "use_backend", "LinearCrossEntropyLoss", "linear_cross_entropy"]
__version__ = "0.1.0"
