"""nanfuse under torch.compile: the registered ops pass torch.library.opcheck, and a model's forward with
nanfuse's losses, the clip and the guarded fused-optimizer step compile with fullgraph=True, with no
graph break, and give what eager mode gives.

Most compiles use backend="aot_eager" (Dynamo + AOTAutograd, the ops' fake and autograd registrations,
no C++ build); one test runs Inductor itself.
"""

import copy

import pytest
import torch
from helpers import assert_close
from reference import cross_entropy_ref, softmax_ref

import nanfuse
from nanfuse import _ops
from nanfuse._backend import registered_ops

CROSS_ENTROPY_OPTIONS = [
    dict(),
    dict(reduction="sum", label_smoothing=0.1),
    dict(reduction="none", z_loss=1e-3, softcap=5.0),
    dict(logit_scale=0.5, z_loss=1e-3),
]


def op_args(logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
            softcap=None, logit_scale=1.0, normalize_by=1.0, divisor=None):
    return (logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
            normalize_by, divisor, logits.requires_grad)


def targets(n_rows, n_classes):
    target = torch.randint(0, n_classes, (n_rows,))
    target[0] = -100
    return target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", CROSS_ENTROPY_OPTIONS, ids=str)
def test_cross_entropy_op_passes_opcheck(options, dtype):
    logits = (torch.randn(6, 37) * 3).to(dtype).requires_grad_()
    torch.library.opcheck(_ops._cross_entropy, op_args(logits, targets(6, 37), **options))
    torch.library.opcheck(_ops._cross_entropy, op_args(logits, targets(6, 37), normalize_by=3.0,
                                                       divisor=torch.tensor(7), **options))


def test_cross_entropy_op_with_weights_and_probabilities_passes_opcheck():
    logits = torch.randn(5, 23, requires_grad=True)
    probabilities = torch.softmax(torch.randn(5, 23), 1)
    torch.library.opcheck(_ops._cross_entropy, op_args(logits, probabilities, torch.rand(23) + 0.5, reduction="none"))
    torch.library.opcheck(_ops._cross_entropy, op_args(logits, targets(5, 23), torch.rand(23) + 0.5,
                                                       label_smoothing=0.2))


def test_cross_entropy_rows_backward_op_passes_opcheck():
    logits, target = torch.randn(6, 37), targets(6, 37)
    _, _, stats, scalars = _ops._cross_entropy(*op_args(logits, target, reduction="none", z_loss=1e-3, softcap=4.0))
    torch.library.opcheck(_ops._cross_entropy_rows_backward,
                          (logits, target, None, scalars, stats, torch.rand(6), -100, 0.0, 1e-3, 4.0, 1.0))


@pytest.mark.parametrize("log", [False, True])
def test_softmax_ops_pass_opcheck(log):
    x = torch.randn(5, 19, requires_grad=True)
    torch.library.opcheck(_ops.softmax, (x, log))
    y = _ops.softmax(x.detach(), log)
    torch.library.opcheck(_ops.softmax_backward, (y, torch.randn(5, 19), log))


@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_clip_ops_pass_opcheck(max_norm):
    grads = [torch.randn(7, 3), torch.randn(11).to(torch.bfloat16), torch.randn(2, 2)[:, 0]]
    torch.library.opcheck(_ops.grad_norm, (grads, max_norm, 2.0))
    torch.library.opcheck(_ops.scale_grads_, (grads, torch.tensor(0.25)))


def test_fused_optimizer_step_op_passes_opcheck():
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(torch.randn(2, 4)).sum().backward()
    key = _ops.remember_optimizer(optimizer)
    args = (key, torch.tensor(1.0), torch.tensor(0.0), torch.zeros((), dtype=torch.int64))
    torch.library.opcheck(_ops.fused_optimizer_step, args)


@pytest.mark.parametrize("options", CROSS_ENTROPY_OPTIONS, ids=str)
def test_registered_op_path_matches_the_reference(options):
    logits, target = torch.randn(9, 50) * 4, targets(9, 50)
    x = logits.clone().requires_grad_()
    with registered_ops():
        loss = nanfuse.cross_entropy(x, target, **options)
        upstream = torch.rand_like(loss) + 0.5
        loss.backward(upstream)
    x_ref = logits.double().requires_grad_()
    ref = cross_entropy_ref(x_ref, target, **options)
    ref.backward(upstream.double())
    assert_close(loss, ref, what="loss")
    assert_close(x.grad, x_ref.grad, what="grad")


def test_registered_op_path_of_softmax_matches_the_reference():
    x = torch.randn(4, 6, 30, requires_grad=True)
    with registered_ops():
        y = nanfuse.log_softmax(x, dim=1)
    x_ref = x.detach().double().requires_grad_()
    assert_close(y, softmax_ref(x_ref, 1, log=True), what="log_softmax")


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=97, width=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def graph_breaks(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


@pytest.mark.parametrize("options", CROSS_ENTROPY_OPTIONS, ids=str)
def test_model_with_cross_entropy_compiles_in_one_graph(options):
    model, tokens = TinyLM(), torch.randint(0, 97, (4, 12))
    labels = tokens.roll(-1, 1)

    def loss_fn(model, tokens, labels):
        logits = model(tokens)
        loss = nanfuse.cross_entropy(logits.flatten(0, 1), labels.flatten(), **options)
        return loss.sum() if loss.dim() else loss

    assert graph_breaks(loss_fn, model, tokens, labels).graph_break_count == 0
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(model, tokens, labels)
    loss.backward()
    expected = loss_fn(eager, tokens, labels)
    expected.backward()
    assert_close(loss, expected.double(), what="loss")
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert_close(p.grad, q.grad.double(), what=f"grad of {name}")


def test_dynamic_shapes_compile_once_for_every_batch_size():
    model = TinyLM()

    def loss_fn(tokens):
        logits = model(tokens).flatten(0, 1)
        return nanfuse.cross_entropy(logits, tokens.flatten(), label_smoothing=0.1, z_loss=1e-3, softcap=20.0)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for n_rows in (2, 5, 9):
        tokens = torch.randint(0, 97, (n_rows, 7))
        assert_close(compiled(tokens), loss_fn(tokens).double(), what=f"loss for {n_rows} rows")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compiled_graph_holds_one_cross_entropy_call_whatever_the_size():
    # the CPU path works in row chunks; under compile that loop stays inside the op, never unrolled
    def loss_fn(logits, target):
        return nanfuse.cross_entropy(logits * 2, target)

    sizes = []
    for n_rows in (4, 70):  # 70 x 65,536 logits: three chunks of the CPU path
        logits = torch.randn(n_rows, 65_536, requires_grad=True)
        explanation = graph_breaks(loss_fn, logits, targets(n_rows, 65_536))
        assert explanation.graph_break_count == 0
        nodes = [node.target for node in explanation.graphs[0].graph.nodes if node.op == "call_function"]
        assert nodes.count(torch.ops.nanfuse.cross_entropy.default) == 1, nodes
        sizes.append(len(nodes))
    assert sizes[0] == sizes[1]


def test_attention_with_softmax_compiles_in_one_graph():
    q, k, v = (torch.randn(2, 8, 16, requires_grad=True) for _ in range(3))
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    mask[3] = False  # a fully masked row: nanfuse gives zeros where PyTorch gives NaN

    def attention(q, k, v):
        scores = (q @ k.transpose(1, 2)).masked_fill(~mask, float("-inf"))
        return nanfuse.softmax(scores, dim=-1) @ v

    assert graph_breaks(attention, q, k, v).graph_break_count == 0
    torch._dynamo.reset()
    out = torch.compile(attention, fullgraph=True, backend="aot_eager")(q, k, v)
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected = attention(q, k, v)
    expected.sum().backward()
    assert torch.isfinite(out).all() and (out[:, 3] == 0).all()
    assert_close(out, expected.double(), what="attention output")
    for got, t in zip(grads, (q, k, v)):
        assert_close(got, t.grad.double(), what="attention input grad")


def test_inductor_compiles_model_and_cross_entropy():
    model, tokens = TinyLM(), torch.randint(0, 97, (3, 10))
    eager = copy.deepcopy(model)

    def loss_fn(model, tokens):
        return nanfuse.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten(), label_smoothing=0.1)

    torch._dynamo.reset()
    loss = torch.compile(loss_fn, fullgraph=True)(model, tokens)
    loss.backward()
    expected = loss_fn(eager, tokens)
    expected.backward()
    assert_close(loss, expected.double(), what="loss")
    assert_close(model.head.weight.grad, eager.head.weight.grad.double(), what="head grad")


def with_gradients(model, step, poison=False):
    tokens = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(step))
    nanfuse.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    if poison:
        model.mix.weight.grad[1, 2] = float("nan")
    return model


def test_clip_compiles_in_one_graph():
    def clip(params):
        return nanfuse.clip_grad_norm_(params, 0.1)

    assert graph_breaks(clip, list(with_gradients(TinyLM(), 0).parameters())).graph_break_count == 0
    model = TinyLM()
    eager = with_gradients(copy.deepcopy(model), 0)
    with_gradients(model, 0)
    torch._dynamo.reset()
    norm = torch.compile(clip, fullgraph=True, backend="aot_eager")(list(model.parameters()))
    expected = nanfuse.clip_grad_norm_(eager.parameters(), 0.1)
    assert_close(norm, expected.double(), what="norm")
    for p, q in zip(model.parameters(), eager.parameters()):
        assert_close(p.grad, q.grad.double(), what="clipped grad")


def test_guarded_fused_step_compiles_in_one_graph():
    def guarded(model):
        return nanfuse.NanGuard(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), max_norm=0.1)

    probe = with_gradients(TinyLM(), 0)
    assert graph_breaks(guarded(probe).step).graph_break_count == 0
    model = TinyLM()
    eager = copy.deepcopy(model)
    guard, eager_guard = guarded(model), guarded(eager)
    torch._dynamo.reset()
    step = torch.compile(guard.step, fullgraph=True, backend="aot_eager")
    for i in range(4):
        for m in (model, eager):
            m.zero_grad()
            with_gradients(m, i, poison=i == 2)
        report, expected = step(), eager_guard.step()
        assert report.found_inf.item() == expected.found_inf.item() == (1.0 if i == 2 else 0.0)
        for p, q in zip(model.parameters(), eager.parameters()):
            assert torch.equal(p, q)
    assert guard.skipped_steps.item() == 1 and guard.steps == 4
