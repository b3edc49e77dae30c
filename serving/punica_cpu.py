"""loraplex's punica wrapper for vLLM on CPU: grouped multi-LoRA instead of per-token gathers.

Installed by the vLLM plugin (serving/plugin.py) on CPU platforms; vLLM's GPU
kernels are never touched. The grouping of the step's tokens by adapter slot is
computed once in `update_metadata` and reused by every LoRA layer of the step;
each layer's weights are prepared once and reused while they do not change.

vLLM also wraps the LM head whenever LoRA is enabled and runs its per-token LoRA
ops on the full vocabulary every step (gathering max_loras x vocab x rank weights
per token), even though adapters that vLLM serves almost never target `lm_head`.
Those weights are all zero then, so the wrapper skips the logits LoRA while they
stay zero; that path alone took about a quarter of each decode step here. The token
embedding's LoRA is skipped the same way.

When vLLM loads an adapter into a slot, its model manager tells the wrapper which slot
(`watch_slot_writes`), and the next step re-lays out and re-checks only that slot's
weights in each layer: a cold adapter load then costs one slot's copy per layer, not
every slot's.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

import torch
from vllm.lora.model_manager import LoRAModelManager
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from loraplex.serving.cpu_lora_ops import (
    LoRAGroups,
    PreparedLoRAWeights,
    SlotWrites,
    add_grouped_lora,
    prepare_weights,
)
from loraplex.serving.native_lora import (
    LayerCall,
    LayoutJob,
    NativeLayerWeights,
    NativeTiles,
    StepOperands,
    load_kernel,
    prepare_native_weights,
    supports,
    use_bf16_pairs,
)

log = logging.getLogger(__name__)


@functools.cache
def watch_slot_writes() -> None:
    """Make vLLM's LoRA model manager tell its punica wrappers each slot it loads an
    adapter into: recorded in their `slot_writes`, and laid out at once by the fused
    wrapper (`after_slot_write`).

    `activate_adapter` is where vLLM writes a slot: it zeroes or fills that slot of every
    LoRA layer (`reset_lora` / `set_lora`) and nothing else writes the stacked weights
    after they are created. The wrappers still check the tensors' version counters, so
    a write made some other way re-lays out every slot rather than serving stale
    weights."""
    activate = LoRAModelManager.activate_adapter

    @functools.wraps(activate)
    def activate_adapter(self: LoRAModelManager, lora_id: int) -> bool:
        if lora_id in self._active_adapters:  # every step, for every adapter in the batch
            return activate(self, lora_id)
        wrappers = [
            wrapper
            for wrapper in self.punica_wrapper_mapping.values()
            if isinstance(wrapper, GroupedPunicaWrapperCPU)
        ]
        before = [wrapper.before_slot_write() for wrapper in wrappers]
        activated = activate(self, lora_id)
        if activated:
            slot = self.lora_index_to_id.index(lora_id)
            for wrapper, state in zip(wrappers, before, strict=True):
                wrapper.slot_writes.record(slot)
                wrapper.after_slot_write(slot, state)
        return activated

    LoRAModelManager.activate_adapter = activate_adapter  # type: ignore[method-assign]


def _holds_nonzero(weights: torch.Tensor) -> bool:
    """Whether any bit of `weights` is set, read 8 bytes at a time where the tensor
    allows (about 10x faster than a bfloat16 `any()` on an LM head's 1.5 MB slot). A
    -0.0 counts as non-zero: the LoRA op then runs and adds nothing, which is still right."""
    size = weights.element_size()
    if (
        weights.is_contiguous()
        and (weights.numel() * size) % 8 == (weights.storage_offset() * size) % 8 == 0
    ):
        return bool(weights.reshape(-1).view(torch.int64).any())
    return bool(weights.any())


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """PunicaWrapperCPU whose linear-layer ops run one GEMM pair per active adapter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        watch_slot_writes()
        self.slot_writes = SlotWrites()
        self._groups: LoRAGroups | None = None
        # One entry per LoRA layer (keyed by its first stacked tensor).
        self._prepared: dict[int, PreparedLoRAWeights] = {}
        # data_ptr of a LoRA B tensor -> (its version, the slot-write number it was
        # checked at, whether each slot holds a non-zero weight).
        self._nonzero: dict[int, tuple[int, int, list[bool]]] = {}

    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        self._groups = LoRAGroups.from_token_slots(self.token_lora_indices)

    def before_slot_write(self) -> Any:
        """Called just before vLLM writes an adapter into a slot; what it returns is
        handed to `after_slot_write`. The grouped torch ops prepare lazily: nothing."""
        return None

    def after_slot_write(self, slot: int, before: Any) -> None:
        """Called once vLLM wrote `slot` and `slot_writes` recorded it."""
        return None

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        groups = self._groups
        # Rows padded or trimmed beyond the step's mapping, or a caller-owned buffer:
        # vLLM's own path handles those cases.
        if buffer is not None or (groups is not None and groups.num_tokens != x.size(0)):
            return super().add_lora_linear(
                y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
            )
        if groups is None:  # no token in this step uses a LoRA
            return None
        layer = id(lora_a_stacked[0])
        weights = prepare_weights(
            groups, lora_a_stacked, lora_b_stacked, scale, y.dtype, self._prepared.get(layer)
        )
        self._prepared[layer] = weights
        add_grouped_lora(groups, y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]), weights)
        return None

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: float,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        if not self._any_nonzero(lora_b_stacked):
            return None  # every adapter's LM-head delta is zero: nothing to add
        return super().add_lora_logits(
            y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs
        )

    def add_lora_embedding(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        # Like the LM head, vLLM wraps the token embedding whenever LoRA is enabled and
        # runs a per-token expand every step, though adapters rarely train embeddings.
        if add_inputs and not self._any_nonzero(lora_b_stacked):
            return None  # every adapter's embedding delta is zero: nothing to add
        return super().add_lora_embedding(y, x, lora_b_stacked, add_inputs, **kwargs)

    def _any_nonzero(self, lora_b_stacked: torch.Tensor) -> bool:
        """Whether any slot holds a non-zero weight, re-checked only after a write, and
        then only in the slots written since (all of them for a write not recorded).

        vLLM fills and clears slots in place, which bumps the tensor's version counter,
        so the (pointer, version) pair changes exactly when the answer can change. The
        LM head's B weights are 8 x 49,152 x 16 values: checking every slot on each
        adapter load took tens of ms of a cold load here."""
        pointer, version = lora_b_stacked.data_ptr(), lora_b_stacked._version
        cached = self._nonzero.get(pointer)
        if cached is not None and cached[0] == version:
            return any(cached[2])
        writes = self.slot_writes
        slots: Iterable[int] = writes.since(cached[1]) if cached is not None else ()
        if cached is not None and slots:
            nonzero = list(cached[2])
        else:  # first look, or a write that was not recorded: every slot
            nonzero, slots = [False] * lora_b_stacked.shape[0], range(lora_b_stacked.shape[0])
        for slot in slots:
            nonzero[slot] = _holds_nonzero(lora_b_stacked[slot])
        self._nonzero[pointer] = (version, writes.seq, nonzero)
        return any(nonzero)


class FusedPunicaWrapperCPU(GroupedPunicaWrapperCPU):
    """GroupedPunicaWrapperCPU whose linear-layer LoRA runs in one fused C++ call per layer
    (serving/csrc/grouped_lora.cpp); the grouped torch ops remain for what the kernel does
    not cover (other dtypes, slice widths that are not whole vectors) and for machines
    where it cannot be built."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kernel = load_kernel()
        self._tiles: NativeTiles | None = None
        self._step: StepOperands | None = None
        self._native: dict[int, NativeLayerWeights] = {}
        # One prepared kernel call per LoRA layer, keyed by its B tuple (vLLM passes each
        # layer's own tuple on every call).
        self._calls: dict[int, LayerCall] = {}
        self._shrunk = torch.zeros(0)
        self._widest_srp = 0

    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        if self._kernel is not None:
            self._tiles = NativeTiles.from_token_slots(
                self.token_lora_indices, self._kernel.tile_rows
            )
            self._step = self._step_operands()

    def before_slot_write(self) -> tuple[list[LayerCall], list[LayerCall]]:
        """The prepared layer calls laid out at the latest recorded write, split into
        those no stacked tensor was written to since (current: copying the slot about to
        be written brings them up to date) and those written to without a record."""
        seq, current, unrecorded = self.slot_writes.seq, [], []
        for call in self._calls.values():
            if call.weights.written_seq == seq:
                (current if call.unwritten() else unrecorded).append(call)
        return current, unrecorded

    def after_slot_write(self, slot: int, before: tuple[list[LayerCall], list[LayerCall]]) -> None:
        """Lay out `slot` of every layer that was current before the write, in one C++
        call, where vLLM writes the slot: the next forward then reuses every prepared call
        instead of re-laying out each layer in Python (about 45 us a layer, 120 layers
        for SmolLM2). A layer written to without a record is left to re-lay out every
        slot on its next call (`_layer_call`), as are layers the torch ops lay out."""
        kernel, seq = self._kernel, self.slot_writes.seq
        current, unrecorded = before
        for call in unrecorded:  # no recorded write after `seq`: its next call copies all
            call.weights.written_seq = seq
        native = [call for call in current if call.layout_job is not None]
        if kernel is None or not native:
            return
        jobs = (LayoutJob * len(native))(*(call.layout_job for call in native))
        try:
            kernel.layout_slots(jobs, slot)
        except RuntimeError as error:  # the load itself must not fail: lay out on the forward
            log.warning("loraplex: slot %d not laid out at the write (%s)", slot, error)
            return
        for call in native:
            call.mark_laid_out(seq)
        log.debug(
            "loraplex: laid out slot %d of %d LoRA layers where vLLM wrote it", slot, len(native)
        )

    def _step_operands(self) -> StepOperands | None:
        """The step's shared operands, with scratch for the widest layer seen so far."""
        tiles, kernel = self._tiles, self._kernel
        if tiles is None or kernel is None:
            return None
        rows = (tiles.rows.numel() + kernel.tile_rows) * self._widest_srp
        if self._shrunk.numel() < rows:
            self._shrunk = torch.zeros(rows)
        return StepOperands(tiles, self._shrunk)

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        # Runs once per LoRA layer per step (120 times in a SmolLM2 step): the common case
        # is one dict lookup, `LayerCall.current` and the C call.
        kernel, step = self._kernel, self._step
        if kernel is not None and buffer is None:
            if step is None:
                return None  # no token in this step uses a LoRA
            x2 = x if x.dim() == 2 else x.view(-1, x.shape[-1])
            y2 = y if y.dim() == 2 else y.view(-1, y.shape[-1])
            call = self._calls.get(id(lora_b_stacked))
            if call is None or not call.current(
                lora_a_stacked, lora_b_stacked, scale, x2, y2, step.tiles.num_tokens
            ):
                call = self._layer_call(x2, y2, lora_a_stacked, lora_b_stacked, scale)
            if call is not None:
                call.run(kernel, self._step, x2, y2)  # type: ignore[arg-type]
                return None
        # No kernel, a caller-owned buffer, rows padded or trimmed beyond the step's
        # mapping, or a layer the kernel does not cover: the grouped torch ops.
        return super().add_lora_linear(
            y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
        )

    def _layer_call(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
    ) -> LayerCall | None:
        """A layer's kernel call prepared (weights laid out for the slots written since),
        or None when the kernel does not cover this call."""
        kernel, tiles = self._kernel, self._tiles
        assert kernel is not None and tiles is not None
        if tiles.num_tokens != x.size(0) or not supports(x, y, lora_b_stacked, kernel.lanes):
            return None
        weights = self.native_weights(lora_a_stacked, lora_b_stacked, scale, y.dtype)
        call = LayerCall(weights, lora_a_stacked, lora_b_stacked, scale, y.dtype)
        if x.size(1) != call.in_dim or y.size(1) != call.width:
            return None
        self._calls[id(lora_b_stacked)] = call
        if weights.srp > self._widest_srp:  # more scratch: every call refills its step
            self._widest_srp = weights.srp
            self._step = self._step_operands()
        return call

    def native_weights(
        self,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        dtype: torch.dtype,
    ) -> NativeLayerWeights:
        """The layer's weights in the kernel's layout, kept per layer and refreshed in
        place for the slots vLLM wrote since (every slot after a write not recorded)."""
        assert self._kernel is not None
        layer = id(lora_a_stacked[0])
        weights = prepare_native_weights(
            self._kernel,
            lora_a_stacked,
            lora_b_stacked,
            scale,
            dtype,
            self._native.get(layer),
            paired=use_bf16_pairs(self._kernel, dtype, lora_a_stacked),
            written=self.slot_writes,
        )
        self._native[layer] = weights
        return weights
