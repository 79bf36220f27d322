// Fused attention of one decode step (one new token per sequence): for sequence b and query head h,
// out = softmax(q . K[:, :length] / sqrt(D)) @ V[:length], fp32 math, T (half or bf16) in and out.
// Positions >= length are never used. Caches as quickcupy/llama/model.py's KVCache: keys
// (B, n_kv, D, max_len) (K^T: position is the contiguous axis), values (B, n_kv, max_len, D);
// out (B, n_heads * D); length: positions to attend, plus *start when start is not null (the
// position of the new token in device memory: one captured graph serves every step).
// window: 0, or W > 0 (a sliding window, Mistral's): only positions >= length - W are attended; the
// tile loop starts at the 8-aligned position below the first (16-byte chunks stay aligned) and masks
// the few before it, so without a window the loop is the one it always was. The window and split-KV
// (below) are compiled into the GENERAL instances only.
// Query head h reads KV head h / (n_heads / n_kv) (Hugging Face repeat_kv).
//
// Two modes, by cos_t:
//   cos_t null: q (B, n_heads, D) holds rotated queries and the caches already hold position length - 1.
//   cos_t given (the Llama decode step, rope and cache write fused in): q is the qkv projection
//     (B, n_heads + 2 n_kv, D) of the new token at position p = length - 1; the block rotates its
//     query heads and its KV head's k (rotate_half pairs i, i + D/2, cos/sin tables (positions, D/2)
//     fp32, each rotated value rounded to T as llama_ops.cu's rope_cache does), writes k and v into
//     the caches at p, then attends (a GQA group split over blocks writes the same bytes twice).
//     On sm_90 its first tile of K and V is copied before qc::pdl_wait (positions before p and *start are
//     not the previous kernel's output), so in a programmatic chain it loads while the qkv GEMM ends.
//
// Block: HEADS query heads of one sequence sharing one KV head (HEADS divides the group), so K and V
// are read once per block. It walks the positions (its split's: see Split-KV below) in tiles of
// TP = THREADS with an online softmax (running max and sum, rescaled per tile). Each tile of K^T
// (D x TP) and V (TP x D) is copied to shared memory in bursts of cp.async (16-byte chunks when
// max_len % 8 == 0 and the caches are 16-byte aligned, else element by element), V's copy in
// flight while the scores use K, so a tile costs one memory latency, not D dependent loads. (One
// buffer for both, V after K, fits twice the blocks per SM but measured slower on the H100 from
// batch 64 on: results/h100/llama_attention_variants.txt.)
//   scores:       thread i owns position tile + i (a warp reads 32 consecutive elements of a row of K^T);
//   weighted sum: warp w owns positions tile + w, w + WARPS, ...; lane l owns d elements
//                 [l * D/32, (l + 1) * D/32) (a warp reads one whole row of V); warps add up at the end.
// Dynamic shared memory: quickcupy/attention.py's decode_smem_bytes() states the same layout.
//
// Split-KV (flash decoding), gridDim.y = splits > 1: when B x head groups leave SMs idle (batch 1),
// quickcupy/attention.py's decode_splits() cuts the attended tiles of each (sequence, head group)
// among `splits` blocks: with n tiles from the window's start, split s takes tiles
// [s * per, (s + 1) * per), per = ceil(n / splits), so the last split with a tile holds p and the
// splits after it (a short cache: the count is sized by max_len) attend nothing. The tiles follow
// from the length in the kernel, so one captured launch serves every step. Each split rotates its
// own query heads (the same bytes in every split); only the one holding p rotates k and writes k
// and v at p. On sm_90 every split copies its own first tile before pdl_wait, so all of a short
// cache is in shared memory when the qkv GEMM ends. Every split stores its partial to `partial`
// (fp32, per (sequence, head group) and split: acc (HEADS x D, unnormalized, relative to m), m
// (HEADS, log2 units), l (HEADS); a split without tiles stores m = -inf, l = 0, acc = 0), then
// counts itself in counters[blockIdx.x]; the last to arrive resets the counter and combines splits
// 0 .. splits - 1 in that order (deterministic: whichever block arrives last, the sum is the same):
// out = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M), M = max_s m_s (finite: split 0 holds the
// first attended position; an empty split's weight is exactly 0 and adds exact zeros). splits == 1
// is the single pass: it normalizes and writes out itself, no partial, no counter (both may be
// null). splits <= TP / 2 (registry.DECODE_MAX_SPLITS): the combiner keeps every split's m and l in p_s.
#include "quant_common.cuh"   // Dt<T>, cp.async wrappers; smem_maps.cuh: DECODE_ATTENTION_THREADS

namespace decode {

constexpr int THREADS = DECODE_ATTENTION_THREADS;  // from quickcupy/registry.py, which launches this many
constexpr int WARPS = THREADS / 32;
constexpr int TP = THREADS;                        // positions per tile
constexpr float LOG2E = 1.4426950408889634f;       // scores are kept in log2 units: exp2f instead of expf

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

template <bool MAX>
__device__ __forceinline__ float warp_reduce(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const float x = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, x) : v + x;
  }
  return v;
}

// E consecutive elements at p (shared memory) as floats, in loads of C = 4, 2 or 1 elements (the
// largest dividing E: rows of V start at multiples of D = 32 E and lane l at l * E).
template <int E, typename T>
__device__ __forceinline__ void load_row(const T* p, float (&v)[E]) {
  constexpr int C = E % 4 == 0 ? 4 : E % 2 == 0 ? 2 : 1;
  struct alignas(2 * C) Chunk { T h[C]; };
#pragma unroll
  for (int c = 0; c < E / C; ++c) {
    const Chunk x = reinterpret_cast<const Chunk*>(p)[c];
#pragma unroll
    for (int k = 0; k < C; ++k) v[c * C + k] = qc::Dt<T>::to_float(x.h[k]);
  }
}

// Copies positions [t0, t0 + n) of K^T (rows of max_len) into Ks (D x TP), as one cp.async group.
// vec: 16-byte chunks (a row's last chunk may read up to 7 positions past n, still inside max_len,
// never used); else element by element, synchronously.
template <int D, typename T>
__device__ __forceinline__ void load_k(const T* __restrict__ K, T* Ks, int max_len, int t0, int n, bool vec) {
  constexpr int CPR = TP / 8;   // 16-byte chunks in a row of a full tile of K^T
  const int tid = threadIdx.x;
  if (vec) {
    const int j = tid % CPR;
    if (8 * j < n) {
#pragma unroll 4
      for (int i = tid / CPR; i < D; i += THREADS / CPR)
        qc::cp_async16(Ks + i * TP + 8 * j, K + (size_t)i * max_len + t0 + 8 * j, true);
    }
  } else {
    for (int c = tid; c < D * n; c += THREADS) Ks[(c / n) * TP + c % n] = K[(size_t)(c / n) * max_len + t0 + c % n];
  }
  qc::cp_async_commit();
}

// Copies rows [t0, t0 + n) of V (contiguous) into Vs (n x D), as one cp.async group (vec as load_k).
template <int D, typename T>
__device__ __forceinline__ void load_v(const T* __restrict__ V, T* Vs, int t0, int n, bool vec) {
  const T* src = V + (size_t)t0 * D;
  if (vec) {
#pragma unroll 4
    for (int c = threadIdx.x; c < n * (D / 8); c += THREADS) qc::cp_async16(Vs + 8 * c, src + 8 * c, true);
  } else {
    for (int c = threadIdx.x; c < n * D; c += THREADS) Vs[c] = src[c];
  }
  qc::cp_async_commit();
}

// Fetches positions [t0, t0 + n) of K^T and V into L2 (one prefetch per 128-byte line, no register
// held, nothing waited for), so that the next tile's copies find them there: issued after a tile's
// copies, it overlaps the next tile's DRAM latency with this tile's math (3.5% at batch 256 over 131
// positions, dev/attention_probe.py's prefetch variant, results/h100/llama_decode_ab.txt).
template <int D, typename T>
__device__ __forceinline__ void prefetch_tile(const T* K, const T* V, int max_len, int t0, int n) {
  constexpr int LINE = 128 / sizeof(T);   // elements per 128-byte line
  constexpr int LPR = TP / LINE;          // lines per row of a full tile of K^T
  for (int c = threadIdx.x; c < D * LPR; c += THREADS)
    if (LINE * (c % LPR) < n) qc::prefetch_l2(K + (size_t)(c / LPR) * max_len + t0 + LINE * (c % LPR));
  for (int c = threadIdx.x; c < (n * D + LINE - 1) / LINE; c += THREADS) qc::prefetch_l2(V + (size_t)t0 * D + LINE * c);
}

// The positions of split `split` of `splits` (see the top): [lo, hi), empty when lo >= hi; first:
// the first attended position (the window's start); used: the splits that hold a tile (the last
// of them holds the new position length - 1).
struct Span {
  int first, lo, hi, used;
};
__device__ __forceinline__ Span split_span(int length, int window, int split, int splits) {
  const int first = window > 0 && length > window ? length - window : 0;
  const int base = first & ~7;   // a multiple of 8: cp.async's 16-byte chunks stay aligned
  const int tiles = (length - base + TP - 1) / TP;
  const int per = (tiles + splits - 1) / splits;
  const int lo = base + split * per * TP;
  return {first, lo, min(length, lo + per * TP), (tiles + per - 1) / per};
}

// Split-KV arrival of a whole block, "last one combines": qc::splitk_warp_arrive's fences, for a
// block. Call it with every thread after the block's partial stores; returns true (to every thread)
// in the block that arrives last among the `splits` sharing `counter`, which then reads every
// split's partial (__ldcg) and resets the counter to 0 (zeroed once by the host: graph-safe).
// bar.sync orders every thread's stores before thread 0's release fence, and thread 0's acquire
// before every thread's reads (fences are cumulative), as a grid-wide barrier does.
__device__ __forceinline__ bool block_arrive(unsigned int* counter, unsigned int splits) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    qc::fence_acq_rel_gpu();   // release: the block's partial stores before the count
    last = atomicAdd(counter, 1u) == splits - 1;
    if (last) {
      qc::fence_acq_rel_gpu();   // acquire: the partial reads after the observed count
      atomicExch(counter, 0u);   // every split has arrived: reset
    }
  }
  __syncthreads();
  return last;
}

}  // namespace decode

// Below sm_90, at least one block per SM: without it NVRTC 12.9's ptxas holds decode_attention<96, 8,
// half> for sm_80 under 96 registers and spills one; sm_90 keeps the default bounds its H100 figures
// were measured with.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define DECODE_ATTENTION_BOUNDS __launch_bounds__(decode::THREADS, 1)
#else
#define DECODE_ATTENTION_BOUNDS __launch_bounds__(decode::THREADS)
#endif

template <int D,         // head_dim: a multiple of 32 (a warp spans it in the weighted sum)
          int HEADS,     // query heads per block, sharing one KV head
          bool GENERAL,  // split-KV and the sliding window, read at run time; false: the single pass
                         // over every position (gridDim.y must be 1, window is taken as 0), which
                         // compiles without them (quickcupy/attention.py picks it whenever it can)
          typename T>    // half or __nv_bfloat16 (Dt<T>)
__global__ void DECODE_ATTENTION_BOUNDS
decode_attention(const T* __restrict__ q, T* __restrict__ keys, T* __restrict__ values, T* __restrict__ out,
                 int n_heads, int n_kv, int max_len, int length, int window, const int* __restrict__ start,
                 const float* __restrict__ cos_t, const float* __restrict__ sin_t, float* __restrict__ partial,
                 unsigned int* __restrict__ counters) {
  using namespace decode;
  using Dt = qc::Dt<T>;
  static_assert(D % 32 == 0, "a warp spans head_dim in the weighted sum: D must be a multiple of 32");
  static_assert(WARPS * HEADS * D * 4 <= D * TP * (int)sizeof(T), "the warps' sums reuse the K tile");
  constexpr int E = D / 32;                        // d elements per lane in the weighted sum
  extern __shared__ __align__(16) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem);                            // D x TP: the tile of K^T
  T* Vs = Ks + D * TP;                                           // TP x D: the tile of V
  float* q_s = reinterpret_cast<float*>(Vs + TP * D);            // D x HEADS: q * log2(e) / sqrt(D)
  float* p_s = q_s + D * HEADS;                                  // HEADS x TP: the tile's probabilities
  float* red_s = p_s + HEADS * TP;                               // WARPS x HEADS: maxima, then sums
  float* sum_s = reinterpret_cast<float*>(smem);                 // WARPS x HEADS x D, after the loop

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int split = GENERAL ? blockIdx.y : 0, splits = GENERAL ? gridDim.y : 1;   // 1: the single pass
  if (!GENERAL) window = 0;
  const int blocks_per_seq = n_heads / HEADS;
  const int b = blockIdx.x / blocks_per_seq, h0 = (blockIdx.x % blocks_per_seq) * HEADS;
  const int kv = h0 / (n_heads / n_kv);
  T* K = keys + (size_t)(b * n_kv + kv) * D * max_len;     // D x max_len
  T* V = values + (size_t)(b * n_kv + kv) * max_len * D;   // max_len x D
  const float scale = LOG2E / sqrtf((float)D);
  const bool vec = max_len % 8 == 0 && (reinterpret_cast<size_t>(keys) | reinterpret_cast<size_t>(values)) % 16 == 0;

  qc::pdl_trigger();
  // Fused mode: every cached position before the new one was written by earlier steps, and *start
  // by the step before (a programmatic chain never writes either before this kernel), so the first
  // tile of K and V is copied while the previous kernel (the qkv GEMM) ends; the new position's
  // slot of it is filled below from this block's own rotation.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool EARLY = true;
#else
  constexpr bool EARLY = false;   // no programmatic launch below sm_90: nothing to overlap
#endif
  int pre_t0 = -1;   // the first tile's start when it was copied here
  if (EARLY && cos_t) {
    if (start) length += *start;
    const Span early = split_span(length, window, split, splits);
    if (early.lo < early.hi) {
      pre_t0 = early.lo;
      load_k<D>(K, Ks, max_len, pre_t0, min(TP, early.hi - pre_t0), vec);
      load_v<D>(V, Vs, pre_t0, min(TP, early.hi - pre_t0), vec);
    }
  }
  qc::pdl_wait();                // q (or qkv) is the previous kernel's output
  if (start && !(EARLY && cos_t)) length += *start;   // a CUDA graph reads the cache length from device memory
  const Span span = split_span(length, window, split, splits);
  const bool active = span.lo < span.hi;   // false: a split past the cache's tiles (an empty partial)

  if (active && cos_t) {
    // q is qkv: rotate this block's query heads into q_s; the split holding p also rotates the KV
    // head's k into the cache at p and copies v there.
    const int q_heads = n_heads + 2 * n_kv, p = length - 1;
    const bool writer = split == span.used - 1;
    const T* row = q + (size_t)b * q_heads * D;
    const float* c = cos_t + (size_t)p * (D / 2);
    const float* s = sin_t + (size_t)p * (D / 2);
    const int slot = EARLY && p - pre_t0 < TP ? p - pre_t0 : -1;   // p's column of the copied first tile
    if (EARLY) {
      qc::cp_async_wait<0>();
      __syncthreads();   // the first tile has landed: the new position's slot is written over below
    }
    for (int j = tid; j < (HEADS + writer) * (D / 2); j += THREADS) {
      const int g = j / (D / 2), i = j % (D / 2);
      const T* x = row + (g < HEADS ? h0 + g : n_heads + kv) * D;
      const float x1 = Dt::to_float(x[i]), x2 = Dt::to_float(x[i + D / 2]);
      // __fmul_rn: no fused multiply-add, so the rounding is the reference's x1 * c - x2 * s
      const T y1 = Dt::from_float(__fmul_rn(x1, c[i]) - __fmul_rn(x2, s[i]));
      const T y2 = Dt::from_float(__fmul_rn(x2, c[i]) + __fmul_rn(x1, s[i]));
      if (g < HEADS) {
        q_s[i * HEADS + g] = Dt::to_float(y1) * scale;
        q_s[(i + D / 2) * HEADS + g] = Dt::to_float(y2) * scale;
      } else {
        K[(size_t)i * max_len + p] = y1;
        K[(size_t)(i + D / 2) * max_len + p] = y2;
        if (slot >= 0) {
          Ks[i * TP + slot] = y1;
          Ks[(i + D / 2) * TP + slot] = y2;
        }
      }
    }
    if (writer) {
      const T* v_new = row + (size_t)(n_heads + n_kv + kv) * D;
      for (int i = tid; i < D; i += THREADS) {
        V[(size_t)p * D + i] = v_new[i];
        if (slot >= 0) Vs[slot * D + i] = v_new[i];
      }
    }
    __syncthreads();   // the block's own cache writes are seen by its tile loads below, and the slot
  } else if (active) {
    const T* qh = q + ((size_t)b * n_heads + h0) * D;
    for (int i = tid; i < HEADS * D; i += THREADS) q_s[(i % D) * HEADS + i / D] = Dt::to_float(qh[i]) * scale;
  }

  // Per query head: the running max (the same in every thread), this thread's share of the sum of
  // exponentials, and this lane's weighted sums of V; all relative to the running max.
  float m[HEADS], l[HEADS], acc[HEADS][E];
#pragma unroll
  for (int g = 0; g < HEADS; ++g) {
    m[g] = neg_inf();
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[g][e] = 0.f;
  }

  // The split's tiles; the first starts at the 8-aligned position at or below the window's start.
  bool copied = pre_t0 >= 0;
  for (int t0 = span.lo; t0 < span.hi; t0 += TP) {
    const int n = min(TP, span.hi - t0);
    const int skip = max(span.first - t0, 0);   // positions t0 .. t0 + skip - 1 lie before the window (< 8)
    if (!copied) {                              // the fused mode's first tile was copied before the wait
      load_k<D>(K, Ks, max_len, t0, n, vec);
      load_v<D>(V, Vs, t0, n, vec);
    }
    copied = false;
    if (t0 + TP < span.hi) prefetch_tile<D>(K, V, max_len, t0 + TP, min(TP, span.hi - t0 - TP));
    qc::cp_async_wait<1>();   // this thread's K chunks (V may still be in flight)
    __syncthreads();          // everyone's K chunks, and q_s

    // Scores of position t0 + tid (-inf past length and before the window).
    const bool live = tid < n && tid >= skip;
    float s[HEADS];
#pragma unroll
    for (int g = 0; g < HEADS; ++g) s[g] = live ? 0.f : neg_inf();
    if (live) {
#pragma unroll 16
      for (int i = 0; i < D; ++i) {
        const float k = Dt::to_float(Ks[i * TP + tid]);
#pragma unroll
        for (int g = 0; g < HEADS; ++g) s[g] = fmaf(q_s[i * HEADS + g], k, s[g]);
      }
    }
    // Tile maximum over the block; lane 0 of each warp posts its warp's.
#pragma unroll
    for (int g = 0; g < HEADS; ++g) {
      const float w = warp_reduce<true>(s[g]);
      if (lane == 0) red_s[warp * HEADS + g] = w;
    }
    qc::cp_async_wait<0>();   // this thread's V chunks
    __syncthreads();          // everyone's V chunks and tile maxima
    float alpha[HEADS];       // rescales what earlier tiles accumulated to the new maximum
#pragma unroll
    for (int g = 0; g < HEADS; ++g) {
      float tile_max = red_s[g];
#pragma unroll
      for (int w = 1; w < WARPS; ++w) tile_max = fmaxf(tile_max, red_s[w * HEADS + g]);
      const float m_new = fmaxf(m[g], tile_max);   // finite: the tile holds an attended position
      alpha[g] = exp2f(m[g] - m_new);              // 0 on the first tile (m = -inf)
      m[g] = m_new;
      const float p = exp2f(s[g] - m_new);         // 0 past length and before the window
      l[g] = fmaf(l[g], alpha[g], p);
      p_s[g * TP + tid] = p;
    }
    __syncthreads();
    // Weighted sum of the tile's attended rows of V (rows before the window are not read: they
    // may hold anything, and 0 * inf is NaN).
#pragma unroll
    for (int g = 0; g < HEADS; ++g)
#pragma unroll
      for (int e = 0; e < E; ++e) acc[g][e] *= alpha[g];
#pragma unroll 4
    for (int j = skip + warp; j < n; j += WARPS) {
      float v[E];
      load_row<E>(Vs + j * D + lane * E, v);
#pragma unroll
      for (int g = 0; g < HEADS; ++g) {
        const float p = p_s[g * TP + j];
#pragma unroll
        for (int e = 0; e < E; ++e) acc[g][e] = fmaf(p, v[e], acc[g][e]);
      }
    }
    __syncthreads();   // the next tile rewrites Ks, Vs, red_s and p_s
  }

  // Sum the warps' weighted sums (in the K tile's place) and the threads' shares of the denominator.
  // A split without tiles gets m = -inf, l = 0, acc = 0: it adds exact zeros to the combination.
  constexpr int PART = HEADS * (D + 2);   // a split's partial: acc (HEADS x D), m (HEADS), l (HEADS)
  float* part = splits > 1 ? partial + ((size_t)blockIdx.x * splits + split) * PART : nullptr;
#pragma unroll
  for (int g = 0; g < HEADS; ++g) {
    const float w = warp_reduce<false>(l[g]);
    if (lane == 0) red_s[warp * HEADS + g] = w;
#pragma unroll
    for (int e = 0; e < E; ++e) sum_s[(warp * HEADS + g) * D + lane * E + e] = acc[g][e];
    if (splits > 1 && tid == 0) part[HEADS * D + g] = m[g];
  }
  __syncthreads();
  T* o_row = out + ((size_t)b * n_heads + h0) * D;   // HEADS x D
  for (int i = tid; i < HEADS * D; i += THREADS) {
    const int g = i / D, c = i % D;
    float o = 0.f, denom = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      o += sum_s[(w * HEADS + g) * D + c];
      denom += red_s[w * HEADS + g];
    }
    if (splits == 1) {
      o_row[i] = Dt::from_float(o / denom);
    } else {
      part[i] = o;
      if (c == 0) part[HEADS * D + HEADS + g] = denom;
    }
  }
  if (splits == 1 || !block_arrive(counters + blockIdx.x, splits)) return;

  // The last split to arrive combines the partials of splits 0 .. splits - 1 in that order. p_s
  // holds m (then the weights 2^(m_s - M)) and l of each split, red_s the combined denominators.
  const float* part0 = partial + (size_t)blockIdx.x * splits * PART;
  float* w_s = p_s;                      // splits x HEADS
  float* l_s = p_s + splits * HEADS;     // splits x HEADS
  for (int i = tid; i < splits * HEADS; i += THREADS) {
    const float* ps = part0 + (size_t)(i / HEADS) * PART + HEADS * D + i % HEADS;
    w_s[i] = __ldcg(ps);
    l_s[i] = __ldcg(ps + HEADS);
  }
  __syncthreads();
  if (tid < HEADS) {
    float mx = neg_inf();
    for (int t = 0; t < splits; ++t) mx = fmaxf(mx, w_s[t * HEADS + tid]);   // finite: split 0 has a tile
    float denom = 0.f;
    for (int t = 0; t < splits; ++t) {
      const float w = exp2f(w_s[t * HEADS + tid] - mx);   // 0 for a split without tiles
      w_s[t * HEADS + tid] = w;
      denom = fmaf(l_s[t * HEADS + tid], w, denom);
    }
    red_s[tid] = denom;
  }
  __syncthreads();
  for (int i = tid; i < HEADS * D; i += THREADS) {
    const int g = i / D;
    float o = 0.f;
#pragma unroll 4
    for (int t = 0; t < splits; ++t) o = fmaf(__ldcg(part0 + (size_t)t * PART + i), w_s[t * HEADS + g], o);
    o_row[i] = Dt::from_float(o / red_s[g]);
  }
}
