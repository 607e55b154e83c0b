"""TensorBoard sink: scalars under `stability/` (the writer Megatron-LM uses, or our own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_gate.monitor import schema
from megatron_gate.monitor.sinks.base import Sink

_MASK_DELTA = 0xA282EAD8  # TFRecord's checksum mask (rotate right by 15, add this)


class TensorBoardSink(Sink):
    """Writes `step` records as scalars and `event` records as `stability/events/<detector>`;
    attributed guard events also as the running count `stability/attributed/<attribution>`.

    All values of one record go into ONE `Summary` protobuf (one event in the file) instead of
    one `add_scalar` call per value: `add_scalar` costs ~0.1-0.6 ms each on a busy CPU, and a
    per-layer record holds hundreds of values. Writers without a file writer (tensorboardX,
    W&B's TB shim) get plain `add_scalar` calls.
    """

    name = "tensorboard"

    def __init__(self, *, log_dir: str | Path | None = None, writer: Any = None) -> None:
        use_fast_checksum()
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(log_dir))
            self._owned = True
        else:
            self._owned = False
        self.writer = writer
        self.attributed = dict.fromkeys(schema.ATTRIBUTIONS, 0)
        """Rejected steps recomputed so far, by attribution (transient, reproducible)."""

    def write(self, record: dict[str, Any]) -> None:
        """Scalars of steps and events."""
        kind, step = record["kind"], record.get("step")
        values: list[tuple[str, float]] = []
        if kind == "step":
            for name, value in record["scalars"].items():
                if value is not None:
                    values.append((schema.tensorboard_tag(name), value))
            for name, per_layer in (record.get("layers") or {}).items():
                for index, value in enumerate(per_layer):
                    if value is not None:
                        values.append((schema.tensorboard_tag(name, index + 1), value))
        elif kind == "event":
            values.append((schema.tensorboard_tag(f"events/{record['detector']}"), record["value"]))
            attribution = record.get("attribution")
            if attribution in self.attributed:
                self.attributed[attribution] += 1
                values.append((schema.attribution_tag(attribution), self.attributed[attribution]))
        if values:
            self._write_values(values, step)

    def _write_values(self, values: list[tuple[str, float]], step: int) -> None:
        file_writer = getattr(self.writer, "_get_file_writer", None)
        if file_writer is None:
            for tag, value in values:
                self.writer.add_scalar(tag, value, step)
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(
            value=[Summary.Value(tag=tag, simple_value=float(value)) for tag, value in values]
        )
        file_writer().add_summary(summary, step)

    def flush(self) -> None:
        """Flush the writer."""
        self.writer.flush()

    def close(self) -> None:
        """Close the writer when the sink created it."""
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()


def use_fast_checksum() -> bool:
    """Checksum TensorBoard's event records with the `crc32c` package (C, SSE4.2) when installed.

    Without TensorFlow, TensorBoard computes each record's masked CRC-32C in pure Python, about
    1 ms per KiB here: a per-layer record (14 values per layer) then costs more than all of the
    monitor's device work, and the GIL it holds stalls the training thread. The checksums are
    the same; the patch applies once, keeps the original as `__wrapped__`, and helps every
    writer in the process (Megatron-LM's own). Returns whether the fast checksum is in use.
    """
    try:
        import crc32c
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    original = record_writer.masked_crc32c
    if getattr(original, "__wrapped__", None) is not None:
        return True

    def masked_crc32c(data: bytes) -> int:
        crc = crc32c.crc32c(data)
        return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF

    masked_crc32c.__wrapped__ = original  # type: ignore[attr-defined]
    record_writer.masked_crc32c = masked_crc32c
    return True
