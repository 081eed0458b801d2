"""sanitize_batch against a sample-by-sample reference, and a step on a sanitized batch = a step on its good rows."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import sanitize_ref

import nanfuse

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), tail=st.lists(st.integers(1, 70), max_size=2), dtypes=st.lists(
    st.sampled_from(FLOAT_DTYPES), min_size=1, max_size=3), seq_target=st.booleans(), seed=st.integers(0, 2**16),
    fill=st.sampled_from([0.0, -1.5, 3.0]))
def test_sanitize_batch_matches_reference(n, tail, dtypes, seq_target, seed, fill):
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for k, dtype in enumerate(dtypes):
        x = torch.randn(n, *tail[:k + 1], generator=generator).to(dtype) * 100
        bad = torch.rand(x.shape, generator=generator) < 0.02
        x[bad] = torch.tensor([float("nan"), float("inf"), -float("inf")])[
            torch.randint(0, 3, (int(bad.sum()),), generator=generator)].to(dtype)
        inputs.append(x)
    target = torch.randint(0, 5, (n, 4) if seq_target else (n,), generator=generator)
    expected_inputs, expected_target, expected_bad = sanitize_ref(inputs, target, -7, fill)
    token_ids = torch.randint(0, 5, (n, 3), generator=generator)
    result = nanfuse.sanitize_batch(inputs + [token_ids], target, ignore_index=-7, fill=fill)
    for x, expected in zip(inputs, expected_inputs):
        assert torch.equal(x, expected)  # in place, bit for bit
    assert torch.equal(target, expected_target)
    assert result.bad_rows.tolist() == [i in expected_bad for i in range(n)]
    assert result.bad_count.item() == len(expected_bad) and result.bad_count.dtype == torch.int64


def test_arguments_are_checked():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="fill"):
        nanfuse.sanitize_batch(x, None, fill=float("nan"))
    with pytest.raises(ValueError, match="fill"):
        nanfuse.sanitize_batch(x.half(), None, fill=1e6)
    with pytest.raises(ValueError, match="inputs\\[1\\]"):
        nanfuse.sanitize_batch([x, torch.randn(5, 3)], None)
    with pytest.raises(ValueError, match="target"):
        nanfuse.sanitize_batch(x, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="inputs\\[0\\]"):
        nanfuse.sanitize_batch(torch.tensor(1.0), None)


def test_targets_that_cannot_take_ignore_index_and_complex_inputs_are_refused():
    x = torch.randn(4, 3)
    x[1, 0] = float("nan")
    for bad_target in (torch.zeros(4), torch.zeros(4, dtype=torch.bool)):  # MSE-style or mask targets
        with pytest.raises(TypeError, match="target"):
            nanfuse.sanitize_batch(x.clone(), bad_target)
    with pytest.raises(ValueError, match="ignore_index"):  # -100 would wrap to 156
        nanfuse.sanitize_batch(x.clone(), torch.zeros(4, dtype=torch.uint8))
    target = torch.zeros(4, dtype=torch.uint8)
    nanfuse.sanitize_batch(x.clone(), target, ignore_index=255)
    assert target.tolist() == [0, 255, 0, 0]
    z = torch.randn(4, 3, dtype=torch.complex64)
    z[2, 1] = complex(float("nan"), 0.0)
    with pytest.raises(TypeError, match="inputs\\[0\\] is complex"):
        nanfuse.sanitize_batch(z, None)


def test_a_step_on_a_sanitized_batch_equals_a_step_on_its_good_rows():
    torch.manual_seed(0)
    gru = torch.nn.GRU(6, 8, batch_first=True)
    head = torch.nn.Linear(8, 5)
    params = list(gru.parameters()) + list(head.parameters())
    x, y = torch.randn(7, 4, 6), torch.randint(0, 5, (7, 4))
    x[2, 1, 3], x[5, 0, 0] = float("nan"), float("inf")
    good = torch.tensor([0, 1, 3, 4, 6])

    def gradients(inputs, target):
        loss = nanfuse.cross_entropy(head(gru(inputs)[0]).flatten(0, 1), target.flatten())
        grads = torch.autograd.grad(loss, params)
        return loss, grads

    expected_loss, expected = gradients(x[good].clone(), y[good].clone())
    result = nanfuse.sanitize_batch(x, y)
    loss, grads = gradients(x, y)
    assert result.bad_rows.nonzero().flatten().tolist() == [2, 5]
    torch.testing.assert_close(loss, expected_loss)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


def test_arguments_of_the_wrong_type_are_named():
    x, target = torch.randn(3, 2), torch.zeros(3, dtype=torch.int64)
    for kwargs, name in ((dict(ignore_index=-100.5), "ignore_index"), (dict(ignore_index=True), "ignore_index"),
                         (dict(ignore_index="x"), "ignore_index"), (dict(fill="a"), "fill")):
        with pytest.raises(TypeError, match=name):
            nanfuse.sanitize_batch(x, target, **kwargs)
    with pytest.raises(TypeError, match="target"):
        nanfuse.sanitize_batch(x, [0, 1, 2])
    with pytest.raises(TypeError, match="inputs\\[1\\]"):  # float8: no isfinite or masked_fill in PyTorch
        nanfuse.sanitize_batch([x, x.to(torch.float8_e4m3fn)], target)
    assert target.tolist() == [0, 0, 0]
