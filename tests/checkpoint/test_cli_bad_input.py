"""`convert`, `reshard`, `retrofit` given bad input: exit 2, one error line, nothing written.

One case per class of bad input and its siblings (damaged files, wrongly typed or inconsistent
configs, index files, layouts, output locations). Inputs are written with the package's own
writers from random tensors, then damaged; every case runs the console command through
`megatron_gate.cli.main` and checks the exit code, the single error line (no traceback), that
the output folder stays empty and the input is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from error_checks import assert_one_error_line, listing, read_only_folder, small_disk

from megatron_gate.checkpoint import hf_qwen3_next
from megatron_gate.checkpoint.convert import write_hf_dir, write_megatron
from megatron_gate.checkpoint.model import GptShape, expected_full_shapes
from megatron_gate.cli import main

SHAPE = GptShape(
    num_layers=2,
    hidden_size=32,
    ffn_hidden_size=48,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=8,
    vocab_size=64,
    qk_layernorm=True,
)


def _random(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {key: torch.randn(size, generator=generator) for key, size in shapes.items()}


def _hf(root: Path, *, config: dict | None = None, extra: dict | None = None) -> Path:
    tensors = {**_random(hf_qwen3_next.expected_hf_shapes(SHAPE)), **(extra or {})}
    path = write_hf_dir(root / "hf", hf_qwen3_next.config_from_shape(SHAPE), tensors, force=False)
    if config is not None:
        merged = {**json.loads((path / "config.json").read_text()), **config}
        (path / "config.json").write_text(json.dumps(merged))
    return path


def _edit_config(root: Path, text: str | bytes) -> Path:
    path = _hf(root)
    target = path / "config.json"
    target.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _sharded(root: Path, index: object) -> Path:
    path = _hf(root)
    (path / "model.safetensors").rename(path / "shard-1.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def _truncated(root: Path) -> Path:
    path = _hf(root)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    return path


def _megatron(root: Path) -> Path:
    return write_megatron(root / "meg.pt", SHAPE, _random(expected_full_shapes(SHAPE)), force=False)


def _model_config(root: Path, text: str) -> Path:
    (root / "shape.json").write_text(text)
    return root / "shape.json"


Case = Callable[[Path], tuple[list[str], tuple[str, ...]]]
HF = ["convert", "--from", "hf", "--to", "megatron"]
TO_HF = ["convert", "--from", "megatron", "--to", "hf"]

CASES: dict[str, Case] = {
    "truncated safetensors": lambda r: (
        [*HF, str(_truncated(r))],
        ("safetensors file cannot be read", "model.safetensors"),
    ),
    "config not JSON": lambda r: ([*HF, str(_edit_config(r, "{"))], ("not valid UTF-8 JSON",)),
    "config not UTF-8": lambda r: (
        [*HF, str(_edit_config(r, b'{"a": "\xff"}'))],
        ("not valid UTF-8 JSON",),
    ),
    "config a list": lambda r: ([*HF, str(_edit_config(r, "[1, 2]"))], ("not a JSON object",)),
    "config layers a string": lambda r: (
        [*HF, str(_hf(r, config={"num_hidden_layers": "2"}))],
        ("num_hidden_layers='2' is not a positive integer",),
    ),
    "config heads a float": lambda r: (
        [*HF, str(_hf(r, config={"num_attention_heads": 4.0}))],
        ("num_attention_heads=4.0",),
    ),
    "config rope a string": lambda r: (
        [*HF, str(_hf(r, config={"rope_parameters": "fast"}))],
        ("config.json is malformed",),
    ),
    "config layer_types a number": lambda r: (
        [*HF, str(_hf(r, config={"layer_types": 5}))],
        ("config.json is malformed",),
    ),
    "config lacks hidden_size": lambda r: (
        [*HF, str(_hf(r, config={"hidden_size": None}))],
        ("lacks hidden_size",),
    ),
    "config declares fewer layers": lambda r: (
        [*HF, str(_hf(r, config={"num_hidden_layers": 1}))],
        ("unexpected tensor model.layers.1.", "11 unexpected"),
    ),
    "unknown extra tensor": lambda r: (
        [*HF, str(_hf(r, extra={"model.visual.proj.weight": torch.zeros(2, 2)}))],
        ("unexpected tensor model.visual.proj.weight",),
    ),
    "key/value heads 0": lambda r: (
        [*HF, str(_hf(r, config={"num_key_value_heads": 0}))],
        ("num_key_value_heads=0",),
    ),
    "index without weight_map": lambda r: (
        [*HF, str(_sharded(r, {"metadata": {}}))],
        ("no weight_map",),
    ),
    "index naming a missing shard": lambda r: (
        [
            *HF,
            str(
                _sharded(
                    r, {"weight_map": {"a": "shard-1.safetensors", "b": "shard-2.safetensors"}}
                )
            ),
        ],
        ("shard-2.safetensors", "missing"),
    ),  # fmt: skip
    "index shard outside the folder": lambda r: (
        [*HF, str(_sharded(r, {"weight_map": {"a": "../shard-1.safetensors"}}))],
        ("outside the model directory",),
    ),
    "index not an object": lambda r: ([*HF, str(_sharded(r, ["x"]))], ("not a JSON object",)),
    "model-config not JSON": lambda r: (
        [*TO_HF, str(_megatron(r)), "--model-config", str(_model_config(r, "{oops"))],
        ("not valid UTF-8 JSON", "shape.json"),
    ),
    "model-config query groups 0": lambda r: (
        [
            *TO_HF,
            str(_megatron(r)),
            "--model-config",
            str(_model_config(r, json.dumps({**SHAPE.to_dict(), "num_query_groups": 0}))),
        ],
        ("num_query_groups=0", "out of range"),
    ),  # fmt: skip
    "model-config layers a string": lambda r: (
        [
            *TO_HF,
            str(_megatron(r)),
            "--model-config",
            str(_model_config(r, json.dumps({**SHAPE.to_dict(), "num_layers": "2"}))),
        ],
        ("num_layers='2' is not a int",),
    ),  # fmt: skip
    "model-config rotary_percent 2": lambda r: (
        [
            *TO_HF,
            str(_megatron(r)),
            "--model-config",
            str(_model_config(r, json.dumps({**SHAPE.to_dict(), "rotary_percent": 2.0}))),
        ],
        ("rotary_percent=2.0",),
    ),  # fmt: skip
    "megatron input not a checkpoint": lambda r: (
        [*TO_HF, str(_model_config(r, "not a pickle"))],
        ("weights_only=True",),
    ),
    "check-tp 0": lambda r: (["reshard", str(_megatron(r)), "--check-tp", "0"], ("--check-tp 0",)),
    "check-tp -2": lambda r: (
        ["reshard", str(_megatron(r)), "--check-tp", "-2"],
        ("--check-tp -2",),
    ),
    "check-pp 0": lambda r: (["reshard", str(_megatron(r)), "--check-pp", "0"], ("--check-pp 0",)),
    "check layout too large": lambda r: (
        ["reshard", str(_megatron(r)), "--check-tp", "16", "--check-pp", "16"],
        ("256 processes",),
    ),
    "check-tp not dividing heads": lambda r: (
        ["reshard", str(_megatron(r)), "--check-tp", "3"],
        ("cannot be split",),
    ),
    "check-pp not dividing layers": lambda r: (
        ["reshard", str(_megatron(r)), "--check-tp", "1", "--check-pp", "3"],
        ("2 layers",),
    ),
    "check with a torch output": lambda r: (
        ["reshard", str(_megatron(r)), "--check-tp", "2", "--megatron-format", "torch"],
        ("torch_dist",),
    ),
    "retrofit of a gated model": lambda r: (["retrofit", str(_megatron(r))], ("already gated",)),
}


def _run(args: list[str], output: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `args` (command words, INPUT, flags) with `output` inserted after INPUT."""
    capsys.readouterr()
    after_input = len(HF) + 1 if args[0] == "convert" else 2
    return main([*args[:after_input], str(output), *args[after_input:]]), capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    args, fragments = CASES[case](inputs)
    before = {p: p.stat().st_mtime_ns for p in inputs.rglob("*")}
    code, err = _run(args, outputs / "result", capsys)
    assert code == 2, err
    assert_one_error_line(err, args[0], *fragments)
    assert listing(outputs) == [], "a refused command must not write anything"
    assert {p: p.stat().st_mtime_ns for p in inputs.rglob("*")} == before


def test_output_that_is_the_input_is_refused_even_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _megatron(tmp_path)
    content = source.read_bytes()
    for argv in (["reshard", str(source), str(source), "--force", "--megatron-format", "torch"],
                 ["retrofit", str(source), str(source), "--force"]):  # fmt: skip
        assert main(argv) == 2
        assert_one_error_line(capsys.readouterr().err, argv[0], "is the input")
    hf = _hf(tmp_path)
    assert main([*HF, str(hf), str(hf / "inside.pt"), "--force"]) == 2
    assert_one_error_line(capsys.readouterr().err, "convert", "inside it")
    assert source.read_bytes() == content


def test_missing_output_folder_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*HF, str(_hf(tmp_path)), str(tmp_path / "no" / "such" / "out.pt")]) == 2
    assert_one_error_line(capsys.readouterr().err, "convert", "does not exist")


def test_read_only_output_location_is_one_error_line(
    tmp_path: Path, read_only_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf = _hf(tmp_path)
    assert main([*HF, str(hf), str(read_only_folder / "out.pt")]) == 2
    assert_one_error_line(capsys.readouterr().err, "convert", "not writable", str(read_only_folder))


def test_disk_full_is_one_error_line_and_leaves_no_partial(
    tmp_path: Path, small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = SHAPE.replace(vocab_size=4096)  # ~1 MiB of embeddings: larger than the disk
    source = write_megatron(tmp_path / "big.pt", big, _random(expected_full_shapes(big)),
                            force=False)  # fmt: skip
    code = main(["reshard", str(source), str(small_disk / "out.pt"), "--megatron-format", "torch"])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, "reshard", "MiB are free", str(small_disk))
    assert listing(small_disk) == []


@pytest.mark.parametrize("writer", ["torch.save", "plain write"])
def test_disk_filling_up_during_a_write_leaves_no_partial(small_disk: Path, writer: str) -> None:
    """The space check cannot foresee everything (other writers): the write itself fails."""
    from megatron_gate.checkpoint.safe_io import CheckpointError, atomic_output

    with (
        pytest.raises(CheckpointError, match="writing the output failed"),
        atomic_output(small_disk / "out.pt", force=False) as partial,
    ):
        if writer == "torch.save":
            torch.save(torch.zeros(200_000), partial)
        else:
            partial.write_bytes(b"x" * 1_000_000)
    assert listing(small_disk) == []


def test_unknown_flag_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["reshard", "a", "b", "--check-tp", "two"])
    assert exited.value.code == 2
    assert_one_error_line(capsys.readouterr().err, "reshard", "--check-tp", "--help")


def test_unexpected_error_is_one_line_with_the_debug_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from megatron_gate.checkpoint import convert_cli

    def broken(*_args: object, **_kwargs: object) -> Path:
        raise RuntimeError("something deep broke\nwith a second line")

    monkeypatch.setattr(convert_cli, "convert", broken)
    argv = [*HF, str(tmp_path / "in"), str(tmp_path / "out")]
    assert main(argv) == 1
    line = assert_one_error_line(capsys.readouterr().err, "convert", "RuntimeError")
    assert line.endswith("(rerun with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="something deep broke"):
        main([*argv, "--debug"])


__all__ = ["read_only_folder", "small_disk"]  # fixtures used above
