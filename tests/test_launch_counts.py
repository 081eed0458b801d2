"""What one eager cross-entropy call launches, counted (not timed): every aten op through a TorchDispatchMode,
every Triton launch through the launch hook of nanfuse's launchers (kernels/common.Launch.run). The counts per
call are stated here and asserted; backward with an upstream factor of exactly 1 (plain loss.backward(),
Transformers' num_items_in_batch and gradient accumulation through normalize_by) makes no op over N x C."""

import sys

import pytest
import torch
from nanfuse.kernels import common, scale
from torch.utils._python_dispatch import TorchDispatchMode

import nanfuse

N_ROWS, N_CLASSES = 16, 4500  # beyond SMALL_CPU_LOGITS: on CPU, small calls are PyTorch's own ops
TRITON = nanfuse.current_backend() == "interpret"
# ops that make or look at tensors without reading or writing their elements
NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "detach", "alias", "view", "select", "slice",
              "expand", "t", "unsqueeze", "squeeze", "as_strided", "_local_scalar_dense", "ones_like"}


class Trace(TorchDispatchMode):
    """aten ops (name, largest tensor touched) and Triton launches (kernel name, grid)."""

    def __init__(self):
        super().__init__()
        self.ops, self.launches, self.launching, self.active = [], [], False, False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.launching:  # the interpreter's own copies of a launch's arguments: not the op's
            return out
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        self.ops.append((func.overloadpacket.__name__, max((t.numel() for t in tensors), default=0)))
        return out

    def big_ops(self):
        """aten ops that read or write N x C elements."""
        return [name for name, size in self.ops if size >= N_ROWS * N_CLASSES and name not in NO_TRAFFIC]


@pytest.fixture
def trace(monkeypatch):
    traced = Trace()
    run = common.Launch.run

    def hooked(launch):
        if traced.active:
            traced.launches.append((launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else str(launch.kernel),
                                    launch.grid))
        traced.launching = True
        try:
            return run(launch)
        finally:
            traced.launching = False

    monkeypatch.setattr(common.Launch, "run", hooked)
    return traced


def _inputs(dtype=torch.float32):
    logits = torch.randn(N_ROWS, N_CLASSES, dtype=dtype, requires_grad=True)
    target = torch.randint(0, N_CLASSES, (N_ROWS,))
    target[3] = -100
    return logits, target


BACKWARD_AT_ONE = {
    "mean": lambda x, t: nanfuse.cross_entropy(x, t),
    "num_items_in_batch": lambda x, t: nanfuse.cross_entropy(x, t, reduction="sum", normalize_by=torch.tensor(80)),
    "accumulation": lambda x, t: nanfuse.cross_entropy(x, t, normalize_by=4),
}


@pytest.mark.parametrize("case", BACKWARD_AT_ONE)
def test_a_backward_at_factor_one_moves_nothing_over_n_by_c(case, trace):
    x, target = _inputs()
    loss = BACKWARD_AT_ONE[case](x, target)
    with trace:
        loss.backward()
    assert trace.big_ops() == []
    if TRITON:  # one launch of a few programs that read the factor, see it is 1 and exit
        assert [name for name, _ in trace.launches] == ["scale_kernel"]
        assert trace.launches[0][1][0] <= scale.PROGRAMS_PER_SM * 4  # the interpreter's 4 "SMs"
    else:  # the factor is read on the host (CPU): not even that
        assert trace.launches == []


def test_the_transformers_loss_backward_moves_nothing_over_n_by_c(trace):
    from nanfuse.integrations.transformers import causal_lm_loss

    logits = torch.randn(2, N_ROWS // 2, N_CLASSES, requires_grad=True)
    labels = torch.randint(0, N_CLASSES, (2, N_ROWS // 2))
    loss = causal_lm_loss(logits, labels, N_CLASSES, num_items_in_batch=torch.tensor(N_ROWS - 2))
    with trace:
        loss.backward()
    assert trace.big_ops() == [] or trace.big_ops() == ["view"]
    assert len(trace.launches) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_loss_scale_costs_one_pass_in_backward(dtype, trace):
    # GradScaler: scaler.scale(loss).backward() is loss * S: fp32 scales the written gradient once, fp16 recomputes
    # it once with S folded in before its one rounding
    x, target = _inputs(dtype)
    loss = nanfuse.cross_entropy(x, target, normalize_by=torch.tensor(3.0))
    with trace:
        (loss * 65536.0).backward()
    if TRITON:
        assert trace.big_ops() == []
        assert [name for name, _ in trace.launches] == ["scale_kernel" if dtype == torch.float32
                                                        else "cross_entropy_kernel"]
    elif dtype == torch.float32:
        assert trace.big_ops() == ["mul"]


@pytest.mark.parametrize("ignored", [False, True], ids=["all valid", "ignored rows"])
def test_forward_launches(ignored, trace, monkeypatch):
    # Triton: one launch of the normalisers (1 program) and one of the cross-entropy (2 for a split row); aten:
    # the buffers (empty), views of them, and the sum of the row losses. The fallback: with every target in [0, C)
    # a plain path of 12 small ops (5 take an N x C tensor; log-softmax and exp pass over it); else the general
    # one, which also forms the ignore masks and the normalisers.
    x, target = _inputs()
    if not ignored:
        target[3] = 5
    if TRITON:  # the range check of CPU targets (free there, skipped on CUDA) is not what a GPU call launches
        monkeypatch.setattr(sys.modules["nanfuse.cross_entropy"], "_check_targets", lambda target: False)
    with trace:
        nanfuse.cross_entropy(x, target)
    if TRITON:
        assert [name for name, _ in trace.launches] == ["normalizers_kernel", "cross_entropy_kernel"]
        assert trace.launches[0][1] == (1,)
        assert len(trace.ops) <= 12, trace.ops  # 4 empty buffers, 7 views (select) of them for the launches
        assert [name for name, _ in trace.ops if name not in NO_TRAFFIC] == ["sum"]
        assert trace.big_ops() == []
    else:
        assert trace.launches == []
        assert len(trace.ops) <= (80 if ignored else 12), trace.ops
        assert len(trace.big_ops()) <= (16 if ignored else 5), trace.big_ops()
