"""One collective per logged step: pack every statistic into one tensor, gather, combine.

A single `all_reduce` cannot take the max of some entries and the sum of others, so every rank
contributes its packed row to one `all_gather` over the monitor's group (the default group spans
TP, PP, DP and CP), and each rank combines the rows column by column: `max` columns by max,
`sum` columns by sum. Every rank ends with the same numbers, so the pure detectors reach the
same decision everywhere without a second collective. Ranks that do not hold a statistic (a
layer on another pipeline stage) contribute the neutral element (0 for sums, -inf for maxes).

The payload is `world_size x width` float64 values per logged step (width is a few hundred
for a 32-layer model); it is gathered only on logged steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

REDUCE_OPS = ("sum", "max")


@dataclass(frozen=True)
class Slot:
    """A named run of `size` columns reduced by `op`."""

    name: str
    start: int
    size: int
    op: str


class PackLayout:
    """Names, sizes and reduce ops of the packed statistics (identical on every rank)."""

    def __init__(self) -> None:
        self.slots: dict[str, Slot] = {}
        self.width = 0
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def add(self, name: str, size: int, op: str) -> Slot:
        """Append a slot; names must be unique and `op` one of `REDUCE_OPS`."""
        if op not in REDUCE_OPS:
            raise ValueError(f"reduce op {op!r} is not one of {REDUCE_OPS}")
        if name in self.slots:
            raise ValueError(f"slot {name!r} is defined twice")
        slot = Slot(name, self.width, size, op)
        self.slots[name] = slot
        self.width += size
        return slot

    def _cached(self, name: str, device: torch.device | str, build: Any) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = build(device)
        return self._cache[key]

    def neutral(self, *, device: torch.device | str = "cpu") -> torch.Tensor:
        """A `[width]` row of neutral elements (what a rank without the statistic sends)."""
        return self._cached("neutral", device, self._build_neutral)

    def _build_neutral(self, device: torch.device | str) -> torch.Tensor:
        row = torch.zeros(self.width, dtype=torch.float64, device=device)
        for slot in self.slots.values():
            if slot.op == "max":
                row[slot.start : slot.start + slot.size] = float("-inf")
        return row

    def _neutral_piece(self, slot: Slot, device: torch.device | str) -> torch.Tensor:
        """The neutral row's view of `slot`, cached (read only: `cat` copies it)."""
        return self._cached(
            f"neutral/{slot.name}",
            device,
            lambda on: self.neutral(device=on)[slot.start : slot.start + slot.size],
        )

    def max_mask(self, *, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean `[width]`: True where the column is reduced by max."""
        return self._cached("max_mask", device, self._build_max_mask)

    def _build_max_mask(self, device: torch.device | str) -> torch.Tensor:
        mask = torch.zeros(self.width, dtype=torch.bool, device=device)
        for slot in self.slots.values():
            if slot.op == "max":
                mask[slot.start : slot.start + slot.size] = True
        return mask

    def pack(
        self, values: dict[str, torch.Tensor], *, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """`[width]` float64 row: each named value flattened into its slot, neutral elsewhere.

        One `cat` of the pieces in slot order (few ops on a logged step).
        """
        unknown = set(values) - set(self.slots)
        if unknown:
            raise ValueError(f"unknown slots {sorted(unknown)}")
        neutral = self.neutral(device=device)
        pieces = []
        for name, slot in self.slots.items():
            value = values.get(name)
            if value is None:
                pieces.append(self._neutral_piece(slot, device))
                continue
            if value.numel() != slot.size:
                raise ValueError(f"slot {name!r} holds {slot.size} values, got {value.numel()}")
            pieces.append(_flat_on(value, neutral.device))
        # cat promotes to float64 (the neutral pieces are float64)
        row = torch.cat(pieces)
        return row if row.dtype == torch.float64 else row.double()

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        """`[world, width]` gathered rows -> `[width]`: max columns by max, sum columns by sum."""
        mask = self.max_mask(device=rows.device)
        return torch.where(mask, rows.amax(dim=0), rows.sum(dim=0))

    def unpack(self, reduced: list[float]) -> dict[str, list[float]]:
        """Host list of a reduced row -> {slot name: its values}."""
        return {
            name: reduced[slot.start : slot.start + slot.size] for name, slot in self.slots.items()
        }


def _flat_on(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`value` as a detached 1-d tensor on `device`, dispatching only the ops it needs."""
    if value.requires_grad:
        value = value.detach()
    if value.dim() != 1:
        value = value.reshape(-1)
    return value if value.device == device else value.to(device)


def gather_rows(row: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All ranks' rows `[world, width]` with ONE all_gather (the row itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return row.unsqueeze(0)
    world = dist.get_world_size(group)
    if world == 1:
        return row.unsqueeze(0)
    # A flat output buffer: what both gloo and NCCL accept. [world * width] -> [world, width]
    rows = torch.empty(world * row.numel(), dtype=row.dtype, device=row.device)
    dist.all_gather_into_tensor(rows, row.contiguous(), group=group)
    return rows.view(world, row.numel())


def reduce_packed(
    layout: PackLayout, row: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Gather every rank's packed row and combine them (one collective; none for one rank)."""
    rows = gather_rows(row, group)
    return row if rows.shape[0] == 1 else layout.combine(rows)
