"""Token streams for the demo and the sweep: embedded corpus, plain text, Megatron indexed datasets.

    corpus = load_corpus(None)                      # Python's own stdlib sources + pydoc topics
    corpus = load_corpus("notes.txt")               # bytes of a text file (or a folder of them)
    corpus = load_corpus("my-corpus_text_document") # Megatron .bin/.idx (preprocess_data.py output)
    batches = BatchSampler(corpus.train, seq_len=128, batch_size=8, seed=0)
    tokens, labels = batches.next()                 # [b, s] each

Text is tokenised as bytes (vocab 256), so no tokenizer and no download is needed. The split is
deterministic: every `VALIDATION_EVERY`-th block of `SPLIT_BLOCK` tokens goes to validation.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BYTE_VOCAB_SIZE = 256
SPLIT_BLOCK = 4096
VALIDATION_EVERY = 10
EMBEDDED_CORPUS_BYTES = 2_000_000
MAX_DATA_TOKENS = 32_000_000
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".html", ".tex")


class DataError(ValueError):
    """A `--data` path that cannot be read as training data (the message says why and the fix)."""


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

    @property
    def num_tokens(self) -> int:
        return int(self.train.numel() + self.validation.numel())


def embedded_corpus_files() -> list[Path]:
    """The files of the default corpus: pydoc's topic docs, then stdlib modules by name.

    Every CPython installation has them, so the demo needs no download; the list is sorted, so the
    corpus is the same on every run of the same Python version.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [stdlib / "pydoc_data" / "topics.py"]
    sources = sorted(path for path in stdlib.glob("*.py") if path.is_file())
    return [path for path in docs + sources if path.is_file()]


def _read_bytes(paths: list[Path], limit: int) -> bytes:
    chunks, total = [], 0
    for path in paths:
        data = path.read_bytes()[: limit - total]
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return b"\n".join(chunks)


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


def _bytes_corpus(name: str, data: bytes) -> Corpus:
    tokens = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))
    train, validation = split_train_validation(tokens)
    return Corpus(name=name, train=train, validation=validation, vocab_size=BYTE_VOCAB_SIZE)


def embedded_corpus(*, max_bytes: int = EMBEDDED_CORPUS_BYTES) -> Corpus:
    """The default corpus: ~2 MB of this Python's standard library sources and docs, as bytes."""
    data = _read_bytes(embedded_corpus_files(), max_bytes)
    return _bytes_corpus(f"Python {sysconfig.get_python_version()} stdlib (embedded)", data)


def indexed_dataset_prefix(path: Path) -> Path | None:
    """The `.bin`/`.idx` prefix that `path` names (prefix, `x.bin` or `x.idx`), or None."""
    prefix = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    return prefix if bin_path.is_file() and idx_path.is_file() else None


def indexed_corpus(prefix: Path, *, max_tokens: int = MAX_DATA_TOKENS) -> Corpus:
    """Tokens of a Megatron indexed dataset (documents concatenated in order, up to `max_tokens`)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix), mmap=True)
    pieces, total = [], 0
    for index in range(len(dataset)):
        sequence = np.asarray(dataset[index], dtype=np.int64)
        pieces.append(sequence[: max_tokens - total])
        total += pieces[-1].size
        if total >= max_tokens:
            break
    if total == 0:
        raise DataError(
            f"--data {prefix}: the indexed dataset holds no tokens; pass a non-empty one."
        )
    tokens = torch.from_numpy(np.concatenate(pieces))
    if int(tokens.min()) < 0:
        raise DataError(f"--data {prefix}: negative token ids; is the .idx dtype right?")
    # Round the vocabulary up to a multiple of 128 so it divides any TP size up to 128.
    vocab_size = -(-(int(tokens.max()) + 1) // 128) * 128
    train, validation = split_train_validation(tokens)
    return Corpus(
        name=f"{prefix} (indexed dataset)",
        train=train,
        validation=validation,
        vocab_size=vocab_size,
    )


def text_corpus(path: Path, *, max_bytes: int = MAX_DATA_TOKENS) -> Corpus:
    """Bytes of a text file, or of the text files under a folder (sorted by path)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(
                f"--data {path}: the folder holds no text files ({', '.join(TEXT_SUFFIXES)})."
            )
    else:
        files = [path]
    data = _read_bytes(files, max_bytes)
    if not data.strip():
        raise DataError(f"--data {path}: no text in it; pass a non-empty text file or folder.")
    return _bytes_corpus(str(path), data)


def load_corpus(data: str | Path | None) -> Corpus:
    """The embedded corpus (`None`), a Megatron indexed dataset, or text; raises `DataError`."""
    if data is None:
        return embedded_corpus()
    path = Path(data).expanduser()
    prefix = indexed_dataset_prefix(path)
    if prefix is not None:
        return indexed_corpus(prefix)
    if path.suffix in (".bin", ".idx"):
        raise DataError(
            f"--data {path}: an indexed dataset needs both {path.with_suffix('.bin')} and "
            f"{path.with_suffix('.idx')}."
        )
    if not path.exists():
        raise DataError(
            f"--data {path}: no such file, folder or indexed dataset prefix (PREFIX.bin + "
            "PREFIX.idx); check the path, or leave --data out to use the embedded corpus."
        )
    return text_corpus(path)


def check_corpus_size(corpus: Corpus, *, seq_len: int) -> None:
    """Raise `DataError` when either split is too short for one `seq_len + 1` window."""
    for split, stream in (("train", corpus.train), ("validation", corpus.validation)):
        if stream.numel() < seq_len + 1:
            raise DataError(
                f"--data {corpus.name}: the {split} split has {stream.numel()} tokens, fewer than "
                f"--seq-len + 1 = {seq_len + 1}; pass more text or a smaller --seq-len."
            )


class BatchSampler:
    """Random `[b, s]` windows of a token stream from a seeded generator (same on every rank)."""

    def __init__(self, tokens: torch.Tensor, *, seq_len: int, batch_size: int, seed: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(tokens, labels)`, each `[b, s]`; labels are the tokens shifted by one."""
        high = self.tokens.numel() - self.seq_len - 1
        starts = torch.randint(0, high + 1, (self.batch_size,), generator=self.generator)
        # [b, s + 1] windows
        windows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]


def validation_batches(
    tokens: torch.Tensor, *, seq_len: int, batch_size: int, num_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, evenly spaced `(tokens, labels)` batches of the validation stream."""
    count = batch_size * num_batches
    high = tokens.numel() - seq_len - 1
    starts = torch.linspace(0, high, count).long().tolist()
    # [count, s + 1] -> num_batches x [b, s + 1]
    windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts])
    return [(w[:, :-1], w[:, 1:]) for w in torch.split(windows, batch_size)]
