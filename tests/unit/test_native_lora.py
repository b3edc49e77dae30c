"""The fused C++ multi-LoRA kernel: its build, and the cases the wrapper tests do not cover."""

from __future__ import annotations

import logging

import pytest
import torch
from vllm.lora.layers.utils import LoRAMapping

from loraplex.serving import native_lora
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
