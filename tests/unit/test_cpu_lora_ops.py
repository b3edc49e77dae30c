"""loraplex's CPU multi-LoRA ops (the fused C++ kernel and the grouped torch ops) equal
vLLM's reference ops."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.model_manager import LoRAModelManager
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from loraplex.serving.cpu_lora_ops import LoRAGroups
from loraplex.serving.punica_cpu import FusedPunicaWrapperCPU, GroupedPunicaWrapperCPU

MAX_LORAS = 8
WRAPPERS = {"fused": FusedPunicaWrapperCPU, "grouped": GroupedPunicaWrapperCPU}
# Every LoRA projection of SmolLM2 as vLLM packs it: (input size, output slices).
PROJECTIONS = {
    "qkv_proj": (576, (576, 192, 192)),
    "o_proj": (576, (576,)),
    "gate_up_proj": (576, (1536, 1536)),
    "down_proj": (1536, (576,)),
}


def _slots(kind: str, tokens: int) -> list[int]:
    """Slot per token; -1 = base model. The last slot stays empty in mixes with -1,
    because vLLM's reference reads slot -1 (the last one) for base tokens."""
    if kind == "uniform-all":
        return [i % MAX_LORAS for i in range(tokens)]
    if kind == "mixed-with-base":
        return [(i % MAX_LORAS) - 1 for i in range(tokens)]  # -1, 0 .. 6
    if kind == "single":
        return [3] * tokens
    if kind == "unbalanced":  # one long prefill next to a few decode tokens
        return [2] * (tokens - 3) + [0, -1, 5]
    if kind == "in-order-equal":  # requests queued adapter by adapter: no gathers
        return [i * 4 // tokens for i in range(tokens)]
    if kind == "in-order-skewed":
        return [1] * (tokens - 2) + [4, 6]
    raise ValueError(kind)


def _wrappers(
    slots: list[int], prefill: bool, wrapper: str = "grouped"
) -> tuple[PunicaWrapperCPU, GroupedPunicaWrapperCPU]:
    # Slot i holds LoRA id i + 1; id 0 in a mapping means "no LoRA".
    mapping = LoRAMapping(tuple(s + 1 for s in slots), tuple(s + 1 for s in slots), prefill)
    ids = list(range(1, MAX_LORAS + 1))
    ref, new = PunicaWrapperCPU(4096, 256, "cpu"), WRAPPERS[wrapper](4096, 256, "cpu")
    for wrapper in (ref, new):
        wrapper.update_metadata(mapping, ids, MAX_LORAS + 1, 49152)
    return ref, new


def _weights(rank, in_size, slices, dtype, empty_last):
    gen = torch.Generator().manual_seed(rank * 1000 + in_size)
    lora_a = tuple(
        torch.randn(MAX_LORAS, 1, rank, in_size, generator=gen, dtype=dtype) / in_size**0.5
        for _ in slices
    )
    lora_b = tuple(
        torch.randn(MAX_LORAS, 1, out, rank, generator=gen, dtype=dtype) for out in slices
    )
    if empty_last:
        for stacked in (*lora_a, *lora_b):
            stacked[-1] = 0
    return lora_a, lora_b


@pytest.mark.parametrize("projection", sorted(PROJECTIONS))
@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize(
    "kind",
    ["uniform-all", "mixed-with-base", "single", "unbalanced", "in-order-equal", "in-order-skewed"],
)
@pytest.mark.parametrize("prefill", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_add_lora_linear_matches_vllm(projection, rank, kind, prefill, dtype, wrapper) -> None:
    in_size, slices = PROJECTIONS[projection]
    tokens = 40
    slots = _slots(kind, tokens)
    ref, new = _wrappers(slots, prefill, wrapper)
    lora_a, lora_b = _weights(rank, in_size, slices, dtype, empty_last=-1 in slots)
    gen = torch.Generator().manual_seed(1)  # same inputs whatever ran before
    x = torch.randn(tokens, in_size, generator=gen).to(dtype)
    y_start = torch.randn(tokens, sum(slices), generator=gen).to(dtype)
    y_ref, y_new = y_start.clone(), y_start.clone()
    ref.add_lora_linear(y_ref, x, lora_a, lora_b, 0.5, slices)
    new.add_lora_linear(y_new, x, lora_a, lora_b, 0.5, slices)
    # float32: y and the delta are O(1-10) and may cancel, so the absolute part of the
    # tolerance covers float32 rounding of the operands, not of the (small) result.
    rtol, atol = (1e-5, 1e-4) if dtype == torch.float32 else (3e-2, 3e-2)
    torch.testing.assert_close(y_new, y_ref, rtol=rtol, atol=atol)
    assert not torch.equal(y_new, y_start), "the LoRA delta was not applied"
    if wrapper == "fused":  # the C++ kernel ran, not the torch fallback
        assert len(new._native) == 1 and not new._prepared


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_base_tokens_stay_untouched_when_every_slot_is_occupied(wrapper) -> None:
    in_size, slices = PROJECTIONS["o_proj"]
    slots = [-1, 7, -1, 0, 3]
    _, new = _wrappers(slots, prefill=False, wrapper=wrapper)
    lora_a, lora_b = _weights(16, in_size, slices, torch.float32, empty_last=False)
    x = torch.randn(len(slots), in_size)
    y = torch.zeros(len(slots), sum(slices))
    new.add_lora_linear(y, x, lora_a, lora_b, 1.0, slices)
    assert torch.count_nonzero(y[[0, 2]]) == 0
    assert torch.count_nonzero(y[[1, 3, 4]]) > 0


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_no_lora_step_changes_nothing(wrapper) -> None:
    _, new = _wrappers([-1] * 6, prefill=True, wrapper=wrapper)
    lora_a, lora_b = _weights(16, 576, (576,), torch.float32, empty_last=False)
    y = torch.randn(6, 576)
    before = y.clone()
    new.add_lora_linear(y, torch.randn(6, 576), lora_a, lora_b, 1.0, (576,))
    assert torch.equal(y, before)


def test_grouping_chooses_bmm_for_balanced_and_loop_for_skewed_batches() -> None:
    balanced = LoRAGroups.from_token_slots(torch.tensor([0, 1, 2, 0, 1, 2]))
    assert balanced is not None and balanced.use_bmm and balanced.counts == [2, 2, 2]
    skewed = LoRAGroups.from_token_slots(torch.tensor([1] * 30 + [0, 2]))
    assert skewed is not None and not skewed.use_bmm
    assert skewed.gather_rows.tolist() == [30, *range(30), 31]
    assert skewed.inverse.tolist() == [*range(1, 31), 0, 31]
    assert LoRAGroups.from_token_slots(torch.tensor([-1, -1])) is None


def test_batches_already_grouped_by_slot_skip_the_gathers() -> None:
    in_order = LoRAGroups.from_token_slots(torch.tensor([0, 0, 3, 3, 5, 5]))
    assert in_order is not None and in_order.in_order
    for slots in ([3, 0, 0], [0, 0, -1], [0, 0, 0, 1]):  # unsorted, base row, padded bmm
        groups = LoRAGroups.from_token_slots(torch.tensor(slots))
        assert groups is not None and not groups.in_order, slots


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_prepared_weights_follow_in_place_slot_reloads_and_slot_changes(wrapper) -> None:
    """vLLM loads an adapter by writing into the stacked tensors in place; the next step
    must use the new weights, and a step with other active slots must use theirs."""
    in_size, slices = PROJECTIONS["qkv_proj"]
    lora_a, lora_b = _weights(16, in_size, slices, torch.float32, empty_last=True)
    x = torch.randn(12, in_size, generator=torch.Generator().manual_seed(0))
    close = {"rtol": 1e-5, "atol": 1e-4}

    def step(slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ref, new = _wrappers(slots, prefill=False, wrapper=wrapper)
        new._prepared = new._native = cache  # the same layer across steps
        y_ref, y_new = torch.zeros(12, sum(slices)), torch.zeros(12, sum(slices))
        ref.add_lora_linear(y_ref, x, lora_a, lora_b, 1.0, slices)
        new.add_lora_linear(y_new, x, lora_a, lora_b, 1.0, slices)
        return y_ref, y_new

    cache: dict = {}
    first = step([i % 4 for i in range(12)])
    torch.testing.assert_close(first[1], first[0], **close)
    for stacked in (*lora_a, *lora_b):  # an adapter reloaded into slot 2
        stacked[2, 0].normal_(std=0.05)
    second = step([i % 4 for i in range(12)])
    torch.testing.assert_close(second[1], second[0], **close)
    assert not torch.allclose(second[1], first[1])
    third = step([(i % 3) + 4 for i in range(12)])  # other slots active
    torch.testing.assert_close(third[1], third[0], **close)


def _logits_case(nonzero_slot: int | None):
    slots = [i % MAX_LORAS for i in range(16)]
    ref, new = _wrappers(slots, prefill=False)
    gen = torch.Generator().manual_seed(7)
    vocab, hidden, rank = 1024, 64, 8
    lora_a = torch.randn(MAX_LORAS, 1, rank, hidden, generator=gen)
    lora_b = torch.zeros(MAX_LORAS, 1, vocab, rank)
    if nonzero_slot is not None:
        lora_b[nonzero_slot] = torch.randn(1, vocab, rank, generator=gen)
    x = torch.randn(16, hidden, generator=gen)
    logits = torch.randn(16, vocab, generator=gen)
    return ref, new, lora_a, lora_b, x, logits


@pytest.mark.parametrize("nonzero_slot", [None, 5])
def test_lm_head_lora_matches_vllm_and_is_skipped_only_while_all_zero(nonzero_slot) -> None:
    ref, new, lora_a, lora_b, x, logits = _logits_case(nonzero_slot)
    expected, got = logits.clone(), logits.clone()
    ref.add_lora_logits(expected, x, lora_a, lora_b, 1.0)
    new.add_lora_logits(got, x, lora_a, lora_b, 1.0)
    torch.testing.assert_close(got, expected)
    assert torch.equal(got, logits) == (nonzero_slot is None)


def test_lm_head_lora_loaded_into_a_slot_later_is_applied() -> None:
    ref, new, lora_a, lora_b, x, logits = _logits_case(None)
    new.add_lora_logits(logits.clone(), x, lora_a, lora_b, 1.0)  # caches "all zero"
    lora_b[2].copy_(torch.ones(1, lora_b.shape[2], lora_b.shape[3]))  # a slot load, in place
    expected, got = logits.clone(), logits.clone()
    ref.add_lora_logits(expected, x, lora_a, lora_b, 1.0)
    new.add_lora_logits(got, x, lora_a, lora_b, 1.0)
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, logits)


def test_lm_head_lora_follows_recorded_slot_writes() -> None:
    """Writes recorded as vLLM's model manager records them (only that slot is checked
    again): LM-head weights loaded into slot 2 turn the logits LoRA on; slot 2 reloaded
    with an adapter that has none turns it off again."""
    ref, new, lora_a, lora_b, x, logits = _logits_case(None)
    new.add_lora_logits(logits.clone(), x, lora_a, lora_b, 1.0)  # caches "all zero"
    lora_b[2].fill_(0.5)
    new.slot_writes.record(2)
    expected, got = logits.clone(), logits.clone()
    ref.add_lora_logits(expected, x, lora_a, lora_b, 1.0)
    new.add_lora_logits(got, x, lora_a, lora_b, 1.0)
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, logits)
    lora_b[2].zero_()
    new.slot_writes.record(2)
    got = logits.clone()
    new.add_lora_logits(got, x, lora_a, lora_b, 1.0)
    assert torch.equal(got, logits)


@pytest.mark.parametrize("nonzero_slot", [None, 3])
def test_embedding_lora_matches_vllm_and_is_skipped_only_while_all_zero(nonzero_slot) -> None:
    slots = [i % MAX_LORAS for i in range(12)]
    ref, new = _wrappers(slots, prefill=False)
    gen = torch.Generator().manual_seed(11)
    hidden, rank = 64, 8
    lora_b = torch.zeros(MAX_LORAS, 1, hidden, rank)
    if nonzero_slot is not None:
        lora_b[nonzero_slot] = torch.randn(1, hidden, rank, generator=gen)
    x = torch.randn(12, rank, generator=gen)  # the per-token rows of embedding A
    start = torch.randn(12, hidden, generator=gen)
    expected, got = start.clone(), start.clone()
    ref.add_lora_embedding(expected, x, lora_b, add_inputs=True)
    new.add_lora_embedding(got, x, lora_b, add_inputs=True)
    torch.testing.assert_close(got, expected)
    assert torch.equal(got, start) == (nonzero_slot is None)
    lora_b[5].fill_(0.5)  # an adapter with embedding LoRA loaded later, in place
    expected, got = start.clone(), start.clone()
    ref.add_lora_embedding(expected, x, lora_b, add_inputs=True)
    new.add_lora_embedding(got, x, lora_b, add_inputs=True)
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, start)


def _step(fused: FusedPunicaWrapperCPU, layers: dict, slots: list[int], gen) -> None:
    """One engine step through every layer: the fused wrapper's result equals vLLM's
    reference ops for the tokens' `slots` (-1: base model), and every prepared call got
    this step's rows and enough scratch."""
    mapping = LoRAMapping(tuple(s + 1 for s in slots), tuple(s + 1 for s in slots), False)
    reference = PunicaWrapperCPU(4096, 256, "cpu")
    for wrapper in (reference, fused):
        wrapper.update_metadata(mapping, list(range(1, MAX_LORAS + 1)), MAX_LORAS + 1, 49152)
    # o_proj (one slice) before qkv_proj (three): the scratch grows within the step.
    for name in ("o_proj", "qkv_proj", "gate_up_proj", "down_proj"):
        in_size, slices = PROJECTIONS[name]
        lora_a, lora_b = layers[name]
        x = torch.randn(len(slots), in_size, generator=gen)
        expected, got = torch.zeros(len(slots), sum(slices)), torch.zeros(len(slots), sum(slices))
        reference.add_lora_linear(expected, x, lora_a, lora_b, 1.0, slices)
        fused.add_lora_linear(got, x, lora_a, lora_b, 1.0, slices)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4, msg=name)
    tiles = fused._tiles
    assert tiles is not None
    for call in fused._calls.values():
        assert call.step is not None and call.step.tiles is tiles  # this step's rows
        rows = tiles.rows.numel() + fused._kernel.tile_rows  # type: ignore[union-attr]
        assert call.step.shrunk.numel() >= rows * call.weights.srp


def _fused_wrapper() -> FusedPunicaWrapperCPU:
    fused = FusedPunicaWrapperCPU(4096, 256, "cpu")
    if fused._kernel is None:
        pytest.skip("no C++ compiler: the fused kernel cannot be built here")
    return fused


def test_one_fused_wrapper_across_steps_reuses_each_layers_call_until_a_write() -> None:
    """The serving case: one wrapper, many steps, every layer called each step. A layer's
    prepared kernel call is reused while nothing changed; a slot written in place (with or
    without vLLM's record of it) and a step with other slots and more tokens still give
    vLLM's reference result, and a wider layer growing the scratch mid-step leaves every
    layer's call with room."""
    # The last slot stays empty: the reference reads it for base tokens (slot -1).
    layers = {name: _weights(16, *PROJECTIONS[name], torch.float32, True) for name in PROJECTIONS}
    fused, gen = _fused_wrapper(), torch.Generator().manual_seed(3)
    _step(fused, layers, [i % 4 for i in range(6)], gen)
    first_calls = dict(fused._calls)
    assert len(first_calls) == len(PROJECTIONS)
    _step(fused, layers, [(i % 5) + 2 for i in range(13)], gen)  # other slots, more tokens
    assert fused._calls == first_calls
    # Slot 3 written in place and the write recorded, without vLLM's activate_adapter
    # (which lays the slot out at once): every layer re-lays out on its next call.
    for name, (lora_a, lora_b) in layers.items():
        for stacked in (*lora_a, *lora_b):
            stacked[3, 0].normal_(std=0.05) if name != "o_proj" else stacked[3, 0].zero_()
    fused.slot_writes.record(3)
    _step(fused, layers, [3, 5, 5, 3, -1, 0], gen)
    assert all(first_calls[key] is not call for key, call in fused._calls.items())
    second_calls = dict(fused._calls)
    _, down_b = layers["down_proj"]
    down_b[0][5, 0].normal_()  # a write nobody recorded: every slot of that layer again
    _step(fused, layers, [5, 0, 5, -1], gen)
    rebuilt = {key for key, call in fused._calls.items() if second_calls[key] is not call}
    assert rebuilt == {id(down_b)}


class _StackedLoRALayer:
    """What a vLLM LoRA layer does when the model manager writes a slot: `set_lora`
    copies an adapter's weights into that slot of its stacked tensors, `reset_lora`
    zeroes the slot for an adapter without weights for this layer."""

    def __init__(self, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...]):
        self.lora_a, self.lora_b = lora_a, lora_b

    def set_lora(self, index: int, lora_a: list, lora_b: list) -> None:
        for stacked, weights in zip((*self.lora_a, *self.lora_b), (*lora_a, *lora_b), strict=True):
            stacked[index, 0].copy_(weights)

    def reset_lora(self, index: int) -> None:
        for stacked in (*self.lora_a, *self.lora_b):
            stacked[index] = 0


def _adapter(lora_id: int, layers: dict, without: str) -> SimpleNamespace:
    """A LoRA model with random weights for every layer but `without`."""
    weights = {
        name: SimpleNamespace(
            lora_a=[torch.randn(t.shape[2:]) * 0.05 for t in lora_a],
            lora_b=[torch.randn(t.shape[2:]) * 0.05 for t in lora_b],
        )
        for name, (lora_a, lora_b) in layers.items()
        if name != without
    }
    return SimpleNamespace(id=lora_id, get_lora=weights.get)


def _manager(fused: FusedPunicaWrapperCPU, layers: dict) -> LoRAModelManager:
    """vLLM's LoRA model manager with what `activate_adapter` reads: slots 0-6 hold
    adapters 1-7 except slot 3 (free), slot 7 stays empty; adapters 9 and 10 registered."""
    manager = object.__new__(LoRAModelManager)
    manager.lora_index_to_id = [1, 2, 3, None, 5, 6, 7, None]
    manager._active_adapters = {i: None for i in manager.lora_index_to_id if i is not None}
    manager._registered_adapters = {
        9: _adapter(9, layers, without="o_proj"),
        10: _adapter(10, layers, without="qkv_proj"),
    }
    manager.modules = {name: _StackedLoRALayer(*weights) for name, weights in layers.items()}
    manager.punica_wrapper_mapping = {"language_model": fused}
    manager.is_pooling_model = False
    return manager


def test_an_adapter_load_lays_out_its_slot_where_vllm_writes_it() -> None:
    """vLLM's own `activate_adapter` loading adapters into free slots: the wrapper copies
    the written slot of every layer during the load (one C++ call), so the next step
    reuses every prepared call and still equals vLLM's reference ops. A layer written
    without a record before a load is not trusted: its next call re-lays out every slot."""
    layers = {name: _weights(16, *PROJECTIONS[name], torch.float32, True) for name in PROJECTIONS}
    fused, gen = _fused_wrapper(), torch.Generator().manual_seed(5)
    manager = _manager(fused, layers)
    _step(fused, layers, [0, 1, 2, 4, 5, 6], gen)
    calls = dict(fused._calls)

    assert manager.activate_adapter(9) and manager.lora_index_to_id[3] == 9
    assert not bool(layers["o_proj"][1][0][3].any())  # reset: no weights in the adapter
    _step(fused, layers, [3, 5, 5, 3, -1, 0], gen)
    assert all(calls[key] is call for key, call in fused._calls.items())  # none rebuilt

    _, down_b = layers["down_proj"]
    down_b[0][5, 0].normal_()  # written without a record, before the next load
    manager.lora_index_to_id[1] = None  # adapter 2 deactivated as vLLM does it
    del manager._active_adapters[2]
    assert manager.activate_adapter(10) and manager.lora_index_to_id[1] == 10
    _step(fused, layers, [1, 5, 5, 1, 3, -1], gen)  # slot 5 must show the unrecorded write
    rebuilt = {key for key, call in fused._calls.items() if calls[key] is not call}
    assert rebuilt == {id(down_b)}


def test_a_failed_layout_at_the_write_leaves_the_load_to_the_forward(monkeypatch) -> None:
    """If the C++ copy refused the layers at the write, the adapter still loads, and each
    layer lays the slot out on its next call instead: results still equal vLLM's ops."""
    layers = {name: _weights(16, *PROJECTIONS[name], torch.float32, True) for name in PROJECTIONS}
    fused, gen = _fused_wrapper(), torch.Generator().manual_seed(7)
    manager = _manager(fused, layers)
    _step(fused, layers, [0, 1, 2, 4, 5, 6], gen)
    calls = dict(fused._calls)

    kernel = fused._kernel
    assert kernel is not None
    lay_out, refused = kernel.layout_slots, []

    def refuse_once(jobs, slot):  # the call at the write; the forward's calls go through
        if not refused:
            refused.append(slot)
            raise RuntimeError("lpx_layout_slots: unsupported element size or slice count")
        lay_out(jobs, slot)

    monkeypatch.setattr(kernel, "layout_slots", refuse_once)
    assert manager.activate_adapter(9) and manager.lora_index_to_id[3] == 9
    assert refused == [3]
    _step(fused, layers, [3, 5, 5, 3, -1, 0], gen)
    assert all(calls[key] is not call for key, call in fused._calls.items())  # all rebuilt
