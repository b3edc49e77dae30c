"""The fused grouped multi-LoRA kernel (serving/csrc/grouped_lora.cpp): build, load, call.

The kernel is plain C++ (vector extensions + OpenMP, no PyTorch headers), compiled on
first use on the serving machine with `-O3 -march=native` into loraplex's cache
(about a second) and loaded with ctypes; the build is keyed by the source, compiler
and CPU, so a copied cache from another machine is never used. Loaded after torch,
its OpenMP calls run on PyTorch's own libgomp thread pool (same soname), so there is
no second pool competing for the cores.

When no C++ compiler is available, or the build fails, `load_kernel()` returns None
with one warning and callers keep the grouped torch ops (serving/cpu_lora_ops.py).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.serving.cpu_lora_ops import rows_by_slot, weights_state
from loraplex.settings import default_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "grouped_lora.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
PAIRED_BF16_CODE = 2
"""bf16 weights in the paired layout, for vdpbf16ps (see the kernel's header comment)."""


class NativeKernel:
    """The loaded library, with its entry point typed once."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = library.lpx_grouped_lora
        self._fn.restype = ctypes.c_int
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        self._fn.argtypes = [
            ctypes.c_int,
            ptr,
            i64,
            i64,
            ptr,
            i64,
            ptr,
            i64,
            ptr,
            i64,
            i64,
            ptr,
            ptr,
            ptr,
            i64,
            ptr,
            ptr,
            ptr,
            ptr,
            i64,
            ctypes.c_float,
            ptr,
        ]
        self.tile_rows = int(library.lpx_tile_rows())
        self.lanes = int(library.lpx_lanes())
        # Output vectors per expand work item: the B layout must match the kernel's.
        self.chunk_vectors = int(library.lpx_chunk_vectors())
        # Built for a CPU with AVX512-BF16: bf16 layers use the paired layout.
        self.bf16_pairs = bool(library.lpx_bf16_pairs())

    def __call__(
        self,
        tiles: NativeTiles,
        y: torch.Tensor,
        x: torch.Tensor,
        weights: NativeLayerWeights,
        shrunk: torch.Tensor,
    ) -> None:
        """y[rows, :width] += the LoRA delta of each row's slot, in place; `shrunk` is
        float32 scratch of at least (LoRA rows + tile_rows) x weights.srp."""
        # Pointer arguments of the layer and the step are packed once (`args`): this
        # call sits on the per-layer hot path, where Python overhead adds up.
        status = self._fn(
            weights.code,
            x.data_ptr(),
            x.stride(0),
            x.shape[1],
            y.data_ptr(),
            y.stride(0),
            *weights.args,
            *tiles.args,
            weights.scale,
            shrunk.data_ptr(),
        )
        if status != 0:
            raise RuntimeError("lpx_grouped_lora: unsupported dtype")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _build_key(compiler: str) -> str:
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line for line in cpu.splitlines() if line.startswith("flags")), "")
    digest = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        version.encode(),
        " ".join(FLAGS).encode(),
        platform.machine().encode(),
        flags.encode(),
    ):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build(cache_dir: Path) -> Path:
    """Compile the kernel into `cache_dir` (once per source/compiler/CPU); the library path."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"grouped_lora-{_build_key(compiler)}.so"
    if target.exists():
        return target
    # Several vLLM processes may start at once: one builds, the others wait for it.
    with open(cache_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
            partial = Path(scratch) / target.name
            done = subprocess.run(
                [compiler, *FLAGS, str(SOURCE), "-o", str(partial)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed on {SOURCE}:\n{done.stderr[-2000:]}")
            partial.replace(target)  # atomic: readers see no half-written library
    return target


@functools.cache
def load_kernel() -> NativeKernel | None:
    """The kernel, built on first use; None (with a warning) when it cannot be built."""
    try:
        path = build(default_cache_dir() / "kernels")
        kernel = NativeKernel(ctypes.CDLL(str(path)))
    except (OSError, RuntimeError) as error:
        log.warning("loraplex: fused CPU LoRA kernel unavailable, using torch ops: %s", error)
        return None
    log.info("loraplex: fused CPU LoRA kernel loaded from %s", path)
    return kernel


def _int32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


@dataclass(frozen=True)
class NativeTiles:
    """One step's LoRA rows grouped by slot and cut into tiles, shared by every layer."""

    rows: torch.Tensor
    """(n,) int32 batch rows that use a LoRA, grouped by slot."""
    start: torch.Tensor
    """(tiles,) int32 first position of each tile in `rows`."""
    length: torch.Tensor
    """(tiles,) int32 rows in each tile (at most the kernel's tile size)."""
    slot: torch.Tensor
    """(tiles,) int32 LoRA slot of each tile."""
    num_tokens: int
    """Rows in the batch, with or without a LoRA."""

    @property
    def num_tiles(self) -> int:
        return self.start.numel()

    @functools.cached_property
    def args(self) -> tuple[int, ...]:
        """The kernel's per-step arguments."""
        return (
            self.rows.data_ptr(),
            self.start.data_ptr(),
            self.length.data_ptr(),
            self.slot.data_ptr(),
            self.num_tiles,
        )

    @staticmethod
    def from_token_slots(token_slots: torch.Tensor, tile_rows: int) -> NativeTiles | None:
        """None when no row uses a LoRA."""
        grouped = rows_by_slot(token_slots)
        if grouped is None:
            return None
        rows, slots, counts = grouped
        starts, lengths, tile_slots, position = [], [], [], 0
        for slot, count in zip(slots.tolist(), counts.tolist(), strict=True):
            for offset in range(0, count, tile_rows):
                starts.append(position + offset)
                lengths.append(min(tile_rows, count - offset))
                tile_slots.append(slot)
            position += count
        return NativeTiles(
            rows=rows.to(torch.int32),
            start=_int32(starts),
            length=_int32(lengths),
            slot=_int32(tile_slots),
            num_tokens=token_slots.numel(),
        )


@dataclass(frozen=True)
class NativeLayerWeights:
    """One LoRA layer's weights for every slot, in the kernel's layout."""

    key: tuple
    code: int
    """The kernel's dtype code: DTYPE_CODES, or PAIRED_BF16_CODE."""
    scale: float
    """LoRA scaling, applied in float32 by the kernel."""
    at: torch.Tensor
    """(slots, in, srp): every slice's A^T side by side along the rank, zero-padded to a
    whole number of vectors; paired: (slots, in / 2, srp, 2)."""
    srp: int
    """Shrink columns: every slice's rank, padded to whole vectors."""
    bt: torch.Tensor
    """(slots, rank * width): per slot, each output chunk's (rank, chunk columns) block of
    B^T, contiguous, at rank * the chunk's first column."""
    rank: int
    width: int
    chunk_col: torch.Tensor
    chunk_vecs: torch.Tensor
    chunk_rank_col: torch.Tensor
    """Output column chunks (first column, vectors, first shrink column of the slice)."""

    @functools.cached_property
    def args(self) -> tuple[int, ...]:
        """The kernel's per-layer arguments."""
        return (
            self.at.data_ptr(),
            self.srp,
            self.bt.data_ptr(),
            self.rank,
            self.width,
            self.chunk_col.data_ptr(),
            self.chunk_vecs.data_ptr(),
            self.chunk_rank_col.data_ptr(),
            self.chunk_col.numel(),
        )


def supports(
    x: torch.Tensor, y: torch.Tensor, lora_b: tuple[torch.Tensor, ...], lanes: int
) -> bool:
    """Whether the kernel handles this call (else the torch ops do)."""
    return (
        x.dtype in DTYPE_CODES
        and y.dtype == x.dtype
        and x.stride(-1) == 1
        and y.stride(-1) == 1
        and all(t.shape[2] % lanes == 0 for t in lora_b)
    )


def use_bf16_pairs(
    kernel: NativeKernel, dtype: torch.dtype, lora_a: tuple[torch.Tensor, ...]
) -> bool:
    """Whether a layer runs the paired bf16 path: AVX512-BF16, even input size and rank."""
    rank, in_size = lora_a[0].shape[-2:]
    return kernel.bf16_pairs and dtype == torch.bfloat16 and rank % 2 == 0 and in_size % 2 == 0


def _pair_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., rows, cols) -> (..., rows / 2, cols, 2): consecutive rows interleaved."""
    *lead, rows, cols = t.shape
    return t.reshape(*lead, rows // 2, 2, cols).transpose(-1, -2)


def prepare_native_weights(
    kernel: NativeKernel,
    lora_a: tuple[torch.Tensor, ...],
    lora_b: tuple[torch.Tensor, ...],
    scale: float,
    dtype: torch.dtype,
    cached: NativeLayerWeights | None = None,
    *,
    paired: bool = False,
) -> NativeLayerWeights:
    """The layer's kernel-layout weights, reusing `cached` while vLLM wrote no slot.
    `paired` lays bf16 weights out for vdpbf16ps (see `use_bf16_pairs`)."""
    key = (scale, dtype, paired, weights_state(lora_a, lora_b))
    if cached is not None and cached.key == key:
        return cached
    lanes = kernel.lanes
    a = torch.cat([t.squeeze(1) for t in lora_a], dim=1).to(dtype)  # (slots, S*r, in)
    padded = -(-a.shape[1] // lanes) * lanes
    at = torch.zeros(a.shape[0], a.shape[2], padded, dtype=dtype)
    at[:, :, : a.shape[1]] = a.transpose(1, 2)
    if paired:
        at = _pair_rows(at).contiguous()
    rank, chunk = lora_b[0].shape[-1], kernel.chunk_vectors * lanes
    cols, vecs, rank_cols, blocks, offset = [], [], [], [], 0
    for index, stacked in enumerate(lora_b):
        b_t = stacked.squeeze(1).transpose(1, 2).to(dtype)  # (slots, rank, width)
        width = b_t.shape[2]
        whole = width // chunk * chunk
        # (slots, rank, chunks, chunk) -> (slots, chunks, rank, chunk): one block per chunk,
        # then the last, narrower chunk (if any).
        pieces = (
            b_t[:, :, :whole].reshape(b_t.shape[0], rank, -1, chunk).transpose(1, 2),
            b_t[:, :, whole:],
        )
        blocks += [(_pair_rows(piece) if paired else piece).flatten(1) for piece in pieces]
        for start in range(0, width, chunk):
            cols.append(offset + start)
            vecs.append(min(chunk, width - start) // lanes)
            rank_cols.append(index * rank)
        offset += width
    return NativeLayerWeights(
        key=key,
        code=PAIRED_BF16_CODE if paired else DTYPE_CODES[dtype],
        scale=scale,
        at=at,
        srp=padded,
        bt=torch.cat(blocks, dim=1),
        rank=rank,
        width=offset,
        chunk_col=_int32(cols),
        chunk_vecs=_int32(vecs),
        chunk_rank_col=_int32(rank_cols),
    )
