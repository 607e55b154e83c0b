"""Collectors: measure on the device, never read back to the host.

- `LayerCollector`: forward hooks on Megatron `TransformerLayer`s (residual stream = the layer
  output), their `self_attention` and `mlp` outputs, the gate observers of `GatedSelfAttention`,
  and the attention-sink probe (a forward pre-hook on `self_attention.core_attention`, which
  sees query and key after RoPE). The hooks are on the model only while armed (`arm()` on
  per-layer steps, `disarm()` after the backward): other steps run the model untouched. When
  every step is a per-layer step they stay registered (no registration per step).
  What they see is kept as 0-d tensors (`LayerObservations`) and folded into the packed blocks
  with a few stacked ops per logged step (`tensor_statistics.finish`, `index_add_`,
  `scatter_reduce_`).
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

from megatron_gate.monitor import schema, sink_statistics
from megatron_gate.monitor.probe import (
    class_share_sums,
    first_token_shares,
    query_class_weights,
    sample_positions,
    value_norms,
)
from megatron_gate.monitor.reduction import PackLayout
from megatron_gate.monitor.sink_statistics import SinkObservations
from megatron_gate.monitor.tensor_statistics import (
    GroupedSumOfSquares,
    Partial,
    finish,
    partial_statistics,
)
from megatron_gate.monitor.update_norm import UpdateNorm

logger = logging.getLogger(__name__)

ACTIVATIONS = ("residual", "attention_output", "mlp_output")


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
            return output[0].detach() + bias.detach()  # no autograd node for a statistic
        return output[0]
    return None


# ---------------------------------------------------------------------- observations
class LayerObservations:
    """One step's layer observations, kept as lists of 0-d device tensors until packed.

    Each observation carries its position in the packed blocks (`kind_index * num_layers +
    layer_index`), so that all of them become the packed blocks with one `scatter_reduce_`
    (maxes) or `index_add_` (sums) per block: the op count of a logged step does not grow with
    the layers (or the microbatches) beyond the hooks' own reductions. Element counts are known
    from shapes: they stay on the host.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.activations: list[Partial] = []
        self.activation_slots: list[int] = []
        self.gate_sums: list[torch.Tensor] = []
        self.gate_histograms: list[torch.Tensor] = []
        self.gate_layers: list[int] = []
        self.probe_max_logits: list[torch.Tensor] = []
        self.probe_share_sums: list[torch.Tensor] = []
        self.probe_layers: list[int] = []
        self.counts = [0.0] * (len(LayerCollector.COUNT_KEYS) * num_layers)
        self._index_cache: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}

    def clear(self) -> None:
        """Forget the observations (a new per-layer step begins)."""
        for observed in (
            self.activations,
            self.activation_slots,
            self.gate_sums,
            self.gate_histograms,
            self.gate_layers,
            self.probe_max_logits,
            self.probe_share_sums,
            self.probe_layers,
        ):
            observed.clear()
        self.counts = [0.0] * len(self.counts)

    @property
    def empty(self) -> bool:
        """Nothing was observed since the last `clear`."""
        return not (self.activations or self.gate_sums or self.probe_max_logits)

    def _index(self, slots: list[int], device: torch.device) -> torch.Tensor:
        """Slot positions as a device tensor, cached: the same list every logged step."""
        key = (tuple(slots), str(device))
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor(slots, dtype=torch.long).to(device)
        return self._index_cache[key]

    def blocks(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The packed `layers/max`, `layers/sum`, `layers/count` (and `gate/histogram`) blocks."""
        layers = self.num_layers
        max_values: list[torch.Tensor] = []
        max_slots: list[int] = []
        sum_values: list[torch.Tensor] = []
        sum_slots: list[int] = []
        if self.activations:
            abs_max, sumsq = finish(self.activations)
            max_values.append(abs_max)
            sum_values.append(sumsq)
            max_slots += self.activation_slots
            sum_slots += self.activation_slots
        blocks: dict[str, torch.Tensor] = {}
        if self.gate_histograms:
            # [m, bins] per observation -> [num_layers, bins] summed per layer
            histograms = torch.stack(self.gate_histograms).float()
            gate_index = self._index(self.gate_layers, device)
            blocks["gate/histogram"] = (
                torch.zeros(layers, histograms.shape[1], device=device)
                .index_add_(0, gate_index, histograms.to(device))
                .reshape(-1)
            )
            # sigmoid(gate) < GATE_SPARSITY_THRESHOLD is exactly the first bin
            sum_values += [torch.stack(self.gate_sums), histograms[:, 0]]
            sum_slots += [3 * layers + n for n in self.gate_layers]
            sum_slots += [4 * layers + n for n in self.gate_layers]
        if self.probe_max_logits:
            max_values.append(torch.stack(self.probe_max_logits))
            max_slots += [3 * layers + n for n in self.probe_layers]
            sum_values.append(torch.stack(self.probe_share_sums))
            sum_slots += [5 * layers + n for n in self.probe_layers]
        blocks["layers/max"] = _scattered(
            max_values,
            self._index(max_slots, device),
            len(LayerCollector.MAX_KEYS) * layers,
            neutral=-math.inf,
            reduce="amax",
            device=device,
        )
        blocks["layers/sum"] = _scattered(
            sum_values,
            self._index(sum_slots, device),
            len(LayerCollector.SUM_KEYS) * layers,
            neutral=0.0,
            reduce="sum",
            device=device,
        )
        blocks["layers/count"] = torch.tensor(self.counts, dtype=torch.float64)
        return blocks


def _scattered(
    values: list[torch.Tensor],
    index: torch.Tensor,
    size: int,
    *,
    neutral: float,
    reduce: str,
    device: torch.device,
) -> torch.Tensor:
    """`[size]` float32: `values` (concatenated) folded into their slots by `reduce`."""
    block = torch.full((size,), neutral, device=device)
    if not values:
        return block
    source = torch.cat(values).to(device=device, dtype=torch.float32)
    if reduce == "sum":
        return block.index_add_(0, index, source)
    return block.scatter_reduce_(0, index, source, reduce)


# ---------------------------------------------------------------------- layer collector
class LayerCollector:
    """Activation, gate and attention-sink statistics of the transformer layers on this rank.

    `arm` registers the hooks and `disarm` takes them off again, so that the steps in between
    run the model without them (a hooked module call leaves PyTorch's fast path: about 12 us
    per module and step on the CPU benchmark model). With `keep_registered` (every step is a
    per-layer step) they stay on, registered once. `remove` takes them off for good.
    """

    def __init__(
        self,
        layers: dict[int, torch.nn.Module],
        *,
        num_layers: int,
        probe_queries: int,
        position: RankPosition,
        keep_registered: bool = False,
    ) -> None:
        self.layers = layers
        self.keep_registered = keep_registered
        self.num_layers = num_layers
        self.probe_queries = probe_queries if position.context_parallel_size == 1 else 0
        self.observations = LayerObservations(num_layers)
        self.num_heads = _num_heads(layers)
        self.tensor_parallel_rank = position.tensor_parallel_rank
        self.sink = SinkObservations(num_layers, self.num_heads)
        # The BOS residual ratio needs position 0 in the rank's layer output: not with the
        # sequence (SP) or context (CP) split across ranks.
        self.whole_sequences = position.context_parallel_size == 1 and not _sequence_parallel(
            layers
        )
        self.query_flags: torch.Tensor | None = None
        """`[b, s]` bool of this step's batch (True: a query of the flagged type), or None."""
        self.active = False
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
        if keep_registered:
            self._register()

    @property
    def armed(self) -> bool:
        """Whether the hooks record now."""
        return self.active

    def arm(self) -> None:
        """Start recording (a per-layer step begins); forgets the previous step's statistics."""
        if not self.active:
            self.observations.clear()
            self.sink.clear()
            if not (self._handles or self._observers):
                self._register()
            self.active = True

    def disarm(self) -> None:
        """Stop recording (statistics stay until the next `arm`)."""
        self.active = False
        if not self.keep_registered:
            self._unregister()

    def remove(self) -> None:
        """Take every hook and gate observer off the model (the monitor closes)."""
        self.active = False
        self._unregister()

    def _unregister(self) -> None:
        for handle in self._handles:
            handle.remove()
        for observers, observer in self._observers:
            if observer in observers:
                observers.remove(observer)
        self._handles.clear()
        self._observers.clear()

    def _register(self) -> None:
        layers = self.num_layers
        for number, layer in self.layers.items():
            index = number - 1
            hooked = [(layer, 0)]
            for offset, name in enumerate(("self_attention", "mlp"), start=1):
                module = getattr(layer, name, None)
                if isinstance(module, torch.nn.Module):
                    hooked.append((module, offset))
            for module, kind_index in hooked:
                hook = self._activation_hook(ACTIVATIONS[kind_index], kind_index * layers + index)
                self._handles.append(module.register_forward_hook(hook))
            attention = getattr(layer, "self_attention", None)
            observers = getattr(attention, "gate_observers", None)
            if isinstance(observers, list):
                observer = self._gate_observer(index)
                observers.append(observer)
                self._observers.append((observers, observer))
            core = getattr(attention, "core_attention", None)
            if self.probe_queries and isinstance(core, torch.nn.Module):
                self._handles.append(
                    core.register_forward_pre_hook(self._probe_hook(index, core), with_kwargs=True)
                )

    def _safely(self, kind: str, observe: Any, *args: Any) -> None:
        """Run an observation; its error never reaches the model's forward (warn once).

        Observations detach what they read (cheaper than a `no_grad` context per call).
        """
        try:
            observe(*args)
        except Exception as error:  # noqa: BLE001 - the monitor never stops training
            if kind not in self._warned:
                self._warned.add(kind)
                logger.warning(
                    "stability monitor: %s hook failed (%s: %s); its statistics are skipped.",
                    kind,
                    type(error).__name__,
                    error,
                )

    # -------------------------------------------------------------- hooks
    def _activation_hook(self, kind: str, slot: int) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            if self.active:
                self._safely(kind, self._observe_activation, slot, output)

        return hook

    def _observe_activation(self, slot: int, output: Any) -> None:
        tensor = _output_tensor(output)
        if tensor is None:
            return
        observations = self.observations
        observations.activations.append(partial_statistics(tensor.detach()))
        observations.activation_slots.append(slot)
        observations.counts[slot] += tensor.numel()
        if slot < self.num_layers and self.whole_sequences:  # a layer output: the residual
            self.sink.add_residual(slot, tensor.detach())

    def _gate_observer(self, index: int) -> Any:
        def observe(_module: torch.nn.Module, gate_logits: torch.Tensor) -> None:
            if self.active:
                self._safely("gate", self._observe_gate, index, gate_logits)

        return observe

    def _observe_gate(self, index: int, gate_logits: torch.Tensor) -> None:
        # [sq, b, np, hn | 1] pre-sigmoid gate -> values in (0, 1)
        if gate_logits.dtype != torch.float32:
            gate_logits = gate_logits.float()
        gate = torch.sigmoid(gate_logits)
        total = gate.sum()
        # Bin index of each value, 1.0 in the last bin (`gate` is our own tensor: scaled in
        # place); bincount is far cheaper than histc or bucketize on the CPU.
        bins = schema.GATE_HISTOGRAM_BINS
        bin_index = gate.mul_(bins).long().clamp_(max=bins - 1)
        observations = self.observations
        observations.gate_sums.append(total)
        observations.gate_histograms.append(torch.bincount(bin_index.reshape(-1), minlength=bins))
        observations.gate_layers.append(index)
        observations.counts[3 * self.num_layers + index] += gate.numel()

    def _positions(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """Sampled query positions, cached per (length, device): the same every step."""
        key = (seq_len, str(device))
        if key not in self._position_cache:
            self._position_cache[key] = sample_positions(seq_len, self.probe_queries, device=device)
        return self._position_cache[key]

    def _probe_hook(self, index: int, core: torch.nn.Module) -> Any:
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if self.active:
                self._safely("attention-sink probe", self._observe_probe, index, core, args, kwargs)

        return hook

    def _observe_probe(self, index: int, core: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        query = args[0] if args else kwargs.get("query")
        key = args[1] if len(args) > 1 else kwargs.get("key")
        value = args[2] if len(args) > 2 else kwargs.get("value")
        mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
        if query is None or key is None or query.dim() != 4 or key.dim() != 4:
            return
        positions = self._positions(query.shape[0], query.device)
        if positions.numel() == 0:
            return
        offset = getattr(core, "softmax_offset", None)
        shares, max_logit = first_token_shares(
            query.detach(),
            key.detach(),
            softmax_scale=_softmax_scale(core, query.shape[-1]),
            positions=positions,
            attention_mask=mask if isinstance(mask, torch.Tensor) else None,
            softmax_offset=offset if isinstance(offset, torch.Tensor) else None,
        )
        observations = self.observations
        observations.probe_max_logits.append(max_logit)
        observations.probe_share_sums.append(shares.sum())
        observations.probe_layers.append(index)
        observations.counts[4 * self.num_layers + index] += shares.numel()
        self._observe_sink(index, shares, positions, value)

    def _observe_sink(
        self, index: int, shares: torch.Tensor, positions: torch.Tensor, value: Any
    ) -> None:
        """Per-head shares by query class, and the value drain, of one layer."""
        batch, local_heads, _ = shares.shape
        flags = self.query_flags
        if flags is not None and flags.shape[0] != batch:
            flags = None  # a batch the flags do not describe (e.g. an evaluation)
        weights = query_class_weights(flags, positions, batch=batch)
        sums, counts = class_share_sums(shares, weights)
        first_head = self.tensor_parallel_rank * local_heads
        if first_head + local_heads <= self.num_heads:
            self.sink.add_shares(index, first_head, sums, counts)
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[0] > 1:
            self.sink.add_value_norms(index, *value_norms(value.detach()))

    # -------------------------------------------------------------- packing
    # Packed key-major blocks ([key 0: layers 1..L | key 1: layers 1..L | ...]) and the
    # slot names they unpack to: few, large pieces keep the logged step's op count low.
    # `LayerObservations.blocks` relies on this order (activations first, then gate, probe).
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
        for name, size in sink_statistics.block_sizes(count, self.num_heads).items():
            layout.add(name, size, "sum")

    def packed_values(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Slot name -> flat tensor on `device` (neutral where a layer is not on this rank)."""
        return {**self.observations.blocks(device), **self.sink.blocks(device)}

    def sink_metrics(
        self, values: dict[str, list[float]]
    ) -> tuple[dict[str, list[float | None]], dict[str, list[list[float | None]]]]:
        """Reduced blocks -> (per-layer sink metrics, per-head first-token shares)."""
        return sink_statistics.unpack(values, num_layers=self.num_layers, num_heads=self.num_heads)

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


def _num_heads(layers: dict[int, torch.nn.Module]) -> int:
    """Attention heads of the model (all tensor-parallel ranks), from the layers' config."""
    for layer in layers.values():
        config = getattr(getattr(layer, "self_attention", None), "config", None)
        heads = getattr(config, "num_attention_heads", None)
        if isinstance(heads, int) and heads > 0:
            return heads
    return 1


def _sequence_parallel(layers: dict[int, torch.nn.Module]) -> bool:
    """Whether the layers' outputs are split along the sequence (Megatron's sequence_parallel)."""
    return any(
        bool(getattr(getattr(layer, "config", None), "sequence_parallel", False))
        for layer in layers.values()
    )


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
        self._squares: dict[str, GroupedSumOfSquares] = {}

    @staticmethod
    def _counted_here(param: torch.nn.Parameter, position: RankPosition) -> bool:
        if not param.requires_grad or not position.is_replica_owner:
            return False
        # Tensor-parallel shards are summed over TP ranks; replicated params (norms) once.
        return position.tensor_parallel_rank == 0 or bool(
            getattr(param, "tensor_model_parallel", False)
        )

    def grad_sumsq(self, device: torch.device) -> torch.Tensor:
        """`[num_layers + 1]` sums of squared gradients (Megatron's `main_grad` when present)."""
        grads, groups = [], []
        for param, group in zip(self.params, self.groups, strict=True):
            grad = _grad(param)
            if grad is not None:
                grads.append(grad)
                groups.append(group)
        squares = self._squares.setdefault(str(device), GroupedSumOfSquares(device))
        result = torch.zeros(self.num_layers + 1, device=device)
        squares.add(result, grads, groups)
        return result

    def update_norm(self, device: torch.device) -> UpdateNorm:
        """An `UpdateNorm` over this rank's counted parameters (measured by `bucketed_step`)."""
        return UpdateNorm(self.params, self.groups, num_layers=self.num_layers, device=device)


def _grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    main_grad = getattr(param, "main_grad", None)
    return main_grad if isinstance(main_grad, torch.Tensor) else param.grad


# ---------------------------------------------------------------------- scalars
class ScalarBuffer:
    """Per-step scalars of one log interval, without host reads on a GPU.

    A step's tensor values (the loss, a grad norm from `clip_grad_norm_`) are copied with ONE
    `stack` into a small device tensor (no sync; a copy, so that a buffer the loop updates in
    place, such as a loss scale, keeps this step's value); with `read_on_host` (the CPU, by
    `guard.skip_mode`) they are read at once instead. Python numbers (the learning rate,
    tokens/s) stay on the host. `merged()` joins both at log time with a few ops for the whole
    interval; NaN/Inf is found there from the stored values themselves.
    """

    def __init__(self, rows: int, device: torch.device, *, read_on_host: bool = False) -> None:
        self.rows = rows
        self.device = device
        self.read_on_host = read_on_host
        """Read tensor values at once (on the CPU a read waits for nothing, and a host number
        costs no ops at log time)."""
        self.names = schema.SCALARS
        self.columns = {name: column for column, name in enumerate(self.names)}
        self.steps: list[int | None] = [None] * rows
        # per row: (columns, stacked device values) and the host values (None: absent)
        self._device_rows: list[tuple[tuple[int, ...], torch.Tensor] | None] = [None] * rows
        self._host_values: list[list[float | None]] = [[None] * len(self.names)] * rows
        self._index_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, row: int, step: int, scalars: dict[str, float | torch.Tensor | None]) -> None:
        """Write one step's scalars into `row`."""
        self.steps[row] = step
        host: list[float | None] = [None] * len(self.names)
        columns: list[int] = []
        tensors: list[torch.Tensor] = []
        for name, value in scalars.items():
            column = self.columns[name]
            if isinstance(value, torch.Tensor) and self.read_on_host:
                host[column] = value.item()
            elif isinstance(value, torch.Tensor):
                columns.append(column)
                tensors.append(self._scalar(value))
            elif value is not None:
                host[column] = float(value)
        self._host_values[row] = host
        self._device_rows[row] = (tuple(columns), torch.stack(tensors)) if tensors else None

    def _scalar(self, value: torch.Tensor) -> torch.Tensor:
        """A 0-d view of `value` on the buffer's device, outside the autograd graph."""
        if value.requires_grad:
            value = value.detach()
        if value.dim() != 0:
            value = value.reshape(())
        return value if value.device == self.device else value.to(self.device)

    def merged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values with absent entries 0, presence 0/1, per-row non-finite flag), on the device."""
        presence = [[float(v is not None) for v in values] for values in self._host_values]
        filled = [(row, entry) for row, entry in enumerate(self._device_rows) if entry is not None]
        for row, (columns, _) in filled:
            presence[row] = list(presence[row])
            for column in columns:
                presence[row][column] = 1.0
        # [2, rows, width]: host values (0 where absent or on the device), presence
        host_values = [[0.0 if v is None else v for v in values] for values in self._host_values]
        host = torch.tensor([host_values, presence], dtype=torch.float64)
        if host.device != self.device:
            host = host.to(self.device)
        values, present = host[0], host[1]
        if filled:
            rows, columns = self._index(tuple((row, entry[0]) for row, entry in filled))
            device_values = torch.cat([entry[1] for _, entry in filled]).to(torch.float64)
            # device and host entries are disjoint: where one is present the other is 0
            values = values.index_put((rows, columns), device_values, accumulate=True)
        non_finite = torch.isfinite(values).logical_not_().any(dim=1).double()
        return values, present, non_finite

    def _index(self, pattern: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) index tensors of the device entries, cached: the same every interval."""
        if pattern not in self._index_cache:
            rows = [row for row, columns in pattern for _ in columns]
            columns = [column for _, row_columns in pattern for column in row_columns]
            self._index_cache[pattern] = (
                torch.tensor(rows, dtype=torch.long).to(self.device),
                torch.tensor(columns, dtype=torch.long).to(self.device),
            )
        return self._index_cache[pattern]

    def clear(self) -> None:
        """Forget the recorded steps (after they were read)."""
        self.steps = [None] * self.rows
        self._device_rows = [None] * self.rows
        self._host_values = [[None] * len(self.names)] * self.rows
