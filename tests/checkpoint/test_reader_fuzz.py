"""Property-based fuzzing of the checkpoint readers: whatever the bytes or fields, the only
exception is `CheckpointError` (never a traceback of json, safetensors, pickle or torch).

Covers the JSON reader (config.json, index, --model-config), `GptShape` fields, the Qwen3-Next
and paper config readers, the safetensors loader, and the torch_dist vetting of `.metadata`
(random and mutated pickles of real torch.distributed.checkpoint metadata, and hostile storage
references).
"""

from __future__ import annotations

import contextlib
import pickle
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_gate.checkpoint import hf_qwen3_next, paper_qwen3
from megatron_gate.checkpoint.convert import _load_safetensors, malformed_config_is_input_error
from megatron_gate.checkpoint.model import GptShape, read_json_object
from megatron_gate.checkpoint.safe_io import CheckpointError
from megatron_gate.checkpoint.torch_dist_files import METADATA_FILE, vet_torch_dist_dir

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
SHAPE = GptShape(num_layers=1, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
                 num_query_groups=1, kv_channels=4, vocab_size=16, qk_layernorm=True)  # fmt: skip
CONFIG_KEYS = sorted(hf_qwen3_next.config_from_shape(SHAPE)) + ["rope_scaling", "head_dim"]


def _expect_checkpoint_error_only(action) -> None:  # noqa: ANN001
    with contextlib.suppress(CheckpointError):  # anything else fails the test
        action()


@FUZZ
@given(st.binary(max_size=300) | VALUES.map(lambda v: repr(v).encode()))
def test_json_reader(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_bytes(data)
        _expect_checkpoint_error_only(lambda: read_json_object(path, what="config.json"))


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(SHAPE.to_dict())), SCALARS, max_size=8))
def test_model_shape_fields(changes: dict) -> None:
    _expect_checkpoint_error_only(lambda: GptShape.from_dict({**SHAPE.to_dict(), **changes}))


@FUZZ
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), VALUES, max_size=6), st.booleans())
def test_hf_and_paper_config_readers(changes: dict, paper: bool) -> None:
    base = (paper_qwen3 if paper else hf_qwen3_next).config_from_shape(SHAPE)
    config = {**base, **changes}
    reader = paper_qwen3.shape_from_config if paper else hf_qwen3_next.shape_from_config

    def read() -> None:
        with malformed_config_is_input_error(Path("config.json")):
            reader(config)

    _expect_checkpoint_error_only(read)


def _valid_safetensors() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "w.safetensors"
        save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}, str(path))
        return path.read_bytes()


SAFETENSORS = _valid_safetensors()


def _mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """Truncations, byte flips and inserted junk of `data`."""
    cut = st.integers(0, len(data)).map(lambda n: data[:n])
    flip = st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)).map(
        lambda p: data[: p[0]] + bytes([p[1]]) + data[p[0] + 1 :]
    )
    insert = st.tuples(st.integers(0, len(data)), st.binary(min_size=1, max_size=16)).map(
        lambda p: data[: p[0]] + p[1] + data[p[0] :]
    )
    return st.one_of(cut, flip, insert, st.binary(max_size=200))


@FUZZ
@given(_mutations(SAFETENSORS))
def test_safetensors_loader(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        path.write_bytes(data)
        _expect_checkpoint_error_only(lambda: _load_safetensors(path))


def _metadata(relative_path: str = "__0_0.distcp", offset: int = 0, length: int = 8) -> Metadata:
    properties = TensorProperties(dtype=torch.float32)
    tensor = TensorStorageMetadata(properties, torch.Size([2]), [ChunkStorageMetadata(torch.Size([0]), torch.Size([2]))])  # fmt: skip
    return Metadata(
        state_dict_metadata={"w": tensor, "obj": BytesStorageMetadata()},
        storage_data={
            MetadataIndex("w", torch.Size([0])): _StorageInfo(relative_path, offset, length),
            MetadataIndex("obj"): _StorageInfo("__0_0.distcp", 8, 0),
        },
    )


METADATA = pickle.dumps(_metadata())


def _vet(metadata: bytes, data: bytes = b"\0" * 8) -> None:
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / METADATA_FILE).write_bytes(metadata)
        (Path(folder) / "__0_0.distcp").write_bytes(data)
        _expect_checkpoint_error_only(lambda: vet_torch_dist_dir(folder))


@FUZZ
@given(_mutations(METADATA))
def test_torch_dist_metadata_bytes(data: bytes) -> None:
    _vet(data)


@FUZZ
@given(
    st.one_of(st.text(max_size=20), st.sampled_from(["..", "/etc/passwd", "../x", "a/b", ""])),
    st.integers(-(2**40), 2**40),
    st.integers(-(2**40), 2**40),
    st.binary(max_size=32),
)
def test_torch_dist_storage_references(name: str, offset: int, length: int, data: bytes) -> None:
    _vet(pickle.dumps(_metadata(name, offset, length)), data)
