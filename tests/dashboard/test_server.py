"""The HTTP server: its API, loopback by default, and nothing served outside the run directories."""

from __future__ import annotations

import gzip
import http.client
import json
import os
from pathlib import Path

import pytest

from megatron_gate.cli import build_parser
from megatron_gate.dashboard.server import resolve_inside


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


TRAVERSALS = [
    "/runs/baseline/../../../../../../etc/passwd",
    "/runs/baseline/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/runs/baseline/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/runs/baseline//etc/passwd",
    "/runs/baseline/../gated/stability.jsonl",  # a sibling run, addressed through another
    "/runs/baseline/",
    "/runs/nosuchrun/stability.jsonl",
    "/runs/baseline/outside.txt",  # a symlink pointing out of the run directory
    "/runs/baseline/stability.jsonl%00.png",
    "/static/../cli.py",
    "/static/%2e%2e/cli.py",
    "/static/index.html/../../cli.py",
    "/../../../../etc/passwd",
]


def test_only_files_inside_run_directories_are_served(
    serve, two_runs: list[Path], tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve me")
    os.symlink(secret, two_runs[0] / "outside.txt")
    (two_runs[0] / "tb").mkdir()
    (two_runs[0] / "tb" / "notes.txt").write_text("inside the run")
    server = serve(two_runs)
    for path in TRAVERSALS:
        status, _, body = _get(server, path)
        assert status in (400, 403, 404), path
        assert b"root:" not in body and b"do not serve me" not in body and b"import" not in body, (
            path
        )
    status, _, body = _get(server, "/runs/baseline/stability.jsonl")
    assert status == 200 and body == (two_runs[0] / "stability.jsonl").read_bytes()
    assert _get(server, "/runs/baseline/tb/notes.txt")[2] == b"inside the run"


def test_resolve_inside(tmp_path: Path) -> None:
    (tmp_path / "run" / "sub").mkdir(parents=True)
    root = tmp_path / "run"
    assert resolve_inside(root, "sub/x.json") == (root / "sub" / "x.json").resolve()
    for bad in ("", "..", "../run2/x", "/etc/passwd", "sub/../../x", "a\x00b"):
        assert resolve_inside(root, bad) is None, bad


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
    connection.request(method, "/runs/baseline/stability.jsonl", body=b"x")
    assert connection.getresponse().status == 501
    connection.close()
