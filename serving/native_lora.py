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
from typing import Any

import torch

from loraplex.serving.cpu_lora_ops import SlotWrites, rows_by_slot
from loraplex.settings import default_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "grouped_lora.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
PAIRED_BF16_CODE = 2
"""bf16 weights in the paired layout, for vdpbf16ps (see the kernel's header comment)."""


class Problem(ctypes.Structure):
    """The kernel's `Problem` struct (grouped_lora.cpp), field for field: one call's
    operands. A layer's fields are filled once (`LayerCall`); per call only x and y
    change, and the step's tiles once per step."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("x_stride", ctypes.c_int64),
        ("in_dim", ctypes.c_int64),
        ("y", ctypes.c_void_p),
        ("y_stride", ctypes.c_int64),
        ("at", ctypes.c_void_p),
        ("srp", ctypes.c_int64),
        ("bt", ctypes.c_void_p),
        ("rank", ctypes.c_int64),
        ("width", ctypes.c_int64),
        ("chunk_col", ctypes.c_void_p),
        ("chunk_vecs", ctypes.c_void_p),
        ("chunk_rank_col", ctypes.c_void_p),
        ("n_chunks", ctypes.c_int64),
        ("rows", ctypes.c_void_p),
        ("tile_start", ctypes.c_void_p),
        ("tile_len", ctypes.c_void_p),
        ("tile_slot", ctypes.c_void_p),
        ("n_tiles", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("shrunk", ctypes.c_void_p),
    ]


MAX_SLICES = 4
"""Slices per LoRA layer a `LayoutJob` holds (the C++ side's MAX_SLICES; vLLM stacks 3)."""


class LayoutJob(ctypes.Structure):
    """The kernel's `LayoutJob` struct (grouped_lora.cpp), field for field: where one
    layer's stacked weights and layout start and how many bytes each slot takes, so one
    prepared array lays out any slot of every layer in one call (`lpx_layout_slots`)."""

    _fields_ = [
        ("elem_bytes", ctypes.c_int64),
        ("paired", ctypes.c_int64),
        ("in_dim", ctypes.c_int64),
        ("rank", ctypes.c_int64),
        ("srp", ctypes.c_int64),
        ("chunk", ctypes.c_int64),
        ("n_slices", ctypes.c_int64),
        ("a", ctypes.c_void_p * MAX_SLICES),
        ("b", ctypes.c_void_p * MAX_SLICES),
        ("a_slot_bytes", ctypes.c_int64 * MAX_SLICES),
        ("b_slot_bytes", ctypes.c_int64 * MAX_SLICES),
        ("widths", ctypes.c_int64 * MAX_SLICES),
        ("at", ctypes.c_void_p),
        ("bt", ctypes.c_void_p),
        ("at_slot_bytes", ctypes.c_int64),
        ("bt_slot_bytes", ctypes.c_int64),
    ]


class NativeKernel:
    """The loaded library, with its entry points typed once."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._run = library.lpx_grouped_lora_problem
        self._run.restype = ctypes.c_int
        self._run.argtypes = [ctypes.c_int, ctypes.POINTER(Problem)]
        self.tile_rows = int(library.lpx_tile_rows())
        self.lanes = int(library.lpx_lanes())
        # Output vectors per expand work item: the B layout must match the kernel's.
        self.chunk_vectors = int(library.lpx_chunk_vectors())
        # Built for a CPU with AVX512-BF16: bf16 layers use the paired layout.
        self.bf16_pairs = bool(library.lpx_bf16_pairs())
        library.lpx_isa.restype = ctypes.c_char_p
        self._layout_slots = library.lpx_layout_slots
        self._layout_slots.restype = ctypes.c_int
        self._layout_slots.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
        self.isa = library.lpx_isa().decode()
        """The widest vector ISA the build targets (avx512bf16, avx512f, avx2, neon)."""

    def run(self, code: int, problem: Any) -> None:
        """Run one prepared call: `problem` is a `Problem` passed by reference."""
        if self._run(code, problem) != 0:
            raise RuntimeError("lpx_grouped_lora_problem: unsupported dtype")

    def __call__(
        self,
        tiles: NativeTiles,
        y: torch.Tensor,
        x: torch.Tensor,
        weights: NativeLayerWeights,
        shrunk: torch.Tensor,
    ) -> None:
        """y[rows, :width] += the LoRA delta of each row's slot, in place; `shrunk` is
        float32 scratch of at least (LoRA rows + tile_rows) x weights.srp. The serving
        path prepares its calls once per layer instead (`LayerCall`)."""
        problem = weights.problem()
        StepOperands(tiles, shrunk).fill(problem)
        problem.x, problem.x_stride, problem.in_dim = x.data_ptr(), x.stride(0), x.shape[1]
        problem.y, problem.y_stride = y.data_ptr(), y.stride(0)
        self.run(weights.code, ctypes.byref(problem))

    def layout_slots(self, jobs: ctypes.Array, slot: int) -> None:
        """Copy `slot` of every job's stacked weights into its layer's layout, in one C++
        call instead of a strided torch copy per slice and chunk (those were most of a
        cold adapter load); `NativeLayerWeights.layout_job` prepares a job."""
        if self._layout_slots(len(jobs), ctypes.addressof(jobs), slot) != 0:
            raise RuntimeError("lpx_layout_slots: unsupported element size or slice count")


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

    def fill(self, problem: Problem) -> None:
        """Write the step's tile fields into `problem`."""
        problem.rows, problem.tile_start = self.rows.data_ptr(), self.start.data_ptr()
        problem.tile_len, problem.tile_slot = self.length.data_ptr(), self.slot.data_ptr()
        problem.n_tiles = self.num_tiles

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


@dataclass
class NativeLayerWeights:
    """One LoRA layer's weights for every slot, in the kernel's layout.

    The layout tensors are allocated once per layer and rewritten in place, one slot at a
    time, when vLLM writes a slot (`refresh`); `versions` and `written_seq` say what
    they were laid out from."""

    key: tuple
    """What the layout depends on besides the weights' values: scale, dtype, pairing,
    the stacked tensors' storage. A new key means a new layout."""
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
    chunk: int
    """Output columns per chunk (the kernel's chunk vectors x lanes)."""
    paired: bool
    versions: tuple = ()
    """The stacked tensors' version counters when the layout was last written."""
    written_seq: int = 0
    """The slot-write sequence number (see `prepare_native_weights`) it was written at."""

    def problem(self) -> Problem:
        """A kernel call's struct with this layer's fields filled in."""
        return Problem(
            at=self.at.data_ptr(),
            srp=self.srp,
            bt=self.bt.data_ptr(),
            rank=self.rank,
            width=self.width,
            chunk_col=self.chunk_col.data_ptr(),
            chunk_vecs=self.chunk_vecs.data_ptr(),
            chunk_rank_col=self.chunk_rank_col.data_ptr(),
            n_chunks=self.chunk_col.numel(),
            scale=self.scale,
        )

    def native_layout(
        self, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...]
    ) -> bool:
        """Whether the kernel's C++ copy can lay these out: contiguous stacked weights
        already in the layout's dtype (vLLM's are) and one rank for A and B."""
        return all(
            t.is_contiguous() and t.dtype == self.at.dtype for t in (*lora_a, *lora_b)
        ) and all(t.shape[-2] == self.rank for t in lora_a)

    def layout_job(
        self, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...]
    ) -> LayoutJob | None:
        """This layer's slot copy for `NativeKernel.layout_slots`, or None when the C++
        copy cannot lay these weights out (`native_layout`) or they have too many slices."""
        if len(lora_a) > MAX_SLICES or not self.native_layout(lora_a, lora_b):
            return None
        job = LayoutJob(
            elem_bytes=self.at.element_size(),
            paired=int(self.paired),
            in_dim=lora_a[0].shape[-1],
            rank=self.rank,
            srp=self.srp,
            chunk=self.chunk,
            n_slices=len(lora_a),
            at=self.at.data_ptr(),
            bt=self.bt.data_ptr(),
            at_slot_bytes=self.at.stride(0) * self.at.element_size(),
            bt_slot_bytes=self.bt.stride(0) * self.bt.element_size(),
        )
        for index, (a, b) in enumerate(zip(lora_a, lora_b, strict=True)):
            job.a[index], job.b[index] = a.data_ptr(), b.data_ptr()
            job.a_slot_bytes[index] = a.stride(0) * a.element_size()
            job.b_slot_bytes[index] = b.stride(0) * b.element_size()
            job.widths[index] = b.shape[2]
        return job

    def lay_out(
        self,
        kernel: NativeKernel,
        lora_a: tuple[torch.Tensor, ...],
        lora_b: tuple[torch.Tensor, ...],
        slots: list[int],
    ) -> None:
        """Copy the stacked weights of `slots` into the layout, in place."""
        job = self.layout_job(lora_a, lora_b)
        if job is not None:
            jobs = (LayoutJob * 1)(job)
            for slot in slots:
                kernel.layout_slots(jobs, slot)
        elif len(slots) == self.at.shape[0]:
            self.lay_out_torch(lora_a, lora_b, slice(None))
        else:
            for slot in slots:
                self.lay_out_torch(lora_a, lora_b, slice(slot, slot + 1))

    def lay_out_torch(
        self, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], slots: slice
    ) -> None:
        """`lay_out` with torch ops (any dtype, any strides): one strided copy per slice
        for A and at most two per slice for B, whatever the number of slots."""
        r = lora_a[0].shape[-2]
        for index, stacked in enumerate(lora_a):
            a_t = stacked[slots, 0].transpose(1, 2)  # (k, in, r)
            if self.paired:  # (k, in / 2, r, 2): consecutive input rows interleaved
                target = self.at[slots, :, index * r : (index + 1) * r, :]
                target.copy_(_pair_rows(a_t))
            else:
                self.at[slots, :, index * r : (index + 1) * r].copy_(a_t)
        rank, chunk, offset = self.rank, self.chunk, 0
        for stacked in lora_b:
            b_t = stacked[slots, 0].transpose(1, 2)  # (k, rank, width)
            k, width = b_t.shape[0], b_t.shape[2]
            whole = width // chunk * chunk
            # (k, rank, chunks, chunk) -> (k, chunks, rank, chunk): one block per chunk,
            # then the last, narrower chunk (if any), at rank * its first column.
            pieces = (
                (b_t[:, :, :whole].reshape(k, rank, -1, chunk).transpose(1, 2), offset),
                (b_t[:, :, whole:], offset + whole),
            )
            for piece, column in pieces:
                if piece.numel() == 0:
                    continue
                if self.paired:
                    piece = _pair_rows(piece)
                target = self.bt[slots, rank * column : rank * column + piece[0].numel()]
                target.view(piece.shape).copy_(piece)
            offset += width


class StepOperands:
    """What every layer's call shares in one step: the tiles and the scratch buffer."""

    def __init__(self, tiles: NativeTiles, shrunk: torch.Tensor) -> None:
        self.tiles, self.shrunk = tiles, shrunk

    def fill(self, problem: Problem) -> None:
        self.tiles.fill(problem)
        problem.shrunk = self.shrunk.data_ptr()


class LayerCall:
    """One LoRA layer's kernel call, prepared once and reused while it stays valid.

    Checking and packing the kernel's 22 operands on every call cost about as much as a
    decode step's kernel work (bench/decode_split.py): here the layer's operands sit in a
    `Problem` filled once, the step's once per step, and a call writes only x and y.
    `current` is what must hold for the prepared call to be right: the same stacked
    tensors, none written since (version counters), the same scale, dtypes, shapes and
    strides the kernel was checked for."""

    __slots__ = (
        "code",
        "dtype",
        "in_dim",
        "layout_job",
        "lora_a",
        "lora_b",
        "problem",
        "reference",
        "scale",
        "step",
        "tensors",
        "versions",
        "weights",
        "width",
    )

    def __init__(
        self,
        weights: NativeLayerWeights,
        lora_a: tuple[torch.Tensor, ...],
        lora_b: tuple[torch.Tensor, ...],
        scale: float,
        dtype: torch.dtype,
    ) -> None:
        self.weights, self.code = weights, weights.code
        self.lora_a, self.lora_b = lora_a, lora_b
        self.tensors = (*lora_a, *lora_b)
        self.versions = [t._version for t in self.tensors]
        self.scale, self.dtype = scale, dtype
        self.in_dim, self.width = lora_a[0].shape[-1], weights.width
        self.problem = weights.problem()
        self.problem.in_dim = self.in_dim
        self.reference = ctypes.byref(self.problem)
        self.step: StepOperands | None = None
        self.layout_job = weights.layout_job(lora_a, lora_b)

    def current(
        self,
        lora_a: tuple[torch.Tensor, ...],
        lora_b: tuple[torch.Tensor, ...],
        scale: float,
        x: torch.Tensor,
        y: torch.Tensor,
        num_tokens: int,
    ) -> bool:
        """Whether this prepared call computes y += LoRA(x) for these operands."""
        return (
            lora_a is self.lora_a
            and lora_b is self.lora_b
            and scale == self.scale
            and x.dtype is self.dtype
            and y.dtype is self.dtype
            and x.size(0) == num_tokens
            and x.size(1) == self.in_dim
            and y.size(1) == self.width
            and x.stride(1) == 1
            and y.stride(1) == 1
            and self.unwritten()
        )

    def unwritten(self) -> bool:
        """Whether no stacked tensor was written since the call was prepared or last laid out."""
        return [t._version for t in self.tensors] == self.versions

    def mark_laid_out(self, seq: int) -> None:
        """The layout now matches the stacked tensors as they are, up to slot write `seq`
        (`lpx_layout_slots` copied the slot vLLM just wrote): the call stays valid."""
        self.versions = [t._version for t in self.tensors]
        self.weights.versions = tuple(self.versions)
        self.weights.written_seq = seq

    def run(
        self, kernel: NativeKernel, step: StepOperands, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        """y[rows] += the LoRA delta of each row's slot, in place (2-D x and y)."""
        problem = self.problem
        if self.step is not step:
            step.fill(problem)
            self.step = step
        problem.x, problem.x_stride = x.data_ptr(), x.stride(0)
        problem.y, problem.y_stride = y.data_ptr(), y.stride(0)
        kernel.run(self.code, self.reference)


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


def kernel_path(dtype: torch.dtype, in_size: int, rank: int, widths: tuple[int, ...]) -> str:
    """Which path a LoRA layer of these shapes takes on this machine, for benchmark
    records: the same build and the same checks as the wrapper's."""
    kernel = load_kernel()
    if kernel is None:
        return "torch ops (no kernel build)"
    x, y = (torch.empty(1, size, dtype=dtype, device="meta") for size in (in_size, sum(widths)))
    lora_a = (torch.empty(1, 1, rank, in_size, device="meta"),)
    lora_b = tuple(torch.empty(1, 1, width, rank, device="meta") for width in widths)
    if not supports(x, y, lora_b, kernel.lanes):
        return "torch ops (shape or dtype not covered)"
    if use_bf16_pairs(kernel, dtype, lora_a):
        return "fused, bf16 pairs (vdpbf16ps)"
    return f"fused, {str(dtype).removeprefix('torch.')} with float32 FMA ({kernel.isa})"


def _pair_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., rows, cols) -> (..., rows / 2, cols, 2): consecutive rows interleaved."""
    *lead, rows, cols = t.shape
    return t.reshape(*lead, rows // 2, 2, cols).transpose(-1, -2)


def weight_state(
    lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The stacked tensors' storage (a layout stays valid while it holds) and their
    version counters, which every in-place write bumps."""
    tensors = (*lora_a, *lora_b)
    return tuple(t.data_ptr() for t in tensors), tuple(t._version for t in tensors)


def prepare_native_weights(
    kernel: NativeKernel,
    lora_a: tuple[torch.Tensor, ...],
    lora_b: tuple[torch.Tensor, ...],
    scale: float,
    dtype: torch.dtype,
    cached: NativeLayerWeights | None = None,
    *,
    paired: bool = False,
    written: SlotWrites | None = None,
) -> NativeLayerWeights:
    """The layer's kernel-layout weights, reusing `cached` while vLLM wrote no slot.
    `paired` lays bf16 weights out for vdpbf16ps (see `use_bf16_pairs`).

    When vLLM did write (the version counters moved) and `written` names the slots it
    wrote since `cached` was laid out, only those slots are copied again; a write that
    `written` does not account for re-lays out every slot."""
    storage, versions = weight_state(lora_a, lora_b)
    key = (scale, dtype, paired, storage)
    if cached is not None and cached.key == key:
        if cached.versions == versions:
            return cached
        slots = written.since(cached.written_seq) if written is not None else set()
        if slots:
            log.debug("loraplex: re-laying out written slots %s of a LoRA layer", sorted(slots))
        else:
            log.debug("loraplex: a LoRA layer changed without a recorded slot write: every slot")
        cached.lay_out(kernel, lora_a, lora_b, sorted(slots) or list(range(cached.at.shape[0])))
        cached.versions = versions
        cached.written_seq = written.seq if written is not None else 0
        return cached
    lanes = kernel.lanes
    slots_count, rank_a, in_size = lora_a[0].shape[0], lora_a[0].shape[-2], lora_a[0].shape[-1]
    padded = -(-len(lora_a) * rank_a // lanes) * lanes
    shape = (slots_count, in_size // 2, padded, 2) if paired else (slots_count, in_size, padded)
    rank, chunk = lora_b[0].shape[-1], kernel.chunk_vectors * lanes
    cols, vecs, rank_cols, offset = [], [], [], 0
    for index, stacked in enumerate(lora_b):
        width = stacked.shape[2]
        for start in range(0, width, chunk):
            cols.append(offset + start)
            vecs.append(min(chunk, width - start) // lanes)
            rank_cols.append(index * rank)
        offset += width
    weights = NativeLayerWeights(
        key=key,
        code=PAIRED_BF16_CODE if paired else DTYPE_CODES[dtype],
        scale=scale,
        at=torch.zeros(shape, dtype=dtype),  # the rank padding stays zero
        srp=padded,
        bt=torch.empty(slots_count, rank * offset, dtype=dtype),
        rank=rank,
        width=offset,
        chunk_col=_int32(cols),
        chunk_vecs=_int32(vecs),
        chunk_rank_col=_int32(rank_cols),
        chunk=chunk,
        paired=paired,
        versions=versions,
        written_seq=written.seq if written is not None else 0,
    )
    weights.lay_out(kernel, lora_a, lora_b, list(range(slots_count)))
    return weights
