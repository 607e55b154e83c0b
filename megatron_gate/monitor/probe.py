"""Attention-sink probe: exact softmax statistics of a few sampled queries per head.

Fused attention kernels never materialise the probabilities, so the probe recomputes them for
`k` query positions per head (all keys, all heads, all batch entries): cost `k / sq` of the
score computation of the attention it samples. It reports

- first-token attention share: the mean softmax mass that the sampled queries put on key 0
  (the attention sink of Xiao et al.; the gate is meant to remove it);
- the max attention logit (scaled `q.k`) over the sampled queries and their visible keys.

Query position 0 is never sampled (it can only see itself: its share is 1 by construction).
`plain_attention_probabilities` is the full reference the tests compare with.
"""

from __future__ import annotations

import math

import torch


def sample_positions(
    seq_len: int, count: int, *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """`count` evenly spaced query positions in [1, seq_len - 1], deterministic, ending at the last."""
    if seq_len < 2 or count < 1:
        return torch.empty(0, dtype=torch.long, device=device)
    positions = torch.linspace(1, seq_len - 1, min(count, seq_len - 1), device=device)
    return positions.round().long().unique()


def visible_keys_mask(
    positions: torch.Tensor,
    key_len: int,
    *,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean `[b|1, np|1, k, sk]`, True where a sampled query must NOT see a key.

    `attention_mask` is Megatron's boolean `[b|1, 1|np, sq, sk]` (True = masked); without one
    the mask is causal.
    """
    if attention_mask is not None:
        hidden = attention_mask.index_select(2, positions.to(attention_mask.device))
        return hidden if hidden.dtype == torch.bool else hidden.bool()
    keys = torch.arange(key_len, device=positions.device)
    # [k, sk]: key j is hidden from query i when j > i (queries and keys share positions).
    return (keys[None, :] > positions[:, None])[None, None]


def probe_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    softmax_scale: float,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Sink statistics of the sampled queries, on the device (no host sync).

    query `[sq, b, np, hn]`, key `[sk, b, ng, hn]` (grouped-query: `np` a multiple of `ng`).
    Returns (sum of first-token shares, number of (query, head, batch) rows, max logit): the
    sum and max as 0-d float32 device tensors, the count as an int (known from shapes), so that
    shares can be summed across ranks before dividing.

    About ten ops whatever the shape (a logged step runs it once per layer): the scale is
    applied to the `k` sampled queries rather than to the scores, and the scores are masked
    and soft-maxed in place.
    """
    sq, batch, heads, head_dim = query.shape
    key_len, _, groups, _ = key.shape
    count = positions.numel()
    # [sq, b, np, hn] -> [b, np, k, hn] -> [b, ng, hpg * k, hn]: each key head's queries in a
    # row block (np = ng * hpg, contiguous after index_select), scaled here (k rows).
    sampled = _float32(query.permute(1, 2, 0, 3).index_select(2, positions)).mul_(softmax_scale)
    sampled = sampled.view(batch, groups, (heads // groups) * count, head_dim)
    # [b, ng, hpg * k, hn] @ [b, ng, hn, sk] -> [b, np, k, sk]; no key repeat needed for GQA.
    logits = torch.matmul(sampled, _float32(key).permute(1, 2, 3, 0))
    logits = logits.view(batch, heads, count, key_len)
    hidden = visible_keys_mask(positions, key_len, attention_mask=attention_mask)
    logits.masked_fill_(hidden, float("-inf"))
    first_token_share = torch.softmax(logits, dim=-1)[..., 0]
    return first_token_share.sum(), first_token_share.numel(), logits.amax()


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32, without a dispatched no-op when it already is."""
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def plain_attention_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: full probabilities and masked logits `[b, np, sq, sk]` of every query."""
    sq, batch, heads, head_dim = query.shape
    groups = key.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    # [sk, b, ng, hn] -> [sk, b, np, hn]: each key head serves heads // ng query heads.
    full_key = key.repeat_interleave(heads // groups, dim=2).float()
    logits = torch.einsum("qbnh,sbnh->bnqs", query.float(), full_key) * scale
    if attention_mask is None:
        attention_mask = torch.triu(
            torch.ones(sq, key.shape[0], dtype=torch.bool, device=query.device), diagonal=1
        )[None, None]
    logits = logits.masked_fill(attention_mask.bool(), float("-inf"))
    return torch.softmax(logits, dim=-1), logits
