// Fused grouped multi-LoRA for CPU: y[row] += ((x[row] @ A_slot^T) * scale) @ B_slot^T
// for every batch row that uses a LoRA slot, in one call per layer.
//
// Why a kernel of our own: the step's LoRA work is ~100 small GEMMs per layer call
// when written with torch ops (gathers, padded batched GEMMs, block-diagonal B), and
// their dispatch and memory traffic cost several times the arithmetic. Here each
// weight is read once per group of rows, intermediate results stay in registers or
// a small float buffer, and no zero padding is multiplied.
//
// Layouts (written per slot by lpx_layout_slots when vLLM writes that slot, then reused):
//   at    (slots, in_dim, srp)  every slice's A^T side by side along the rank,
//                               zero-padded to srp (multiple of 16)
//   chunks: output column ranges of at most 2 vectors, never crossing a slice:
//           first column, vectors, first shrunk column of its slice
//   bt    (slots, rank * width)  per slot, one contiguous (rank, chunk width) block per
//                                chunk at rank * first column: block[j][c] =
//                                B_{slice}[slot][first column + c - slice offset][j]
// Per-step grouping (computed once per step, shared by every layer):
//   rows  (n)       batch rows that use a LoRA, grouped by slot
//   tiles (n_tiles) runs of at most TILE rows of one slot: start in `rows`, length, slot
//
// bfloat16 on CPUs with AVX512-BF16 ("paired" layout, dtype code 2): the same two
// phases with vdpbf16ps, which multiplies pairs of bf16 values along the contraction
// and accumulates in float32 (half the instructions, no conversions). at and each bt
// block then interleave consecutive contraction rows: at[slot][i/2][c][i%2] and
// block[j/2][c][j%2]; the shrink result is rounded to bf16 before the expand, as
// vLLM's own ops do. Requires an even in_dim and rank (Python checks).
//
// Built with GCC/Clang vector extensions at -O3 -march=native on the serving machine
// (intrinsics only for vdpbf16ps); parallel with OpenMP, which shares PyTorch's
// libgomp when loaded into the same process.

#include <cstdint>
#include <cstring>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

// Rows computed together: each weight vector loaded is used by every row of a tile. A
// tile of n rows runs the variant for the next of 1, 2, 4, 8 rows (the extra rows repeat
// its last row and are never stored); 8 rows x 3 vectors of accumulators still fit the
// 32 vector registers of AVX-512.
constexpr int TILE = 8;
constexpr int MAX_SHRINK_VECS = 3;  // rank vectors per shrink pass
constexpr int LANES = 16;           // floats per vector
constexpr int CHUNK_VECS = 2;       // output vectors per work item (expand_rows handles 1-2)

typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

struct F32 {
  typedef float T;
  static inline float scalar(const T* p) { return *p; }
  static inline vf load(const T* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
  static inline void store(T* p, vf v) { std::memcpy(p, &v, sizeof v); }
};

struct BF16 {
  typedef uint16_t T;
  static inline float scalar(const T* p) {
    uint32_t u = uint32_t(*p) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static inline vf load(const T* p) {
    vh h;
    std::memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static inline void store(T* p, vf f) {  // round to nearest even, as torch does
    vu u;
    std::memcpy(&u, &f, sizeof u);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vh h = __builtin_convertvector(u, vh);
    std::memcpy(p, &h, sizeof h);
  }
};

struct Problem {
  const void* x; int64_t x_stride; int64_t in_dim;
  void* y; int64_t y_stride;
  const void* at; int64_t srp;
  const void* bt; int64_t rank; int64_t width;
  const int32_t* chunk_col; const int32_t* chunk_vecs; const int32_t* chunk_rank_col;
  int64_t n_chunks;
  const int32_t* rows; const int32_t* tile_start; const int32_t* tile_len;
  const int32_t* tile_slot; int64_t n_tiles;
  float scale;
  float* shrunk;  // (n + TILE, srp) scratch: short tiles compute (never store) extra rows
};

// shrunk[pos .. pos+len) = scale * x[rows] @ at[slot], Q vectors of the rank at a time.
// The scale is applied in float32 here: folding it into bf16 weights would round twice.
template <class E, int TT, int Q>
inline void shrink_tile_generic(const Problem& p, int64_t tile, int64_t q0) {
  typedef typename E::T T;
  const int64_t start = p.tile_start[tile], len = p.tile_len[tile];
  const T* xr[TT];
  for (int t = 0; t < TT; ++t)  // short tiles repeat their last row; never stored
    xr[t] = static_cast<const T*>(p.x) + p.rows[start + (t < len ? t : len - 1)] * p.x_stride;
  const T* a = static_cast<const T*>(p.at) + int64_t(p.tile_slot[tile]) * p.in_dim * p.srp + q0;
  vf acc[TT][Q] = {};
  for (int64_t i = 0; i < p.in_dim; ++i, a += p.srp) {
    vf w[Q];
    for (int q = 0; q < Q; ++q) w[q] = E::load(a + q * LANES);
    for (int t = 0; t < TT; ++t) {
      const float xv = E::scalar(xr[t] + i);
      for (int q = 0; q < Q; ++q) acc[t][q] += xv * w[q];
    }
  }
  for (int t = 0; t < len; ++t)
    for (int q = 0; q < Q; ++q) {
      const vf scaled = acc[t][q] * p.scale;
      std::memcpy(p.shrunk + (start + t) * p.srp + q0 + q * LANES, &scaled, sizeof(vf));
    }
}

template <class K, int TT>
inline void shrink_rows(const Problem& p, int64_t tile) {
  const int64_t vecs = p.srp / LANES;
  int64_t q = 0;
  for (; q + MAX_SHRINK_VECS <= vecs; q += MAX_SHRINK_VECS)
    K::template shrink_tile<TT, MAX_SHRINK_VECS>(p, tile, q * LANES);
  switch (vecs - q) {
    case 2: K::template shrink_tile<TT, 2>(p, tile, q * LANES); break;
    case 1: K::template shrink_tile<TT, 1>(p, tile, q * LANES); break;
    default: break;
  }
}

template <class K>
inline void shrink(const Problem& p, int64_t tile) {
  const int32_t len = p.tile_len[tile];
  if (len > 4) shrink_rows<K, 8>(p, tile);
  else if (len > 2) shrink_rows<K, 4>(p, tile);
  else if (len > 1) shrink_rows<K, 2>(p, tile);
  else shrink_rows<K, 1>(p, tile);
}

// y[rows, col0 : col0 + NV*16) += shrunk[rows, slice's rank] @ the chunk's block of bt.
template <class E, int TT, int NV>
inline void expand_tile_generic(const Problem& p, int64_t tile, int64_t col0, int64_t rank_col0) {
  typedef typename E::T T;
  const int64_t start = p.tile_start[tile], len = p.tile_len[tile];
  const T* b = static_cast<const T*>(p.bt) + int64_t(p.tile_slot[tile]) * p.rank * p.width +
               p.rank * col0;
  const float* s = p.shrunk + start * p.srp + rank_col0;  // rows past len: scratch, never stored
  vf acc[TT][NV] = {};
  for (int64_t j = 0; j < p.rank; ++j, b += NV * LANES) {
    vf w[NV];
    for (int v = 0; v < NV; ++v) w[v] = E::load(b + v * LANES);
    for (int t = 0; t < TT; ++t) {
      const float sv = s[t * p.srp + j];
      for (int v = 0; v < NV; ++v) acc[t][v] += sv * w[v];
    }
  }
  for (int t = 0; t < len; ++t) {
    T* out = static_cast<T*>(p.y) + p.rows[start + t] * p.y_stride + col0;
    for (int v = 0; v < NV; ++v) E::store(out + v * LANES, E::load(out + v * LANES) + acc[t][v]);
  }
}

// The element-type kernels: float32, and bf16 converted to float32 in registers.
template <class E>
struct Generic {
  template <int TT, int Q>
  static void shrink_tile(const Problem& p, int64_t tile, int64_t q0) {
    shrink_tile_generic<E, TT, Q>(p, tile, q0);
  }
  template <int TT, int NV>
  static void expand_tile(const Problem& p, int64_t tile, int64_t col0, int64_t rank_col0) {
    expand_tile_generic<E, TT, NV>(p, tile, col0, rank_col0);
  }
};

#if defined(__AVX512BF16__)
// bf16 with vdpbf16ps over pairs of contraction rows (layouts in the header comment).
struct PairedBF16 {
  template <int TT, int Q>
  static void shrink_tile(const Problem& p, int64_t tile, int64_t q0) {
    const int64_t start = p.tile_start[tile], len = p.tile_len[tile];
    const uint32_t* xr[TT];  // a row of x as bf16 pairs
    for (int t = 0; t < TT; ++t)
      xr[t] = reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(p.x) +
                                                p.rows[start + (t < len ? t : len - 1)] *
                                                    p.x_stride);
    const uint16_t* a = static_cast<const uint16_t*>(p.at) +
                        int64_t(p.tile_slot[tile]) * p.in_dim * p.srp + 2 * q0;
    __m512 acc[TT][Q];
    for (int t = 0; t < TT; ++t)
      for (int q = 0; q < Q; ++q) acc[t][q] = _mm512_setzero_ps();
    for (int64_t i = 0; i < p.in_dim / 2; ++i, a += 2 * p.srp) {
      __m512bh w[Q];
      for (int q = 0; q < Q; ++q) w[q] = (__m512bh)_mm512_loadu_si512(a + q * 2 * LANES);
      for (int t = 0; t < TT; ++t) {
        uint32_t pair;
        std::memcpy(&pair, xr[t] + i, 4);
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(int(pair));
        for (int q = 0; q < Q; ++q) acc[t][q] = _mm512_dpbf16_ps(acc[t][q], xv, w[q]);
      }
    }
    // The shrink result as bf16 (rounded to nearest even), for the paired expand.
    uint16_t* out = reinterpret_cast<uint16_t*>(p.shrunk);
    for (int t = 0; t < len; ++t)
      for (int q = 0; q < Q; ++q) {
        const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[t][q], _mm512_set1_ps(p.scale)));
        std::memcpy(out + (start + t) * p.srp + q0 + q * LANES, &h, sizeof h);
      }
  }

  template <int TT, int NV>
  static void expand_tile(const Problem& p, int64_t tile, int64_t col0, int64_t rank_col0) {
    const int64_t start = p.tile_start[tile], len = p.tile_len[tile];
    const uint16_t* b = static_cast<const uint16_t*>(p.bt) +
                        int64_t(p.tile_slot[tile]) * p.rank * p.width + p.rank * col0;
    const uint16_t* s = reinterpret_cast<const uint16_t*>(p.shrunk) + start * p.srp + rank_col0;
    __m512 acc[TT][NV];
    for (int t = 0; t < TT; ++t)
      for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_setzero_ps();
    for (int64_t j = 0; j < p.rank; j += 2, b += 2 * NV * LANES) {
      __m512bh w[NV];
      for (int v = 0; v < NV; ++v) w[v] = (__m512bh)_mm512_loadu_si512(b + v * 2 * LANES);
      for (int t = 0; t < TT; ++t) {
        uint32_t pair;
        std::memcpy(&pair, s + t * p.srp + j, 4);
        const __m512bh sv = (__m512bh)_mm512_set1_epi32(int(pair));
        for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], sv, w[v]);
      }
    }
    for (int t = 0; t < len; ++t) {
      uint16_t* out = static_cast<uint16_t*>(p.y) + p.rows[start + t] * p.y_stride + col0;
      for (int v = 0; v < NV; ++v) {
        vf sum;
        std::memcpy(&sum, &acc[t][v], sizeof sum);
        BF16::store(out + v * LANES, BF16::load(out + v * LANES) + sum);
      }
    }
  }
};
#endif

template <class K, int TT>
inline void expand_rows(const Problem& p, int64_t tile, int64_t col0, int64_t vecs,
                        int64_t rank_col0) {
  if (vecs == 2) K::template expand_tile<TT, 2>(p, tile, col0, rank_col0);
  else K::template expand_tile<TT, 1>(p, tile, col0, rank_col0);
}

template <class K>
inline void expand(const Problem& p, int64_t tile, int64_t col0, int64_t vecs, int64_t rank_col0) {
  const int32_t len = p.tile_len[tile];
  if (len > 4) expand_rows<K, 8>(p, tile, col0, vecs, rank_col0);
  else if (len > 2) expand_rows<K, 4>(p, tile, col0, vecs, rank_col0);
  else if (len > 1) expand_rows<K, 2>(p, tile, col0, vecs, rank_col0);
  else expand_rows<K, 1>(p, tile, col0, vecs, rank_col0);
}

template <class K>
void run(const Problem& p) {
  #pragma omp parallel
  {
    #pragma omp for schedule(static)
    for (int64_t tile = 0; tile < p.n_tiles; ++tile) shrink<K>(p, tile);
    // Implicit barrier: every row's shrink is done before any expand reads it.
    // Tile-major work items: a thread walks its rows of y in memory order and the
    // slot's weight blocks in memory order (tiles of one slot are adjacent, so a block
    // read from memory for one tile is still in cache for the next).
    #pragma omp for collapse(2) schedule(static)
    for (int64_t tile = 0; tile < p.n_tiles; ++tile)
      for (int64_t c = 0; c < p.n_chunks; ++c)
        expand<K>(p, tile, p.chunk_col[c], p.chunk_vecs[c], p.chunk_rank_col[c]);
  }
}

}  // namespace

// One slot's weights into the layouts above, copying bits (the stacked weights are
// already in the layout's dtype). a[s]: slice s's A, (rank, in_dim) row-major; b[s]: its
// B, (widths[s], rank) row-major, as vLLM stacks them. P = 2: the paired (interleaved)
// variant, P = 1: plain. The loops run in the layout's memory order, so each written
// cache line is filled whole and the reads come from `rank` rows (A) or one chunk of B
// that stay in L1.
template <class T, int P>
void layout_slot(int64_t in_dim, int64_t rank, int64_t srp, int64_t chunk, int64_t n_slices,
                 const void* const* a, const void* const* b, const int64_t* widths, void* at,
                 void* bt) {
  T* at_out = static_cast<T*>(at);
  for (int64_t i = 0; i < in_dim; i += P) {
    T* row = at_out + i * srp;  // paired: input rows i, i + 1 share one row of 2 * srp
    for (int64_t s = 0; s < n_slices; ++s) {
      const T* as = static_cast<const T*>(a[s]) + i;
      T* out = row + s * rank * P;
      for (int64_t j = 0; j < rank; ++j)
        for (int p = 0; p < P; ++p) out[j * P + p] = as[j * in_dim + p];
    }
  }
  T* bt_out = static_cast<T*>(bt);
  for (int64_t s = 0, offset = 0; s < n_slices; offset += widths[s], ++s) {
    const T* bs = static_cast<const T*>(b[s]);
    for (int64_t first = 0; first < widths[s]; first += chunk) {
      const int64_t cw = widths[s] - first < chunk ? widths[s] - first : chunk;
      T* block = bt_out + rank * (offset + first);  // (rank, cw) or (rank / 2, cw, 2)
      for (int64_t j = 0; j < rank; j += P)
        for (int64_t c = 0; c < cw; ++c)
          for (int p = 0; p < P; ++p)
            block[(j / P * cw + c) * P + p] = bs[(first + c) * rank + j + p];
    }
  }
}

template <class T>
void layout_slot(bool paired, int64_t in_dim, int64_t rank, int64_t srp, int64_t chunk,
                 int64_t n_slices, const void* const* a, const void* const* b,
                 const int64_t* widths, void* at, void* bt) {
  if (paired)
    layout_slot<T, 2>(in_dim, rank, srp, chunk, n_slices, a, b, widths, at, bt);
  else
    layout_slot<T, 1>(in_dim, rank, srp, chunk, n_slices, a, b, widths, at, bt);
}

// One LoRA layer's slot copy for lpx_layout_slots: the stacked tensors' and the layout's
// slot-0 addresses and bytes per slot, so one array prepared per wrapper serves every
// slot write (native_lora.LayoutJob mirrors it field for field).
constexpr int MAX_SLICES = 4;  // vLLM stacks at most q, k, v (3) in one LoRA layer
struct LayoutJob {
  int64_t elem_bytes, paired, in_dim, rank, srp, chunk, n_slices;
  const char* a[MAX_SLICES];
  const char* b[MAX_SLICES];
  int64_t a_slot_bytes[MAX_SLICES], b_slot_bytes[MAX_SLICES], widths[MAX_SLICES];
  char* at;
  char* bt;
  int64_t at_slot_bytes, bt_slot_bytes;
};

extern "C" {

// dtype: 0 = float32, 1 = bfloat16, 2 = bfloat16 in the paired layout (only when
// lpx_bf16_pairs() is 1). Returns 0, or -1 for an unsupported dtype.
// One pointer instead of 22 arguments: the Python side (native_lora.Problem mirrors the
// struct) fills a layer's Problem once and updates only x and y per call, because
// converting 22 ctypes arguments cost more per call than a small decode's kernel work.
int lpx_grouped_lora_problem(int dtype, const Problem* p) {
  if (dtype == 0) run<Generic<F32>>(*p);
  else if (dtype == 1) run<Generic<BF16>>(*p);
#if defined(__AVX512BF16__)
  else if (dtype == 2) run<PairedBF16>(*p);
#endif
  else return -1;
  return 0;
}

#if defined(__AVX512BF16__)
int lpx_bf16_pairs() { return 1; }
#else
int lpx_bf16_pairs() { return 0; }
#endif

// Lays out `slot` of every job's layer: one call per adapter load, where vLLM writes the
// slot (and one per layer and slot for a layer laid out later). elem_bytes 4 (float32) or
// 2 (bfloat16). Returns 0, or -1 when a job has another element size or too many slices
// (those layers are skipped).
int lpx_layout_slots(int64_t n_jobs, const LayoutJob* jobs, int64_t slot) {
  int failed = 0;
  #pragma omp parallel for schedule(dynamic) reduction(max : failed)
  for (int64_t i = 0; i < n_jobs; ++i) {
    const LayoutJob& job = jobs[i];
    if (job.n_slices < 1 || job.n_slices > MAX_SLICES) {
      failed = 1;
      continue;
    }
    const void* a[MAX_SLICES];
    const void* b[MAX_SLICES];
    for (int64_t s = 0; s < job.n_slices; ++s) {
      a[s] = job.a[s] + slot * job.a_slot_bytes[s];
      b[s] = job.b[s] + slot * job.b_slot_bytes[s];
    }
    void* at = job.at + slot * job.at_slot_bytes;
    void* bt = job.bt + slot * job.bt_slot_bytes;
    if (job.elem_bytes == 4)
      layout_slot<uint32_t>(job.paired != 0, job.in_dim, job.rank, job.srp, job.chunk,
                            job.n_slices, a, b, job.widths, at, bt);
    else if (job.elem_bytes == 2)
      layout_slot<uint16_t>(job.paired != 0, job.in_dim, job.rank, job.srp, job.chunk,
                            job.n_slices, a, b, job.widths, at, bt);
    else
      failed = 1;
  }
  return failed ? -1 : 0;
}

int lpx_tile_rows() { return TILE; }
int lpx_lanes() { return LANES; }
int lpx_chunk_vectors() { return CHUNK_VECS; }

// The widest vector ISA this build targets, for benchmark records: the 16-lane vectors
// above lower to one register on AVX-512, two on AVX2.
const char* lpx_isa() {
#if defined(__AVX512BF16__)
  return "avx512bf16";
#elif defined(__AVX512F__)
  return "avx512f";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__ARM_NEON)
  return "neon";
#else
  return "generic";
#endif
}

}  // extern "C"
