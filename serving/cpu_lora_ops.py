"""Grouped multi-LoRA ops for CPU: one small GEMM pair per active adapter, not per token.

vLLM's CPU path (`vllm/lora/ops/torch_ops`) gathers a full LoRA weight matrix for
every token (`lora_b_weights[indices]`) and contracts with einsum, so each layer
moves tokens x rank x hidden weights through memory. Here the tokens of one step
are grouped by adapter slot once (`LoRAGroups.from_token_slots`), and every layer
reuses that grouping:

- "bmm": each group is padded to the largest group and all groups go through one
  batched matmul per projection (few ops, best when groups are similar in size);
- "loop": one plain matmul per group (no padding waste, best when one group
  dominates, e.g. a long prefill next to a few decode tokens).

A layer's active weights are prepared once (`PreparedLoRAWeights`: all slices'
A stacked along the rank, all slices' B as one block-diagonal matrix) and reused
until the active slots or the weights change; tensor version counters catch
every in-place update vLLM makes when it loads an adapter into a slot.

Numerics follow vLLM's reference ops: the shrink (x @ A^T * scale) accumulates in
float32, the expand (h @ B^T) runs in the output's dtype and is added in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Padding more than this factor over the real token count switches to the loop.
MAX_PADDING_FACTOR = 1.5


@dataclass(frozen=True)
class LoRAGroups:
    """Tokens of one step grouped by the LoRA slot they use (slot -1 = no LoRA)."""

    slots: torch.Tensor
    """(k,) active slot indices, ascending."""
    tokens: torch.Tensor
    """(n,) rows of the batch that use a LoRA, grouped by slot."""
    counts: list[int]
    """Tokens per group, in `slots` order (sums to n)."""
    padded_rows: torch.Tensor
    """(k, G) token row for each padded group position; padding repeats a real row."""
    valid: torch.Tensor | None
    """(n,) positions of the real entries in the flat (k * G) layout; None if no padding."""
    num_tokens: int
    """Rows in the batch, with or without a LoRA."""
    use_bmm: bool

    @staticmethod
    def from_token_slots(token_slots: torch.Tensor) -> LoRAGroups | None:
        """Group the batch rows by slot; None when no row uses a LoRA."""
        rows = torch.nonzero(token_slots >= 0).squeeze(1)
        if rows.numel() == 0:
            return None
        slot_of_row = token_slots[rows]
        order = torch.argsort(slot_of_row, stable=True)
        rows, slot_of_row = rows[order], slot_of_row[order]
        slots, counts_t = torch.unique_consecutive(slot_of_row, return_counts=True)
        counts = counts_t.tolist()
        k, widest, n = len(counts), max(counts), rows.numel()
        starts = torch.cumsum(counts_t, 0) - counts_t
        group_of_entry = torch.repeat_interleave(torch.arange(k), counts_t)
        valid = group_of_entry * widest + (torch.arange(n) - starts[group_of_entry])
        # Padding points at each group's first row: computed, then never written back.
        padded = rows[starts].repeat_interleave(widest)
        padded[valid] = rows
        return LoRAGroups(
            slots=slots,
            tokens=rows,
            counts=counts,
            padded_rows=padded.view(k, widest),
            valid=None if k * widest == n else valid,
            num_tokens=token_slots.numel(),
            use_bmm=k * widest <= MAX_PADDING_FACTOR * n,
        )


@dataclass(frozen=True)
class PreparedLoRAWeights:
    """One layer's active LoRA weights, laid out for the grouped GEMMs."""

    key: tuple
    a: torch.Tensor
    """(k, S*r, in) float32: every slice's A stacked along the rank, scale folded in."""
    b: torch.Tensor
    """(k, S*r, sum of slice widths) in the output dtype, block-diagonal over slices."""


def _active(stacked: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(max_loras, 1, a, b) stacked weights -> (k, a, b) for the active slots."""
    if slots.numel() == stacked.shape[0]:  # every slot active (slots are unique, sorted)
        return stacked.squeeze(1)
    return stacked.index_select(0, slots).squeeze(1)


def prepare_weights(
    groups: LoRAGroups,
    lora_a: tuple[torch.Tensor, ...],
    lora_b: tuple[torch.Tensor, ...],
    scale: float,
    dtype: torch.dtype,
    cached: PreparedLoRAWeights | None = None,
) -> PreparedLoRAWeights:
    """The layer's prepared weights, reusing `cached` when nothing changed since."""
    tensors = (*lora_a, *lora_b)
    key = (
        tuple(groups.slots.tolist()),
        scale,
        dtype,
        tuple(t.data_ptr() for t in tensors),
        tuple(t._version for t in tensors),  # bumped by every in-place write (slot loads)
    )
    if cached is not None and cached.key == key:
        return cached
    a = torch.cat([_active(t, groups.slots) for t in lora_a], dim=1).float() * scale
    rank = lora_b[0].shape[-1]
    widths = [t.shape[2] for t in lora_b]
    b = torch.zeros(len(groups.counts), rank * len(lora_b), sum(widths), dtype=dtype)
    offset = 0
    for index, (stacked, width) in enumerate(zip(lora_b, widths, strict=True)):
        block = _active(stacked, groups.slots).transpose(1, 2)  # (k, r, width)
        b[:, index * rank : (index + 1) * rank, offset : offset + width] = block
        offset += width
    return PreparedLoRAWeights(key=key, a=a, b=b)


def add_grouped_lora(
    groups: LoRAGroups, y: torch.Tensor, x: torch.Tensor, weights: PreparedLoRAWeights
) -> None:
    """y[rows, :sum of widths] += (x[rows] @ A^T * scale) @ B^T for each row's slot, in place."""
    width = weights.b.shape[-1]
    if groups.use_bmm:
        shrunk = torch.bmm(x[groups.padded_rows].float(), weights.a.transpose(1, 2))
        out = torch.bmm(shrunk.to(y.dtype), weights.b).view(-1, width)
        if groups.valid is not None:
            out = out.index_select(0, groups.valid)
    else:
        xs = torch.split(x[groups.tokens].float(), groups.counts)
        out = torch.cat(
            [
                (x_group @ a.t()).to(y.dtype) @ b
                for x_group, a, b in zip(xs, weights.a, weights.b, strict=True)
            ]
        )
    y[:, :width].index_add_(0, groups.tokens, out)
