"""The HTTP server: its API, loopback by default, and nothing served outside the run directories."""

from __future__ import annotations

import gzip
import http.client
import json
from pathlib import Path

import pytest

from megatron_gate.cli import build_parser


def _get(server, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """GET `path` exactly as given (http.client does not normalise `..`)."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    if response.getheader("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return response.status, dict(response.getheaders()), body


def test_api_status_and_view(serve, two_runs: list[Path]) -> None:
    server = serve(two_runs)
    status, _, body = _get(server, "/api/status")
    assert status == 200
    runs = json.loads(body)["runs"]
    assert [r["name"] for r in runs] == ["baseline", "gated"]
    assert [r["last_step"] for r in runs] == [300, 300]
    status, headers, body = _get(
        server, "/api/view?points=100&heatmap=30&start=50&end=240", {"Accept-Encoding": "gzip"}
    )
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    view = json.loads(body)
    baseline = view["runs"][0]
    assert len(baseline["scalars"]["loss"]["x"]) <= 100
    assert (
        min(baseline["scalars"]["loss"]["x"]) >= 50 and max(baseline["scalars"]["loss"]["x"]) <= 240
    )
    assert [e["step"] for e in baseline["events"]] == [120]
    assert len(baseline["heatmaps"]["max_abs_residual"]["z"]) == 6
    assert "gate_sparsity" not in baseline["heatmaps"]  # the baseline has no gates
    assert _get(server, "/api/view?points=abc")[0] == 400


def test_page_and_static_files(serve, two_runs: list[Path]) -> None:
    server = serve(two_runs)
    status, headers, page = _get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'src="static/plotly.min.js"' in page and b"{{" not in page
    status, _, plotly_js = _get(server, "/static/plotly.min.js")
    assert status == 200 and len(plotly_js) > 1_000_000
    assert _get(server, "/static/dashboard.js")[0] == 200


PROBES = [
    "/runs/baseline/stability.jsonl",  # the old file route: the page never needed it
    "/runs/baseline/../../../../../../etc/passwd",
    "/runs/baseline/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/runs/baseline/checkpoint.pt",
    "/runs/baseline/.secret",
    "/static/../cli.py",
    "/static/%2e%2e/cli.py",
    "/static/index.html",
    "/static/index.html/../../cli.py",
    "/static/plotly.min.js%00.png",
    "/../../../../etc/passwd",
    "/api/../static/dashboard.js",
    "/" + "a" * 10_000,
]


def test_only_the_page_and_its_api_are_served(serve, two_runs: list[Path]) -> None:
    (two_runs[0] / "checkpoint.pt").write_bytes(b"weights" * 100)
    (two_runs[0] / ".secret").write_text("do not serve me")
    server = serve(two_runs)
    for path in PROBES:
        status, _, body = _get(server, path)
        assert status in (400, 404, 414), path
        assert b"root:" not in body and b"do not serve me" not in body and b"weights" not in body
        assert b"import" not in body, path
        if status == 404:
            assert json.loads(body)["error"].startswith("not found"), path


def test_plotly_is_streamed_or_gzipped(serve, two_runs: list[Path]) -> None:
    server = serve(two_runs)
    status, headers, plain = _get(server, "/static/plotly.min.js")
    assert status == 200 and "Content-Encoding" not in headers
    assert int(headers["Content-Length"]) == len(plain) > 1_000_000
    _, headers, unzipped = _get(server, "/static/plotly.min.js", {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip" and int(headers["Content-Length"]) < len(plain)
    assert unzipped == plain


def test_server_errors_answer_with_their_message(
    serve, two_runs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(two_runs)
    status, _, body = _get(server, "/api/view?start=nan")
    assert status == 400 and "start must be a finite number" in json.loads(body)["error"]

    def broken_view(self, **_window):  # an I/O failure while the view is built
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(type(server.dashboard.stores["baseline"]), "view", broken_view)
    status, _, body = _get(server, "/api/view")
    assert status == 500 and "Input/output error" in json.loads(body)["error"]
    assert _get(server, "/api/status")[0] == 200  # the server keeps answering


def test_loopback_by_default_and_host_header_checked(serve, two_runs: list[Path]) -> None:
    args = build_parser("dashboard").parse_args(["dashboard", str(two_runs[0])])
    assert args.host == "127.0.0.1"
    server = serve(two_runs)
    assert server.server_address[0] == "127.0.0.1"
    # DNS rebinding: a page from evil.example whose name resolves to 127.0.0.1 is refused.
    assert _get(server, "/api/status", {"Host": "evil.example:8765"})[0] == 403
    assert _get(server, "/api/status", {"Host": f"localhost:{server.server_address[1]}"})[0] == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_only_get(serve, two_runs: list[Path], method: str) -> None:
    server = serve(two_runs)
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    connection.request(method, "/api/status", body=b"x")
    assert connection.getresponse().status == 501
    connection.close()
