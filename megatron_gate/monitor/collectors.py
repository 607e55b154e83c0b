"""Collectors: measure on the device, never read back to the host.

- `LayerCollector`: forward hooks on Megatron `TransformerLayer`s (residual stream = the layer
  output), their `self_attention` and `mlp` outputs, the gate observers of `GatedSelfAttention`,
  and the attention-sink probe (a forward pre-hook on `self_attention.core_attention`, which
  sees query and key after RoPE). Hooks are registered by `arm()` on per-layer steps only and
  removed by `disarm()`: other steps pay nothing.
- `ParameterCollector`: per-layer gradient sums of squares, and which parameters this rank
  counts (the update norm, `update_norm.UpdateNorm`, is measured by the optimizer step).
- `ScalarBuffer`: per-step scalars written into a device buffer (no `.item()`), read once per
  log interval.

Everything is accumulated as (max, sum of squares, count) so that microbatches, tensor-parallel
replicas, sequence shards and data-parallel ranks combine with one max and one sum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_gate.monitor import schema
from megatron_gate.monitor.probe import probe_attention, sample_positions
from megatron_gate.monitor.reduction import PackLayout
from megatron_gate.monitor.update_norm import UpdateNorm

logger = logging.getLogger(__name__)

ACTIVATIONS = ("residual", "attention_output", "mlp_output")
# sigmoid(gate) < 0.1 is exactly the first of 10 equal bins: the histogram gives the sparsity.
_SPARSITY_IS_FIRST_BIN = schema.GATE_SPARSITY_THRESHOLD * schema.GATE_HISTOGRAM_BINS == 1.0


# ---------------------------------------------------------------------- rank position
@dataclass(frozen=True, kw_only=True)
class RankPosition:
    """Where this rank sits in the model-parallel grid (what it must not double count)."""

    tensor_parallel_rank: int = 0
    data_parallel_rank: int = 0
    context_parallel_size: int = 1

    @property
    def is_replica_owner(self) -> bool:
        """Gradients and parameters are identical across DP/CP replicas: count them on one."""
        return self.data_parallel_rank == 0


def rank_position(*, data_parallel_rank: int | None = None) -> RankPosition:
    """Read Megatron's parallel state (or the default group when Megatron's is not set up)."""
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return RankPosition(
                tensor_parallel_rank=parallel_state.get_tensor_model_parallel_rank(),
                data_parallel_rank=(
                    data_parallel_rank
                    if data_parallel_rank is not None
                    else parallel_state.get_data_parallel_rank(with_context_parallel=True)
                ),
                context_parallel_size=parallel_state.get_context_parallel_world_size(),
            )
    except ImportError:  # plain PyTorch without megatron-core
        pass
    if data_parallel_rank is None:
        data_parallel_rank = dist.get_rank() if dist.is_initialized() else 0
    return RankPosition(data_parallel_rank=data_parallel_rank)


def _guarded(kind: str, hook: Any, warned: set[str]) -> Any:
    """Run a hook, but never let its error reach the model's forward (warn once per kind)."""

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            hook(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - the monitor never stops training
            if kind not in warned:
                warned.add(kind)
                logger.warning(
                    "stability monitor: %s hook failed (%s: %s); its statistics are skipped.",
                    kind,
                    type(error).__name__,
                    error,
                )
        return None

    return guarded


# ---------------------------------------------------------------------- layer discovery
def find_layers(models: Iterable[torch.nn.Module]) -> dict[int, torch.nn.Module]:
    """Transformer layers by their global 1-based `layer_number` (pipeline-stage aware)."""
    layers: dict[int, torch.nn.Module] = {}
    for model in models:
        for module in model.modules():
            number = getattr(module, "layer_number", None)
            if isinstance(number, int) and hasattr(module, "self_attention"):
                layers[number] = module
    return dict(sorted(layers.items()))


def total_layers(models: Sequence[torch.nn.Module], layers: dict[int, torch.nn.Module]) -> int:
    """The model's total layer count (all pipeline stages), from its config when it has one."""
    for model in models:
        config = getattr(model, "config", None) or getattr(
            getattr(model, "module", None), "config", None
        )
        if getattr(config, "num_layers", None):
            return max(int(config.num_layers), max(layers, default=0))
    return max(layers, default=0)


def _output_tensor(output: Any) -> torch.Tensor | None:
    """Megatron modules return `(output, bias)` or `(hidden, context)`: the first, bias added."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        bias = output[1] if len(output) > 1 else None
        if isinstance(bias, torch.Tensor) and bias.shape[-1:] == output[0].shape[-1:]:
            return output[0] + bias
        return output[0]
    return None


# ---------------------------------------------------------------------- accumulators
class Accumulator:
    """Running (max, sum, count) per key; max and sum stay on the device."""

    def __init__(self) -> None:
        self.maximum: dict[Any, torch.Tensor] = {}
        self.total: dict[Any, torch.Tensor] = {}
        self.count: dict[Any, float] = {}

    def add(
        self,
        key: Any,
        *,
        maximum: torch.Tensor | None = None,
        total: torch.Tensor | None = None,
        count: float = 0.0,
    ) -> None:
        """Fold one observation in (max by max, total and count by sum)."""
        if maximum is not None:
            maximum = maximum.detach().float()
            previous = self.maximum.get(key)
            self.maximum[key] = maximum if previous is None else torch.maximum(previous, maximum)
        if total is not None:
            total = total.detach().float()
            previous = self.total.get(key)
            self.total[key] = total if previous is None else previous + total
        self.count[key] = self.count.get(key, 0.0) + count

    def clear(self) -> None:
        """Forget everything."""
        self.maximum.clear()
        self.total.clear()
        self.count.clear()


# ---------------------------------------------------------------------- layer collector
class LayerCollector:
    """Activation, gate and attention-sink statistics of the transformer layers on this rank."""

    def __init__(
        self,
        layers: dict[int, torch.nn.Module],
        *,
        num_layers: int,
        probe_queries: int,
        position: RankPosition,
    ) -> None:
        self.layers = layers
        self.num_layers = num_layers
        self.probe_queries = probe_queries if position.context_parallel_size == 1 else 0
        self.stats = Accumulator()
        self.gate_histogram: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._observers: list[tuple[list, Any]] = []
        self._warned: set[str] = set()
        self._position_cache: dict[tuple[int, str], torch.Tensor] = {}
        if probe_queries and position.context_parallel_size > 1:
            logger.warning(
                "stability monitor: the attention-sink probe is off with context parallelism "
                "(each rank holds only a chunk of the keys); first_token_attention_share and "
                "max_attention_logit are reported as null."
            )

    @property
    def armed(self) -> bool:
        """Whether hooks are registered now."""
        return bool(self._handles or self._observers)

    def arm(self) -> None:
        """Register the hooks (a per-layer step begins)."""
        if self.armed:
            return
        self.stats.clear()
        self.gate_histogram.clear()
        for number, layer in self.layers.items():
            self._handles.append(
                layer.register_forward_hook(self._activation_hook(number, "residual"))
            )
            for name, kind in (("self_attention", "attention_output"), ("mlp", "mlp_output")):
                module = getattr(layer, name, None)
                if isinstance(module, torch.nn.Module):
                    self._handles.append(
                        module.register_forward_hook(self._activation_hook(number, kind))
                    )
            attention = getattr(layer, "self_attention", None)
            observers = getattr(attention, "gate_observers", None)
            if isinstance(observers, list):
                observer = self._gate_observer(number)
                observers.append(observer)
                self._observers.append((observers, observer))
            core = getattr(attention, "core_attention", None)
            if self.probe_queries and isinstance(core, torch.nn.Module):
                self._handles.append(
                    core.register_forward_pre_hook(self._probe_hook(number, core), with_kwargs=True)
                )

    def disarm(self) -> None:
        """Remove every hook (statistics stay until the next `arm`)."""
        for handle in self._handles:
            handle.remove()
        for observers, observer in self._observers:
            if observer in observers:
                observers.remove(observer)
        self._handles.clear()
        self._observers.clear()

    # -------------------------------------------------------------- hooks
    def _activation_hook(self, number: int, kind: str) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            tensor = _output_tensor(output)
            if tensor is None:
                return
            tensor = tensor.detach()
            # aminmax reads the tensor once without an |h| copy (vector_norm(inf) is slow on CPU)
            low, high = torch.aminmax(tensor)
            self.stats.add(
                (kind, number),
                maximum=torch.maximum(high, -low),
                total=torch.linalg.vector_norm(tensor, 2, dtype=torch.float32).square(),
                count=float(tensor.numel()),
            )

        return _guarded(kind, hook, self._warned)

    def _gate_observer(self, number: int) -> Any:
        def observe(_module: torch.nn.Module, gate_logits: torch.Tensor) -> None:
            # [sq, b, np, hn | 1] pre-sigmoid gate -> values in (0, 1)
            gate = torch.sigmoid(gate_logits.float())
            self.stats.add(("gate", number), total=gate.sum(), count=float(gate.numel()))
            # Bin index of each value (1.0 falls into the last bin); bincount is far cheaper
            # than histc on the CPU and equal to it on equal-width bins over [0, 1].
            bins = schema.GATE_HISTOGRAM_BINS
            index = (gate * bins).long().clamp_(max=bins - 1)
            histogram = torch.bincount(index.reshape(-1), minlength=bins).float()
            if _SPARSITY_IS_FIRST_BIN:
                below = histogram[0]
            else:
                below = (gate < schema.GATE_SPARSITY_THRESHOLD).sum()
            self.stats.add(("gate_below", number), total=below)
            previous = self.gate_histogram.get(number)
            self.gate_histogram[number] = histogram if previous is None else previous + histogram

        return _guarded("gate", observe, self._warned)

    def _positions(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """Sampled query positions, cached per (length, device): the same every step."""
        key = (seq_len, str(device))
        if key not in self._position_cache:
            self._position_cache[key] = sample_positions(seq_len, self.probe_queries, device=device)
        return self._position_cache[key]

    def _probe_hook(self, number: int, core: torch.nn.Module) -> Any:
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            query = args[0] if args else kwargs.get("query")
            key = args[1] if len(args) > 1 else kwargs.get("key")
            mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
            if query is None or key is None or query.dim() != 4 or key.dim() != 4:
                return
            positions = self._positions(query.shape[0], query.device)
            if positions.numel() == 0:
                return
            share_sum, share_count, max_logit = probe_attention(
                query.detach(),
                key.detach(),
                softmax_scale=_softmax_scale(core, query.shape[-1]),
                positions=positions,
                attention_mask=mask if isinstance(mask, torch.Tensor) else None,
            )
            self.stats.add(
                ("probe", number), maximum=max_logit, total=share_sum, count=float(share_count)
            )

        return _guarded("attention-sink probe", hook, self._warned)

    # -------------------------------------------------------------- packing
    # Packed key-major blocks ([key 0: layers 1..L | key 1: layers 1..L | ...]) and the
    # slot names they unpack to: few, large pieces keep the logged step's op count low.
    MAX_KEYS: tuple[tuple[str, str], ...] = (
        ("residual", "residual/max"),
        ("attention_output", "attention_output/max"),
        ("mlp_output", "mlp_output/max"),
        ("probe", "probe/max_logit"),
    )
    SUM_KEYS: tuple[tuple[str, str], ...] = (
        ("residual", "residual/sumsq"),
        ("attention_output", "attention_output/sumsq"),
        ("mlp_output", "mlp_output/sumsq"),
        ("gate", "gate/sum"),
        ("gate_below", "gate/below"),
        ("probe", "probe/share_sum"),
    )
    COUNT_KEYS: tuple[tuple[str, str], ...] = (
        ("residual", "residual/count"),
        ("attention_output", "attention_output/count"),
        ("mlp_output", "mlp_output/count"),
        ("gate", "gate/count"),
        ("probe", "probe/share_count"),
    )

    def add_slots(self, layout: PackLayout) -> None:
        """Declare this collector's slots (identical on every rank)."""
        count = self.num_layers
        layout.add("layers/max", len(self.MAX_KEYS) * count, "max")
        layout.add("layers/sum", len(self.SUM_KEYS) * count, "sum")
        layout.add("layers/count", len(self.COUNT_KEYS) * count, "sum")
        layout.add("gate/histogram", count * schema.GATE_HISTOGRAM_BINS, "sum")

    def packed_values(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Slot name -> flat tensor on `device` (neutral where a layer is not on this rank)."""
        numbers = range(1, self.num_layers + 1)
        stats = self.stats
        max_keys = [(kind, n) for kind, _ in self.MAX_KEYS for n in numbers]
        sum_keys = [(kind, n) for kind, _ in self.SUM_KEYS for n in numbers]
        values = {
            "layers/max": _stacked(stats.maximum, max_keys, -math.inf, device),
            "layers/sum": _stacked(stats.total, sum_keys, 0.0, device),
            "layers/count": torch.tensor(
                [stats.count.get((kind, n), 0.0) for kind, _ in self.COUNT_KEYS for n in numbers],
                dtype=torch.float64,
            ),
        }
        if self.gate_histogram:
            values["gate/histogram"] = _stacked(self.gate_histogram, list(numbers), 0.0, device)
        return values

    def unpack(self, values: dict[str, list[float]]) -> dict[str, list[float]]:
        """Reduced blocks -> per-statistic lists of `num_layers` values, by slot name."""
        count = self.num_layers
        named: dict[str, list[float]] = {}
        for block, keys in (
            ("layers/max", self.MAX_KEYS),
            ("layers/sum", self.SUM_KEYS),
            ("layers/count", self.COUNT_KEYS),
        ):
            for index, (_, name) in enumerate(keys):
                named[name] = values[block][index * count : (index + 1) * count]
        return named


def _stacked(
    values: dict[Any, torch.Tensor], keys: Sequence[Any], neutral: float, device: torch.device
) -> torch.Tensor:
    """One flat tensor of `values[key]` in `keys` order, `neutral` where missing."""
    present = [values[key] for key in keys if key in values]
    if not present:
        return torch.full((len(keys),), neutral, device=device)
    filler = torch.full_like(present[0], neutral)
    return torch.stack([values.get(key, filler) for key in keys]).reshape(-1)


def _softmax_scale(core: torch.nn.Module, head_dim: int) -> float:
    """The scale the core attention applies to `q.k` (Megatron's, TE's, or 1/sqrt(hn))."""
    scale = getattr(core, "softmax_scale", None)
    if scale is None:
        scale = getattr(getattr(core, "config", None), "softmax_scale", None)
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


# ---------------------------------------------------------------------- parameters
class ParameterCollector:
    """Per-layer gradient sums of squares, each parameter counted once across ranks.

    All parameters of this rank form one flat list with a group index per parameter (layer
    i + 1 -> i, everything else -> `num_layers`), so that one `_foreach_norm` and one
    `index_add_` give every layer's sum of squares.
    """

    def __init__(
        self,
        models: Sequence[torch.nn.Module],
        layers: dict[int, torch.nn.Module],
        *,
        num_layers: int,
        position: RankPosition,
    ) -> None:
        self.num_layers = num_layers
        self.params: list[torch.nn.Parameter] = []
        self.groups: list[int] = []
        in_layers: set[int] = set()
        for number, layer in layers.items():
            for param in layer.parameters():
                in_layers.add(id(param))
                if self._counted_here(param, position):
                    self.params.append(param)
                    self.groups.append(number - 1)
        for model in models:
            for param in model.parameters():
                if id(param) not in in_layers and self._counted_here(param, position):
                    in_layers.add(id(param))
                    self.params.append(param)
                    self.groups.append(num_layers)
        self._index_cache: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}

    @staticmethod
    def _counted_here(param: torch.nn.Parameter, position: RankPosition) -> bool:
        if not param.requires_grad or not position.is_replica_owner:
            return False
        # Tensor-parallel shards are summed over TP ranks; replicated params (norms) once.
        return position.tensor_parallel_rank == 0 or bool(
            getattr(param, "tensor_model_parallel", False)
        )

    def _group_sumsq(
        self, tensors: list[torch.Tensor], groups: list[int], device: torch.device
    ) -> torch.Tensor:
        """`[num_layers + 1]`: sum of squared norms of `tensors` by group."""
        result = torch.zeros(self.num_layers + 1, device=device)
        if not tensors:
            return result
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        squares = torch.stack(norms).square().to(device)
        key = (tuple(groups), str(device))
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor(groups, device=device)
        return result.index_add_(0, self._index_cache[key], squares)

    def grad_sumsq(self, device: torch.device) -> torch.Tensor:
        """`[num_layers + 1]` sums of squared gradients (Megatron's `main_grad` when present)."""
        grads, groups = [], []
        for param, group in zip(self.params, self.groups, strict=True):
            grad = _grad(param)
            if grad is not None:
                grads.append(grad)
                groups.append(group)
        with torch.no_grad():
            return self._group_sumsq(grads, groups, device)

    def update_norm(self, device: torch.device) -> UpdateNorm:
        """An `UpdateNorm` over this rank's counted parameters (measured by `bucketed_step`)."""
        return UpdateNorm(self.params, self.groups, num_layers=self.num_layers, device=device)


def _grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    main_grad = getattr(param, "main_grad", None)
    return main_grad if isinstance(main_grad, torch.Tensor) else param.grad


# ---------------------------------------------------------------------- scalars
class ScalarBuffer:
    """Per-step scalars of one log interval, without host reads.

    Tensor values (the loss, a grad norm from `clip_grad_norm_`) are copied into a
    `[log_interval, len(SCALARS)]` device buffer: one small copy per value, no sync. Python
    numbers (the learning rate, tokens/s) stay on the host. `merged()` joins both at log time;
    NaN/Inf is found there from the stored values themselves.
    """

    def __init__(self, rows: int, device: torch.device) -> None:
        self.rows = rows
        self.names = schema.SCALARS
        self.columns = {name: column for column, name in enumerate(self.names)}
        self.device_values = torch.zeros(rows, len(self.names), dtype=torch.float64, device=device)
        self.on_device = [[False] * len(self.names) for _ in range(rows)]
        self.host_values: list[list[float | None]] = [[None] * len(self.names) for _ in range(rows)]
        self.steps: list[int | None] = [None] * rows

    def record(self, row: int, step: int, scalars: dict[str, float | torch.Tensor | None]) -> None:
        """Write one step's scalars into `row`."""
        self.steps[row] = step
        for name, value in scalars.items():
            column = self.columns[name]
            if isinstance(value, torch.Tensor):
                with torch.no_grad():  # the buffer must not join the autograd graph
                    self.device_values[row, column] = (
                        value if value.dim() == 0 else value.reshape(())
                    )
                self.on_device[row][column] = True
                self.host_values[row][column] = None
            else:
                self.on_device[row][column] = False
                self.host_values[row][column] = None if value is None else float(value)

    def merged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values with absent entries 0, presence 0/1, per-row non-finite flag), on the device."""
        device = self.device_values.device
        host = torch.tensor(
            [[0.0 if v is None else v for v in row] for row in self.host_values],
            dtype=torch.float64,
        ).to(device)
        on_device = torch.tensor(self.on_device).to(device)
        present = on_device | torch.tensor(
            [[v is not None for v in row] for row in self.host_values]
        ).to(device)
        values = torch.where(on_device, self.device_values, host)
        non_finite = (~torch.isfinite(values) & present).any(dim=1).double()
        values = torch.where(present, values, torch.zeros_like(values))
        return values, present.double(), non_finite

    def clear(self) -> None:
        """Forget the recorded steps (after they were read)."""
        self.steps = [None] * self.rows
        self.on_device = [[False] * len(self.names) for _ in range(self.rows)]
        self.host_values = [[None] * len(self.names) for _ in range(self.rows)]
