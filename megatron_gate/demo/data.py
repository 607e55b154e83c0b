"""Token streams for the demo and the sweep: embedded corpus, plain text, Megatron indexed datasets.

    corpus = load_corpus(None)                      # Python's own stdlib sources + pydoc topics
    corpus = load_corpus("notes.txt")               # bytes of a text file (or a folder of them)
    corpus = load_corpus("my-corpus_text_document") # Megatron .bin/.idx (preprocess_data.py output)
    corpus = load_corpus(DataSource(path="notes.txt", bos=True, doc_split="blank-line"))
    task = load_corpus(DataSource(task="bigram-backcopy"))   # a synthetic task (bigram_backcopy.py)
    batches = corpus.batches(seq_len=128, batch_size=8, seed=0)   # same call for a task
    tokens, labels = batches.next()                 # [b, s] each

Text is tokenised as bytes (vocab 256), so no tokenizer and no download is needed. The split is
deterministic: every `VALIDATION_EVERY`-th block of `SPLIT_BLOCK` tokens goes to validation.

Documents: one per file (one per stdlib module for the embedded corpus), per paragraph
(`doc_split="blank-line"`) or between occurrences of a marker (`"marker:<text>"`); one per
sequence of an indexed dataset. Without BOS they are joined with a newline. With `bos=True` one
extra token id (BOS, the first id past the data's own) starts every document in the stream and
sits at position 0 of every training and validation sequence, as in real pretraining data, where
attention sinks are known to form on it. Files are read only up to the token limit, and only
regular files are opened (a FIFO or a device would block or never end).
"""

from __future__ import annotations

import re
import stat
import struct
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_gate.demo.bigram_backcopy import TASK_NAME, BigramBackcopy

BYTE_VOCAB_SIZE = 256
SPLIT_BLOCK = 4096
VALIDATION_EVERY = 10
EMBEDDED_CORPUS_BYTES = 2_000_000
MAX_DATA_TOKENS = 32_000_000
TASKS = (TASK_NAME,)
"""Synthetic tasks that `--task` names (generated, not read)."""
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".html", ".tex")
DOC_SPLITS = ("file", "blank-line", "marker:<text>")
NEWLINE = ord("\n")
"""Joins byte-level documents when there is no BOS (files read back to back, as text)."""
VOCAB_MULTIPLE = 128
"""Vocabularies are rounded up to this so that they divide any TP size up to 128."""
_BLANK_LINES = re.compile(rb"\n(?:[ \t\r]*\n)+")
"""A newline followed by one or more blank lines: the boundary of `--doc-split blank-line`."""
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                      6: np.float64, 7: np.float32, 8: np.uint16}  # fmt: skip


class DataError(ValueError):
    """A `--data` path that cannot be read as training data (the message says why and the fix)."""


def _error(what: str, path: Path | str, fix: str) -> DataError:
    return DataError(f"{what} (--data {path}): {fix}")


@dataclass(frozen=True, kw_only=True)
class DataSource:
    """What `--data`, `--bos` and `--doc-split` ask for."""

    path: str | None = None
    """Text file, folder of text files or indexed dataset prefix; None: the embedded corpus."""
    bos: bool = False
    """Start every document and every sequence with a BOS token."""
    doc_split: str = "file"
    """How text becomes documents: "file", "blank-line" or "marker:<text>"."""
    task: str | None = None
    """A synthetic task from `TASKS` instead of text (`path`, `bos`, `doc_split` unused)."""


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """A tokenised corpus split into train and validation streams."""

    name: str
    """Where the tokens came from (shown in the report)."""
    train: torch.Tensor
    """1-D int64 token ids."""
    validation: torch.Tensor
    """1-D int64 token ids, disjoint blocks from `train`."""
    vocab_size: int
    """Model vocabulary size that covers every id (256 for byte-level text)."""
    bos_token: int | None = None
    """The id at position 0 of every sequence (and before every document), or None."""
    num_documents: int = 1

    @property
    def num_tokens(self) -> int:
        return int(self.train.numel() + self.validation.numel())

    @property
    def description(self) -> str:
        """One line for the demo's start-up message."""
        return f"{self.name}, {self.num_tokens:,} tokens"

    def batches(self, *, seq_len: int, batch_size: int, seed: int) -> BatchSampler:
        """Random training windows from `seed` (the same on every rank)."""
        return BatchSampler(self.train, seq_len=seq_len, batch_size=batch_size, seed=seed,
                            bos=self.bos_token)  # fmt: skip

    def validation_batches(
        self, *, seq_len: int, batch_size: int, num_batches: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed, evenly spaced validation batches."""
        return validation_batches(self.validation, seq_len=seq_len, batch_size=batch_size,
                                  num_batches=num_batches, bos=self.bos_token)  # fmt: skip

    def query_flags(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Text defines no query types (a task does: `BigramBackcopy.query_flags`)."""
        del tokens
        return None


def embedded_corpus_files() -> list[Path]:
    """The files of the default corpus: pydoc's topic docs, then stdlib modules by name.

    Every CPython installation has them, so the demo needs no download; the list is sorted, so the
    corpus is the same on every run of the same Python version.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [stdlib / "pydoc_data" / "topics.py"]
    sources = sorted(path for path in stdlib.glob("*.py") if path.is_file())
    return [path for path in docs + sources if path.is_file()]


# ---------------------------------------------------------------------- reading text
def require_regular_file(path: Path) -> None:
    """Raise `DataError` unless `path` is a regular file (checked before opening it: opening a
    FIFO blocks until a writer appears, and a device such as /dev/zero never ends)."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise _error("cannot read it", path, f"{error.strerror}; check the path") from None
    if not stat.S_ISREG(mode):
        raise _error(
            "not a regular file", path,
            "pass a text file, a folder of text files or an indexed dataset prefix",
        )  # fmt: skip


def read_prefix(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of the regular file `path`; nothing past them is read."""
    require_regular_file(path)
    try:
        with open(path, "rb") as file:
            return file.read(limit)
    except OSError as error:
        raise _error("cannot read it", path, f"{error.strerror}; check its permissions") from None


def split_documents(text: bytes, doc_split: str) -> list[bytes]:
    """The non-blank documents of one file's bytes under `doc_split` (see `DOC_SPLITS`).

    "blank-line": a document is a run of non-blank lines (joined by newlines; lines holding only
    spaces, tabs or carriage returns are blank). "marker:<text>": the text between markers.
    """
    if doc_split == "file":
        pieces = [text]
    elif doc_split == "blank-line":
        # Newlines around the text let blank lines at its very start or end match too.
        pieces = [piece.strip(b"\n") for piece in _BLANK_LINES.split(b"\n" + text + b"\n")]
    else:
        pieces = text.split(doc_split.removeprefix("marker:").encode("utf-8"))
    return [piece for piece in pieces if piece.strip()]


def check_doc_split(doc_split: str) -> None:
    """Raise `DataError` for a `--doc-split` value that is not one of `DOC_SPLITS`."""
    if doc_split in ("file", "blank-line"):
        return
    if not doc_split.startswith("marker:") or not doc_split.removeprefix("marker:"):
        raise DataError(
            f"unknown document split {doc_split!r} (--doc-split): choose file, blank-line "
            "or marker:<text> (e.g. marker:<|endoftext|>)"
        )


def read_documents(paths: list[Path], *, limit: int, doc_split: str) -> Iterator[bytes]:
    """Documents of the files in order, `limit` bytes of text in all (the last one cut)."""
    left = limit
    for path in paths:
        if left <= 0:
            return
        for document in split_documents(read_prefix(path, left), doc_split):
            if left <= 0:
                return
            yield document[:left]
            left -= len(document)


# ---------------------------------------------------------------------- streams
def split_train_validation(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split: block i of `SPLIT_BLOCK` tokens is validation when i % 10 == 9."""
    blocks = torch.split(tokens, SPLIT_BLOCK)
    if len(blocks) < VALIDATION_EVERY:
        # Too small for the block rule: keep the last 10% for validation.
        cut = int(tokens.numel() * (1 - 1 / VALIDATION_EVERY))
        return tokens[:cut], tokens[cut:]
    is_validation = [i % VALIDATION_EVERY == VALIDATION_EVERY - 1 for i in range(len(blocks))]
    train = torch.cat([b for b, val in zip(blocks, is_validation, strict=True) if not val])
    validation = torch.cat([b for b, val in zip(blocks, is_validation, strict=True) if val])
    return train, validation


def round_vocab(max_id: int) -> int:
    """The smallest multiple of `VOCAB_MULTIPLE` above `max_id`."""
    return -(-(max_id + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def join_documents(
    documents: list[np.ndarray], *, bos_token: int | None, separator: int | None
) -> torch.Tensor:
    """One int64 stream: BOS before every document, or (without BOS) `separator` between them."""
    if bos_token is not None:
        mark = np.array([bos_token], dtype=np.int64)
        pieces = [piece for doc in documents for piece in (mark, doc)]
    elif separator is not None:
        mark = np.array([separator], dtype=np.int64)
        pieces = [piece for doc in documents for piece in (mark, doc)][1:]
    else:
        pieces = list(documents)
    return torch.from_numpy(np.concatenate([p.astype(np.int64) for p in pieces]))


def documents_corpus(
    name: str,
    documents: list[np.ndarray],
    *,
    bos: bool,
    data_vocab: int,
    separator: int | None = None,
) -> Corpus:
    """Join and split the documents; with `bos` the BOS id is `data_vocab` (one past the data's
    ids), and the vocabulary is rounded up to hold it."""
    bos_token = data_vocab if bos else None
    tokens = join_documents(documents, bos_token=bos_token, separator=separator)
    train, validation = split_train_validation(tokens)
    vocab = round_vocab(data_vocab) if bos else data_vocab
    return Corpus(name=name + (" + BOS" if bos else ""), train=train, validation=validation,
                  vocab_size=vocab, bos_token=bos_token, num_documents=len(documents))  # fmt: skip


def _bytes_documents(documents: Iterator[bytes]) -> list[np.ndarray]:
    return [np.frombuffer(doc, dtype=np.uint8) for doc in documents]


def embedded_corpus(
    *, max_bytes: int = EMBEDDED_CORPUS_BYTES, bos: bool = False, doc_split: str = "file"
) -> Corpus:
    """The default corpus: ~2 MB of this Python's standard library sources and docs, as bytes
    (one document per module with the default `doc_split`)."""
    documents = read_documents(embedded_corpus_files(), limit=max_bytes, doc_split=doc_split)
    name = f"Python {sysconfig.get_python_version()} stdlib (embedded)"
    return documents_corpus(name, _bytes_documents(documents), bos=bos,
                            data_vocab=BYTE_VOCAB_SIZE, separator=NEWLINE)  # fmt: skip


def text_corpus(
    path: Path, *, max_bytes: int = MAX_DATA_TOKENS, bos: bool = False, doc_split: str = "file"
) -> Corpus:
    """Bytes of a text file, or of the text files under a folder (sorted by path)."""
    if path.is_dir():
        # is_file() is False for FIFOs, sockets and devices, so those are never opened.
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise _error("the folder holds no text files", path,
                         f"put files ending in {', '.join(TEXT_SUFFIXES)} in it")  # fmt: skip
    else:
        files = [path]
    documents = _bytes_documents(read_documents(files, limit=max_bytes, doc_split=doc_split))
    if not documents:
        raise _error("no text in it", path, "pass a non-empty text file or folder")
    return documents_corpus(str(path), documents, bos=bos, data_vocab=BYTE_VOCAB_SIZE,
                            separator=NEWLINE)  # fmt: skip


# ---------------------------------------------------------------------- indexed datasets
def indexed_dataset_prefix(path: Path) -> Path | None:
    """The `.bin`/`.idx` prefix that `path` names (prefix, `x.bin` or `x.idx`), or None."""
    prefix = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    return prefix if bin_path.is_file() and idx_path.is_file() else None


def check_index_file(prefix: Path) -> None:
    """Raise `DataError` unless `PREFIX.idx` has Megatron's header and the size it declares
    (Megatron's reader only asserts, or fails later inside numpy, on a junk file)."""
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx_path, bin_path):
        require_regular_file(path)
    header = read_prefix(idx_path, 34)
    fix = "pass the .bin/.idx pair that Megatron's preprocess_data.py wrote"
    if len(header) < 34 or header[:9] != _INDEX_HEADER:
        raise _error("not a Megatron indexed dataset index", idx_path, fix)
    version, code, sequences, documents = struct.unpack("<QBQQ", header[9:34])
    if version != 1 or code not in _INDEX_DTYPE_CODES:
        raise _error(f"unsupported index version {version} or dtype code {code}", idx_path, fix)
    expected = 34 + sequences * (4 + 8) + documents * 8
    if idx_path.stat().st_size < expected:
        raise _error(f"truncated index ({sequences} sequences declared)", idx_path, fix)
    if bin_path.stat().st_size == 0 and sequences:
        raise _error("empty token file", bin_path, fix)


def _indexed_documents(prefix: Path, max_tokens: int) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    pieces, total = [], 0
    dataset = IndexedDataset(str(prefix), mmap=True)
    for index in range(len(dataset)):
        sequence = np.asarray(dataset[index], dtype=np.int64)
        pieces.append(sequence[: max_tokens - total])
        total += pieces[-1].size
        if total >= max_tokens:
            break
    return [piece for piece in pieces if piece.size]


def indexed_corpus(prefix: Path, *, max_tokens: int = MAX_DATA_TOKENS, bos: bool = False) -> Corpus:
    """Tokens of a Megatron indexed dataset (sequences in order as documents, up to `max_tokens`)."""
    check_index_file(prefix)
    fix = "pass the .bin/.idx pair that Megatron's preprocess_data.py wrote"
    try:
        documents = _indexed_documents(prefix, max_tokens)
    except (AssertionError, ValueError, TypeError, IndexError, KeyError, OSError) as error:
        # A header that passed the check can still point past the end of the .bin file.
        raise _error(f"unreadable indexed dataset ({error})", prefix, fix) from None
    if not documents:
        raise _error("the indexed dataset holds no tokens", prefix, "pass a non-empty one")
    low = min(int(doc.min()) for doc in documents)
    if low < 0:
        raise _error("negative token ids", prefix, "check the dtype in the .idx file")
    high = max(int(doc.max()) for doc in documents)
    # BOS takes the id after the largest one seen; the vocabulary is rounded up either way.
    return documents_corpus(f"{prefix} (indexed dataset)", documents, bos=bos,
                            data_vocab=round_vocab(high) if not bos else high + 1)  # fmt: skip


def _optional_str(path: str | Path | None) -> str | None:
    return None if path is None else str(path)


def load_corpus(data: DataSource | str | Path | None) -> Corpus | BigramBackcopy:
    """The corpus (or synthetic task) a `DataSource` or a bare `--data` path names; raises
    `DataError`."""
    source = data if isinstance(data, DataSource) else DataSource(path=_optional_str(data))
    if source.task is not None:
        return load_task(source.task)
    check_doc_split(source.doc_split)
    if source.path is None:
        return embedded_corpus(bos=source.bos, doc_split=source.doc_split)
    path = Path(source.path).expanduser()
    prefix = indexed_dataset_prefix(path)
    if prefix is not None:
        return indexed_corpus(prefix, bos=source.bos)
    if path.suffix in (".bin", ".idx"):
        raise _error(
            "an indexed dataset needs both files", path,
            f"put {path.with_suffix('.bin').name} and {path.with_suffix('.idx').name} side by side",
        )  # fmt: skip
    if not path.exists():
        raise _error(
            "no such file, folder or indexed dataset prefix", path,
            "check the path, or leave --data out to use the embedded corpus",
        )  # fmt: skip
    if not path.is_dir():
        require_regular_file(path)
    return text_corpus(path, bos=source.bos, doc_split=source.doc_split)


def load_task(name: str) -> BigramBackcopy:
    """The synthetic task called `name` (one of `TASKS`); raises `DataError`."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r} (--task): choose {', '.join(TASKS)}")
    return BigramBackcopy()


def check_corpus_size(corpus: Corpus | BigramBackcopy, *, seq_len: int) -> None:
    """Raise `DataError` when either split is too short for one `seq_len + 1` window (a task
    generates sequences of any length)."""
    if not isinstance(corpus, Corpus):
        return
    for split, stream in (("train", corpus.train), ("validation", corpus.validation)):
        if stream.numel() < seq_len + 1:
            raise _error(
                f"the {split} split has {stream.numel()} tokens, fewer than --seq-len + 1 = "
                f"{seq_len + 1}", corpus.name, "pass more text or a smaller --seq-len",
            )  # fmt: skip


# ---------------------------------------------------------------------- batches
def windows_to_batch(
    windows: torch.Tensor, *, bos: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[b, s + 1]` windows -> `(tokens, labels)`, each `[b, s]`.

    Without BOS the labels are the tokens shifted by one. With BOS the sequence is BOS followed by
    the window's first s - 1 tokens, and the labels are the window's first s tokens: every
    sequence starts with the same token, and every label is still the next token.
    """
    if bos is None:
        return windows[:, :-1], windows[:, 1:]
    labels = windows[:, :-1]
    tokens = torch.cat([torch.full_like(labels[:, :1], bos), labels[:, :-1]], dim=1)
    return tokens, labels


class BatchSampler:
    """Random `[b, s]` windows of a token stream from a seeded generator (same on every rank)."""

    def __init__(
        self,
        tokens: torch.Tensor,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        bos: int | None = None,
    ) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.bos = bos
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(tokens, labels)`, each `[b, s]` (see `windows_to_batch`)."""
        high = self.tokens.numel() - self.seq_len - 1
        starts = torch.randint(0, high + 1, (self.batch_size,), generator=self.generator)
        # [b, s + 1] windows
        windows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        return windows_to_batch(windows, bos=self.bos)


def validation_batches(
    tokens: torch.Tensor,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    bos: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, evenly spaced `(tokens, labels)` batches of the validation stream."""
    count = batch_size * num_batches
    high = tokens.numel() - seq_len - 1
    starts = torch.linspace(0, high, count).long().tolist()
    # [count, s + 1] -> num_batches x [b, s + 1]
    windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts])
    return [windows_to_batch(w, bos=bos) for w in torch.split(windows, batch_size)]
