"""The stability monitor on Megatron-LM's training loop (`megatron.training`).

Where each monitor call sits in Megatron's `train_step` (iteration `n`, 1-based like its logs):

    train_step            -> monitor.start_step(n)            (arms layer hooks on layer steps)
      forward_backward    -> this rank's loss, kept on the device
      optimizer.step
        clip_grad_norm / get_grad_norm -> the global grad norm Megatron computes anyway
        step_with_ready_grads -> monitor.end_step(n, ...)      (before the update is applied; the
                                 guard runs there, every step)
                                 skip / rollback / the guard rejects: the update is not applied
                                 (Megatron counts a skipped iteration and does not step its
                                 scheduler); lr back-off: the monitor scales the lrs
      the guard rejected      -> train_step once more on the same micro-batches and random
                                 state (step_recompute.py; Megatron's rerun state machine where
                                 it runs): a clean recompute is applied (transient), a
                                 rejected one skipped (reproducible)
    generate_state_dict   -> the monitor's state goes into every Megatron checkpoint
    _load_base_checkpoint -> and comes back on resume

A rollback reloads the newest checkpoint of `--save` (model, optimizer, scheduler); the data
iterator is not rewound, so the batches since that checkpoint are not replayed. An abort saves a
checkpoint of the last applied iteration first. Both run on every rank (the monitor decides the
same on all of them).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_gate.megatron_lm import skips
from megatron_gate.megatron_lm.patching import wrap
from megatron_gate.megatron_lm.step_recompute import StepReplay, values
from megatron_gate.monitor import Decision, MonitorConfig, RollbackRequest, StabilityMonitor
from megatron_gate.monitor.guarded_step import guarded_inner_step

logger = logging.getLogger(__name__)

STATE_KEY = "stability_monitor"
"""Key of the monitor's state in Megatron checkpoints."""


def monitor_sinks(config: MonitorConfig) -> list[str]:
    """Names of the sinks a monitor with `config` writes to (JSONL always, when enabled)."""
    if not config.enabled:
        return []
    optional = ("tensorboard", "wandb", "prometheus", "console")
    return ["jsonl", *(name for name in optional if getattr(config.sinks, name))]


def stability_dir(args: argparse.Namespace) -> Path:
    """Where `stability.jsonl` goes: `--stability-dir`, else `<--save>/stability`."""
    if getattr(args, "stability_dir", None):
        return Path(args.stability_dir)
    return Path(args.save or ".") / "stability"


def local_loss(losses_reduced: Sequence[dict[str, torch.Tensor]] | None) -> torch.Tensor | None:
    """This rank's loss from `forward_backward_func`'s output, kept on the device.

    Each microbatch reports `{"lm loss": [sum, tokens]}` (0.19) or `{"lm loss": mean}` (older).
    """
    if not losses_reduced:
        return None
    key = "lm loss" if "lm loss" in losses_reduced[0] else next(iter(losses_reduced[0]))
    values = [report[key].detach().float().view(-1) for report in losses_reduced]
    if values[0].numel() == 2:
        total = torch.stack(values).sum(dim=0)
        return total[0] / total[1].clamp(min=1)
    return torch.cat(values).mean()


@dataclass
class _Step:
    number: int
    loss: torch.Tensor | None = None
    grad_norm: Any = None
    decision: Decision | None = None
    recomputing: bool = False
    """The guard rejected the first run: this is the second, on the same micro-batches."""
    first: Any = None
    """(loss, grad norm) of the first run, for the rerun state machine's comparison."""


class MegatronLoopMonitor:
    """A `StabilityMonitor` bound to one `megatron.training` run: its model chunks, optimizer
    and scheduler (for rollback and abort) and its tokens per step."""

    def __init__(
        self,
        monitor: StabilityMonitor,
        *,
        model: list[torch.nn.Module],
        optimizer: Any,
        scheduler: Any,
        tokens_per_step: int,
    ) -> None:
        self.monitor = monitor
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.tokens_per_step = tokens_per_step
        self.current: _Step | None = None
        self.rolling_back = False
        self.replay = StepReplay()
        guard = monitor.config.guard
        self.recompute = monitor.enabled and guard.enabled and guard.recompute_rejected
        monitor.on_rollback = self.rollback
        monitor.on_abort = self.save_before_abort

    # ------------------------------------------------------------------ per step
    def begin(self, step: int) -> None:
        self.current = _Step(step)
        self.monitor.start_step(step)

    def record_losses(self, losses_reduced: Any) -> None:
        if self.current is not None:
            self.current.loss = local_loss(losses_reduced)

    def record_grad_norm(self, grad_norm: Any) -> None:
        if self.current is not None:
            self.current.grad_norm = grad_norm

    def end(self) -> Decision | None:
        """`monitor.end_step` for the current step, once (None when no step is open)."""
        step = self.current
        if step is None:
            return None
        if step.decision is None:
            get_loss_scale = getattr(self.optimizer, "get_loss_scale", None)
            # Megatron reads the grad norm on the host and `applies` reads the flag: a recompute
            # decided here adds no synchronisation.
            step.decision = self.monitor.end_step(
                step.number,
                loss=step.loss,
                grad_norm=step.grad_norm,
                loss_scale=get_loss_scale() if get_loss_scale is not None else None,
                tokens=self.tokens_per_step,
                recompute=self.recompute,
            )
        elif step.recomputing and step.decision.recompute:
            step.decision = self.monitor.end_recompute(
                step.number, loss=step.loss, grad_norm=step.grad_norm, samples=_samples()
            )
        return step.decision

    def start_recompute(self) -> None:
        """Set up the second run of a rejected step (the same micro-batches and random state)."""
        step = self.current
        step.first = values(step.loss, step.grad_norm)
        step.recomputing, step.loss, step.grad_norm = True, None, None
        self.replay.prepare_rerun(step.first)

    def recording(self, schedule: Any) -> Any:
        """`forward_backward_func` that keeps this rank's loss (and, in the rerun state
        machine's rerun, hands it the rerun's (loss, grad norm) to compare)."""

        def forward_backward(*args: Any, **kwargs: Any) -> Any:
            losses = schedule(*args, **kwargs)
            self.record_losses(losses)
            step = self.current
            if step is not None and step.recomputing:
                self.optimizer.prepare_grads()  # as optimizer.step will: the same grad norm
                rerun = values(step.loss, self.optimizer.get_grad_norm())
                self.replay.validate_rerun(rerun)
            return losses

        return forward_backward

    def applies(self, decision: Decision) -> bool:
        """Whether the update of `decision`'s step is applied (all ranks agree)."""
        if decision.skip_step or decision.rollback is not None or decision.recompute:
            return False
        # Megatron has just read the global grad norm on the host (clip_grad_norm and
        # get_grad_norm end in .item()) and reads the step's success right after this call: the
        # guard's flag is read here, next to those reads, and adds no synchronisation point.
        return decision.accept is None or bool(decision.accept)

    @contextlib.contextmanager
    def measuring_update(self, step: int) -> Iterator[None]:
        """Measure the update norm of `step` from the inner torch optimizers' buckets."""
        monitor = self.monitor
        optimizers = _inner_optimizers(self.optimizer) if monitor.measures_update(step) else None
        if not optimizers:
            yield
            return
        monitor.update_norm.begin()
        with contextlib.ExitStack() as stack:
            for inner, aliases in optimizers:
                monitor.update_norm.aliases.update(aliases)
                stack.enter_context(guarded_inner_step(inner, on_bucket=monitor.update_norm.add))
            yield
        monitor.update_norm.finish()

    # ------------------------------------------------------------------ actions
    def rollback(self, request: RollbackRequest) -> None:
        """Reload the newest checkpoint of `--save`; keep the data position (no replay)."""
        from megatron.training import get_args
        from megatron.training.checkpointing import checkpoint_exists, load_checkpoint

        args = get_args()
        load_arg = "save" if args.save else "load"
        if not checkpoint_exists(getattr(args, load_arg)):
            logger.warning(
                "megatron-gate: rollback asked (%s) but no checkpoint exists; the "
                "step is skipped instead.",
                request.reason,
            )
            return
        consumed = (args.consumed_train_samples, getattr(args, "consumed_valid_samples", 0))
        self.rolling_back = True
        try:
            iteration, _ = load_checkpoint(
                self.model, self.optimizer, self.scheduler, load_arg=load_arg
            )
        finally:
            self.rolling_back = False
        # Megatron's loader rewinds the sample counters; the data iterator goes on.
        args.consumed_train_samples, args.consumed_valid_samples = consumed
        _print_rank_0(
            f"megatron-gate: rolled back to iteration {iteration} after a spike at step "
            f"{request.spike_step} ({request.reason}); the batches since are not replayed."
        )

    def save_before_abort(self, reason: str) -> None:
        """Save a checkpoint of the last applied iteration before the abort exits."""
        from megatron.training import get_args
        from megatron.training.checkpointing import save_checkpoint

        args = get_args()
        if not args.save or self.current is None:
            return
        save_checkpoint(
            self.current.number - 1,
            self.model,
            self.optimizer,
            self.scheduler,
            getattr(args, "num_floating_point_operations_so_far", 0) or 0,
        )
        _print_rank_0(f"megatron-gate: saved before aborting: {reason}")


ACTIVE: MegatronLoopMonitor | None = None
_RESTORED_STATE: dict[str, Any] | None = None


def _print_rank_0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


# ---------------------------------------------------------------------- attach / close
def attach(
    args: argparse.Namespace | None,
    model: list[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    *,
    backend: str | None = None,
) -> list[str]:
    """Start the monitor for this run (unless `--no-monitor`); return its sink names."""
    global ACTIVE
    if args is None:
        return []
    config = MonitorConfig.from_cli_args(args)
    if not config.enabled:
        return []
    from megatron.training import get_tensorboard_writer

    writer = get_tensorboard_writer()
    world = dist.get_world_size() if dist.is_initialized() else 1
    monitor = StabilityMonitor(
        config,
        models=model,
        run_dir=stability_dir(args),
        # Megatron's TensorBoard writer lives on the last rank: write everything from there.
        writer_rank=world - 1 if args.tensorboard_dir else 0,
        optimizer=optimizer,
        tensorboard_writer=writer,
        model_info={"backend": backend},
    )
    if _RESTORED_STATE:
        monitor.load_state_dict(_RESTORED_STATE)
        _print_rank_0(
            "megatron-gate: stability monitor state restored from the checkpoint "
            f"(last monitored step {_RESTORED_STATE.get('step')})."
        )
    ACTIVE = MegatronLoopMonitor(
        monitor,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        tokens_per_step=args.global_batch_size * args.seq_length,
    )
    _wrap_optimizer(optimizer, ACTIVE)
    return monitor_sinks(config)


# ---------------------------------------------------------------------- hooks
def _wrap_optimizer(optimizer: Any, loop: MegatronLoopMonitor) -> None:
    """Instance-level hooks on Megatron's optimizer: capture the grad norm, decide before the
    update is applied."""

    def capture(original: Any) -> Any:
        def grad_norm(*args: Any, **kwargs: Any) -> Any:
            value = original(*args, **kwargs)
            loop.record_grad_norm(value)
            return value

        return grad_norm

    def decide_then_step(original: Any) -> Any:
        def step_with_ready_grads(*args: Any, **kwargs: Any) -> Any:
            decision = loop.end()
            if decision is None:
                return original(*args, **kwargs)
            if not loop.applies(decision):
                return False  # Megatron: a skipped iteration, no scheduler step
            with loop.measuring_update(decision.step):
                return original(*args, **kwargs)

        return step_with_ready_grads

    for name in ("clip_grad_norm", "get_grad_norm"):
        if hasattr(optimizer, name):
            wrap([optimizer], name, capture)
    wrap([optimizer], "step_with_ready_grads", decide_then_step)


def _inner_optimizers(optimizer: Any) -> list[tuple[Any, dict[int, int]]]:
    """(torch optimizer, {id(main param): id(model param)}) under Megatron's optimizer.

    FP32Optimizer steps the model parameters themselves; the fp16/bf16 optimizer steps fp32
    copies, paired group by group with the model's. The distributed optimizer steps shards of
    the parameters, which the update norm does not map to layers: it is not measured there.
    """
    result = []
    for sub in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(sub, "optimizer", None)
        if inner is None or not hasattr(inner, "param_groups"):
            continue
        if hasattr(sub, "shard_fp32_from_float16_groups"):  # the distributed optimizer
            _warn_once_update_norm()
            continue
        aliases: dict[int, int] = {}
        pairs = zip(getattr(sub, "fp32_from_float16_groups", []),
                    getattr(sub, "float16_groups", []), strict=False)  # fmt: skip
        for main_group, model_group in pairs:
            aliases.update(
                {id(main): id(model) for main, model in zip(main_group, model_group, strict=True)}
            )
        result.append((inner, aliases))
    return result


_WARNED: set[str] = set()


def _warn_once_update_norm() -> None:
    if "update_norm" not in _WARNED:
        _WARNED.add("update_norm")
        logger.warning("megatron-gate: the update norm is not measured with the distributed "
                       "optimizer (it steps parameter shards); it is reported as null.")  # fmt: skip


def _iteration(kwargs: dict[str, Any]) -> int:
    if kwargs.get("iteration") is not None:
        return int(kwargs["iteration"])
    from megatron.training import get_args

    return int(get_args().curr_iteration)


# train_step(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config,
#            forward_backward_func, ...)
_POSITIONS = {"data_iterator": 1, "forward_backward_func": 6}


def _replace_argument(args: tuple, kwargs: dict[str, Any], name: str, change: Any) -> tuple:
    """`train_step`'s arguments with the one called `name` replaced by `change(it)`."""
    if name in kwargs:
        return args, {**kwargs, name: change(kwargs[name])}
    position = _POSITIONS[name]
    return (*args[:position], change(args[position]), *args[position + 1 :]), kwargs


def _wrap_train_step(original: Any) -> Any:
    def train_step(*args: Any, **kwargs: Any) -> Any:
        loop = ACTIVE
        if loop is None:
            return original(*args, **kwargs)
        loop.begin(_iteration(kwargs) + 1)
        if loop.recompute:
            args, kwargs = _replace_argument(args, kwargs, "data_iterator", loop.replay.begin)
        args, kwargs = _replace_argument(args, kwargs, "forward_backward_func", loop.recording)
        result = original(*args, **kwargs)
        # An fp16 overflow returns before the update; the monitor still sees the step.
        decision = loop.end()
        if decision is not None and decision.recompute:  # rejected, nothing applied: again
            loop.start_recompute()
            result = original(*args, **kwargs)
            decision = loop.end()
        # (loss dict, skipped_iter, should_checkpoint, should_exit, ...): a step Megatron did not
        # apply counts once (`skips.py`); one that exits for a rerun elsewhere is replayed there.
        if isinstance(result, tuple) and len(result) > 3 and not result[3]:
            skips.count_once(loop.monitor, decision, megatron_skipped=bool(result[1]))
        return result

    return train_step


def _samples() -> list[int]:
    """The sample positions of this iteration's global batch (Megatron's sampler order)."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.training import get_args

    args = get_args()
    start = int(args.consumed_train_samples)
    count = args.micro_batch_size * args.data_parallel_size * get_num_microbatches()
    return list(range(start, start + count))


def _wrap_generate_state_dict(original: Any) -> Any:
    def generate_state_dict(*args: Any, **kwargs: Any) -> Any:
        state_dict = original(*args, **kwargs)
        if ACTIVE is not None and not ACTIVE.rolling_back:
            state_dict[STATE_KEY] = ACTIVE.monitor.state_dict()
        return state_dict

    return generate_state_dict


def _wrap_load_base_checkpoint(original: Any) -> Any:
    def _load_base_checkpoint(*args: Any, **kwargs: Any) -> Any:
        global _RESTORED_STATE
        result = original(*args, **kwargs)
        state_dict = result[0] if isinstance(result, tuple) else None
        # On resume the monitor starts after the model is loaded; a rollback keeps its history.
        if ACTIVE is None and isinstance(state_dict, dict) and STATE_KEY in state_dict:
            _RESTORED_STATE = state_dict[STATE_KEY]
        return result

    return _load_base_checkpoint


def install(training: Any) -> None:
    """Wrap `train_step` and Megatron's checkpoint state (idempotent)."""
    from megatron.training import checkpointing

    wrap([training], "train_step", _wrap_train_step)
    wrap([checkpointing], "generate_state_dict", _wrap_generate_state_dict)
    wrap([checkpointing], "_load_base_checkpoint", _wrap_load_base_checkpoint)
