"""Data readers of the demo: embedded corpus, text files, Megatron indexed datasets, batches."""

from __future__ import annotations

import struct
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


# ---------------------------------------------------------------------- documents and BOS
def _reference_paragraphs(text: bytes) -> list[bytes]:
    """Plain line loop: a document is a run of non-blank lines."""
    documents, current = [], []
    for line in text.split(b"\n"):
        if line.strip(b" \t\r"):
            current.append(line)
        elif current:
            documents.append(b"\n".join(current))
            current = []
    if current:
        documents.append(b"\n".join(current))
    return documents


def _reference_marker_split(text: bytes, marker: bytes) -> list[bytes]:
    """Plain find loop over the marker's occurrences; blank pieces dropped."""
    documents, start = [], 0
    while True:
        found = text.find(marker, start)
        piece = text[start:] if found < 0 else text[start:found]
        if piece.strip():
            documents.append(piece)
        if found < 0:
            return documents
        start = found + len(marker)


def _reference_stream(documents: list[bytes], bos: int) -> list[int]:
    """BOS, then the document's bytes, for every document."""
    stream = []
    for document in documents:
        stream.append(bos)
        stream.extend(document)
    return stream


def _stream(corpus: data.Corpus) -> list[int]:
    """Undo the block split: the corpus's tokens in their original order."""
    train, validation = corpus.train.tolist(), corpus.validation.tolist()
    stream, block = [], data.SPLIT_BLOCK
    blocks = (len(train) + len(validation) + block - 1) // block
    if blocks < data.VALIDATION_EVERY:
        return train + validation
    for index in range(blocks):
        source = validation if index % 10 == 9 else train
        stream.extend(source[:block])
        del source[:block]
    return stream


def _random_text(seed: int, lines: int = 3000) -> bytes:
    rng = np.random.default_rng(seed)
    choices = [b"", b"  ", b"\t\r", b"def f(x):", b"    return x", b"# note", b"<|doc|>", b"a b c"]
    return b"\n".join(choices[i] for i in rng.integers(0, len(choices), size=lines)) + b"\n"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blank_line_documents_with_bos_match_plain_reference(tmp_path: Path, seed: int) -> None:
    text = _random_text(seed)
    path = tmp_path / "notes.txt"
    path.write_bytes(text)
    source = data.DataSource(path=str(path), bos=True, doc_split="blank-line")
    corpus = data.load_corpus(source)
    documents = _reference_paragraphs(text)
    assert corpus.bos_token == 256 and corpus.vocab_size == 384
    assert corpus.num_documents == len(documents)
    assert _stream(corpus) == _reference_stream(documents, 256)


def test_marker_documents_match_plain_reference(tmp_path: Path) -> None:
    text = _random_text(5)
    path = tmp_path / "notes.txt"
    path.write_bytes(text)
    corpus = data.load_corpus(data.DataSource(path=str(path), bos=True, doc_split="marker:<|doc|>"))
    assert _stream(corpus) == _reference_stream(_reference_marker_split(text, b"<|doc|>"), 256)


def test_folder_documents_are_files_and_bos_starts_each(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("second\n\nparagraph")
    (tmp_path / "a.txt").write_text("first")
    by_file = data.load_corpus(data.DataSource(path=str(tmp_path), bos=True))
    assert _stream(by_file) == _reference_stream([b"first", b"second\n\nparagraph"], 256)
    by_paragraph = data.load_corpus(
        data.DataSource(path=str(tmp_path), bos=True, doc_split="blank-line")
    )
    assert _stream(by_paragraph) == _reference_stream([b"first", b"second", b"paragraph"], 256)


def test_embedded_corpus_has_one_document_per_stdlib_module() -> None:
    limit = data.embedded_corpus_files()[0].stat().st_size + 100_000  # pydoc topics + modules
    corpus = data.embedded_corpus(max_bytes=limit, bos=True)
    stream = _stream(corpus)
    documents, left = [], limit
    for path in data.embedded_corpus_files():
        text = path.read_bytes()[:left]
        if text.strip():
            documents.append(text)
        left -= len(text)
        if left <= 0:
            break
    assert corpus.num_documents == len(documents) > 1
    assert stream == _reference_stream(documents, 256)


def test_bos_batches_start_with_bos_and_keep_next_token_labels() -> None:
    tokens = torch.arange(5000) % 200
    plain = data.BatchSampler(tokens, seq_len=16, batch_size=4, seed=3)
    with_bos = data.BatchSampler(tokens, seq_len=16, batch_size=4, seed=3, bos=256)
    for _ in range(3):
        x_plain, _ = plain.next()
        x, y = with_bos.next()
        # Same windows: BOS, then the window's first 15 tokens; labels its first 16.
        assert x.shape == y.shape == (4, 16)
        assert (x[:, 0] == 256).all()
        assert torch.equal(x[:, 1:], x_plain[:, :-1])
        assert torch.equal(y, x_plain)
    for x, y in data.validation_batches(tokens, seq_len=16, batch_size=4, num_batches=2, bos=7):
        assert (x[:, 0] == 7).all() and torch.equal(x[:, 1:], y[:, :-1])


def test_indexed_dataset_with_bos_takes_the_next_id(tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "corpus_text_document"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    documents = [np.arange(n, dtype=np.int64) % 127 + 1 for n in (300, 500)]
    for document in documents:
        builder.add_document(torch.from_numpy(document), [document.size])
    builder.finalize(f"{prefix}.idx")
    corpus = data.load_corpus(data.DataSource(path=str(prefix), bos=True))
    assert corpus.bos_token == 128 and corpus.vocab_size == 256
    expected = [t for doc in documents for t in [128, *doc.tolist()]]
    assert _stream(corpus) == expected
    plain = data.load_corpus(prefix)
    assert _stream(plain) == np.concatenate(documents).tolist() and plain.vocab_size == 128


def test_unknown_doc_split_is_refused() -> None:
    for bad in ("paragraphs", "marker:"):
        with pytest.raises(data.DataError, match=r"\(--doc-split\): choose file, blank-line"):
            data.load_corpus(data.DataSource(doc_split=bad))


# ---------------------------------------------------------------------- bounded, safe reading
def test_reading_stops_at_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    with open(path, "wb") as file:
        file.truncate(1 << 40)  # a sparse 1 TiB file: reading it whole would never finish
    corpus = data.text_corpus(path, max_bytes=50_000)
    assert corpus.num_tokens == 50_000


def test_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    import os
    import signal

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    signal.alarm(20)  # opening a FIFO for reading blocks until a writer comes: fail, not hang
    try:
        with pytest.raises(data.DataError, match=r"not a regular file \(--data .*pipe.txt\)"):
            data.load_corpus(fifo)
        (tmp_path / "a.txt").write_text("text " * 100)
        corpus = data.load_corpus(tmp_path)  # a folder: the FIFO inside is skipped
        assert corpus.num_tokens == 500
    finally:
        signal.alarm(0)


def _write_index(prefix: Path, *, sequences: int, lengths: list[int], pointers: list[int]) -> None:
    header = data._INDEX_HEADER + struct.pack("<QBQQ", 1, 4, sequences, 1)
    body = np.array(lengths, np.int32).tobytes() + np.array(pointers, np.int64).tobytes()
    Path(f"{prefix}.idx").write_bytes(header + body + np.array([0], np.int64).tobytes())


def _junk_pair(kind: str, folder: Path) -> Path:
    prefix = folder / "junk"
    Path(f"{prefix}.bin").write_bytes(b"\x01" * 64)
    if kind == "random-bytes":
        Path(f"{prefix}.idx").write_bytes(bytes(range(256)) * 4)
    elif kind == "truncated-index":
        Path(f"{prefix}.idx").write_bytes(data._INDEX_HEADER + struct.pack("<QBQQ", 1, 4, 10**6, 1))
    elif kind == "pointer-past-the-end":
        _write_index(prefix, sequences=1, lengths=[1000], pointers=[10**6])
    elif kind == "bad-dtype":
        Path(f"{prefix}.idx").write_bytes(data._INDEX_HEADER + struct.pack("<QBQQ", 1, 99, 0, 0))
    else:
        Path(f"{prefix}.idx").write_bytes(b"")
    return prefix


@pytest.mark.parametrize(
    "kind", ["random-bytes", "truncated-index", "pointer-past-the-end", "bad-dtype", "empty"]
)
def test_junk_indexed_dataset_is_a_one_line_error(tmp_path: Path, capsys, kind: str) -> None:  # noqa: ANN001
    from megatron_gate.cli import main

    prefix = _junk_pair(kind, tmp_path)
    code = main(["demo", "--data", str(prefix), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("megatron-gate demo: error: ")
    assert "(--data " in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["demo", "sweep"])
def test_device_file_is_a_one_line_error(tmp_path: Path, capsys, command: str) -> None:  # noqa: ANN001
    from megatron_gate.cli import main

    code = main([command, "--data", "/dev/zero", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        f"megatron-gate {command}: error: not a regular file (--data /dev/zero): pass a text "
        "file, a folder of text files or an indexed dataset prefix"
    ]
