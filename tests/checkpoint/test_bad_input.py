"""Bad checkpoints and bad requests: clear errors, nothing written, no overwrite without --force.

Checkpoints are written with the package's own writers from random tensors of the right (or
deliberately wrong) shapes; the console command is driven through `megatron_gate.cli.main`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_gate.checkpoint import hf_qwen3_next
from megatron_gate.checkpoint.convert import convert, read_megatron, write_hf_dir, write_megatron
from megatron_gate.checkpoint.model import GptShape, expected_full_shapes
from megatron_gate.checkpoint.safe_io import CheckpointError, load_torch, save_torch
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
    rotary_percent=0.5,
)


def _random(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(size, generator=generator) for key, size in shapes.items()}


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    tensors = _random(hf_qwen3_next.expected_hf_shapes(SHAPE))
    return write_hf_dir(
        tmp_path / "hf", hf_qwen3_next.config_from_shape(SHAPE), tensors, force=False
    )


def _listing(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_wrong_tensor_shape_names_tensor_expected_and_found(hf_dir: Path, tmp_path: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    tensors = _random(hf_qwen3_next.expected_hf_shapes(SHAPE))
    tensors["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(40, 32)
    bad = write_hf_dir(tmp_path / "bad", config, tensors, force=False)
    before = _listing(tmp_path)
    with pytest.raises(CheckpointError) as error:
        convert(bad, tmp_path / "out.pt", from_format="hf", to_format="megatron")
    message = str(error.value)
    assert "model.layers.1.self_attn.q_proj.weight" in message
    assert "[40, 32]" in message and "[64, 32]" in message
    assert _listing(tmp_path) == before  # nothing written, no temporary left


def test_missing_tensor_is_named(hf_dir: Path, tmp_path: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    tensors = _random(hf_qwen3_next.expected_hf_shapes(SHAPE))
    del tensors["model.layers.0.mlp.up_proj.weight"]
    bad = write_hf_dir(tmp_path / "bad", config, tensors, force=False)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight is missing"):
        convert(bad, tmp_path / "out.pt", from_format="hf", to_format="megatron")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"layer_types": ["linear_attention", "full_attention"]},
            "layers \\[0\\] are 'linear_attention'",
        ),
        ({"num_experts": 8, "mlp_only_layers": [0]}, "layers \\[1\\] are MoE"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope type 'yarn'"),
    ],
)
def test_unsupported_config_is_refused(
    hf_dir: Path, tmp_path: Path, change: dict, message: str
) -> None:
    config = {**json.loads((hf_dir / "config.json").read_text()), **change}
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        convert(hf_dir, tmp_path / "out.pt", from_format="hf", to_format="megatron")
    assert not (tmp_path / "out.pt").exists()


def test_megatron_state_dict_shape_mismatch(tmp_path: Path) -> None:
    state = _random(expected_full_shapes(SHAPE))
    save_torch(
        {
            "format": "megatron-gate/full-state-dict/1",
            "model_config": SHAPE.to_dict(),
            "model": state,
        },
        tmp_path / "ok.pt",
        force=False,
    )
    wrong = SHAPE.replace(granularity="headwise")
    (tmp_path / "wrong.json").write_text(json.dumps(wrong.to_dict()))
    with pytest.raises(CheckpointError) as error:
        read_megatron(tmp_path / "ok.pt", model_config=tmp_path / "wrong.json")
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in str(error.value)
    assert "[96, 32]" in str(error.value) and "[68, 32]" in str(error.value)


def test_existing_output_needs_force(hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    out.write_text("keep me")
    with pytest.raises(CheckpointError, match="already exists.*--force"):
        convert(hf_dir, out, from_format="hf", to_format="megatron")
    assert out.read_text() == "keep me"
    convert(hf_dir, out, from_format="hf", to_format="megatron", force=True)
    shape, _ = read_megatron(out)
    assert shape == SHAPE
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_failure_while_writing_leaves_old_output(tmp_path: Path) -> None:
    out = tmp_path / "hf_out"
    out.mkdir()
    (out / "marker").write_text("old")
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type
        write_hf_dir(out, {}, {"x": "not a tensor"}, force=True)  # type: ignore[dict-item]
    assert (out / "marker").read_text() == "old"
    assert _listing(tmp_path) == ["hf_out"]


class PickledObject:
    """A class no library allow-lists for weights-only loading."""


def test_torch_load_is_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "code.pt"
    torch.save({"model": {}, "hook": PickledObject()}, path)  # a pickled object, not plain data
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_torch(path)


def test_cli_reports_errors_and_exit_code(hf_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "meg.pt"
    assert main(["convert", "--from", "hf", "--to", "megatron", str(hf_dir), str(out)]) == 0
    assert main(["convert", "--from", "hf", "--to", "megatron", str(hf_dir), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    code = main(["convert", "--from", "megatron", "--to", "paper", str(out), str(tmp_path / "p")])
    assert code == 2 and "rotary_percent=0.5" in capsys.readouterr().err
    assert main(["convert", "--from", "hf", "--to", "paper", str(hf_dir), str(tmp_path / "x")]) == 2
    assert "exactly one side must be megatron" in capsys.readouterr().err
    plain = write_megatron(
        tmp_path / "plain.pt",
        SHAPE.replace(granularity=None),
        _random(expected_full_shapes(SHAPE.replace(granularity=None))),
        force=False,
    )
    gated = tmp_path / "gated.pt"
    assert main(["retrofit", str(plain), str(gated), "--granularity", "headwise"]) == 0
    assert read_megatron(gated)[0].granularity == "headwise"


def test_torch_dist_convert_reshard_check_and_bad_config(
    hf_dir: Path,
    tmp_path: Path,
    capsys,  # noqa: ANN001
) -> None:
    """torch_dist on disk: convert into it, consolidate it, prove a TP=2 load, refuse a bad shape."""
    dist = tmp_path / "dist"
    convert_args = ["convert", "--from", "hf", "--to", "megatron", str(hf_dir), str(dist)]
    assert main([*convert_args, "--megatron-format", "torch_dist"]) == 0
    assert (dist / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert (dist / "release" / "metadata.json").is_file()
    full = tmp_path / "full.pt"
    assert main(["reshard", str(dist), str(full), "--megatron-format", "torch"]) == 0
    direct = convert(hf_dir, tmp_path / "direct.pt", from_format="hf", to_format="megatron")
    _, via_dist = read_megatron(full)
    _, expected = read_megatron(direct)
    assert via_dist.keys() == expected.keys()
    assert all(torch.equal(via_dist[k], expected[k]) for k in expected)
    assert main(["reshard", str(full), str(tmp_path / "dist2"), "--check-tp", "2"]) == 0
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(SHAPE.replace(num_query_groups=4).to_dict()))
    capsys.readouterr()
    code = main(["reshard", str(dist), str(tmp_path / "x.pt"), "--megatron-format", "torch",
                 "--model-config", str(wrong)])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and "linear_qkv.weight" in error and "128, 32]" in error, error
    assert not (tmp_path / "x.pt").exists()
