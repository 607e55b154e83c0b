"""No code from a file: the package never unpickles without `weights_only=True` or an allow-list.

Scans every module of `megatron_gate` (its AST, so comments and strings do not count) for calls
that can run pickled code: `pickle.load(s)`, `torch.load` without `weights_only=True`,
`yaml.load` / `yaml.unsafe_load` / a non-safe `Loader`, `marshal.load(s)`, `dill`, `cloudpickle`,
`numpy.load(..., allow_pickle=True)`. `ALLOWED` lists the few reviewed exceptions with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import megatron_gate

PACKAGE = Path(megatron_gate.__file__).parent
ALLOWED = {
    ("distributed.py", "pickle.loads"): "results of this process's own spawned workers (IPC)",
}
UNSAFE_MODULES = {"pickle": {"load", "loads", "Unpickler"}, "marshal": {"load", "loads"},
                  "dill": {"load", "loads"}, "cloudpickle": {"load", "loads"}}  # fmt: skip


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return "?"


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _unsafe(name: str, call: ast.Call) -> bool:
    module, _, attr = name.rpartition(".")
    base = module.split(".")[-1]
    if base in UNSAFE_MODULES:
        return attr in UNSAFE_MODULES[base]
    if name == "torch.load":
        return not _is_true(_keyword(call, "weights_only"))
    if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
        return True
    if name == "yaml.load":
        loader = _keyword(call, "Loader")
        return loader is None or "Safe" not in _name(loader)
    if name.endswith(("np.load", "numpy.load")):
        return _is_true(_keyword(call, "allow_pickle"))
    return False


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, call) of every call in `source` that may unpickle code."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in UNSAFE_MODULES:
            for alias in node.names:
                if alias.name in UNSAFE_MODULES[node.module]:
                    found.append((node.lineno, f"{node.module}.{alias.name}"))
        elif isinstance(node, ast.Call) and _unsafe(_name(node.func), node):
            found.append((node.lineno, _name(node.func)))
    return found


def test_the_scanner_finds_each_kind_of_unsafe_call() -> None:
    source = "\n".join([
        "import pickle, torch, yaml, marshal", "from pickle import loads",
        "pickle.load(f)", "torch.load(p)", "torch.load(p, weights_only=False)",
        "torch.load(p, weights_only=True)", "yaml.load(s)", "yaml.load(s, Loader=yaml.SafeLoader)",
        "yaml.unsafe_load(s)", "marshal.loads(b)", "np.load(p, allow_pickle=True)", "np.load(p)",
    ])  # fmt: skip
    assert [call for _, call in unsafe_calls(source)] == [
        "pickle.loads", "pickle.load", "torch.load", "torch.load", "yaml.load",
        "yaml.unsafe_load", "marshal.loads", "np.load",
    ]  # fmt: skip


def test_package_unpickles_nothing_from_files() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, call in unsafe_calls(path.read_text()):
            if (path.name, call) not in ALLOWED:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {call}")
    assert not problems, "unsafe loads (use weights_only=True or an allow-list):\n" + "\n".join(
        problems
    )
