"""`megatron-gate dashboard`: bad input refused before any work, the export, the live command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from megatron_gate.cli import main
from megatron_gate.dashboard.synthetic import SyntheticRun, write_run


@pytest.mark.parametrize(
    "extra, message",
    [
        (["{missing}"], "does not exist"),
        (["{file}"], "is not a directory"),
        (["{run}", "--port", "70000"], "port is out of range (--port 70000)"),
        (["{run}", "--stale-after", "nan"], "(--stale-after nan)"),
        (["{run}", "--stale-after", "-1"], "(--stale-after -1.0)"),
        (["{run}", "--export", "{tmp}"], "is a directory"),
        (["{run}", "--export", "{tmp}/no/such/dir/r.html"], "does not exist"),
        (["{empty}", "--export", "{tmp}/r.html"], "nothing to export"),
    ],
)
def test_bad_input_is_refused(
    tmp_path: Path,
    two_runs: list[Path],
    capsys: pytest.CaptureFixture,
    extra: list[str],
    message: str,
) -> None:
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    names = {
        "missing": tmp_path / "missing",
        "file": tmp_path / "file.txt",
        "run": two_runs[0],
        "tmp": tmp_path,
        "empty": tmp_path / "empty",
    }
    argv = ["dashboard", *(a.format(**names) for a in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("megatron-gate dashboard: error: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()


class _ExternalRefs(HTMLParser):
    """Collects src/href attributes that would need the network."""

    def __init__(self) -> None:
        super().__init__()
        self.external: list[str] = []
        self.scripts_with_src: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                if tag == "script":
                    self.scripts_with_src.append(value)
                if value.startswith(("http:", "https:", "//")):
                    self.external.append(value)


def test_export_is_self_contained(tmp_path: Path, two_runs: list[Path]) -> None:
    bad = two_runs[0] / "stability.jsonl"
    with open(bad, "a") as f:
        f.write("{not json\n")
    out = tmp_path / "report.html"
    assert main(["dashboard", str(tmp_path / "runs"), "--export", str(out)]) == 0
    html = out.read_text()
    refs = _ExternalRefs()
    refs.feed(html)
    assert refs.external == [] and refs.scripts_with_src == []
    assert "Plotly" in html and "window.DASHBOARD_DATA" in html
    payload = html.split("window.DASHBOARD_DATA = ", 1)[1].split(";</script>", 1)[0]
    data = json.loads(payload)
    assert [r["name"] for r in data["runs"]] == ["baseline", "gated"]
    assert [r["skipped_lines"] for r in data["status"]["runs"]] == [1, 0]
    assert max(data["runs"][0]["scalars"]["loss"]["x"]) == 300
    assert not list(tmp_path.glob(".report.html.*"))  # no temp file left behind


def test_live_command_serves_on_loopback(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "live", steps=20, run=SyntheticRun(num_layers=2)).parent
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "megatron_gate.cli", "dashboard", str(run_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = process.stdout.readline()
        assert "http://127.0.0.1:" in line, line + process.stderr.read()
        url = line.split(" at ", 1)[1].split()[0]
        deadline = time.time() + 10
        while True:
            with urllib.request.urlopen(url + "api/status", timeout=5) as response:
                runs = json.load(response)["runs"]
            if runs[0]["last_step"] == 20 or time.time() > deadline:
                break
            time.sleep(0.2)
        assert runs[0]["name"] == "live" and runs[0]["last_step"] == 20
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        process.stdout.close()
        process.stderr.close()


def test_missing_plotly_is_one_line(
    tmp_path: Path, two_runs: list[Path], capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    import megatron_gate.dashboard as package

    monkeypatch.setitem(sys.modules, "plotly", None)  # as if plotly were not installed
    monkeypatch.delitem(sys.modules, "megatron_gate.dashboard.page")
    monkeypatch.delattr(package, "page")
    out = tmp_path / "r.html"
    assert main(["dashboard", str(two_runs[0]), "--export", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-gate dashboard: error: ") and "pip install" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
