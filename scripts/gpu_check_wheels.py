"""The wheels `scripts/gpu_check.sh` brings to an offline GPU machine.

    python scripts/gpu_check_wheels.py fetch   [--list FILE] [--wheels DIR]   # needs a network
    python scripts/gpu_check_wheels.py check   [--list FILE] [--wheels DIR] [--require] [--json]

`check` (run by gpu_check.sh, also in its --dry-run): every line of the list is `name==version`
and pinned the same in requirements/py312.txt; with `--require`, or whenever DIR exists, each has
exactly one wheel in DIR built for CPython 3.12 on x86-64 Linux, and all of them fit what travels
with a working tree to the device machine. Errors are one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / "requirements" / "py312.txt"
MAX_BYTES = 48 * 2**20  # of the 64 MiB that travel, leave room for the working tree itself
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")  # fmt: skip


class WheelError(Exception):
    """One line for the user: what, where, how to fix."""


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "_", text).lower()


def read_pins(path: Path, *, strict: bool = True) -> dict[str, str]:
    """`name==version` lines (comments and blank lines ignored) -> {normalized name: version};
    `strict=False` skips other lines (unpinned requirements)."""
    pins = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.!+]+)", line)
        if match is None and not strict:
            continue
        if match is None:
            raise WheelError(f"line {number} is not name==version ({path}): pin it, e.g. "
                             "megatron-core==0.19.2")  # fmt: skip
        pins[_name(match.group(1))] = match.group(2)
    return pins


def check_pins(wanted: dict[str, str], list_path: Path) -> None:
    tested = read_pins(PINS, strict=False) if PINS.exists() else {}
    for name, version in wanted.items():
        if tested.get(name) != version:
            raise WheelError(
                f"{name}=={version} is not the tested pin ({list_path}): use "
                f"{name}=={tested.get(name, '<pin it in requirements/py312.txt>')}"
            )


def _fits(path: Path) -> bool:
    """A wheel built for CPython 3.12 on x86-64 Linux (or pure Python)."""
    tags = path.name[: -len(".whl")].split("-")[-3:]
    python, _abi, platform = tags
    pure = platform == "any" and python.startswith("py3")
    return pure or ("cp312" in python and "x86_64" in platform and "linux" in platform)


def find_wheels(wanted: dict[str, str], folder: Path) -> dict[str, Path | None]:
    found: dict[str, Path | None] = {}
    for name, version in wanted.items():
        matches = sorted(folder.glob(f"{name}-*.whl")) if folder.is_dir() else []
        if len(matches) > 1:
            raise WheelError(f"{len(matches)} wheels of {name} ({folder}): keep one version, "
                             f"{name}-{version}")  # fmt: skip
        if matches and matches[0].name.split("-")[1] != version:
            raise WheelError(f"{matches[0].name} is not {name}=={version} ({folder}): "
                             "fetch again with scripts/gpu_check_wheels.py fetch")  # fmt: skip
        if matches and not _fits(matches[0]):
            raise WheelError(f"{matches[0].name} is not for CPython 3.12 on x86-64 Linux "
                             f"({folder}): fetch again with scripts/gpu_check_wheels.py fetch")  # fmt: skip
        found[name] = matches[0] if matches else None
    return found


def check(args: argparse.Namespace) -> dict:
    wanted = read_pins(args.list)
    if not wanted:
        raise WheelError(f"no wheels listed ({args.list}): list at least megatron-core==0.19.2")
    check_pins(wanted, args.list)
    found = find_wheels(wanted, args.wheels)
    missing = [name for name, path in found.items() if path is None]
    if missing and (args.require or args.wheels.is_dir()):
        raise WheelError(f"no wheel of {', '.join(missing)} ({args.wheels}): run "
                         "scripts/gpu_check_wheels.py fetch where pip has a network")  # fmt: skip
    size = sum(path.stat().st_size for path in found.values() if path is not None)
    if size > MAX_BYTES:
        raise WheelError(f"the wheels take {size / 2**20:.1f} MiB ({args.wheels}): at most "
                         f"{MAX_BYTES // 2**20} MiB travel with the tree; drop one")  # fmt: skip
    return {"list": str(args.list), "folder": str(args.wheels), "total_bytes": size,
            "wheels": [{"name": n, "version": wanted[n], "file": p.name if p else None}
                       for n, p in found.items()]}  # fmt: skip


def fetch(args: argparse.Namespace) -> dict:
    wanted = read_pins(args.list)
    check_pins(wanted, args.list)
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    for name, version in wanted.items():
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                   "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                   *platforms, "-d", str(args.wheels), f"{name}=={version}"]  # fmt: skip
        if subprocess.run(command).returncode != 0:
            raise WheelError(f"pip could not download {name}=={version} ({args.wheels}): "
                             "check the network and the pin")  # fmt: skip
    return check(argparse.Namespace(**{**vars(args), "require": True}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("check", "fetch"))
    parser.add_argument("--list", type=Path, default=ROOT / "scripts" / "gpu_check_wheels.txt")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    parser.add_argument("--require", action="store_true", help="every listed wheel must be there")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        if not args.list.is_file():
            raise WheelError(f"no wheel list ({args.list}): pass --list FILE")
        result = (fetch if args.command == "fetch" else check)(args)
    except WheelError as error:
        print(f"megatron-gate gpu-check: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else f"wheels: {len(result['wheels'])} ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
