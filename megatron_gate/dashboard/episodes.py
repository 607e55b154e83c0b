"""The events table's rows: one per episode, not one per record.

The monitor writes an episode as several `event` records (schema: phase "open" with the
action, "update" for a divergence or a further step to skip, "close" with the final kind,
peak and duration). The page reads better with one row per episode: what happened (kind,
metric, layer), when it started and how long it lasted, its peak against the threshold it
crossed, what the monitor did, and the signals it was seen in, most severe first. The raw
records stay one click away (`records`).

Input: the store's event views (sanitised, episode fields among their `details`) and each
record's raw JSON text, in step order.
"""

from __future__ import annotations

from typing import Any

from megatron_gate.monitor.schema import SEVERITIES

_SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}


def _key(view: dict[str, Any], index: int) -> tuple:
    """Records of one episode share detector, metric, layer and start step; a record without
    episode fields (an older monitor) is an episode of its own."""
    start = view["details"].get("start_step")
    if not isinstance(start, int):
        return ("record", index)
    return (view["detector"], view["metric"], view["layer"], start)


def _new_row(view: dict[str, Any]) -> dict[str, Any]:
    start = view["details"].get("start_step")
    return {
        "severity": view["severity"],
        "detector": view["detector"],
        "metric": view["metric"],
        "layer": view["layer"],
        "kind": view["details"].get("kind") or view.get("kind"),
        "start_step": start if isinstance(start, int) else view["step"],
        "detected_step": view["step"],
        "end_step": None,
        "duration": 1,
        "finished": not isinstance(start, int),  # a lone record: a one-step alarm
        "peak": None,
        "threshold": view["threshold"],
        "actions": [],
        "signals": [],
        "message": view["message"],
        "records": [],
    }


def _absorb(row: dict[str, Any], view: dict[str, Any], raw: str) -> None:
    """Fold one record into its episode's row (records arrive in step order)."""
    details = view["details"]
    if _SEVERITY_RANK.get(view["severity"], -1) > _SEVERITY_RANK.get(row["severity"], -1):
        row["severity"] = view["severity"]
    row["kind"] = details.get("kind") or row["kind"]
    if isinstance(details.get("duration"), int):
        row["duration"] = details["duration"]
    end = details.get("end_step")
    if end is not None or details.get("phase") == "close":
        row["finished"], row["end_step"] = True, end if end is not None else view["step"]
        if not isinstance(details.get("duration"), int) and isinstance(end, int):
            row["duration"] = max(1, end - row["start_step"] + 1)  # an older monitor's record
    peak = details.get("peak", view["value"])
    if isinstance(peak, (int, float)) and not isinstance(peak, bool):
        row["peak"] = peak if row["peak"] is None else max(row["peak"], peak)
    if row["threshold"] is None:
        row["threshold"] = view["threshold"]
    action = view["action"] or "log"
    if details.get("phase") != "close" and action not in row["actions"]:
        row["actions"].append(action)
    for signal in _signals(details.get("signals")):
        if signal not in row["signals"]:
            row["signals"].append(signal)
    row["records"].append(raw)


def _signals(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def episode_rows(views: list[dict[str, Any]], raw: list[str]) -> list[dict[str, Any]]:
    """One row per episode, most severe first, then the latest start first."""
    rows: dict[tuple, dict[str, Any]] = {}
    for index, (view, text) in enumerate(zip(views, raw, strict=True)):
        row = rows.setdefault(_key(view, index), _new_row(view))
        _absorb(row, view, text)
    for row in rows.values():
        if row["actions"] != ["log"]:
            row["actions"] = [a for a in row["actions"] if a != "log"] or ["log"]
    return sorted(
        rows.values(),
        key=lambda r: (-_SEVERITY_RANK.get(r["severity"], -1), -r["start_step"]),
    )
