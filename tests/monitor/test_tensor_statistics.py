"""The monitor's fast statistics against their plain references, tensor by tensor."""

from __future__ import annotations

import pytest
import torch

from megatron_gate.monitor import schema
from megatron_gate.monitor.tensor_statistics import (
    COMPILE_ENV,
    abs_max_and_sumsq,
    compile_enabled,
    finish,
    partial_statistics,
    plain_abs_max_and_sumsq,
)


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(32, 2, 64, generator=generator)
    massive = hidden.clone()
    massive[5, 1, 7] = -2.5e4  # a massive activation, negative: max |x| comes from the min
    return {
        "float32": hidden,
        "bfloat16": hidden.bfloat16(),
        "non_contiguous": hidden.transpose(0, 2),
        "massive_negative": massive,
        "one_element": torch.tensor([[-3.0]]),
        "all_positive": hidden.abs() + 1.0,
    }


@pytest.mark.parametrize("name", list(_tensors()))
def test_fused_equals_plain(name: str) -> None:
    tensor = _tensors()[name]
    abs_max, sumsq = abs_max_and_sumsq(tensor)
    plain_max, plain_sumsq = plain_abs_max_and_sumsq(tensor)
    assert abs_max.dtype == sumsq.dtype == torch.float32
    assert abs_max.item() == plain_max.item()  # a max is exact
    assert sumsq.item() == pytest.approx(plain_sumsq.item(), rel=1e-5)


def test_non_finite_propagates() -> None:
    tensor = torch.ones(4, 4)
    tensor[1, 2] = float("nan")
    assert torch.isnan(abs_max_and_sumsq(tensor)[0])
    tensor[1, 2] = float("inf")
    abs_max, sumsq = abs_max_and_sumsq(tensor)
    assert torch.isinf(abs_max) and torch.isinf(sumsq)


def test_stacked_finish_equals_each_plain() -> None:
    """Partials of tensors of mixed dtypes and shapes, finished together, in order."""
    tensors = list(_tensors().values())
    abs_max, sumsq = finish([partial_statistics(t) for t in tensors])
    assert abs_max.shape == sumsq.shape == (len(tensors),)
    for index, tensor in enumerate(tensors):
        plain_max, plain_sumsq = plain_abs_max_and_sumsq(tensor)
        assert abs_max[index].item() == plain_max.item()
        assert sumsq[index].item() == pytest.approx(plain_sumsq.item(), rel=1e-5)


def test_compile_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert not compile_enabled("cuda")  # dynamo off wins
    monkeypatch.delenv("TORCHDYNAMO_DISABLE")
    assert compile_enabled("cpu")
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert not compile_enabled("cuda")
    monkeypatch.delenv(COMPILE_ENV)
    assert compile_enabled("cuda") and not compile_enabled("cpu")


def test_sparsity_is_the_first_histogram_bin() -> None:
    """The collector reads the gate sparsity off the histogram's first bin: the schema's
    threshold must be that bin's upper edge (test_monitor checks the values)."""
    assert schema.GATE_SPARSITY_THRESHOLD * schema.GATE_HISTOGRAM_BINS == 1.0


def test_grouped_sum_of_squares_equals_float64_reference() -> None:
    from megatron_gate.monitor.tensor_statistics import GroupedSumOfSquares

    generator = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(7, 5, generator=generator),
        torch.randn(300, generator=generator).to(torch.bfloat16),
        torch.randn(4, 4, generator=generator)[:, ::2],  # non-contiguous
        torch.full((3,), 3e4, dtype=torch.float16),  # squares beyond float16, kept in float32
        torch.randn(11, generator=generator),
    ]
    groups = [2, 0, 2, 1, 0]
    squares = GroupedSumOfSquares(torch.device("cpu"))
    out = torch.zeros(4)
    squares.add(out, tensors, groups)
    squares.add(out, tensors[:1], groups[:1])  # adds up, with a second (cached) index
    expected = torch.zeros(4, dtype=torch.float64)
    for tensor, group in zip(tensors + tensors[:1], groups + groups[:1], strict=True):
        expected[group] += tensor.double().square().sum()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)
    assert out[3] == 0
    squares.add(out, [], [])  # nothing to add: unchanged
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)
