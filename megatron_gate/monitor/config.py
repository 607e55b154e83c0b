"""`MonitorConfig`: cadence, detectors (thresholds and the action each takes) and sinks.

Built from YAML (`MonitorConfig.from_yaml`), a dict (`from_dict`) or CLI flags
(`add_cli_arguments` / `from_cli_args`). Unknown keys and invalid values raise a
`MonitorConfigError` naming the key and what is allowed, before training starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_gate.errors import InputError
from megatron_gate.monitor import schema


class MonitorConfigError(InputError):
    """A monitor configuration key or value that cannot be used; the message names the fix."""


@dataclass(frozen=True, kw_only=True)
class DetectorConfig:
    """One detector: whether it runs, what it does when it fires, and its thresholds.

    Fields that a detector does not use are ignored by it (see docs/monitor.md for which apply).
    """

    enabled: bool = True
    """Run this detector."""
    action: str = "alert"
    """One of `schema.ACTIONS`: log, alert, skip_step, lr_backoff, rollback, abort (taken when an
    event opens)."""
    confirmed_action: str | None = None
    """Action instead of `action` when another signal (loss, grad norm, update norm) opened an
    event within `CORROBORATION_STEPS` steps (None: `action`)."""
    severity: str = "warning"
    """One of `schema.SEVERITIES`, saying what a person must do: info (look when you like),
    warning (look now), critical (the monitor acted: skipped, backed off, rolled back, aborted).
    A corroborated event is raised one level, a level shift is info."""
    false_alarm_rate: float = 1.0e-4
    """Target probability per healthy step that a scalar detector opens an event: the threshold
    is the residual quantile of that rate from a generalized Pareto fit of the residual tail."""
    min_relative_jump: float = 0.1
    """Floor of the scalar threshold: a value must exceed its level by this fraction."""
    min_absolute_jump: float = 0.0
    """Floor of the one-step outlier threshold, in the value's units (nats for the loss)."""
    z_threshold: float = 6.0
    """Scalar detectors, until the tail fit has enough history: robust z-score (median and
    1.4826 x MAD of the residuals) above which an event opens."""
    window: int = 128
    """Past values kept: residual history of scalar detectors, running median of per-layer ones."""
    level_window: int = 8
    """Scalar detectors: the level is the median of this many recent (non-event) values."""
    level_shift_steps: int = 60
    """Scalar detectors: an event elevated this long without recovering is a benign level shift
    (the level moves to the new values)."""
    min_history: int = 16
    """Values needed before the detector may fire."""
    threshold: float | None = None
    """Absolute threshold (massive activation, attention sink, attention logit)."""
    ratio: float | None = None
    """Per-layer: fire when a value exceeds `ratio` x its own running median. Loss: Megatron's
    rule, loss > ratio x the max of the first `warmup_steps` losses (off when None)."""
    warmup_steps: int = 100
    """Steps whose maximum the Megatron loss rule compares with."""


@dataclass(frozen=True, kw_only=True)
class ForecastConfig(DetectorConfig):
    """The divergence forecast (`monitor/forecast.py`): a warning episode while the run is
    heading towards divergence. Of the inherited fields it uses `enabled`, `action`, `severity`,
    `window` (history of the per-layer medians and of the grad-norm level) and `min_history`
    (values before it may fire)."""

    action: str = "alert"
    """`lr_backoff` lowers the learning rate on a forecast (off by default: alert only)."""
    min_history: int = 50
    smoothing: int = 10
    """Span (values) of the exponential average of log(loss) whose minimum is the best loss."""
    trend_steps: int = 20
    """Values in the least-squares trend fit of log(loss) and log(grad norm)."""
    min_t: float = 3.0
    """t-statistic of the fitted slope above which a signal is rising."""
    loss_rise: float = 0.1
    """The smoothed loss must be this fraction above its best."""
    grad_rise: float = 1.0
    """The grad norm must be this fraction above its median of the last `window` values."""
    layer_points: int = 4
    """Per-layer steps in the growth fit of each per-layer statistic."""
    layer_growth: float = 0.01
    """Per-layer growth (log units per step) above which a layer's statistic is growing."""
    layer_ratio: float = 2.0
    """... and it must be this many times its own median (of the values before the fit)."""
    min_layer_signals: int = 3
    """Growing per-layer statistics (different ones) that, with the loss above its best, are
    evidence enough while the loss is not (yet) rising. 3: max attention logit and max |h| grow
    together whenever the weights grow (the logit is a product of projections of h), so two of
    them are one piece of evidence; healthy runs at high learning rates show that pair."""
    confirm: int = 3
    """Consecutive values the rule must hold before the episode opens."""
    release: int = 20
    """Consecutive values without the rule (and the loss no longer rising) that close it."""


def _detector(**kwargs: Any) -> Any:
    return field(default_factory=lambda: DetectorConfig(**kwargs))


@dataclass(frozen=True, kw_only=True)
class DetectorsConfig:
    """The detectors, by name (the `detector` field of events)."""

    # min_history 64: the first steps of a run (warm-up transients) set no scalar threshold.
    loss_spike: DetectorConfig = _detector(
        action="alert", confirmed_action="skip_step", window=1024, min_history=64
    )
    # A grad-norm excursion with no loss reaction needs no action (clipping bounds its update;
    # healthy runs show 3-5x ones every few thousand steps): info, raised to warning when the
    # loss or update norm reacts (corroboration); the guard skips the rare ones above 4x.
    grad_norm_spike: DetectorConfig = _detector(
        action="alert", severity="info", window=1024, min_relative_jump=0.5, min_history=64
    )
    update_norm_spike: DetectorConfig = _detector(
        action="alert", window=256, min_relative_jump=0.5, min_history=8
    )
    # A one-step loss outlier a person sees on the curve: > median of the last 50 losses +
    # max(0.5 nats, 10 robust SD). Informs (severity info), unless loss_spike already reported it.
    loss_outlier: DetectorConfig = _detector(
        action="log", severity="info", window=50, min_history=50, z_threshold=10.0,
        min_absolute_jump=0.5,
    )  # fmt: skip
    nan_or_inf: DetectorConfig = _detector(action="skip_step", severity="critical")
    massive_activation: DetectorConfig = _detector(
        action="log", severity="info", threshold=1.0e4, ratio=10.0, min_history=5
    )
    attention_sink: DetectorConfig = _detector(action="log", severity="info", threshold=0.8)
    attention_logit_growth: DetectorConfig = _detector(
        action="alert", threshold=1.0e3, ratio=4.0, min_history=5
    )
    # sink_detectors.py: one episode per (layer, head) whose first-token share passes threshold,
    # and per layer whose BOS residual ratio passes max(threshold, ratio x its early value).
    sink_formation: DetectorConfig = _detector(action="log", severity="info", threshold=0.5)
    bos_massive_activation: DetectorConfig = _detector(
        action="log", severity="info", threshold=3.0, ratio=2.0, min_history=2
    )
    divergence_forecast: ForecastConfig = field(default_factory=ForecastConfig)
    """Warning before a divergence (monitor/forecast.py); `action: lr_backoff` acts on it."""


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    """The per-step guard: which updates it skips on the device (see docs/monitor.md, "Guard").

    The defaults skip only what is certainly bad: non-finite values, and spikes at high
    confidence: robust z > 8 AND a loss more than 50% above its recent level, or a grad norm
    more than 4x its recent level. Calibrated on real runs by others (bench/spike_detection.py):
    healthy grad norms reach 3.5x their median, so a lower grad-norm bar skips healthy updates.
    """

    enabled: bool = True
    """Run the guard every step (one small all_reduce per step when distributed)."""
    skip_non_finite: bool = True
    """Skip a step whose loss or grad norm is NaN or Inf."""
    skip_loss_spikes: bool = True
    """Skip a step whose loss is a spike (the test below)."""
    skip_grad_norm_spikes: bool = True
    """Skip a step whose grad norm is a spike (the test below)."""
    z_threshold: float = 8.0
    """Robust z-score of the log-value (median and 1.4826 x MAD of the history) above which a
    value may be a spike."""
    min_relative_jump: float = 0.5
    """And the loss must exceed its recent level (the median) by more than this fraction."""
    grad_norm_min_relative_jump: float = 3.0
    """And the grad norm must exceed its recent level by more than this fraction (3.0: 4x).
    Clipping already bounds the update of a large gradient, and healthy runs show grad norms of
    1.5-3.5x their median (llm.c GPT-2 124M: 26 such steps in 19,552): only a far larger
    excursion is skipped; smaller ones are reported by the `grad_norm_spike` detector."""
    window: int = 128
    """Accepted log-values kept for the statistics."""
    min_history: int = 32
    """Accepted values needed before the spike tests can fire (a warm-up)."""
    scale_floor: float = 0.01
    """Lower bound of the robust scale, in log units (about 1%)."""
    max_consecutive_skips: int = 5
    """After this many consecutive spike skips of one signal, the next value is taken as a new
    level: accepted, and the signal's history restarts from it."""
    bucket_bytes: int = 64 * 2**20
    """Parameter bytes per bucket of the guarded optimizer step (peak extra memory: one bucket
    of parameters plus their optimizer state)."""
    skip_mode: str = "auto"
    """Where the guard decides and how `StabilityMonitor.step_optimizer` skips a rejected step:
    "device" (the rule runs as device ops, the optimizer steps bucket by bucket and
    `torch.where` keeps the old state: no host read), "host" (the rule runs in plain Python on
    the read values and a rejected step is not taken: no copies, one synchronisation per step
    on a GPU), or "auto" (host on the CPU, where a read waits for nothing; device otherwise)."""

    recompute_rejected: bool = True
    """Before a rejected step is skipped, run its forward and backward again on the same batch
    (where the loop reads the decision on the host anyway and can re-read the batch): a clean
    recompute is a transient fault and its update is applied, a rejected one is reproducible
    (the batch or the model) and the step is skipped. Accepted steps never recompute."""

    def relative_jump(self, signal: str) -> float:
        """The least relative jump above its level at which `signal`'s value is a spike."""
        return self.grad_norm_min_relative_jump if signal == "grad_norm" else self.min_relative_jump

    def reads_on_host(self, device_type: str) -> bool:
        """Whether per-step values on `device_type` are read to the host (`skip_mode`)."""
        return self.skip_mode == "host" or (self.skip_mode == "auto" and device_type == "cpu")


@dataclass(frozen=True, kw_only=True)
class SinksConfig:
    """Where records go. JSONL (`<run_dir>/stability.jsonl`) is always written."""

    tensorboard: bool = True
    """Write `stability/...` scalars with torch.utils.tensorboard (or into `tensorboard_writer`)."""
    wandb: bool = False
    """Log to Weights & Biases (needs `wandb`; uses the active run or starts one)."""
    wandb_project: str = "megatron-gate"
    """W&B project when the monitor starts the run."""
    prometheus: bool = False
    """Serve gauges on http://`prometheus_host`:`prometheus_port`/metrics."""
    prometheus_host: str = "127.0.0.1"
    """Interface of the Prometheus exporter (loopback by default)."""
    prometheus_port: int = 9400
    """Port of the Prometheus exporter (0 picks a free one)."""
    console: bool = True
    """Print a compact table at steps with per-layer statistics."""


@dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    """Configuration of the stability monitor."""

    enabled: bool = True
    """Turn the whole monitor off (every call becomes a no-op)."""
    log_interval: int = 10
    """Steps between host reads: the per-step scalars of the last `log_interval` steps are
    reduced, checked and written together. Steps in between do no host synchronisation."""
    layer_interval: int = 100
    """Steps between per-layer statistics (hooks are armed only on those steps); a multiple
    of `log_interval`."""
    probe_queries: int = 8
    """Query positions per head sampled by the attention-sink probe (0 turns it off)."""
    update_norm: bool = True
    """Measure the exact per-layer update norm of the step before a per-layer step (from the
    guarded step's buckets: no copy of the parameters; needs `step_optimizer`)."""
    lr_backoff_factor: float = 0.5
    """Learning-rate multiplier while an `lr_backoff` action is active."""
    lr_backoff_steps: int = 100
    """Steps an `lr_backoff` lasts before the learning rate is restored."""
    rollback_skip_batches: int = 1
    """Batches, ending with the spiking step's, that are skipped after a rollback."""
    max_rollbacks: int = 3
    """Rollbacks allowed per run; after that a rollback action aborts."""
    detectors: DetectorsConfig = field(default_factory=DetectorsConfig)
    """Detector thresholds and actions."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """The per-step guard (skips updates on the device, every step)."""
    sinks: SinksConfig = field(default_factory=SinksConfig)
    """Outputs besides JSONL."""

    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MonitorConfig:
        """Build from nested dicts (the YAML shape); unknown keys raise `MonitorConfigError`."""
        return _build(cls, data or {}, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> MonitorConfig:
        """Read a YAML file; a top-level `monitor:` key is accepted as well."""
        path = Path(path)
        if not path.is_file():
            raise MonitorConfigError(f"monitor config {path} does not exist.")
        data = load_yaml(_read_config_text(path), source=f"monitor config {path}") or {}
        if not isinstance(data, dict):
            raise MonitorConfigError(f"monitor config {path} must be a mapping of keys to values.")
        if set(data) == {"monitor"}:
            data = data["monitor"] or {}
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON- and YAML-serialisable)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> MonitorConfig:
        """A copy with top-level fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ CLI
    @staticmethod
    def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add `--monitor-config PATH`, `--monitor-set KEY=VALUE` and `--no-monitor`."""
        group = parser.add_argument_group("stability monitor")
        group.add_argument(
            "--monitor-config", default=None, help="YAML file with the stability monitor config."
        )
        group.add_argument(
            "--monitor-set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="Override one key, dotted for nested ones, e.g. log_interval=5, "
            "detectors.loss_spike.action=lr_backoff, sinks.prometheus=true (repeatable).",
        )
        group.add_argument(
            "--no-monitor", action="store_true", help="Turn the stability monitor off."
        )
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> MonitorConfig:
        """Build from the flags added by `add_cli_arguments` (YAML first, then `--monitor-set`)."""
        data: dict[str, Any] = {}
        if getattr(args, "monitor_config", None):
            data = cls.from_yaml(args.monitor_config).to_dict()
        for item in getattr(args, "monitor_set", None) or []:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise MonitorConfigError(f"--monitor-set {item!r}: expected KEY=VALUE.")
            target = data
            *parents, leaf = key.strip().split(".")
            for parent in parents:
                target = target.setdefault(parent, {})
                if not isinstance(target, dict):
                    raise MonitorConfigError(f"--monitor-set {item!r}: {parent} is not a section.")
            target[leaf] = load_yaml(raw, source=f"--monitor-set {key.strip()}")
        if getattr(args, "no_monitor", False):
            data["enabled"] = False
        return cls.from_dict(data)


# ---------------------------------------------------------------------- reading YAML
MAX_YAML_BYTES = 1 << 20
"""A monitor config (file or --monitor-set value) larger than this is refused unread."""
MAX_YAML_DEPTH = 16
"""Nesting deeper than this is refused (the config itself is three levels deep)."""


def _read_config_text(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise MonitorConfigError(
                f"monitor config is larger than {MAX_YAML_BYTES >> 10} KiB ({path}): a monitor "
                "config is a few lines; pass the right file."
            )
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise MonitorConfigError(
            f"monitor config is not UTF-8 text ({path}: byte {error.start}): save it as UTF-8."
        ) from None
    except OSError as error:
        raise MonitorConfigError(
            f"monitor config cannot be read ({path}: {error.strerror or error}): check the path."
        ) from None


def _check_yaml_events(text: str, source: str) -> None:
    """Refuse aliases (`*name`: a "billion laughs" bomb expands them) and deep nesting, from the
    parser's events, before anything is constructed or expanded."""
    import yaml

    from megatron_gate import safe_yaml

    depth = 0
    for event in yaml.parse(text, Loader=safe_yaml.UniqueKeySafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise MonitorConfigError(
                f"{source}: YAML aliases (*{event.anchor}) are not accepted (monitor config): "
                "write the values out."
            )
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise MonitorConfigError(
                    f"{source}: nested deeper than {MAX_YAML_DEPTH} levels (monitor config): "
                    "the monitor config has three levels; check the file."
                )
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def load_yaml(text: str, *, source: str) -> Any:
    """`text` read with the shared safe loader (`megatron_gate.safe_yaml`: no key given twice)
    and the limits above; every failure is a `MonitorConfigError` whose message never echoes
    the (possibly huge) input."""
    import yaml

    from megatron_gate import safe_yaml

    if len(text) > MAX_YAML_BYTES:
        raise MonitorConfigError(
            f"{source}: longer than {MAX_YAML_BYTES >> 10} KiB (monitor config): refused."
        )
    try:
        _check_yaml_events(text, source)
        return safe_yaml.load(text)
    except MonitorConfigError:
        raise
    except safe_yaml.DuplicateKeyError as error:
        raise MonitorConfigError(f"{source}: {error} (monitor config): {error.fix}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise MonitorConfigError(
            f"{source}: not valid YAML{where}: {str(problem)[:120]} (monitor config): fix the "
            "syntax (quote values that contain ':' or '#')."
        ) from None
    except RecursionError:
        raise MonitorConfigError(f"{source}: nested too deeply (monitor config).") from None
    except (ValueError, OverflowError, TypeError) as error:  # e.g. a 5,000-digit integer
        raise MonitorConfigError(
            f"{source}: a value cannot be read ({str(error)[:120]}) (monitor config): "
            "use plain numbers, strings and booleans."
        ) from None


# ---------------------------------------------------------------------- validation
MAX_INT = 10**9
"""Largest magnitude of any integer key (counts and intervals; tighter limits below)."""
UPPER_BOUNDS = {"log_interval": 10_000, "probe_queries": 4096, "window": 100_000}
"""Keys whose memory grows with their value: buffered steps, probe rows, history windows."""
_SECTIONS = (
    DetectorConfig,
    ForecastConfig,
    DetectorsConfig,
    GuardConfig,
    SinksConfig,
    MonitorConfig,
)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation (bool, int, float, str, optional, section)."""
    options = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in options:
            return None
        annotation = next(option for option in options if option is not type(None))
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            _require(abs(value) <= MAX_INT, key, f"must be at most {MAX_INT:.0e} in magnitude.")
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _require(abs(value) <= 1e300 and math.isfinite(value), key, "must be a finite number.")
            return float(value)
    elif annotation is str and isinstance(value, str):
        return value
    name = getattr(annotation, "__name__", str(annotation))
    shown = repr(value) if len(repr(value)) <= 80 else f"a {type(value).__name__}"
    raise MonitorConfigError(f"monitor config key {key!r}: expected {name}, got {shown}.")


def _build(cls: type, data: Any, prefix: str, base: Any = None) -> Any:
    """`cls` from a mapping: the keys it gives over `base` (default `cls()`), so that a section
    given in part keeps ITS OWN defaults for the rest (e.g. `loss_spike`'s window 1024, not the
    generic `DetectorConfig`'s)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        shown = repr(data) if len(repr(data)) <= 80 else f"a {type(data).__name__}"
        raise MonitorConfigError(
            f"monitor config key {prefix.rstrip('.') or '<root>'!r}: expected a mapping, "
            f"got {shown}."
        )
    hints = _field_types(cls)
    unknown = sorted((str(key) for key in data if key not in hints), key=str)
    if unknown:
        raise MonitorConfigError(
            f"unknown monitor config key {(prefix + unknown[0])[:100]!r}; allowed keys here: "
            f"{', '.join(sorted(hints))}."
        )
    base = cls() if base is None else base
    values = {
        key: _build(hints[key], value, f"{prefix}{key}.", getattr(base, key))
        if hints[key] in _SECTIONS
        else _coerce(value, hints[key], prefix + key)
        for key, value in data.items()
    }
    try:
        return dataclasses.replace(base, **values)
    except MonitorConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise MonitorConfigError(f"monitor config {prefix or '<root>'}: {error}") from error


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise MonitorConfigError(f"monitor config key {key!r}: {message}")


def _validate_detector(name: str, detector: DetectorConfig) -> None:
    key = f"detectors.{name}"
    _require(
        detector.action in schema.ACTIONS,
        f"{key}.action",
        f"{detector.action!r} is not one of {', '.join(schema.ACTIONS)}.",
    )
    _require(
        detector.severity in schema.SEVERITIES,
        f"{key}.severity",
        f"{detector.severity!r} is not one of {', '.join(schema.SEVERITIES)}.",
    )
    _require(
        detector.confirmed_action is None or detector.confirmed_action in schema.ACTIONS,
        f"{key}.confirmed_action",
        f"{detector.confirmed_action!r} is not one of {', '.join(schema.ACTIONS)}.",
    )
    _require(0 < detector.false_alarm_rate < 0.5, f"{key}.false_alarm_rate", "must be in (0, 0.5).")
    _require(detector.min_relative_jump >= 0, f"{key}.min_relative_jump", "must be >= 0.")
    _require(
        math.isfinite(detector.min_absolute_jump) and detector.min_absolute_jump >= 0,
        f"{key}.min_absolute_jump",
        "must be a finite number >= 0.",
    )
    _require(detector.level_window >= 1, f"{key}.level_window", "must be >= 1.")
    _require(detector.level_shift_steps >= 2, f"{key}.level_shift_steps", "must be >= 2.")
    _require(detector.z_threshold > 0, f"{key}.z_threshold", "must be > 0.")
    _require(
        4 <= detector.window <= UPPER_BOUNDS["window"],
        f"{key}.window",
        f"must be in [4, {UPPER_BOUNDS['window']}].",
    )
    _require(
        detector.threshold is None or detector.threshold >= 0, f"{key}.threshold", "must be >= 0."
    )
    _require(
        1 <= detector.min_history <= detector.window,
        f"{key}.min_history",
        f"must be between 1 and window ({detector.window}).",
    )
    _require(detector.ratio is None or detector.ratio > 1, f"{key}.ratio", "must be > 1.")
    _require(detector.warmup_steps >= 1, f"{key}.warmup_steps", "must be >= 1.")


def _validate_forecast(forecast: ForecastConfig) -> None:
    key = "detectors.divergence_forecast"
    for name in ("smoothing", "confirm", "release", "min_layer_signals"):
        _require(getattr(forecast, name) >= 1, f"{key}.{name}", "must be >= 1.")
    for name in ("trend_steps", "layer_points"):
        _require(getattr(forecast, name) >= 3, f"{key}.{name}", "must be >= 3.")
    for name in ("min_t", "loss_rise", "grad_rise", "layer_growth"):
        _require(getattr(forecast, name) > 0, f"{key}.{name}", "must be > 0.")
    _require(forecast.layer_ratio > 1, f"{key}.layer_ratio", "must be > 1.")


SKIP_MODES = ("auto", "device", "host")


def _validate_guard(guard: GuardConfig) -> None:
    finite = math.isfinite
    _require(finite(guard.z_threshold) and guard.z_threshold > 0, "guard.z_threshold",
             "must be a finite number > 0.")  # fmt: skip
    for key in ("min_relative_jump", "grad_norm_min_relative_jump"):
        value = getattr(guard, key)
        _require(finite(value) and value > 0, f"guard.{key}", "must be a finite number > 0.")
    _require(8 <= guard.window <= 4096, "guard.window", "must be between 8 and 4096.")
    _require(1 <= guard.min_history <= guard.window, "guard.min_history",
             f"must be between 1 and window ({guard.window}).")  # fmt: skip
    _require(finite(guard.scale_floor) and guard.scale_floor > 0, "guard.scale_floor",
             "must be a finite number > 0.")  # fmt: skip
    _require(guard.max_consecutive_skips >= 1, "guard.max_consecutive_skips", "must be >= 1.")
    _require(2**10 <= guard.bucket_bytes <= 2**40, "guard.bucket_bytes",
             "must be between 1 KiB and 1 TiB.")  # fmt: skip
    _require(guard.skip_mode in SKIP_MODES, "guard.skip_mode",
             f"{guard.skip_mode!r} is not one of {', '.join(SKIP_MODES)}.")  # fmt: skip


def _validate(config: MonitorConfig) -> None:
    _require(
        1 <= config.log_interval <= UPPER_BOUNDS["log_interval"],
        "log_interval",
        f"must be in [1, {UPPER_BOUNDS['log_interval']}] (the steps in between are buffered).",
    )
    _require(
        config.layer_interval >= 1 and config.layer_interval % config.log_interval == 0,
        "layer_interval",
        f"must be a positive multiple of log_interval ({config.log_interval}).",
    )
    _require(
        0 <= config.probe_queries <= UPPER_BOUNDS["probe_queries"],
        "probe_queries",
        f"must be in [0, {UPPER_BOUNDS['probe_queries']}].",
    )
    _require(0 < config.lr_backoff_factor < 1, "lr_backoff_factor", "must be in (0, 1).")
    _require(config.lr_backoff_steps >= 1, "lr_backoff_steps", "must be >= 1.")
    _require(config.rollback_skip_batches >= 0, "rollback_skip_batches", "must be >= 0.")
    _require(config.max_rollbacks >= 0, "max_rollbacks", "must be >= 0.")
    _validate_guard(config.guard)
    for detector in dataclasses.fields(DetectorsConfig):
        _validate_detector(detector.name, getattr(config.detectors, detector.name))
    _validate_forecast(config.detectors.divergence_forecast)
    _require(
        0 <= config.sinks.prometheus_port < 65536, "sinks.prometheus_port", "must be in [0, 65535]."
    )


def config_json(config: MonitorConfig) -> str:
    """The config as one JSON line (for the `run_start` record)."""
    return json.dumps(config.to_dict(), sort_keys=True)
