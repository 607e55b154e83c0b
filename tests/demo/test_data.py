"""Data readers of the demo: embedded corpus, text files, Megatron indexed datasets, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_gate.demo import data


def _reference_split(tokens: list[int], block: int, every: int) -> tuple[list[int], list[int]]:
    """Plain-loop version of the block split."""
    train, validation = [], []
    for index, start in enumerate(range(0, len(tokens), block)):
        target = validation if index % every == every - 1 else train
        target.extend(tokens[start : start + block])
    return train, validation


def test_split_matches_plain_reference() -> None:
    tokens = torch.arange(data.SPLIT_BLOCK * 23 + 17) % 251
    train, validation = data.split_train_validation(tokens)
    ref_train, ref_validation = _reference_split(tokens.tolist(), data.SPLIT_BLOCK, 10)
    assert train.tolist() == ref_train
    assert validation.tolist() == ref_validation


def test_split_of_short_stream_keeps_last_tenth_for_validation() -> None:
    tokens = torch.arange(1000)
    train, validation = data.split_train_validation(tokens)
    assert torch.equal(torch.cat([train, validation]), tokens)
    assert validation.numel() == 100


def test_embedded_corpus_is_the_stdlib_bytes_and_deterministic() -> None:
    first = data.embedded_corpus(max_bytes=200_000)
    second = data.embedded_corpus(max_bytes=200_000)
    assert first.vocab_size == 256
    assert torch.equal(first.train, second.train)
    assert torch.equal(first.validation, second.validation)
    # The first file is pydoc's topic docs: the stream starts with its bytes.
    head = data.embedded_corpus_files()[0].read_bytes()[:1000]
    assert bytes(first.train[:1000].to(torch.uint8).tolist()) == head
    total = first.num_tokens
    assert 0.08 < first.validation.numel() / total < 0.12


def test_text_file_round_trips_as_bytes(tmp_path: Path) -> None:
    text = "def f(x):\n    return x + 1  # héllo\n" * 3000
    path = tmp_path / "notes.txt"
    path.write_text(text, encoding="utf-8")
    corpus = data.load_corpus(path)
    tokens = corpus.train.tolist() + corpus.validation.tolist()
    assert sorted(tokens) == sorted(text.encode("utf-8"))
    ref_train, _ = _reference_split(list(text.encode("utf-8")), data.SPLIT_BLOCK, 10)
    assert corpus.train.tolist() == ref_train
    assert corpus.vocab_size == 256


def test_folder_of_text_files(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("second " * 400)
    (tmp_path / "a.txt").write_text("first " * 400)
    (tmp_path / "skip.bin.gz").write_bytes(b"\x00" * 100)
    corpus = data.load_corpus(tmp_path)
    stream = bytes(torch.cat([corpus.train, corpus.validation]).to(torch.uint8).tolist())
    assert stream == ("first " * 400).encode() + b"\n" + ("second " * 400).encode()


def test_megatron_indexed_dataset(tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "corpus_text_document"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 1000, size=n) for n in (3000, 5000, 40000)]
    for document in documents:
        builder.add_document(torch.from_numpy(document), [document.size])
    builder.finalize(f"{prefix}.idx")

    expected = np.concatenate(documents).tolist()
    for given in (prefix, Path(f"{prefix}.bin"), Path(f"{prefix}.idx")):
        corpus = data.load_corpus(given)
        ref_train, ref_validation = _reference_split(expected, data.SPLIT_BLOCK, 10)
        assert corpus.train.tolist() == ref_train
        assert corpus.validation.tolist() == ref_validation
        assert corpus.vocab_size == 1024  # max id 999 -> next multiple of 128


def test_batches_are_shifted_windows_and_seeded() -> None:
    tokens = torch.arange(5000)
    first = data.BatchSampler(tokens, seq_len=16, batch_size=4, seed=3)
    second = data.BatchSampler(tokens, seq_len=16, batch_size=4, seed=3)
    for _ in range(3):
        x, y = first.next()
        x2, _ = second.next()
        assert x.shape == (4, 16) and torch.equal(x, x2)
        assert torch.equal(y, x + 1)  # labels are the next tokens of an arange
    batches = data.validation_batches(tokens, seq_len=16, batch_size=4, num_batches=2)
    assert len(batches) == 2 and batches[0][0][0, 0] == 0
    assert batches[-1][1][-1, -1] == tokens[-1]


def _bad_path(kind: str, folder: Path) -> Path:
    if kind == "missing":
        return folder / "missing.txt"
    if kind == "empty":
        (folder / "empty.txt").write_text("  \n")
        return folder / "empty.txt"
    if kind == "bin-without-idx":
        (folder / "x.bin").write_bytes(b"\x00" * 8)
        return folder / "x.bin"
    (folder / "folder").mkdir()
    return folder / "folder"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such file"),
        ("empty", "no text"),
        ("bin-without-idx", "needs both"),
        ("empty-folder", "holds no text files"),
    ],
)
def test_bad_data_paths_raise_clear_errors(tmp_path: Path, kind: str, message: str) -> None:
    with pytest.raises(data.DataError, match=message):
        data.load_corpus(_bad_path(kind, tmp_path))


def test_corpus_too_short_for_sequence_length(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("abc " * 30)
    corpus = data.load_corpus(path)
    with pytest.raises(data.DataError, match="--seq-len"):
        data.check_corpus_size(corpus, seq_len=64)
