"""The fused C++ multi-LoRA kernel: its build, and the cases the wrapper tests do not cover."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.model_manager import LoRAModelManager

from loraplex.serving import native_lora
from loraplex.serving.cpu_lora_ops import SlotWrites
from loraplex.serving.native_lora import (
    NativeTiles,
    load_kernel,
    prepare_native_weights,
)
from loraplex.serving.punica_cpu import FusedPunicaWrapperCPU


@pytest.fixture(scope="module")
def kernel() -> native_lora.NativeKernel:
    loaded = load_kernel()
    # CI machines have g++: a silent fallback to the torch ops would hide a broken kernel.
    assert loaded is not None, "the fused CPU LoRA kernel did not build"
    return loaded


def _reference(y, x, slots, lora_a, lora_b, scale, magnitude=False) -> torch.Tensor:
    """Row by row in float64: y + scale * B_slot (A_slot x) for each slice. `magnitude`:
    instead, sum_j |scale * (A_slot x)_j| |B_slot[:, j]|, what rounding the shrink
    result scales with."""
    out = torch.zeros_like(y, dtype=torch.float64) if magnitude else y.double().clone()
    for row, slot in enumerate(slots):
        if slot < 0:
            continue
        offset = 0
        for a, b in zip(lora_a, lora_b, strict=True):
            shrunk = scale * (a[slot, 0].double() @ x[row].double())
            weights = b[slot, 0].double()
            if magnitude:
                shrunk, weights = shrunk.abs(), weights.abs()
            out[row, offset : offset + b.shape[2]] += weights @ shrunk
            offset += b.shape[2]
    return out


def _case(slots, in_size, widths, rank, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    slots_count = max(slots) + 1
    lora_a = tuple(
        torch.randn(slots_count, 1, rank, in_size, generator=gen).to(dtype) / in_size**0.5
        for _ in widths
    )
    lora_b = tuple(torch.randn(slots_count, 1, w, rank, generator=gen).to(dtype) for w in widths)
    x = torch.randn(len(slots), in_size, generator=gen).to(dtype)
    y = torch.randn(len(slots), sum(widths), generator=gen).to(dtype)
    return lora_a, lora_b, x, y


def _run(kernel, slots, lora_a, lora_b, x, y, scale=0.75, paired=False) -> torch.Tensor:
    tiles = NativeTiles.from_token_slots(torch.tensor(slots), kernel.tile_rows)
    assert tiles is not None
    weights = prepare_native_weights(kernel, lora_a, lora_b, scale, y.dtype, paired=paired)
    shrunk = torch.zeros(len(slots) + kernel.tile_rows, weights.srp)
    out = y.clone()
    kernel(tiles, out, x, weights, shrunk)
    return out


@pytest.mark.parametrize("group_sizes", [[1], [3, 1, 2], [5, 9, 4], [13]])
@pytest.mark.parametrize("rank", [8, 16, 32, 64])
def test_every_tile_length_and_rank_padding(kernel, group_sizes, rank) -> None:
    """Groups that are not whole tiles, ranks whose slices do not fill whole vectors
    (rank 8 x 1 slice) and ranks wider than the kernel's 4-vector block (64 x 3)."""
    slots = [slot for slot, size in enumerate(group_sizes) for _ in range(size)]
    slots = slots[1::2] + slots[::2]  # interleaved, as requests arrive
    lora_a, lora_b, x, y = _case(slots, 96, (64, 32, 48), rank, torch.float32)
    got = _run(kernel, slots, lora_a, lora_b, x, y)
    expected = _reference(y, x, slots, lora_a, lora_b, 0.75)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_rounds_once_like_torch(kernel) -> None:
    slots = [0, 1, -1, 1, 0, 2]
    lora_a, lora_b, x, y = _case(slots, 576, (576,), 16, torch.bfloat16)
    got = _run(kernel, slots, lora_a, lora_b, x, y, paired=False)
    exact = _reference(y, x, slots, lora_a, lora_b, 0.75)
    # Float32 accumulation and one rounding: within half a bf16 step (up to 2^-8 relative) of
    # the exact answer, plus float32 noise where y and the delta cancel.
    error = (got.double() - exact).abs()
    assert bool((error <= exact.abs() * 2.0**-8 + 1e-4).all()), float(error.max())
    assert torch.equal(got[2], y[2]), "the row without a LoRA changed"


def test_rows_of_a_wider_buffer(kernel) -> None:
    """x and y may be column slices of wider tensors (row stride != width)."""
    slots = [1, 0, 1, 1, 0]
    lora_a, lora_b, x_wide, y_wide = _case(slots, 128, (64,), 16, torch.float32)
    x, y = x_wide[:, :96], torch.cat([y_wide, y_wide], dim=1)[:, :64]
    lora_a = tuple(a[..., :96].contiguous() for a in lora_a)
    got = _run(kernel, slots, lora_a, lora_b, x, y)
    expected = _reference(y, x, slots, lora_a, lora_b, 0.75)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_widths_that_are_not_whole_vectors_are_left_to_the_torch_ops(kernel) -> None:
    lora_b = (torch.zeros(2, 1, 40, 8),)
    x, y = torch.zeros(3, 64), torch.zeros(3, 40)
    assert not native_lora.supports(x, y, lora_b, kernel.lanes)
    assert not native_lora.supports(x.half(), y.half(), (torch.zeros(2, 1, 64, 8),), 16)
    assert native_lora.supports(x, torch.zeros(3, 64), (torch.zeros(2, 1, 64, 8),), 16)


def test_build_is_cached_and_keyed_by_source(tmp_path, monkeypatch) -> None:
    first = native_lora.build(tmp_path)
    built_at = first.stat().st_mtime_ns
    assert native_lora.build(tmp_path) == first and first.stat().st_mtime_ns == built_at
    changed = tmp_path / "grouped_lora.cpp"
    changed.write_text(native_lora.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(native_lora, "SOURCE", changed)
    assert native_lora.build(tmp_path) != first  # a new source is never served stale


def test_without_a_compiler_the_wrapper_falls_back_with_one_warning(monkeypatch, caplog) -> None:
    monkeypatch.setattr(native_lora, "_compiler", lambda: None)
    load_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=native_lora.__name__):
            wrapper = FusedPunicaWrapperCPU(4096, 256, "cpu")
        assert wrapper._kernel is None
        assert "using torch ops" in caplog.text and "no C++ compiler" in caplog.text
        slots = [1, 0, -1, 1]
        mapping = LoRAMapping(tuple(s + 1 for s in slots), tuple(s + 1 for s in slots), False)
        wrapper.update_metadata(mapping, [1, 2], 3, 49152)
        lora_a, lora_b, x, y = _case(slots, 64, (32,), 8, torch.float32)
        got = y.clone()
        wrapper.add_lora_linear(got, x, lora_a, lora_b, 0.75, (32,))
        expected = _reference(y, x, slots, lora_a, lora_b, 0.75)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        assert wrapper._prepared and not wrapper._native  # the grouped torch ops ran
    finally:
        load_kernel.cache_clear()


def test_a_failing_compiler_names_the_source(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(native_lora, "_compiler", lambda: "false")
    with pytest.raises(RuntimeError, match=r"grouped_lora\.cpp"):
        native_lora.build(tmp_path)
    assert not list(tmp_path.glob("*.so")), "a failed build left a library behind"


@pytest.mark.parametrize("group_sizes", [[1], [3, 1, 2], [5, 9, 4], [13]])
@pytest.mark.parametrize("rank", [8, 16, 64])
def test_paired_bfloat16_path(kernel, group_sizes, rank) -> None:
    """vdpbf16ps over interleaved pairs (AVX512-BF16 CPUs): like vLLM's ops, the shrink
    result is rounded to bf16 (2^-9 relative) before the expand, on top of the final
    rounding of y."""
    if not kernel.bf16_pairs:
        pytest.skip("this CPU has no AVX512-BF16")
    slots = [slot for slot, size in enumerate(group_sizes) for _ in range(size)]
    slots = [-1, *slots[1::2], *slots[::2]]
    lora_a, lora_b, x, y = _case(slots, 96, (64, 32, 48), rank, torch.bfloat16)
    got = _run(kernel, slots, lora_a, lora_b, x, y, paired=True)
    exact = _reference(y, x, slots, lora_a, lora_b, 0.75)
    magnitude = _reference(y, x, slots, lora_a, lora_b, 0.75, magnitude=True)
    error = (got.double() - exact).abs()
    bound = exact.abs() * 2.0**-8 + magnitude * 2.0**-8 + 1e-4
    assert bool((error <= bound).all()), float((error - bound).max())
    assert torch.equal(got[0], y[0]), "the row without a LoRA changed"


def _fresh(kernel, lora_a, lora_b, paired):
    return prepare_native_weights(kernel, lora_a, lora_b, 0.75, lora_a[0].dtype, paired=paired)


@pytest.mark.parametrize(
    ("dtype", "paired"), [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
)
def test_a_recorded_slot_write_re_lays_out_only_that_slot(kernel, dtype, paired) -> None:
    """An adapter loaded into slot 2 copies slot 2 of the layout, in place, and leaves the
    other slots alone; a write nobody recorded re-lays out every slot. Widths 80 and 48
    leave a chunk narrower than the kernel's. The paired layout is plain copying, so it
    is checked on every CPU (the kernel that reads it needs AVX512-BF16)."""
    lora_a, lora_b, _, _ = _case([0, 1, 2, 3], 96, (80, 48), 16, dtype)
    writes = SlotWrites()
    weights = prepare_native_weights(
        kernel, lora_a, lora_b, 0.75, dtype, paired=paired, written=writes
    )
    for stacked in (*lora_a, *lora_b):  # what vLLM's set_lora does
        stacked[2] = torch.randn(stacked.shape[1:]).to(dtype)
    weights.at[3].fill_(7)  # slot 3 was not written: must stay as it is
    writes.record(2)
    again = prepare_native_weights(
        kernel, lora_a, lora_b, 0.75, dtype, weights, paired=paired, written=writes
    )
    expected = _fresh(kernel, lora_a, lora_b, paired)
    assert again is weights
    assert torch.equal(again.at[2], expected.at[2]) and torch.equal(again.bt, expected.bt)
    assert bool((again.at[3] == 7).all())
    lora_b[0][1].zero_()  # written without telling: every slot again
    again = prepare_native_weights(
        kernel, lora_a, lora_b, 0.75, dtype, weights, paired=paired, written=writes
    )
    expected = _fresh(kernel, lora_a, lora_b, paired)
    assert torch.equal(again.at, expected.at) and torch.equal(again.bt, expected.bt)


@pytest.mark.parametrize(
    ("dtype", "paired"), [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
)
def test_one_call_lays_out_a_written_slot_of_every_layer(kernel, dtype, paired) -> None:
    """`lpx_layout_slots` (what an adapter load runs, one call for all layers) writes the
    written slot of each layer exactly as a fresh layout would, and no other slot: layers
    of one, two and three slices, ranks 8 and 16, a chunk narrower than the kernel's."""
    shapes = [(96, (80, 48), 16), (64, (32,), 8), (128, (64, 32, 48), 16)]
    layers = [
        _case([0, 1, 2, 3], n, widths, rank, dtype, seed=i)
        for i, (n, widths, rank) in enumerate(shapes)
    ]
    laid_out = [_fresh(kernel, a, b, paired) for a, b, _, _ in layers]
    for (lora_a, lora_b, _, _), weights in zip(layers, laid_out, strict=True):
        for stacked in (*lora_a, *lora_b):
            stacked[2] = torch.randn(stacked.shape[1:]).to(dtype)
        weights.at[3].fill_(7)  # not written: must stay
    jobs = [w.layout_job(a, b) for (a, b, _, _), w in zip(layers, laid_out, strict=True)]
    assert all(job is not None for job in jobs)
    kernel.layout_slots((native_lora.LayoutJob * len(jobs))(*jobs), 2)
    for (lora_a, lora_b, _, _), weights in zip(layers, laid_out, strict=True):
        expected = _fresh(kernel, lora_a, lora_b, paired)
        assert torch.equal(weights.at[:3], expected.at[:3])
        assert torch.equal(weights.bt, expected.bt)
        assert bool((weights.at[3] == 7).all())


def test_weights_the_c_copy_cannot_lay_out_get_no_layout_job(kernel) -> None:
    """float32 stacked weights served in bfloat16 are laid out by torch ops: no C job."""
    lora_a, lora_b, _, _ = _case([0, 1], 96, (64,), 16, torch.float32)
    weights = prepare_native_weights(kernel, lora_a, lora_b, 0.75, torch.bfloat16)
    assert weights.layout_job(lora_a, lora_b) is None


@pytest.mark.parametrize(
    ("dtype", "paired"), [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
)
def test_the_c_layout_copy_equals_the_torch_layout(kernel, dtype, paired) -> None:
    """The C++ slot copy and the torch ops (used for weights in another dtype or
    strided) write the same layout: ranks 8 and 16, three slices, a narrow last chunk."""
    for rank in (8, 16):
        lora_a, lora_b, _, _ = _case([0, 1, 2], 64, (80, 32, 48), rank, dtype, seed=rank)
        weights = _fresh(kernel, lora_a, lora_b, paired)
        assert weights.native_layout(lora_a, lora_b)
        by_torch = _fresh(kernel, lora_a, lora_b, paired)
        by_torch.at.zero_()
        by_torch.lay_out_torch(lora_a, lora_b, slice(None))
        assert torch.equal(weights.at, by_torch.at) and torch.equal(weights.bt, by_torch.bt)


def test_weights_in_another_dtype_are_laid_out_by_torch(kernel) -> None:
    """float32 stacked weights served in bfloat16 (a LoRA dtype unlike the model's)."""
    lora_a, lora_b, _, _ = _case([0, 1], 96, (64,), 16, torch.float32)
    weights = prepare_native_weights(kernel, lora_a, lora_b, 0.75, torch.bfloat16)
    assert not weights.native_layout(lora_a, lora_b)
    as_bf16 = tuple(t.bfloat16() for t in lora_a), tuple(t.bfloat16() for t in lora_b)
    expected = prepare_native_weights(kernel, *as_bf16, 0.75, torch.bfloat16)
    assert torch.equal(weights.at, expected.at) and torch.equal(weights.bt, expected.bt)


def test_vllm_records_the_slot_it_loads_an_adapter_into() -> None:
    """vLLM's own LoRAModelManager.activate_adapter (no layers here: it writes none)
    tells loraplex's wrapper which slot it filled, and nothing when already active."""
    wrapper = FusedPunicaWrapperCPU(4096, 256, "cpu")
    manager = object.__new__(LoRAModelManager)  # only what activate_adapter reads
    manager._active_adapters = {}
    manager._registered_adapters = {7: SimpleNamespace(id=7)}
    manager.lora_index_to_id = [3, None, None]
    manager.modules = {}
    manager.punica_wrapper_mapping = {"language_model": wrapper}
    assert manager.activate_adapter(7)
    assert manager.lora_index_to_id == [3, 7, None]
    assert wrapper.slot_writes.since(0) == {1}
    assert not manager.activate_adapter(7)
    assert wrapper.slot_writes.seq == 1
