"""Hostile and damaged checkpoint files: no code runs, one error line, nothing written.

Each malicious file would create a marker file when unpickled (a `__reduce__` that calls
`exec`). A real torch_dist checkpoint is written once per module with the package's own writer
(in this process's one-rank gloo world); each test copies it and plants one hostile part: the
`.metadata` pickle, a pickled `_extra_state` entry inside the `.distcp` data file, a legacy
`common.pt`, a full state-dict `.pt`. The commands run through `megatron_gate.cli.main`.
"""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from error_checks import assert_one_error_line, listing

from megatron_gate.checkpoint.model import GptShape, build_gpt_from_shape
from megatron_gate.checkpoint.reshard import RELEASE, save_distributed
from megatron_gate.checkpoint.safe_io import CheckpointError
from megatron_gate.checkpoint.torch_dist_files import (
    METADATA_FILE,
    read_metadata,
    vet_torch_dist_dir,
)
from megatron_gate.cli import main

SHAPE = GptShape(
    num_layers=1,
    hidden_size=32,
    ffn_hidden_size=48,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=8,
    vocab_size=64,
)


class WritesMarker:
    """Unpickling this runs `exec`, which creates `path`: the attack the loaders must stop."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.path)!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def saved_dist(tmp_path_factory: pytest.TempPathFactory, megatron_world: None) -> Path:
    root = tmp_path_factory.mktemp("saved") / "dist"
    torch.manual_seed(0)
    save_distributed(build_gpt_from_shape(SHAPE), root, shape=SHAPE)
    return root


@pytest.fixture
def dist(saved_dist: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "in" / "dist"
    shutil.copytree(saved_dist, copy)
    return copy


def _reshard(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["reshard", str(source), str(tmp_path / "out.pt"), "--megatron-format", "torch"])
    return code, capsys.readouterr().err


def _assert_refused(code: int, err: str, tmp_path: Path, marker: Path, *fragments: str) -> None:
    assert not marker.exists(), "code from the checkpoint ran"
    assert code == 2, err
    assert_one_error_line(err, "reshard", *fragments)
    assert not (tmp_path / "out.pt").exists()
    assert not [p for p in listing(tmp_path) if ".partial-" in p]


def test_clean_checkpoint_passes_the_vetting(dist: Path) -> None:
    vet_torch_dist_dir(dist / RELEASE)  # raises on anything the writer itself produced
    assert read_metadata(dist / RELEASE).storage_data


def test_malicious_metadata_is_refused_before_torch_reads_it(
    dist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    (dist / RELEASE / METADATA_FILE).write_bytes(pickle.dumps(WritesMarker(marker)))
    code, err = _reshard(dist, tmp_path, capsys)
    _assert_refused(code, err, tmp_path, marker, ".metadata", "builtins.exec")


def test_malicious_metadata_is_refused_by_convert_too(
    dist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    (dist / RELEASE / METADATA_FILE).write_bytes(pickle.dumps(WritesMarker(marker)))
    out = tmp_path / "hf"
    code = main(["convert", "--from", "megatron", "--to", "hf", str(dist), str(out)])
    assert not marker.exists() and code == 2 and not out.exists()
    assert_one_error_line(capsys.readouterr().err, "convert", ".metadata")


def _plant_entry(dist: Path, payload: bytes, *, fqn_part: str) -> None:
    """Append `payload` to the data file and point the first matching byte entry at it (the
    `.metadata` stays a clean, allow-listed pickle)."""
    release = dist / RELEASE
    metadata = read_metadata(release)
    index = next(i for i in metadata.storage_data if fqn_part in i.fqn)
    info = metadata.storage_data[index]
    data_file = release / info.relative_path
    offset = data_file.stat().st_size
    with data_file.open("ab") as stream:
        stream.write(payload)
    metadata.storage_data[index] = type(info)(info.relative_path, offset, len(payload), None)
    (release / METADATA_FILE).write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("entry", ["_extra_state", "common_state"])
def test_malicious_pickled_entry_in_the_data_file_is_refused(
    dist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: str
) -> None:
    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    torch.save([WritesMarker(marker)], buffer)
    _plant_entry(dist, buffer.getvalue(), fqn_part=entry)
    code, err = _reshard(dist, tmp_path, capsys)
    _assert_refused(code, err, tmp_path, marker, entry, "weights_only=True")


def test_malicious_legacy_common_pt_is_refused(
    dist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    torch.save({"hook": WritesMarker(marker)}, dist / RELEASE / "common.pt")
    code, err = _reshard(dist, tmp_path, capsys)
    _assert_refused(code, err, tmp_path, marker, "common.pt")


def test_malicious_full_state_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    torch.save({"format": "megatron-gate/full-state-dict/1", "x": WritesMarker(marker)},
               tmp_path / "evil.pt")  # fmt: skip
    code, err = _reshard(tmp_path / "evil.pt", tmp_path, capsys)
    _assert_refused(code, err, tmp_path, marker, "weights_only=True")


def test_truncated_data_file_is_one_error_line(
    dist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_file = next((dist / RELEASE).glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    code, err = _reshard(dist, tmp_path, capsys)
    _assert_refused(code, err, tmp_path, tmp_path / "marker", "truncated", data_file.name)


def test_truncated_metadata_is_one_error_line(
    dist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metadata = dist / RELEASE / METADATA_FILE
    metadata.write_bytes(metadata.read_bytes()[:100])
    code, err = _reshard(dist, tmp_path, capsys)
    _assert_refused(code, err, tmp_path, tmp_path / "marker", ".metadata")


def test_storage_path_outside_the_checkpoint_is_refused(dist: Path) -> None:
    release = dist / RELEASE
    metadata = read_metadata(release)
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = type(info)("../../etc/passwd", 0, 1, None)
    (release / METADATA_FILE).write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        vet_torch_dist_dir(release)


@pytest.mark.parametrize("text", ["banana", "-3", "1" * 40])
def test_junk_tracker_file_is_one_error_line(
    dist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    (dist / "latest_checkpointed_iteration.txt").write_text(text)
    code, err = _reshard(dist, tmp_path, capsys)
    assert code == 2
    assert_one_error_line(err, "reshard")
    assert not (tmp_path / "out.pt").exists()
