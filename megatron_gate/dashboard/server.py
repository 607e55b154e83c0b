"""The dashboard's HTTP server: the page, its scripts, a JSON API, and the runs' own files.

Routes (GET only):
  /                      the page
  /static/NAME           the page's script and style, and plotly.min.js from the installed plotly
  /api/status            per-run summaries; the page polls this every ~2 s
  /api/view?start=&end=&points=&heatmap=
                         every run's records in [start, end], downsampled on the server
  /runs/RUN/PATH         a file inside that run's directory (e.g. its stability.jsonl)
Nothing outside the run directories and the package's static files is ever served.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import logging
import mimetypes
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from megatron_gate.dashboard.page import STATIC_FILES, render_page
from megatron_gate.dashboard.store import RunStore

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # how often the server reads new JSONL lines
MAX_POINTS = 5000  # upper bounds on what a request may ask for
MAX_HEATMAP_BUCKETS = 2000
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}


class Dashboard:
    """The run stores plus a thread that keeps reading their JSONL files."""

    def __init__(self, stores: Sequence[RunStore], *, poll_seconds: float = POLL_SECONDS) -> None:
        names = [s.name for s in stores]
        if len(set(names)) != len(names):
            raise ValueError(f"run names must be unique, got {names}")
        self.stores = {s.name: s for s in stores}
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="dashboard-poll", daemon=True)

    def start_polling(self) -> None:
        """Read the runs in the background (first at once), so the page answers while a large
        run is still being read."""
        self._thread.start()

    def stop_polling(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def refresh(self) -> None:
        for store in self.stores.values():
            store.refresh()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # a reading error must not end the live page
                log.exception("reading the runs failed; retrying")
            self._stop.wait(self.poll_seconds)

    def status(self) -> dict[str, Any]:
        return {"time": time.time(), "runs": [s.summary() for s in self.stores.values()]}

    def view(self, **window: Any) -> dict[str, Any]:
        return {
            "status": self.status(),
            "window": {"start": window.get("start"), "end": window.get("end")},
            "runs": [s.view(**window) for s in self.stores.values()],
        }


def _number(query: dict[str, list[str]], key: str, *, default: float | None = None) -> float | None:
    values = query.get(key)
    if not values or values[0] in ("", "null"):
        return default
    return float(values[0])  # ValueError -> 400


class DashboardHandler(http.server.BaseHTTPRequestHandler):
    """Answers one request; `dashboard` and `loopback_only` are set on the server."""

    server: DashboardHTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.server.loopback_only and not self._host_is_loopback():
            # A loopback-bound server must not answer pages served from other sites that point
            # a DNS name at 127.0.0.1 (DNS rebinding).
            self._send_error(403, "Host header is not a loopback name")
            return
        url = urlsplit(self.path)
        path = unquote(url.path)
        try:
            if path in ("/", "/index.html"):
                self._send(200, render_page().encode(), "text/html; charset=utf-8")
            elif path.startswith("/static/"):
                self._send_static(path.removeprefix("/static/"))
            elif path == "/api/status":
                self._send_json(self.server.dashboard.status())
            elif path == "/api/view":
                self._send_json(self.server.dashboard.view(**self._window(parse_qs(url.query))))
            elif path.startswith("/runs/"):
                self._send_run_file(path.removeprefix("/runs/"))
            else:
                self._send_error(404, "not found")
        except ValueError as error:
            self._send_error(400, str(error))

    def _window(self, query: dict[str, list[str]]) -> dict[str, Any]:
        points = _number(query, "points", default=1000)
        heatmap = _number(query, "heatmap", default=400)
        return {
            "start": _number(query, "start"),
            "end": _number(query, "end"),
            "points": int(min(max(points, 10), MAX_POINTS)),
            "heatmap_buckets": int(min(max(heatmap, 10), MAX_HEATMAP_BUCKETS)),
        }

    def _host_is_loopback(self) -> bool:
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in _LOOPBACK_NAMES

    def _send_static(self, name: str) -> None:
        file = STATIC_FILES.get(name)
        if file is None:
            self._send_error(404, "not found")
            return
        self._send(200, file.read_bytes(), _content_type(file), static=True)

    def _send_run_file(self, rest: str) -> None:
        run_name, _, relative = rest.partition("/")
        store = self.server.dashboard.stores.get(run_name)
        file = resolve_inside(store.run_dir, relative) if store else None
        if file is None or not file.is_file():
            self._send_error(404, "not found")
            return
        self._send(200, file.read_bytes(), _content_type(file))

    def _send_json(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        self._send(200, body, "application/json")

    def _send_error(self, code: int, message: str) -> None:
        self._send(code, json.dumps({"error": message}).encode(), "application/json")

    def _send(self, code: int, body: bytes, content_type: str, *, static: bool = False) -> None:
        gzipped = "gzip" in self.headers.get("Accept-Encoding", "") and len(body) > 1024
        if gzipped:
            # plotly.min.js is 4.8 MB: compress the package's static files once per server.
            body = _gzip_static(body) if static else gzip.compress(body, compresslevel=5)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if static else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client went away before %s was sent", self.path)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base class's name)
        log.debug("%s " + format, self.address_string(), *args)


@functools.lru_cache(maxsize=8)
def _gzip_static(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=9)


def resolve_inside(root: Path, relative: str) -> Path | None:
    """`root/relative` when that path (symlinks resolved) lies inside `root`, else None."""
    if not relative or "\x00" in relative:
        return None
    base = root.resolve()
    candidate = (base / relative).resolve()
    return candidate if candidate.is_relative_to(base) and candidate != base else None


def _content_type(file: Path) -> str:
    if file.suffix == ".jsonl":
        return "application/x-ndjson"
    guessed = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return guessed + (
        "; charset=utf-8" if guessed.startswith("text/") or guessed.endswith("javascript") else ""
    )


class DashboardHTTPServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP server bound to `host:port` that serves one `Dashboard`."""

    daemon_threads = True

    def __init__(self, dashboard: Dashboard, *, host: str = "127.0.0.1", port: int = 0) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), DashboardHandler)
        self.dashboard = dashboard
        self.loopback_only = host in _LOOPBACK_NAMES

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"
