"""Train small Megatron-Core GPTs, baseline or gated, on the same data with the same seed.

    config = TrainConfig(layers=4, hidden=128, lr=1e-2, steps=300)
    results = train_runs(config, [VARIANTS["baseline"], VARIANTS["gated_headwise"]],
                         data=None, out_dir=Path("demo-out"))

Each run gets `out_dir/<variant>/` holding `stability.jsonl` (the monitor schema), `tensorboard/`,
`validation.jsonl` and `checkpoint/` (`latest.json` names the last complete `step_NNNNNN/`). On the CPU the model runs through
`megatron_gate.cpu`; `tp > 1` spawns one gloo process per tensor-parallel rank
(`megatron_gate.distributed.launch`). On a GPU, Transformer Engine layers are used when present.
Ctrl-C stops the current run cleanly: its last checkpoint and JSONL stay whole, its status is
"interrupted", and later runs are skipped. The monitor's guard skips non-finite and spiking
updates; its `abort` action saves a checkpoint, ends the run "aborted" and stops later runs (the
command exits 3); `rollback` reloads the last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_gate.demo.data import (
    BatchSampler,
    Corpus,
    DataSource,
    load_corpus,
    validation_batches,
)
from megatron_gate.errors import OutputError, output_error
from megatron_gate.output_files import (
    append_whole,
    atomic_write,
    atomic_write_text,
    open_for_append,
)

FINAL_LOSS_WINDOW = 10  # final train loss = mean of the last this-many steps


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One attention architecture of the comparison."""

    name: str
    """Run directory name and label in the report."""
    granularity: str | None = None
    """Gate granularity ("headwise" | "elementwise"), or None for no gate."""
    qk_layernorm: bool = False
    """LayerNorm on queries and keys (Wortsman et al.'s fix for attention-logit growth)."""

    @property
    def gated(self) -> bool:
        return self.granularity is not None


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(name="baseline"),
        Variant(name="qk_layernorm", qk_layernorm=True),
        Variant(name="gated_headwise", granularity="headwise"),
        Variant(name="gated_elementwise", granularity="elementwise"),
        Variant(name="gated_qk_layernorm", granularity="headwise", qk_layernorm=True),
    )
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Model size, optimiser and logging settings shared by every run of a comparison."""

    layers: int = 4
    hidden: int = 128
    heads: int = 4
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 300
    lr: float = 1e-2
    """Peak learning rate (linear warm-up, then cosine decay to `min_lr_ratio * lr`)."""
    warmup_steps: int | None = None
    """Default: 5% of `steps`."""
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta2: float = 0.95
    clip_grad: float = 0.0
    """Global grad-norm clip; 0 (the demo's default) shows the raw instability."""
    seed: int = 1234
    tp: int = 1
    log_interval: int = 10
    """Per-layer metrics every this-many steps (and on step 1)."""
    eval_interval: int = 50
    eval_batches: int = 4
    checkpoint_interval: int = 100
    write_checkpoints: bool = True

    @property
    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, self.steps // 20)

    def learning_rate(self, step: int) -> float:
        """LR at 1-based `step`."""
        if step <= self.warmup:
            return self.lr * step / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


@dataclass(kw_only=True)
class RunResult:
    """What one run did (also readable back from its directory)."""

    name: str
    run_dir: str
    status: str
    steps_done: int
    initial_loss: float = float("nan")
    final_train_loss: float = float("nan")
    final_validation_loss: float = float("nan")
    spikes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    abort_reason: str | None = None
    """Why the monitor aborted the run (`abort` action), else None."""


class StopTraining(Exception):
    """Raised by a run interrupted with Ctrl-C so that no later run starts."""


# ---------------------------------------------------------------------- model
def layer_spec(variant: Variant, *, backend: str) -> Any:
    """Megatron's GPT layer spec for `backend`, gated per `variant`."""
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_gate.spec import gated_gpt_layer_spec

    if variant.gated:
        return gated_gpt_layer_spec(
            granularity=variant.granularity, backend=backend, qk_layernorm=variant.qk_layernorm
        )
    if backend == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=variant.qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=variant.qk_layernorm)


def build_model(
    config: TrainConfig, variant: Variant, *, vocab_size: int, device: torch.device
) -> torch.nn.Module:
    """The variant's GPT, initialised from `config.seed` (same data order for every variant)."""
    from megatron_gate.backends import resolve_backend
    from megatron_gate.demo.tiny_gpt import build_gpt, tiny_config
    from megatron_gate.distributed import init_model_parallel

    backend = resolve_backend("auto") if device.type == "cuda" else "local"
    init_model_parallel(tp=config.tp, seed=config.seed)
    model_config = tiny_config(
        num_layers=config.layers,
        hidden_size=config.hidden,
        num_attention_heads=config.heads,
        num_query_groups=config.heads,
        ffn_hidden_size=4 * config.hidden,
        tensor_model_parallel_size=config.tp,
        qk_layernorm=variant.qk_layernorm,
    )
    model = build_gpt(
        model_config,
        layer_spec(variant, backend=backend),
        vocab_size=vocab_size,
        max_sequence_length=config.seq_len,
    )
    return model.to(device)


def model_info(config: TrainConfig, variant: Variant, *, device: torch.device) -> dict[str, Any]:
    """The `model` field of the monitor's `run_start` record."""
    return {
        "num_layers": config.layers,
        "gated_layers": list(range(1, config.layers + 1)) if variant.gated else [],
        "granularity": variant.granularity,
        "qk_layernorm": variant.qk_layernorm,
        "backend": "te" if device.type == "cuda" else "local",
        "hidden_size": config.hidden,
        "num_attention_heads": config.heads,
        "tensor_model_parallel_size": config.tp,
        "pipeline_model_parallel_size": 1,
    }


# ---------------------------------------------------------------------- optimisation
def grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """Global L2 grad norm: TP-sharded params summed over ranks, replicated ones counted once."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    squares = torch.zeros((), dtype=torch.float64)
    for param in model.parameters():
        if param.grad is not None and param_is_not_tensor_parallel_duplicate(param):
            squares += param.grad.detach().double().pow(2).sum().cpu()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
    return squares.sqrt()


def clip_gradients(model: torch.nn.Module, *, max_norm: float, norm: float) -> None:
    """Scale every gradient by `max_norm / norm` when `0 < max_norm < norm`."""
    if 0 < max_norm < norm:
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(max_norm / (norm + 1e-6))


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D) get no weight decay."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, config.beta2), eps=1e-8)


def token_loss(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a `[b, s]` batch."""
    from megatron_gate.demo.tiny_gpt import causal_mask, position_ids

    batch, seq_len = tokens.shape
    device = next(model.parameters()).device
    # TE builds its own causal mask on the GPU; the local attention needs an explicit one.
    mask = None if device.type == "cuda" else causal_mask(seq_len)
    losses = model(
        tokens.to(device), position_ids(batch, seq_len).to(device), mask, labels=labels.to(device)
    )
    return losses.float().mean()


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    model.eval()
    try:
        return sum(float(token_loss(model, x, y)) for x, y in batches) / len(batches)
    finally:
        model.train()


# ---------------------------------------------------------------------- checkpoints
LATEST_CHECKPOINT = "latest.json"


def save_checkpoint(
    run_dir: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    rank: int,
    meta: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `checkpoint/step_NNNNNN/tp_rank_XX.pt` on every rank, then (after a barrier) point
    `checkpoint/latest.json` at it and remove the older step folders.

    `latest.json` only ever names a folder that every rank has finished, so an interrupted save
    leaves the previous checkpoint in force.
    """
    from megatron.core import parallel_state

    root = run_dir / "checkpoint"
    folder = root / f"step_{step:06d}"
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    state.update(extra or {})
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"tp_rank_{rank:02d}.pt", lambda tmp: torch.save(state, tmp))
    except OSError as error:
        raise output_error(folder, error) from error
    except OutputError:
        with contextlib.suppress(OSError):
            folder.rmdir()  # left empty by this failed save (another rank's file keeps it)
        raise
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.barrier(group=parallel_state.get_tensor_model_parallel_group())
    if rank == 0:
        atomic_write_text(
            root / LATEST_CHECKPOINT,
            json.dumps({**meta, "step": step, "folder": folder.name}, indent=2),
        )
        for old in root.glob("step_*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """`(latest.json contents, its step folder)` of a run, or None before the first save."""
    path = Path(run_dir) / "checkpoint" / LATEST_CHECKPOINT
    if not path.exists():
        return None
    meta = json.loads(path.read_text())
    return meta, path.parent / meta["folder"]


# ---------------------------------------------------------------------- progress
class Progress:
    """One stderr line per run, redrawn in place on a terminal, every 10% otherwise."""

    def __init__(self, label: str, total: int, *, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.start = time.time()
        self.tty = sys.stderr.isatty()
        self._last_decile = -1

    def update(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        decile = 10 * step // self.total
        if not self.tty and decile == self._last_decile and step != self.total:
            return
        self._last_decile = decile
        elapsed = time.time() - self.start
        rate = step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        filled = int(24 * step / self.total)
        bar = "#" * filled + "." * (24 - filled)
        shown = " ".join(f"{k} {v:.3g}" for k, v in values.items())
        line = (
            f"{self.label:>20} [{bar}] {step}/{self.total} {shown} | {rate:.1f} it/s eta {eta:.0f}s"
        )
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self, status: str) -> None:
        if self.enabled:
            elapsed = time.time() - self.start
            sys.stderr.write(
                ("\n" if self.tty else "") + f"{self.label:>20} {status} in {elapsed:.0f}s\n"
            )
            sys.stderr.flush()


# ---------------------------------------------------------------------- one run
VALIDATION_JSONL = "validation.jsonl"
SPIKE_DETECTORS = ("loss_spike", "grad_norm_spike", "update_norm_spike")


def demo_monitor_config(
    *, layer_interval: int, overrides: list[str] | None = None, yaml_path: str | None = None
) -> Any:
    """The demo's monitor settings: per-layer metrics every `layer_interval` steps, no console.

    `overrides` are `--monitor-set KEY=VALUE` items applied on top; a `yaml_path`
    (`--monitor-config`) replaces the demo settings. Raises `MonitorConfigError`.
    """
    import argparse

    from megatron_gate.monitor import MonitorConfig

    defaults = [f"log_interval={layer_interval}", f"layer_interval={layer_interval}",
                "sinks.console=false"]  # fmt: skip
    flags = argparse.Namespace(
        monitor_config=yaml_path,
        monitor_set=(list(overrides or []) if yaml_path else defaults + list(overrides or [])),
        no_monitor=False,
    )
    return MonitorConfig.from_cli_args(flags)


def append_validation(run_dir: Path, step: int, loss: float) -> None:
    """One `{"step", "validation_loss"}` line in `validation.jsonl` (a single append)."""
    line = json.dumps({"step": step, "validation_loss": loss, "time": time.time()}) + "\n"
    path = run_dir / VALIDATION_JSONL
    fd = open_for_append(path)
    try:
        append_whole(fd, line.encode(), path=path)
    finally:
        os.close(fd)


class DemoRun:
    """One variant's model, optimizer and monitor, and the loop's steps over them.

    Actions really happen: `rollback` reloads the last complete checkpoint (weights and
    optimizer; the batches since are not replayed), `abort` saves one and ends the run
    (`StabilityAbort`). The learning-rate schedule advances only with applied updates.
    """

    def __init__(
        self,
        config: TrainConfig,
        variant: Variant,
        corpus: Corpus,
        *,
        run_dir: Path,
        monitor_config: Any,
        rank: int,
    ) -> None:
        from megatron_gate.monitor import StabilityMonitor

        self.config, self.variant, self.run_dir, self.rank = config, variant, run_dir, rank
        device = _device(rank)
        self.model = build_model(config, variant, vocab_size=corpus.vocab_size, device=device)
        self.optimizer = build_optimizer(self.model, config)
        self.batches = BatchSampler(
            corpus.train, seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed,
            bos=corpus.bos_token,
        )  # fmt: skip
        self.eval_set = validation_batches(
            corpus.validation, seq_len=config.seq_len, batch_size=config.batch_size,
            num_batches=config.eval_batches, bos=corpus.bos_token,
        )  # fmt: skip
        self.writer = rank == 0
        if self.writer:
            run_dir.mkdir(parents=True, exist_ok=True)
        self.meta = {"variant": dataclasses.asdict(variant), "config": dataclasses.asdict(config)}
        self.step = 0
        self.applied = 0
        """Updates applied so far (skipped steps do not advance the learning-rate schedule)."""
        self.losses: list[float] = []
        self.monitor = StabilityMonitor(
            monitor_config or demo_monitor_config(layer_interval=config.log_interval),
            models=[self.model], run_dir=run_dir, run_name=variant.name, optimizer=self.optimizer,
            on_rollback=self.rollback, on_abort=self.save_before_abort,
            model_info={**model_info(config, variant, device=device),
                        "train": dataclasses.asdict(config), "data": corpus.name},
        )  # fmt: skip

    def train_step(self, step: int, result: RunResult) -> dict[str, float]:
        """Forward, backward, the monitor's check and (unless skipped) the update."""
        self.step = step
        lr = self.config.learning_rate(self.applied + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tokens, labels = self.batches.next()
        self.monitor.start_step(step)
        loss = token_loss(self.model, tokens, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(grad_norm(self.model))
        decision = self.monitor.end_step(
            step, loss=loss.detach(), grad_norm=norm, learning_rate=lr, tokens=tokens.numel()
        )
        self._stop_if_record_refused()
        result.spikes = _count_spikes(result.spikes, decision.events)
        loss_value = float(loss.detach())
        self.losses.append(loss_value)
        # The demo reads its loss and grad norm on the host every step anyway: reading the
        # guard's flag as well costs no extra synchronisation and keeps the schedule exact.
        applies = decision.accept is None or bool(decision.accept)
        if applies and not decision.skip_step and decision.rollback is None:
            clip_gradients(self.model, max_norm=self.config.clip_grad, norm=norm)
            self.monitor.step_optimizer(self.optimizer, decision)
            self.applied += 1
        return {"loss": loss_value, "grad_norm": norm}

    def _stop_if_record_refused(self) -> None:
        """The demo's report is read from its JSONL: a record the machine refused to write (the
        monitor disabled the sink, saying why) ends the demo with that one line (exit 2)."""
        sinks = getattr(self.monitor, "sinks", None)  # none when the monitor is off
        refused = sinks.disabled.get("jsonl") if sinks is not None else None
        if refused is not None:
            raise OutputError(refused.removeprefix(f"{OutputError.__name__}: "))

    def evaluate(self, step: int, result: RunResult) -> None:
        """Validation loss every `eval_interval` steps and at the end."""
        if step % self.config.eval_interval == 0 or step == self.config.steps:
            result.final_validation_loss = validation_loss(self.model, self.eval_set)
            if self.writer:
                append_validation(self.run_dir, step, result.final_validation_loss)

    def checkpoint(self, step: int) -> None:
        """Save model, optimizer, monitor state and the applied-update count (every rank)."""
        extra = {"monitor": self.monitor.state_dict(), "applied": self.applied}
        save_checkpoint(self.run_dir, model=self.model, optimizer=self.optimizer, step=step,
                        rank=self.rank, meta=self.meta, extra=extra)  # fmt: skip

    def rollback(self, request: Any) -> None:
        """Reload the last complete checkpoint (every rank; the data position goes on)."""
        latest = latest_checkpoint(self.run_dir)
        if latest is None:
            _say(f"{self.variant.name}: rollback asked at step {request.step} ({request.reason}) "
                 "but no checkpoint exists yet; the step is skipped instead.")  # fmt: skip
            return
        meta, folder = latest
        state = torch.load(folder / f"tp_rank_{self.rank:02d}.pt", map_location="cpu",
                           weights_only=True)  # fmt: skip
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.applied = int(state.get("applied", meta["step"]))
        _say(f"{self.variant.name}: rolled back to step {meta['step']} after a spike at step "
             f"{request.spike_step} ({request.reason}); the batches since are not replayed.")  # fmt: skip

    def save_before_abort(self, reason: str) -> None:
        """Save the state of the last applied update before the run ends."""
        if self.config.write_checkpoints and self.step > 1:
            self.checkpoint(self.step - 1)
        _say(f"{self.variant.name}: aborted at step {self.step}: {reason}")


def _say(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"megatron-gate demo: {message}", file=sys.stderr, flush=True)


def train_variant(
    config: TrainConfig,
    variant: Variant,
    corpus: Corpus,
    *,
    run_dir: Path,
    monitor_config: Any = None,
    rank: int = 0,
    progress: bool = True,
) -> RunResult:
    """Train one variant with the stability monitor (and its guard) on.

    Never raises for an abort (the run ends "aborted") or Ctrl-C (it ends "interrupted").
    """
    from megatron_gate.monitor import StabilityAbort

    run = DemoRun(config, variant, corpus, run_dir=run_dir, monitor_config=monitor_config,
                  rank=rank)  # fmt: skip
    bar = Progress(variant.name, config.steps, enabled=progress and run.writer)
    result = RunResult(name=variant.name, run_dir=str(run_dir), status="failed", steps_done=0)
    start = time.time()
    try:
        for step in range(1, config.steps + 1):
            shown = run.train_step(step, result)
            result.steps_done = step
            run.evaluate(step, result)
            if config.write_checkpoints and step % config.checkpoint_interval == 0:
                run.checkpoint(step)
            bar.update(step, **shown)
        result.status = "completed"
    except KeyboardInterrupt:
        result.status = "interrupted"
    except StabilityAbort as abort:
        result.status, result.abort_reason = "aborted", abort.reason
    finally:
        if config.write_checkpoints and _may_save_at_end(result, tp=config.tp):
            run.checkpoint(result.steps_done)
        run.monitor.close(result.status)
        bar.close(result.status)
    _summarise(result, run.losses, start=start)
    return result


def _summarise(result: RunResult, losses: list[float], *, start: float) -> None:
    if losses:
        result.initial_loss = losses[0]
    finite_losses = [v for v in losses[-FINAL_LOSS_WINDOW:] if math.isfinite(v)]
    if result.status != "aborted" and finite_losses:
        result.final_train_loss = sum(finite_losses) / len(finite_losses)
    result.seconds = time.time() - start


def _may_save_at_end(result: RunResult, *, tp: int) -> bool:
    """Save the final state when completed; when interrupted only at TP=1 (the other ranks may
    be stopped at another point, and the last complete checkpoint stays in force)."""
    if result.steps_done == 0:
        return False
    return result.status == "completed" or (result.status == "interrupted" and tp == 1)


def _count_spikes(counts: dict[str, int], events: Any) -> dict[str, int]:
    counts = dict(counts)
    for event in events or ():
        if event.detector in SPIKE_DETECTORS and event.phase == "open":
            counts[event.detector] = counts.get(event.detector, 0) + 1
    return counts


def _device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------- several runs
@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """Everything a worker process needs to train a list of runs (picklable)."""

    runs: list[tuple[Variant, TrainConfig, str]]
    """(variant, config for this run, run directory) in order; all with the same `tp`."""
    data: DataSource | str | None
    """What to train on (`load_corpus`): None is the embedded corpus."""
    monitor_config: Any = None
    """A `MonitorConfig` for every run (default: `demo_monitor_config`)."""
    progress: str = "bar"
    """"bar" (a progress bar per run), "line" (one line per finished run) or "off"."""

    @property
    def tp(self) -> int:
        return self.runs[0][1].tp if self.runs else 1


def _run_line(index: int, total: int, config: TrainConfig, result: RunResult) -> str:
    return (
        f"[{index}/{total}] {result.name:<20} lr {config.lr:<8g} seed {config.seed:<3d} "
        f"{result.status:<11} train loss {result.final_train_loss:.4g}  "
        f"val loss {result.final_validation_loss:.4g}  ({result.seconds:.1f}s)"
    )


def run_plan(plan: RunPlan, *, rank: int = 0) -> list[RunResult]:
    """Train the plan's runs in order on this rank; stop after an interrupted one."""
    corpus = load_corpus(plan.data)
    results = []
    for index, (variant, config, run_dir) in enumerate(plan.runs, start=1):
        result = train_variant(
            config, variant, corpus, run_dir=Path(run_dir), rank=rank,
            monitor_config=plan.monitor_config, progress=plan.progress == "bar",
        )  # fmt: skip
        results.append(result)
        if plan.progress == "line" and rank == 0:
            print(_run_line(index, len(plan.runs), config, result), file=sys.stderr, flush=True)
        if result.status == "interrupted" or result.abort_reason is not None:
            break  # Ctrl-C or the monitor's abort: no later run starts
    return results


def plan_worker(rank: int, world_size: int, plan: RunPlan) -> list[RunResult]:
    """`launch` entry point: one tensor-parallel rank of every run."""
    del world_size
    return run_plan(plan, rank=rank)


def execute(plan: RunPlan) -> list[RunResult]:
    """Run the plan in this process (tp 1) or on `tp` spawned gloo ranks; rank 0's results."""
    from megatron_gate.distributed import free_port, init_process_group, launch

    if plan.tp > 1:
        return launch(plan_worker, world_size=plan.tp, payload=plan, timeout=24 * 3600)[0]
    if not dist.is_initialized():
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        init_process_group(0, 1, free_port())
    return run_plan(plan)
