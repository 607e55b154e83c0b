"""The dashboard's HTTP server: the page, its three static files and a two-route JSON API.

Routes (GET only):
  /                      the page
  /static/NAME           the page's script and style, and plotly.min.js from the installed plotly
  /api/status            per-run summaries; the page polls this every ~2 s
  /api/view?start=&end=&points=&heatmap=
                         every run's records in [start, end], downsampled on the server
Nothing else is served: no file of a run directory is reachable (the page needs only the
summaries the server computes), so checkpoints and dotfiles beside the JSONL stay private.
Errors answer `{"error": message}`, which the page shows in a banner.

Why `http.server` and not Starlette/uvicorn or aiohttp: the viewer must start fast on a login
node with nothing but numpy and plotly's JavaScript installed; five fixed GET routes need no
router, and a threaded stdlib server serves the one or two browsers watching a run.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import logging
import math
import mimetypes
import shutil
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

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
        """Read every run's new records."""
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
        """Every run's summary, and the time its ages are measured to."""
        now = time.time()
        return {"time": now, "runs": [s.summary(now=now) for s in self.stores.values()]}

    def view(self, **window: Any) -> dict[str, Any]:
        """The status plus every run's downsampled records in the window (see `RunStore.view`)."""
        return {
            "status": self.status(),
            "window": {"start": window.get("start"), "end": window.get("end")},
            "runs": [s.view(**window) for s in self.stores.values()],
        }


def _number(query: dict[str, list[str]], key: str, *, default: float | None = None) -> float | None:
    values = query.get(key)
    if not values or values[0] in ("", "null"):
        return default
    value = float(values[0])  # ValueError -> 400
    if not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {values[0]!r}")
    return value


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
        path = url.path  # matched exactly: no decoding, so no `%2e%2e` tricks
        try:
            if path in ("/", "/index.html"):
                self._send(200, render_page().encode(), "text/html; charset=utf-8")
            elif path.startswith("/static/"):
                self._send_static(path.removeprefix("/static/"))
            elif path == "/api/status":
                self._send_json(self.server.dashboard.status())
            elif path == "/api/view":
                self._send_json(self.server.dashboard.view(**self._window(parse_qs(url.query))))
            else:
                self._send_error(404, f"not found: {path[:100]}")
        except ValueError as error:
            self._send_error(400, str(error))
        except Exception as error:  # the page shows the message; the server keeps serving
            log.exception("answering %s failed", path[:100])
            self._send_error(500, f"the dashboard server failed: {type(error).__name__}: {error}")

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
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            self._send(200, _gzip_static(file), _content_type(file), static=True, gzipped=True)
            return
        self._send_headers(200, _content_type(file), file.stat().st_size, static=True)
        with open(file, "rb") as f:  # streamed: plotly.min.js is 4.8 MB
            self._write(lambda out: shutil.copyfileobj(f, out))

    def _send_json(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        self._send(200, body, "application/json")

    def _send_error(self, code: int, message: str) -> None:
        self._send(code, json.dumps({"error": message}).encode(), "application/json")

    def _send(
        self,
        code: int,
        body: bytes,
        content_type: str,
        *,
        static: bool = False,
        gzipped: bool = False,
    ) -> None:
        if not gzipped and "gzip" in self.headers.get("Accept-Encoding", "") and len(body) > 1024:
            body, gzipped = gzip.compress(body, compresslevel=5), True
        self._send_headers(code, content_type, len(body), static=static, gzipped=gzipped)
        self._write(lambda out: out.write(body))

    def _send_headers(
        self, code: int, content_type: str, length: int, *, static: bool, gzipped: bool = False
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "max-age=3600" if static else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()

    def _write(self, send: Any) -> None:
        try:
            send(self.wfile)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client went away before %s was sent", self.path[:100])

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base class's name)
        log.debug("%s " + format, self.address_string(), *args)


@functools.lru_cache(maxsize=len(STATIC_FILES))
def _gzip_static(file: Path) -> bytes:
    """A package file, compressed once per server (plotly.min.js: 4.8 MB -> 1.4 MB)."""
    return gzip.compress(file.read_bytes(), compresslevel=9)


def _content_type(file: Path) -> str:
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
