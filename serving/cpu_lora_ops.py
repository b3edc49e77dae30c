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
    valid: torch.Tensor
    """(n,) positions of the real entries in the flattened (k * G) padded layout."""
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
        position = torch.arange(n) - starts[group_of_entry]
        valid = group_of_entry * widest + position
        # Padding points at each group's first row: computed, then never written back.
        padded = rows[starts].repeat_interleave(widest).clone()
        padded[valid] = rows
        return LoRAGroups(
            slots=slots,
            tokens=rows,
            counts=counts,
            padded_rows=padded.view(k, widest),
            valid=valid,
            num_tokens=token_slots.numel(),
            use_bmm=k * widest <= MAX_PADDING_FACTOR * n,
        )


def _active(stacked: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(max_loras, 1, a, b) stacked weights -> (k, a, b) for the active slots."""
    if slots.numel() == stacked.shape[0]:  # every slot active (slots are unique, sorted)
        return stacked.squeeze(1)
    return stacked.index_select(0, slots).squeeze(1)


def lora_shrink(
    groups: LoRAGroups, x: torch.Tensor, lora_a: tuple[torch.Tensor, ...], scale: float
) -> torch.Tensor:
    """All slices' shrink at once: returns float32 (n-or-padded rows, sum of ranks) buffers.

    With bmm the result is (k, G, S*r); with the loop it is (n, S*r) in group order.
    """
    a_all = torch.cat([_active(a, groups.slots) for a in lora_a], dim=1).float()  # (k, S*r, in)
    if groups.use_bmm:
        xg = x[groups.padded_rows].float()  # (k, G, in)
        return torch.bmm(xg, a_all.transpose(1, 2)).mul_(scale)
    xs = x[groups.tokens].float()
    parts = [
        xs_group @ a_group.t()
        for xs_group, a_group in zip(torch.split(xs, groups.counts), a_all, strict=True)
    ]
    return torch.cat(parts).mul_(scale)


def lora_expand(
    groups: LoRAGroups,
    y: torch.Tensor,
    shrunk: torch.Tensor,
    lora_b: tuple[torch.Tensor, ...],
    output_slices: tuple[int, ...],
    offset_start: int = 0,
) -> None:
    """y[rows, slice i] += shrunk[..., rank block i] @ B_i^T, for every slice, in place."""
    rank = lora_b[0].shape[-1]
    offset = offset_start
    for index, (b, width) in enumerate(zip(lora_b, output_slices, strict=True)):
        b_active = _active(b, groups.slots).to(y.dtype)  # (k, out, r)
        h = shrunk[..., index * rank : (index + 1) * rank].to(y.dtype)
        if groups.use_bmm:
            out = torch.bmm(h, b_active.transpose(1, 2))  # (k, G, out)
            out = out.reshape(-1, out.shape[-1]).index_select(0, groups.valid)
        else:
            out = torch.cat(
                [
                    h_group @ b_group.t()
                    for h_group, b_group in zip(
                        torch.split(h, groups.counts), b_active, strict=True
                    )
                ]
            )
        width = min(width, out.shape[-1])
        y[:, offset : offset + width].index_add_(0, groups.tokens, out[:, :width])
        offset += output_slices[index]
