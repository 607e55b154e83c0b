"""Bigram-Backcopy (Guo et al. 2024, arXiv 2410.13835): a task where attention sinks form in minutes.

    task = BigramBackcopy(seed=0)                   # V=64 normal tokens + BOS, 3 triggers
    batches = task.batches(seq_len=64, batch_size=64, seed=1234)
    tokens, labels = batches.next()                 # [b, s] each, tokens[:, 0] == BOS
    flags = task.query_flags(tokens)                # [b, s] True where the query is a trigger

A random bigram transition matrix over V normal tokens (Dirichlet rows around a Zipf base
measure, so that a few tokens are frequent, as characters are in text). The triggers are the k
most frequent tokens (largest stationary probability). A sequence is `[BOS, x1, x2, ...]`: x1 is
drawn from the stationary distribution without the triggers; then `x_{t+1} = x_{t-1}` when `x_t`
is a trigger (copy back), else `x_{t+1} ~ P(. | x_t)`. Two triggers never follow each other (x1
is not one, and a copy repeats the token before a trigger). The loss is on every position.

Only trigger queries need attention (to fetch the previous token); every other query predicts
from its own token, and a trained softmax head parks those queries on BOS: the attention sink
("dormant" head) of the paper, and with it a small value vector at BOS and a large BOS residual.
"""

from __future__ import annotations

import numpy as np
import torch

TASK_NAME = "bigram-backcopy"
NORMAL_TOKENS = 64
TRIGGERS = 3
CONCENTRATION = 1.0
"""Dirichlet concentration of each transition row: alpha_j = CONCENTRATION * V * zipf_j."""
VALIDATION_SEED = 2**31 - 1
"""Seed offset of the fixed validation batches (disjoint from any training seed stream)."""


class BigramBackcopy:
    """The task's fixed parts (transition matrix, triggers), drawn once from `seed`."""

    def __init__(
        self,
        *,
        normal_tokens: int = NORMAL_TOKENS,
        triggers: int = TRIGGERS,
        concentration: float = CONCENTRATION,
        seed: int = 0,
    ) -> None:
        if not 0 < triggers < normal_tokens:
            raise ValueError(f"triggers {triggers} must be in [1, {normal_tokens - 1}]")
        self.normal_tokens = normal_tokens
        self.seed = seed
        self.bos_token = normal_tokens
        """BOS is the id after the normal tokens; it is at position 0 of every sequence."""
        self.vocab_size = -(-(normal_tokens + 1) // 128) * 128
        """Rounded up to a multiple of 128 (divides any tensor-parallel size up to 128)."""
        self.name = f"{TASK_NAME} (V={normal_tokens}, {triggers} triggers, task seed {seed})"
        self.transition = _transition_matrix(normal_tokens, concentration, seed)
        self.stationary = _stationary(self.transition)
        self.triggers = torch.topk(self.stationary, triggers).indices.sort().values
        self.is_trigger = torch.zeros(normal_tokens + 1, dtype=torch.bool)
        self.is_trigger[self.triggers] = True
        first = self.stationary.clone()
        first[self.triggers] = 0.0
        self.first_distribution = first / first.sum()
        # Inverse-CDF tables: a uniform u picks the first index whose cumulative mass exceeds u.
        self.first_cdf = torch.cumsum(self.first_distribution, 0)
        self.transition_cdf = torch.cumsum(self.transition, 1)

    # ------------------------------------------------------------------ sampling
    def sample(self, uniforms: torch.Tensor) -> torch.Tensor:
        """`[b, s]` float64 uniforms -> `[b, s + 1]` sequences `[BOS, x1, ..., x_s]`."""
        batch, length = uniforms.shape
        uniforms = uniforms.t().contiguous()  # [s, b]: one contiguous row per position
        sequences = torch.empty(batch, length + 1, dtype=torch.long)
        sequences[:, 0] = self.bos_token
        sequences[:, 1] = self._draw(self.first_cdf.expand(batch, -1), uniforms[0])
        for t in range(1, length):
            current = sequences[:, t]
            drawn = self._draw(self.transition_cdf[current.clamp(max=self.normal_tokens - 1)],
                               uniforms[t])  # fmt: skip
            sequences[:, t + 1] = torch.where(self.is_trigger[current], sequences[:, t - 1], drawn)
        return sequences

    def _draw(self, cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """One inverse-CDF draw per row: `cdf [b, V]`, `uniforms [b]` -> `[b]` token ids."""
        index = torch.searchsorted(cdf.contiguous(), uniforms[:, None], right=True)[:, 0]
        return index.clamp_(max=self.normal_tokens - 1)  # u above a rounded-down last entry

    def batch(self, generator: torch.Generator, *, seq_len: int, batch_size: int) -> tuple:
        """`(tokens, labels)`, each `[b, s]`: labels are the next tokens of the sequence."""
        uniforms = torch.rand(batch_size, seq_len, generator=generator, dtype=torch.float64)
        sequences = self.sample(uniforms)
        return sequences[:, :-1], sequences[:, 1:]

    def query_flags(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[b, s]` True where the query token is a trigger (the queries that must copy)."""
        return self.is_trigger[tokens.cpu()].to(tokens.device)

    # ------------------------------------------------------------------ the demo's interface
    def batches(self, *, seq_len: int, batch_size: int, seed: int) -> TaskBatches:
        """Fresh training batches from `seed` (the same on every rank)."""
        return TaskBatches(self, seq_len=seq_len, batch_size=batch_size, seed=seed)

    @property
    def description(self) -> str:
        """One line for the demo's start-up message."""
        share = float(self.stationary[self.triggers].sum())
        return f"{self.name}: sequences generated per step (triggers {share:.0%} of the chain)"

    def validation_batches(self, *, seq_len: int, batch_size: int, num_batches: int) -> list[tuple]:
        """Fixed validation batches (the same for every run seed)."""
        generator = torch.Generator().manual_seed(VALIDATION_SEED - self.seed)
        return [
            self.batch(generator, seq_len=seq_len, batch_size=batch_size)
            for _ in range(num_batches)
        ]


class TaskBatches:
    """Seeded stream of a task's training batches (`next()` like `data.BatchSampler`).

    Sequences are generated `CHUNK_BATCHES` batches at a time: the chain is sequential over
    positions, so one pass over a large batch costs about what one over a small batch does.
    """

    CHUNK_BATCHES = 32

    def __init__(self, task: BigramBackcopy, *, seq_len: int, batch_size: int, seed: int) -> None:
        self.task, self.seq_len, self.batch_size = task, seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(tokens, labels)`, each `[b, s]`."""
        if not self._pending:
            tokens, labels = self.task.batch(self.generator, seq_len=self.seq_len,
                                             batch_size=self.batch_size * self.CHUNK_BATCHES)  # fmt: skip
            self._pending = list(zip(tokens.split(self.batch_size), labels.split(self.batch_size),
                                     strict=True))[::-1]  # fmt: skip
        return self._pending.pop()


def _transition_matrix(size: int, concentration: float, seed: int) -> torch.Tensor:
    """`[V, V]` float64 rows drawn from Dirichlet(concentration * V * zipf)."""
    zipf = 1.0 / np.arange(1, size + 1)
    alpha = concentration * size * zipf / zipf.sum()
    rows = np.random.default_rng(seed).dirichlet(alpha, size=size)
    return torch.from_numpy(rows / rows.sum(axis=1, keepdims=True))


def _stationary(transition: torch.Tensor, *, iterations: int = 500) -> torch.Tensor:
    """The bigram chain's stationary distribution (power iteration from uniform)."""
    state = torch.full((transition.shape[0],), 1.0 / transition.shape[0], dtype=torch.float64)
    for _ in range(iterations):
        state = state @ transition
    return state / state.sum()
