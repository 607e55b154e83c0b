"""The page: one HTML template, its script and style, and plotly.js from the installed plotly.

Served live, the template links the files below; exported, it inlines them and the data, so the
file opens with no server and no network.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any


def _plotly_js() -> Path:
    """plotly.min.js as shipped in the plotly Python package (found without importing plotly)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the page needs plotly's JavaScript (package plotly): pip install 'plotly>=5.20'"
        )
    return Path(spec.origin).parent / "package_data" / "plotly.min.js"


_STATIC = Path(__file__).parent / "static"
STATIC_FILES: dict[str, Path] = {
    "plotly.min.js": _plotly_js(),
    "dashboard.js": _STATIC / "dashboard.js",
    "dashboard.css": _STATIC / "dashboard.css",
}


def _inline_script(text: str) -> str:
    # "</script" inside an inline script would end it early; "<\/" means the same in JS strings.
    return "<script>" + text.replace("</script", "<\\/script") + "</script>"


def render_page(*, data: dict[str, Any] | None = None) -> str:
    """The live page (files linked), or with `data` the self-contained export (all inlined)."""
    template = (_STATIC / "index.html").read_text()
    if data is None:
        parts = {
            "STYLE": '<link rel="stylesheet" href="static/dashboard.css">',
            "PLOTLY": '<script src="static/plotly.min.js"></script>',
            "DATA": "",
            "SCRIPT": '<script src="static/dashboard.js"></script>',
        }
    else:
        payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
        parts = {
            "STYLE": "<style>" + STATIC_FILES["dashboard.css"].read_text() + "</style>",
            "PLOTLY": _inline_script(STATIC_FILES["plotly.min.js"].read_text()),
            "DATA": _inline_script(f"window.DASHBOARD_DATA = {payload};"),
            "SCRIPT": _inline_script(STATIC_FILES["dashboard.js"].read_text()),
        }
    for key, value in parts.items():
        template = template.replace("{{" + key + "}}", value)
    return template
