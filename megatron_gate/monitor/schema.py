"""The stability monitor's output contract: JSONL records, metric names, TensorBoard tags.

Everything that reads what the monitor writes (dashboards, the demo report, Grafana, alert rules)
uses the names below. Bump `SCHEMA_VERSION` on any incompatible change.

One JSON object per line in `<run_dir>/stability.jsonl`, each with `"schema"` and `"kind"`:

- `run_start`: `run` (name), `time` (unix s), `config` (the monitor config), `model`
  (`num_layers`, `gated_layers` [1-based layer numbers], `granularity`, `backend`, parallel sizes).
- `step`: `step` (int), `time`, `scalars` {SCALARS -> float}, and on logged steps `layers`
  {LAYER_METRICS and SINK_LAYER_METRICS -> list of float|null, index i = layer i+1} and optionally `gate_histogram`
  (list per layer of GATE_HISTOGRAM_BINS counts, or null), and `heads` {HEAD_METRICS -> list per
  layer of lists per head (float|null)}: the first-token share of each head, for all sampled
  queries, those the loop did not flag and those it flagged (`start_step(query_flags=...)`).
- `event`: `step`, `time`, `detector`, `severity` (SEVERITIES), `metric`, `value`, `threshold`,
  `layer` (1-based or null), `action` (ACTIONS), `message`, and `episode`: `kind`
  (EVENT_KINDS; provisional until the episode closes), `phase` (EVENT_PHASES: one "open" record
  per episode carries the action, "update" records a divergence or a further step to skip,
  "close" ends it with action "log"), `start_step`, `end_step` (null while open), `peak`,
  `duration` (steps), `delay` (detection step - start_step), `signals` (scalars it is seen in).
  The guard's skipped steps are events with detector "guard" and action "skip_step", at their
  own step (one-step episodes, kind non_finite or spike). `scalars.skipped_steps` counts the guard's skips since
  the run started. A rejected step that was recomputed on the same batch (attribution.py) has
  `attribution` (ATTRIBUTIONS): "transient" (the recompute was clean: action "log", its update
  was applied, not counted as skipped) or "reproducible" (the batch or the model: skipped), and
  `samples` (the batch's sample indices) where the loop knows them; other events have neither.
- `run_end`: `step`, `time`, `status` ("completed" | "aborted" | "interrupted" | "failed").
"""

from __future__ import annotations

SCHEMA_VERSION = 1
SCHEMA = f"megatron-gate.stability/{SCHEMA_VERSION}"
JSONL_NAME = "stability.jsonl"

RECORD_KINDS: tuple[str, ...] = ("run_start", "step", "event", "run_end")

SCALARS: tuple[str, ...] = (
    "loss",
    "grad_norm",
    "update_norm",
    "learning_rate",
    "loss_scale",
    "tokens_per_second",
    "nan_or_inf",
    "skipped_steps",
)

LAYER_METRICS: tuple[str, ...] = (
    "max_abs_residual",
    "rms_residual",
    "max_abs_attention_output",
    "rms_attention_output",
    "max_abs_mlp_output",
    "rms_mlp_output",
    "gate_mean",
    "gate_sparsity",
    "first_token_attention_share",
    "max_attention_logit",
    "grad_norm",
    "update_norm",
)
SINK_LAYER_METRICS: tuple[str, ...] = (
    # attention sinks and outliers (sink_statistics.py): in the same `layers` field
    "first_token_share_head_max",
    "first_token_share_unflagged",
    "first_token_share_unflagged_head_max",
    "first_token_share_flagged",
    "first_token_share_flagged_head_max",
    "value_norm_ratio_first_token",
    "residual_norm_ratio_first_token",
    "kurtosis_residual",
)
HEAD_METRICS: tuple[str, ...] = (
    "first_token_share",
    "first_token_share_unflagged",
    "first_token_share_flagged",
)

GATE_SPARSITY_THRESHOLD = 0.1
GATE_HISTOGRAM_BINS = 10  # equal bins over [0, 1] of sigmoid(gate)

SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")
EVENT_KINDS: tuple[str, ...] = (
    "spike", "bump", "level_shift", "divergence", "non_finite", "threshold", "forecast",
)  # fmt: skip
EVENT_PHASES: tuple[str, ...] = ("open", "update", "close")


def opens_episode(record: dict) -> bool:
    """Whether an `event` record opens an episode (count these to count events)."""
    return (record.get("episode") or {}).get("phase", "open") == "open"


ATTRIBUTIONS: tuple[str, ...] = ("transient", "reproducible")

ACTIONS: tuple[str, ...] = ("log", "alert", "skip_step", "lr_backoff", "rollback", "abort")

TENSORBOARD_PREFIX = "stability/"
PROMETHEUS_PREFIX = "megatron_gate_"


def tensorboard_tag(metric: str, layer: int | None = None) -> str:
    """`stability/loss`, or `stability/layer_03/max_abs_residual` for per-layer metrics."""
    if layer is None:
        return f"{TENSORBOARD_PREFIX}{metric}"
    return f"{TENSORBOARD_PREFIX}layer_{layer:02d}/{metric}"


def prometheus_name(metric: str) -> str:
    """Gauge name of a scalar or per-layer metric (per-layer gauges carry a `layer` label)."""
    return f"{PROMETHEUS_PREFIX}{metric}"


PROMETHEUS_EVENTS_TOTAL = f"{PROMETHEUS_PREFIX}events_total"  # counter; labels detector, severity
PROMETHEUS_LAST_STEP = f"{PROMETHEUS_PREFIX}step"
# counter; label attribution (ATTRIBUTIONS): rejected steps recomputed, by what the recompute found
PROMETHEUS_ATTRIBUTED_TOTAL = f"{PROMETHEUS_PREFIX}attributed_steps_total"


def attribution_tag(attribution: str) -> str:
    """`stability/attributed/transient`: the count of such steps so far (TensorBoard)."""
    return tensorboard_tag(f"attributed/{attribution}")
