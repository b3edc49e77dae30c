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

Both GEMMs run in the model's dtype (bf16 GEMMs accumulate in float32 inside
oneDNN/MKL, and vLLM's reference rounds the shrink to that dtype before its expand
too). The result is written in sorted order into a buffer with one extra zero row
and brought back to batch order with one gather, then added to y: scatter ops
(`index_add_`) are pathologically slow for bf16 on CPU with several threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Padding more than this factor over the real token count switches to the loop.
MAX_PADDING_FACTOR = 1.5


def rows_by_slot(
    token_slots: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(rows using a LoRA, grouped by slot in batch order within a slot; the slots,
    ascending; rows per slot), or None when no row uses a LoRA (slot -1)."""
    rows = torch.nonzero(token_slots >= 0).squeeze(1)
    if rows.numel() == 0:
        return None
    slot_of_row = token_slots[rows]
    order = torch.argsort(slot_of_row, stable=True)
    rows, slot_of_row = rows[order], slot_of_row[order]
    slots, counts = torch.unique_consecutive(slot_of_row, return_counts=True)
    return rows, slots, counts


@dataclass(frozen=True)
class LoRAGroups:
    """Tokens of one step grouped by the LoRA slot they use (slot -1 = no LoRA)."""

    slots: torch.Tensor
    """(k,) active slot indices, ascending."""
    counts: list[int]
    """Tokens per group, in `slots` order."""
    widest: int
    """Tokens in the largest group (G)."""
    use_bmm: bool
    """Pad every group to G and run batched GEMMs; else one GEMM pair per group."""
    gather_rows: torch.Tensor
    """Batch rows to compute, grouped by slot: (k * G,) padded for bmm, (n,) for the loop."""
    inverse: torch.Tensor
    """(num_tokens,) for each batch row, its computed row; rows without LoRA point one
    past the end, at a zero row."""
    num_tokens: int
    """Rows in the batch, with or without a LoRA."""
    in_order: bool = False
    """Every row uses a LoRA and the batch is already grouped by slot with no padding
    (one adapter, or requests queued adapter by adapter): no gathers needed."""

    @property
    def computed_rows(self) -> int:
        return self.gather_rows.numel()

    @staticmethod
    def from_token_slots(token_slots: torch.Tensor) -> LoRAGroups | None:
        """Group the batch rows by slot; None when no row uses a LoRA."""
        grouped = rows_by_slot(token_slots)
        if grouped is None:
            return None
        rows, slots, counts_t = grouped
        counts = counts_t.tolist()
        k, widest, n = len(counts), max(counts), rows.numel()
        use_bmm = k * widest <= MAX_PADDING_FACTOR * n
        if use_bmm:
            starts = torch.cumsum(counts_t, 0) - counts_t
            group_of_entry = torch.repeat_interleave(torch.arange(k), counts_t)
            position = group_of_entry * widest + (torch.arange(n) - starts[group_of_entry])
            # Padding repeats each group's first row: computed, never read back.
            gather_rows = rows[starts].repeat_interleave(widest)
            gather_rows[position] = rows
        else:
            position, gather_rows = torch.arange(n), rows
        inverse = torch.full((token_slots.numel(),), gather_rows.numel(), dtype=torch.long)
        inverse[rows] = position
        in_order = gather_rows.numel() == token_slots.numel() and bool(
            torch.equal(gather_rows, torch.arange(gather_rows.numel()))
        )
        return LoRAGroups(
            slots=slots,
            counts=counts,
            widest=widest,
            use_bmm=use_bmm,
            gather_rows=gather_rows,
            inverse=inverse,
            num_tokens=token_slots.numel(),
            in_order=in_order,
        )


class SlotWrites:
    """The LoRA slots vLLM wrote, each with the sequence number of its latest write.

    Told by the model manager each time it loads an adapter into a slot (see
    `punica_cpu.watch_slot_writes`), so a layer whose weights changed can copy only the
    slots written since it last looked instead of every slot."""

    def __init__(self) -> None:
        self.seq = 0
        self._latest: dict[int, int] = {}

    def record(self, slot: int) -> None:
        self.seq += 1
        self._latest[slot] = self.seq

    def since(self, seq: int) -> set[int]:
        """Slots written after the write numbered `seq`."""
        return {slot for slot, latest in self._latest.items() if latest > seq}


@dataclass(frozen=True)
class PreparedLoRAWeights:
    """One layer's active LoRA weights, laid out for the grouped GEMMs."""

    key: tuple
    a: torch.Tensor
    """(k, in, S*r): every slice's A^T side by side along the rank, scale folded in."""
    b: torch.Tensor
    """(k, S*r, sum of slice widths): every slice's B^T, block-diagonal over slices."""


def _active(stacked: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(max_loras, 1, a, b) stacked weights -> (k, a, b) for the active slots."""
    if slots.numel() == stacked.shape[0]:  # every slot active (slots are unique, sorted)
        return stacked.squeeze(1)
    return stacked.index_select(0, slots).squeeze(1)


def weights_state(lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...]) -> tuple:
    """Changes exactly when vLLM writes a slot: the stacked tensors' storage and their
    version counters, which every in-place write (an adapter loaded into a slot) bumps."""
    tensors = (*lora_a, *lora_b)
    return tuple(t.data_ptr() for t in tensors), tuple(t._version for t in tensors)


def prepare_weights(
    groups: LoRAGroups,
    lora_a: tuple[torch.Tensor, ...],
    lora_b: tuple[torch.Tensor, ...],
    scale: float,
    dtype: torch.dtype,
    cached: PreparedLoRAWeights | None = None,
) -> PreparedLoRAWeights:
    """The layer's prepared weights, reusing `cached` when nothing changed since."""
    key = (tuple(groups.slots.tolist()), scale, dtype, weights_state(lora_a, lora_b))
    if cached is not None and cached.key == key:
        return cached
    a = torch.cat([_active(t, groups.slots) for t in lora_a], dim=1).to(dtype) * scale
    rank = lora_b[0].shape[-1]
    widths = [t.shape[2] for t in lora_b]
    b = torch.zeros(len(groups.counts), rank * len(lora_b), sum(widths), dtype=dtype)
    offset = 0
    for index, (stacked, width) in enumerate(zip(lora_b, widths, strict=True)):
        block = _active(stacked, groups.slots).transpose(1, 2)  # (k, r, width)
        b[:, index * rank : (index + 1) * rank, offset : offset + width] = block
        offset += width
    return PreparedLoRAWeights(key=key, a=a.transpose(1, 2).contiguous(), b=b)


def add_grouped_lora(
    groups: LoRAGroups, y: torch.Tensor, x: torch.Tensor, weights: PreparedLoRAWeights
) -> None:
    """y[:, :sum of widths] += (x @ A^T * scale) @ B^T with each row's own slot, in place."""
    rows, width = groups.computed_rows, weights.b.shape[-1]
    if groups.in_order:  # rows are already grouped: no gather in, no gather out
        out = torch.empty(rows, width, dtype=y.dtype)
        _grouped_delta(groups, x, weights, out)
        y[:, :width].add_(out)
        return
    out = torch.empty(rows + 1, width, dtype=y.dtype)
    out[rows].zero_()  # the row that batch rows without a LoRA read
    _grouped_delta(groups, x.index_select(0, groups.gather_rows), weights, out[:rows])
    y[:, :width].add_(out.index_select(0, groups.inverse))


def _grouped_delta(
    groups: LoRAGroups, xs: torch.Tensor, weights: PreparedLoRAWeights, out: torch.Tensor
) -> None:
    """out = the LoRA deltas of `xs`, whose rows are in grouped (and padded) order."""
    if groups.use_bmm:
        k, width = len(groups.counts), out.shape[-1]
        shrunk = torch.bmm(xs.view(k, groups.widest, -1), weights.a)
        torch.bmm(shrunk, weights.b, out=out.view(k, groups.widest, width))
        return
    start = 0
    for count, a, b in zip(groups.counts, weights.a, weights.b, strict=True):
        torch.mm(xs[start : start + count] @ a, b, out=out[start : start + count])
        start += count
