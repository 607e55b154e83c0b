"""Attention-sink probe: exact softmax statistics of a few sampled queries per head.

Fused attention kernels never materialise the probabilities, so the probe recomputes them for
`k` query positions per head (all keys, all heads, all batch entries): cost `k / sq` of the
score computation of the attention it samples. It reports

- first-token attention share: the mean softmax mass that the sampled queries put on key 0
  (the attention sink of Xiao et al.; the gate is meant to remove it);
- the max attention logit (scaled `q.k`) over the sampled queries and their visible keys;
- per head and query, the share itself (`first_token_shares`), for per-head maxima and for
  shares split by query type (`query_class_weights`: queries the loop flags, e.g. the triggers of
  Bigram-Backcopy, and the others);
- the value drain: the norm of the value vector at position 0 against the other positions
  (`value_norms`; a sink head's first value shrinks, so that parking attention there is a no-op).

With Megatron-Core's `softmax_type` "off-by-one" or "learnable" the core attention adds one
logit per head (0, or its learned `softmax_offset`) to every softmax; pass it as
`softmax_offset` and the shares are those of that softmax.

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
    softmax_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Sink statistics of the sampled queries, on the device (no host sync).

    query `[sq, b, np, hn]`, key `[sk, b, ng, hn]` (grouped-query: `np` a multiple of `ng`).
    Returns (sum of first-token shares, number of (query, head, batch) rows, max logit): the
    sum and max as 0-d float32 device tensors, the count as an int (known from shapes), so that
    shares can be summed across ranks before dividing.
    """
    shares, max_logit = first_token_shares(
        query, key, softmax_scale=softmax_scale, positions=positions,
        attention_mask=attention_mask, softmax_offset=softmax_offset,
    )  # fmt: skip
    return shares.sum(), shares.numel(), max_logit


def first_token_shares(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    softmax_scale: float,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    softmax_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`[b, np, k]` first-token share of every sampled query, max logit), on the device.

    About ten ops whatever the shape (a logged step runs it once per layer): the scale is
    applied to the `k` sampled queries rather than to the scores, and the scores are masked
    and soft-maxed in place. `softmax_offset` `[np]`: the extra logit of each head's softmax.
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
    max_logit = logits.amax()
    if softmax_offset is not None:
        # [b, np, k, sk] -> [b, np, k, sk + 1]: the offset joins the softmax as a last key.
        offset = _float32(softmax_offset.detach()).view(1, heads, 1, 1)
        logits = torch.cat([logits, offset.expand(batch, heads, count, 1)], dim=-1)
    return torch.softmax(logits, dim=-1)[..., 0], max_logit


def query_class_weights(
    flags: torch.Tensor | None, positions: torch.Tensor, *, batch: int
) -> torch.Tensor:
    """`[3, b, k]` float weights of the sampled queries: all, not flagged, flagged.

    `flags` `[b, s]` (True: a query of the flagged type, e.g. a trigger) or None: then only the
    first class has weight (the split is left empty, not guessed).
    """
    if flags is None:
        weights = torch.zeros(3, batch, positions.numel(), device=positions.device)
        weights[0] = 1.0
        return weights
    flagged = flags.to(positions.device).index_select(1, positions).float()
    return torch.stack([torch.ones_like(flagged), 1.0 - flagged, flagged])


def class_share_sums(
    shares: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`[3, np]` share sums per query class and head, `[3]` query counts per class).

    shares `[b, np, k]`, weights `[3, b, k]` (`query_class_weights`).
    """
    sums = torch.einsum("bnk,cbk->cn", shares, weights.to(shares.dtype))
    return sums, weights.sum(dim=(1, 2))


def value_norms(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(sum of value-vector norms at position 0, sum at the other positions, their counts).

    value `[sk, b, ng, hn]`; norms per (position, batch entry, group); counts known from shapes.
    """
    norms = torch.linalg.vector_norm(_float32(value), dim=-1)  # [sk, b, ng]
    first = norms[0].sum()
    return first, norms.sum() - first, norms[0].numel(), norms.numel() - norms[0].numel()


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
