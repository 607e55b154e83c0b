"""StabilityMonitor on a tiny Megatron GPT in a plain PyTorch loop: syncs, records, resilience."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from megatron_gate.monitor import MonitorConfig, StabilityMonitor, schema
from megatron_gate.monitor.sinks import Sink, read_records

from .conftest import batch_at, lm_loss, tiny_gated_gpt

QUIET_SINKS = {"console": False, "tensorboard": False}


def _config(**overrides: object) -> MonitorConfig:
    return MonitorConfig.from_dict({"sinks": QUIET_SINKS, **overrides})


# Every way a tensor's value reaches the host (a device synchronisation on CUDA).
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


@contextlib.contextmanager
def count_host_reads() -> Iterator[dict[str, int]]:
    """Count calls of the Tensor methods that read values back to the host."""
    counts = dict.fromkeys(SYNC_METHODS, 0)
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def counting(name: str):  # noqa: ANN202
        original = originals[name]

        def method(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            counts[name] += 1
            return original(self, *args, **kwargs)

        return method

    try:
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, counting(name))
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _train_step(model, optimizer, monitor, step: int, *, nan: bool = False):  # noqa: ANN001, ANN202
    if monitor is not None:
        monitor.start_step(step)
    loss = lm_loss(model, batch_at(step))
    if nan:
        loss = loss * float("nan")
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    decision = None
    if monitor is None:
        optimizer.step()
    else:
        decision = monitor.end_step(step, loss=loss.detach(), grad_norm=grad_norm, tokens=32)
        monitor.step_optimizer(optimizer, decision)
    optimizer.zero_grad()
    return decision


def _state(model, optimizer) -> list[torch.Tensor]:  # noqa: ANN001
    state = [t.clone() for s in optimizer.state.values() for t in s.values()]
    return [p.detach().clone() for p in model.parameters()] + state


def test_no_host_sync_on_unlogged_steps(one_rank_world: None, tmp_path: Path) -> None:
    model = tiny_gated_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = StabilityMonitor(
        # the device path (torch.where, no read); "auto" would read the flag of a CPU tensor
        _config(log_interval=4, layer_interval=8, guard={"skip_mode": "device"}),
        models=[model],
        run_dir=tmp_path,
    )
    _train_step(model, optimizer, None, 0)  # warm-up (lazy optimizer state)
    with count_host_reads() as plain:
        _train_step(model, optimizer, None, 1)
    baseline = sum(plain.values())
    steps = ((1, False), (2, False), (3, False), (4, True), (6, False), (7, False), (8, True))
    for step, logged in steps:
        before = _state(model, optimizer)
        with count_host_reads() as counts:
            # step 6 has a NaN loss: the guard skips it on the device, still without a read
            decision = _train_step(model, optimizer, monitor, step, nan=step == 6)
        extra = sum(counts.values()) - baseline
        assert decision.accept is not None  # the guard ran on this step
        if logged:
            assert extra > 0, "a log step reads values: the counter must see it"
        else:
            assert extra == 0, f"step {step} is not logged but read {counts} (baseline {plain})"
        unchanged = all(
            torch.equal(a, b) for a, b in zip(before, _state(model, optimizer), strict=True)
        )
        assert unchanged == (step == 6)
    monitor.close()
    events = [
        r for r in read_records(tmp_path) if r["kind"] == "event" and r["detector"] == "guard"
    ]
    assert [(e["step"], e["action"], e["metric"]) for e in events] == [(6, "skip_step", "loss")]
    step_8 = [r for r in read_records(tmp_path) if r["kind"] == "step" and r["step"] == 8]
    assert step_8[0]["scalars"]["skipped_steps"] == 1


class BrokenSink(Sink):
    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    def write(self, record: dict) -> None:
        self.calls += 1
        raise OSError("disk full")


def test_records_failing_sink_and_broken_probe(
    one_rank_world: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_probe(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("probe bug")

    monkeypatch.setattr("megatron_gate.monitor.collectors.first_token_shares", broken_probe)
    model = tiny_gated_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    broken = BrokenSink()
    monitor = StabilityMonitor(
        _config(log_interval=2, layer_interval=4),
        models=[model],
        run_dir=tmp_path,
        optimizer=optimizer,
        extra_sinks=[broken],
    )
    with caplog.at_level(logging.WARNING):
        for step in range(9):
            _train_step(model, optimizer, monitor, step)
        monitor.close()
    assert broken.calls == 1  # warned once, then disabled
    assert sum("sink 'broken' failed" in message for message in caplog.messages) == 1
    assert sum("attention-sink probe hook failed" in message for message in caplog.messages) == 1
    records = read_records(tmp_path)
    assert [r["kind"] for r in records][0] == "run_start" and records[-1]["kind"] == "run_end"
    assert all(r["schema"] == schema.SCHEMA for r in records)
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(9))
    layered = [r for r in steps if "layers" in r]
    assert [r["step"] for r in layered] == [0, 4, 8]
    for record in layered:
        assert set(record["layers"]) == {*schema.LAYER_METRICS, *schema.SINK_LAYER_METRICS}
        layers = record["layers"]
        assert all(v is not None and v > 0 for v in layers["max_abs_residual"])
        assert all(0 < v < 1 for v in layers["gate_mean"])
        assert layers["first_token_attention_share"] == [None, None]  # the broken probe
        assert all(sum(h) > 0 for h in record["gate_histogram"])
    assert layered[0]["layers"]["update_norm"] == [None, None]  # nothing before step 0
    assert all(v > 0 for v in layered[1]["layers"]["update_norm"])
    assert steps[3]["scalars"]["learning_rate"] == pytest.approx(1e-3)
    assert steps[3]["scalars"]["tokens_per_second"] > 0


def test_statistics_equal_plain_reference(one_rank_world: None, tmp_path: Path) -> None:
    """Residual / attention / MLP stats and grad norms against values computed by hand."""
    model = tiny_gated_gpt(seed=5)
    monitor = StabilityMonitor(
        _config(log_interval=1, layer_interval=1), models=[model], run_dir=tmp_path
    )
    seen: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for layer in model.decoder.layers:
        number = layer.layer_number
        handles.append(
            layer.register_forward_hook(
                lambda _m, _i, out, n=number: seen.__setitem__(("residual", n), out[0].detach())
            )
        )
        handles.append(
            layer.mlp.register_forward_hook(
                lambda _m, _i, out, n=number: seen.__setitem__(("mlp", n), out[0].detach())
            )
        )
        handles.append(
            layer.self_attention.register_forward_hook(
                lambda _m, _i, out, n=number: seen.__setitem__(("attention", n), out[0].detach())
            )
        )
        gates: list[torch.Tensor] = []
        layer.self_attention.gate_observers.append(lambda _m, g, gates=gates: gates.append(g))
        seen[("gates", number)] = gates  # type: ignore[assignment]
    monitor.start_step(0)
    loss = lm_loss(model, batch_at(0))
    loss.backward()
    monitor.end_step(0, loss=loss.detach())
    for handle in handles:
        handle.remove()
    record = monitor.last_records[0]
    layers = record["layers"]
    for layer in model.decoder.layers:
        n = layer.layer_number
        for kind, metric in (
            ("residual", "residual"),
            ("attention", "attention_output"),
            ("mlp", "mlp_output"),
        ):
            tensor = seen[(kind, n)]
            assert layers[f"max_abs_{metric}"][n - 1] == pytest.approx(
                tensor.abs().max().item(), rel=1e-6
            )
            assert layers[f"rms_{metric}"][n - 1] == pytest.approx(
                tensor.pow(2).mean().sqrt().item(), rel=1e-5
            )
        gate = torch.sigmoid(seen[("gates", n)][0].float())
        assert layers["gate_mean"][n - 1] == pytest.approx(gate.mean().item(), rel=1e-5)
        assert layers["gate_sparsity"][n - 1] == pytest.approx((gate < 0.1).float().mean().item())
        grad = torch.cat([p.grad.reshape(-1) for p in layer.parameters() if p.grad is not None])
        assert layers["grad_norm"][n - 1] == pytest.approx(grad.norm().item(), rel=1e-5)
    total = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    assert record["scalars"]["grad_norm"] == pytest.approx(total.norm().item(), rel=1e-5)
    assert record["scalars"]["loss"] == pytest.approx(loss.item())
    monitor.close()


def _hook_count(model: torch.nn.Module) -> int:
    hooks = 0
    for module in model.modules():
        hooks += len(module._forward_hooks) + len(module._forward_pre_hooks)
        hooks += len(getattr(module, "gate_observers", []))
    return hooks


def test_microbatches_hooks_only_while_armed_and_plain_reference(
    one_rank_world: None, tmp_path: Path
) -> None:
    """Two microbatches per step: every layer statistic is the combination of both forwards,
    computed directly from tensors the test's own hooks saw; the monitor's hooks are on the
    model only during per-layer steps, and leave it at close."""
    model = tiny_gated_gpt(seed=7)
    before = _hook_count(model)
    monitor = StabilityMonitor(
        _config(log_interval=2, layer_interval=2), models=[model], run_dir=tmp_path
    )
    assert _hook_count(model) == before  # nothing on the model until a per-layer step
    monitor.start_step(0)
    registered = _hook_count(model) - before
    assert registered == 5 * len(model.decoder.layers)  # 3 outputs, the probe, the gate
    monitor.end_step(0, loss=1.0)
    assert _hook_count(model) == before  # off again after the per-layer step
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}

    def keep(kind: str, number: int):  # noqa: ANN202
        def hook(_module, _inputs, output):  # noqa: ANN001, ANN202
            seen.setdefault((kind, number), []).append(output[0].detach().clone())

        return hook

    handles = []
    for layer in model.decoder.layers:
        n = layer.layer_number
        handles += [
            layer.register_forward_hook(keep("residual", n)),
            layer.self_attention.register_forward_hook(keep("attention_output", n)),
            layer.mlp.register_forward_hook(keep("mlp_output", n)),
        ]
        layer.self_attention.gate_observers.append(
            lambda _m, g, n=n: seen.setdefault(("gate", n), []).append(g.clone())
        )
    own = 4 * len(model.decoder.layers)  # the test's three forward hooks and one observer
    for step in range(1, 3):  # step 1: not a per-layer step, its forwards must not be recorded
        seen.clear()
        monitor.start_step(step)
        assert _hook_count(model) - before == own + (registered if step == 2 else 0)
        for micro in range(2):
            lm_loss(model, batch_at(10 * step + micro)).backward()
        monitor.end_step(step, loss=1.0)
        assert _hook_count(model) - before == own
    (record,) = [r for r in monitor.last_records if r["step"] == 2]
    layers = record["layers"]
    for layer in model.decoder.layers:
        n = layer.layer_number
        for kind in ("residual", "attention_output", "mlp_output"):
            both = torch.cat([t.reshape(-1) for t in seen[(kind, n)]]).double()
            assert len(seen[(kind, n)]) == 2
            assert layers[f"max_abs_{kind}"][n - 1] == pytest.approx(both.abs().max().item())
            assert layers[f"rms_{kind}"][n - 1] == pytest.approx(
                both.square().mean().sqrt().item(), rel=1e-5
            )
        gate = torch.sigmoid(torch.cat([g.reshape(-1) for g in seen[("gate", n)]]).double())
        assert layers["gate_mean"][n - 1] == pytest.approx(gate.mean().item(), rel=1e-5)
        histogram = torch.histc(gate, bins=schema.GATE_HISTOGRAM_BINS, min=0.0, max=1.0)
        assert record["gate_histogram"][n - 1] == histogram.tolist()
    for handle in handles:
        handle.remove()
    monitor.close()
    assert _hook_count(model) - before == own - len(handles)  # the test's gate observers


def test_every_step_per_layer_registers_hooks_once(one_rank_world: None, tmp_path: Path) -> None:
    model = tiny_gated_gpt(seed=2)
    before = _hook_count(model)
    monitor = StabilityMonitor(
        _config(log_interval=1, layer_interval=1), models=[model], run_dir=tmp_path
    )
    handles = []
    for step in range(3):
        monitor.start_step(step)
        handles.append({id(h) for h in monitor.layer_collector._handles})
        lm_loss(model, batch_at(step)).backward()
        monitor.end_step(step, loss=1.0)
        assert _hook_count(model) - before == 5 * len(model.decoder.layers)
    assert handles[0] == handles[1] == handles[2]  # the same registrations every step
    assert all(r["layers"]["max_abs_residual"][0] > 0 for r in monitor.last_records)
    monitor.close()
    assert _hook_count(model) == before


def test_state_dict_resume_keeps_history(one_rank_world: None, tmp_path: Path) -> None:
    config = _config(log_interval=1, layer_interval=1, detectors={"loss_spike": {"min_history": 4}})
    model = tiny_gated_gpt()
    first = StabilityMonitor(config, models=[model], run_dir=tmp_path)
    for step, loss in enumerate([3.0, 2.9, 3.05, 2.95, 3.0]):
        first.start_step(step)
        first.end_step(step, loss=loss)
    state = first.state_dict()
    first.close("interrupted")
    resumed = StabilityMonitor(config, models=[model], run_dir=tmp_path)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["detectors"] == state["detectors"]
    resumed.start_step(5)
    events = resumed.end_step(5, loss=30.0).events
    assert [e.detector for e in events] == ["loss_spike"]
    fresh = StabilityMonitor(config, models=[model], run_dir=tmp_path / "fresh")
    fresh.start_step(5)
    assert fresh.end_step(5, loss=30.0).events == ()
    resumed.close()
    fresh.close()
    kinds = [r["kind"] for r in read_records(tmp_path)]
    assert kinds.count("run_start") == 2 and kinds[-1] == "run_end"
