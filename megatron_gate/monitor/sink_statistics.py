"""Attention-sink and outlier statistics of a per-layer step, kept on the device until packed.

Per layer (and, for the share, per head and query class):

- first-token share per head, for all sampled queries, those the loop does not flag and those
  it flags (`probe.query_class_weights`; Bigram-Backcopy flags its triggers): reported as the
  mean over heads and the max over heads, and per head in the record's `heads` field;
- value drain: mean value-vector norm at position 0 over the mean at the other positions;
- BOS residual ratio: per sequence, the layer output's norm at position 0 over its median norm
  at the other positions ("massive activation at BOS"), averaged over sequences;
- kurtosis of the layer output, per sequence over all its entries (Bondarenko et al. 2023's
  outlier measure; 3 for a normal distribution), averaged over sequences.

Everything is a sum with a count, so that tensor-parallel heads (each rank fills its own head
slots), replicated activations (sum and count both repeat) and data-parallel ranks combine
with one sum.
"""

from __future__ import annotations

import math

import torch

from megatron_gate.monitor import schema

QUERY_CLASSES = ("", "_unflagged", "_flagged")
"""Metric suffixes of the three query classes (all, not flagged, flagged)."""
SCALAR_KEYS = ("value_first", "value_first_count", "value_rest", "value_rest_count",
               "residual_ratio", "kurtosis", "sequences")  # fmt: skip
HEAD_METRICS = schema.HEAD_METRICS
"""Per-head lists in a step record's `heads` field (one per query class, in that order)."""
LAYER_METRICS = schema.SINK_LAYER_METRICS


def residual_sink_sums(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum over sequences of the BOS residual ratio, sum of kurtosis, sequence count).

    hidden `[s, b, h]` (a layer's output). Ratio per sequence: ||h_0|| / median_{t>0} ||h_t||.
    """
    hidden = hidden if hidden.dtype == torch.float32 else hidden.float()
    norms = torch.linalg.vector_norm(hidden, dim=-1)  # [s, b]
    ratio = norms[0] / norms[1:].median(dim=0).values.clamp_min(1e-30)
    # [s, b, h] -> [b, s * h]: one kurtosis per sequence over all its entries
    flat = hidden.transpose(0, 1).reshape(hidden.shape[1], -1)
    centred = flat - flat.mean(dim=1, keepdim=True)
    variance = centred.square().mean(dim=1)
    kurtosis = centred.pow(4).mean(dim=1) / variance.square().clamp_min(1e-30)
    return ratio.sum(), kurtosis.sum(), hidden.shape[1]


class SinkObservations:
    """One per-layer step's sink statistics, as device tensors until `blocks` packs them."""

    def __init__(self, num_layers: int, num_heads: int) -> None:
        self.num_layers, self.num_heads = num_layers, num_heads
        self.share_sums: list[torch.Tensor] = []
        self.share_counts: list[torch.Tensor] = []
        self.share_slots: list[torch.Tensor] = []
        self.scalars: list[torch.Tensor] = []
        self.scalar_slots: list[int] = []
        self.host: list[tuple[int, float]] = []
        self._slot_cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def clear(self) -> None:
        """Forget the observations (a new per-layer step begins)."""
        for observed in (self.share_sums, self.share_counts, self.share_slots, self.scalars,
                         self.scalar_slots, self.host):  # fmt: skip
            observed.clear()

    def _scalar_slot(self, key: str, layer: int) -> int:
        return SCALAR_KEYS.index(key) * self.num_layers + layer

    def add_shares(
        self, layer: int, first_head: int, sums: torch.Tensor, counts: torch.Tensor
    ) -> None:
        """`[3, np]` share sums and `[3]` counts of this rank's heads `first_head ...`."""
        classes, heads = sums.shape
        key = (layer, first_head, heads)
        if key not in self._slot_cache:
            # slot of (layer, class, head) in the `[L, 3, H]` block
            rows = torch.arange(classes)[:, None] * self.num_heads + first_head
            slots = layer * classes * self.num_heads + rows + torch.arange(heads)[None, :]
            self._slot_cache[key] = slots.reshape(-1).to(sums.device)
        self.share_sums.append(sums.reshape(-1))
        self.share_counts.append(counts[:, None].expand(classes, heads).reshape(-1))
        self.share_slots.append(self._slot_cache[key])

    def add_value_norms(self, layer: int, first: torch.Tensor, rest: torch.Tensor,
                        first_count: int, rest_count: int) -> None:  # fmt: skip
        """Sums of value-vector norms at position 0 and elsewhere (`probe.value_norms`)."""
        self.scalars += [first, rest]
        self.scalar_slots += [self._scalar_slot("value_first", layer),
                              self._scalar_slot("value_rest", layer)]  # fmt: skip
        self.host += [(self._scalar_slot("value_first_count", layer), float(first_count)),
                      (self._scalar_slot("value_rest_count", layer), float(rest_count))]  # fmt: skip

    def add_residual(self, layer: int, hidden: torch.Tensor) -> None:
        """BOS ratio and kurtosis of one layer output `[s, b, h]`."""
        if hidden.dim() != 3 or hidden.shape[0] < 2:
            return
        ratio, kurtosis, sequences = residual_sink_sums(hidden)
        self.scalars += [ratio, kurtosis]
        self.scalar_slots += [self._scalar_slot("residual_ratio", layer),
                              self._scalar_slot("kurtosis", layer)]  # fmt: skip
        self.host.append((self._scalar_slot("sequences", layer), float(sequences)))

    def blocks(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The packed `sink/share_sum`, `sink/share_count` and `sink/sums` blocks."""
        share_size = self.num_layers * len(QUERY_CLASSES) * self.num_heads
        share_sum = torch.zeros(share_size, device=device)
        share_count = torch.zeros(share_size, device=device)
        if self.share_sums:
            slots = torch.cat(self.share_slots).to(device)
            share_sum.index_add_(0, slots, torch.cat(self.share_sums).to(device, torch.float32))
            share_count.index_add_(0, slots, torch.cat(self.share_counts).to(device, torch.float32))
        host = [0.0] * (len(SCALAR_KEYS) * self.num_layers)
        for slot, value in self.host:
            host[slot] += value
        sums = torch.tensor(host, device=device)
        if self.scalars:
            index = torch.tensor(self.scalar_slots, device=device)
            values = torch.stack(self.scalars).to(device, torch.float32)
            sums.index_add_(0, index, values)
        return {"sink/share_sum": share_sum, "sink/share_count": share_count, "sink/sums": sums}


def block_sizes(num_layers: int, num_heads: int) -> dict[str, int]:
    """Sizes of the packed blocks (all reduced by sum)."""
    shares = num_layers * len(QUERY_CLASSES) * num_heads
    return {"sink/share_sum": shares, "sink/share_count": shares,
            "sink/sums": len(SCALAR_KEYS) * num_layers}  # fmt: skip


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 and math.isfinite(numerator) else None


def unpack(
    values: dict[str, list[float]], *, num_layers: int, num_heads: int
) -> tuple[dict[str, list[float | None]], dict[str, list[list[float | None]]]]:
    """Reduced blocks -> (per-layer metrics by `LAYER_METRICS`, per-head lists by `HEAD_METRICS`)."""
    classes = len(QUERY_CLASSES)
    heads: dict[str, list[list[float | None]]] = {name: [] for name in HEAD_METRICS}
    layers: dict[str, list[float | None]] = {name: [] for name in LAYER_METRICS}
    for layer in range(num_layers):
        for index, name in enumerate(HEAD_METRICS):
            start = (layer * classes + index) * num_heads
            per_head = [
                _ratio(s, c)
                for s, c in zip(values["sink/share_sum"][start : start + num_heads],
                                values["sink/share_count"][start : start + num_heads],
                                strict=True)
            ]  # fmt: skip
            heads[name].append(per_head)
    for suffix, name in zip(QUERY_CLASSES, HEAD_METRICS, strict=True):
        measured = [[v for v in row if v is not None] for row in heads[name]]
        layers[f"first_token_share{suffix}_head_max"] = [max(r) if r else None for r in measured]
        if suffix:
            layers[f"first_token_share{suffix}"] = [
                sum(r) / len(r) if r else None for r in measured
            ]
    sums = values["sink/sums"]

    def scalar(key: str, layer: int) -> float:
        return sums[SCALAR_KEYS.index(key) * num_layers + layer]

    for layer in range(num_layers):
        first = _ratio(scalar("value_first", layer), scalar("value_first_count", layer))
        rest = _ratio(scalar("value_rest", layer), scalar("value_rest_count", layer))
        layers["value_norm_ratio_first_token"].append(
            None if first is None or rest is None or rest <= 0 else first / rest
        )
        count = scalar("sequences", layer)
        layers["residual_norm_ratio_first_token"].append(
            _ratio(scalar("residual_ratio", layer), count)
        )
        layers["kurtosis_residual"].append(_ratio(scalar("kurtosis", layer), count))
    return layers, heads
