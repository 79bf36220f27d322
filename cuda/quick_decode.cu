// QUICK decode: small-M (1..32, fastest for M <= 16) GEMM C = A x W (+ bias) on the packed QUICK
// layout (pack_quick), built to stream the weights at memory speed. Weights go global -> registers ->
// mma fragments and never touch shared memory; shared memory holds only the block's slice of the
// activations (and, at the very end, the fp32 sums of warps that split K inside the block).
//
// Roles are swapped against quick_gemm.cu: the mma computes C^T = W^T A^T, so the dequantized
// weights are the mma A operand (16 output columns) and the activations the B operand (8 rows of
// M). In the QUICK layout the B fragments of n8 sub-tiles 2i and 2i+1 of a lane are exactly the A
// fragment of the 16-column tile i (a0 = word 2i reg 0, a1 = word 2i+1 reg 0, a2 = word 2i reg 1,
// a3 = word 2i+1 reg 1), so the same packed words feed it and M <= 8 costs half the mma of the
// normal orientation (8 instead of 16 rows computed per mma).
//
// Pipeline: weights stream in batches of U chunks (U 16-byte loads per lane, with the batch's
// scales/zeros: lane t loads those of chunks t*U/4 .. and the lanes of a column group trade them
// with shuffles). Two register buffers: batch b+1 is issued as soon as batch b has arrived and is in
// flight while batch b is dequantized and multiplied. The issue of batch b+1 is tied to the arrival
// of batch b by a fake data dependency (address + (last word & 0)): ptxas tracks all global loads of
// a warp on one scoreboard, so a prefetch issued earlier would be waited for together with the
// batch in use, and a deeper register ring (tried: 3 stages) degenerates to one batch per memory
// round trip. So each warp keeps U * 512 bytes in flight at all times; occupancy (16 warps/SM at
// <= 128 registers) supplies the rest. The block's activations (M rows x its K slice) are copied to
// shared memory once, with cp.async, while the first batch flies; after that one __syncthreads the
// main loop has no barrier.
//
// K is split twice. Inside a block, KW warps share a tile column and take the batches of the
// block's K slice round robin (neighbouring addresses at any time); at the end they add their fp32
// sums through shared memory in warp order (two __syncthreads). Across blocks (gridDim.y = splits >
// 1), each block's sums go to partial[split][M][N] and counters[tile column] counts the arrivals; the
// warp that arrives last sums all splits in split order (deterministic), adds bias, writes fp16 and
// resets the counter to 0 (splitk_warp_arrive / splitk_reduce_strip32 in quant_common.cuh): one
// launch, CUDA-graph safe, bit-identical from run to run.
//
// Launch (scratch/decode_proto.py: plan_decode, choose_decode): grid (ceil(N / 32 / (NWARPS / KW)),
// splits), block NWARPS * 32 threads, dynamic shared memory max(2 * (M * (32 * chunks_per_split + 8)
// + 8), (KW - 1) * (NWARPS / KW) * MB * 1024) bytes; chunks_per_split a multiple of U * KW;
// M <= 8 * MB; K % 32 == 0, N % 32 == 0, group_size % 32 == 0, K % group_size == 0; counters: N / 32
// uint32 zeroed once by the host; partial: splits * M * N fp32 (unused, may be null, when splits == 1).
#include "quant_common.cuh"

using namespace qc;

template <int U>
struct DecodeBatch {
  uint4 w[U];       // packed codes of U consecutive 32-deep chunks, one 16-byte load each
  uint2 s[U / 4];   // scales (fp16 x 4) of chunks (lane % 4) * U / 4 + i of the batch, this lane's g
  u32 z[U / 4];     // zero points (nibbles 0..3) of the same chunks
};

// Block: 32 * NWARPS / KW output columns x all M rows over one K slice (split blockIdx.y). Warp w
// owns QUICK tile column blockIdx.x * (NWARPS / KW) + w % (NWARPS / KW) (32 columns) over part
// w / (NWARPS / KW) of the slice; lane (g = lane / 4, t = lane % 4) loads 16 bytes per chunk (columns
// 8 j + g, k rows 2t + {0,1,8,9,16,17,24,25}) and sums C[m = 8 mb + 2t + {0,1}][n = 16 i + g + {0,8}].
template <int NWARPS,   // warps per block; block = 32 * NWARPS threads
          int KW,       // warps along K per tile column (divides NWARPS): NWARPS / KW tile columns per block
          int MB,       // 8-row tiles of activations (mma n8 tiles): the kernel serves M <= 8 * MB
          int U,        // 32-deep K chunks per batch (4 or 8): U 16-byte weight loads in flight per lane
          int GCH,      // chunks per scale/zero change = gcd(group_size / 32, U): divides U
          int MINB,     // blocks per SM the registers must allow (__launch_bounds__): 16 / NWARPS -> <= 128 regs
          typename T>   // activations, bias and C: half or __nv_bfloat16 (Dt<T>); scales are fp16
__global__ void __launch_bounds__(NWARPS * 32, MINB)
quick_decode(const T* __restrict__ A, const uint4* __restrict__ qweight,
             const unsigned short* __restrict__ qzeros, const uint2* __restrict__ scales,
             const T* __restrict__ bias, T* __restrict__ C, float* __restrict__ partial,
             unsigned int* __restrict__ counters, int M, int N, int K, int group_size,
             int chunks_per_split) {
  static_assert(U % GCH == 0, "GCH must divide U");
  static_assert(NWARPS % KW == 0, "KW must divide NWARPS");
  static_assert(U == 4 || U == 8, "a batch is 4 or 8 chunks (each lane holds U / 4 scales)");
  constexpr int SPL = U / 4;                   // chunks whose scales/zeros one lane loads per batch
  constexpr int NWN = NWARPS / KW;             // tile columns per block
  using D = Dt<T>;
  // one untyped extern array for every instance (extern __shared__ arrays of different types clash)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* A_s = reinterpret_cast<T*>(smem_raw);     // [M][pitch] activations of the K slice, then 8 zero values

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
  const int wn = warp % NWN, wk = warp / NWN;
  const int tiles_n = N / 32, chunks = K / 32, groups = K / group_size, cpg = group_size / 32;
  const int tn = blockIdx.x * NWN + wn;  // this warp's QUICK tile column
  const bool active = tn < tiles_n;      // N % 32 == 0: a tile column is all in or all out
  const int kc0 = blockIdx.y * chunks_per_split;
  const int nch_b = min(chunks, kc0 + chunks_per_split) - kc0;  // chunks of the block's slice (>= 1)
  // the KW warps of a tile column take the slice's batches of U chunks round robin (warp wk: batches
  // wk, wk + KW, ...), so at any time they read neighbouring 2-4 KB pieces of the column's stream
  const int nbat = (nch_b + U - 1) / U;                        // batches in the slice
  const int nb = nbat > wk ? (nbat - wk + KW - 1) / KW : 0;    // batches of this warp
  const int pitch = chunks_per_split * 32 + 8;  // halfs per shared row: 16-byte pad, ldmatrix conflict-free

  // ---- activations of the slice -> shared memory, once (16-byte cp.async, rows contiguous)
  {
    // 16-byte vectors per row: the slice's nch_b chunks, then zeros up to a whole step, so chunks
    // past the slice's end (zero weights) multiply zeros, never stale shared memory
    const int VECS = (nch_b + U - 1) / U * U * 4;  // read by the DEC_A_CP map
    for (int i = threadIdx.x; i < M * VECS; i += NWARPS * 32) {
      const int r = DEC_A_CP_ROW(i), c = DEC_A_CP_COL(i) / 8;
      T* dst = A_s + r * pitch + c * 8;
      if (c < nch_b * 4) cp_async16(dst, A + (size_t)r * K + (size_t)kc0 * 32 + c * 8, true);
      else *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
    cp_async_commit();
    // row M, columns 0..7: the 16 zero bytes that rows >= M of an ldmatrix point at
    if (threadIdx.x == 0) *reinterpret_cast<uint4*>(A_s + M * pitch) = make_uint4(0, 0, 0, 0);
  }

  // ---- this warp's streams: tile column tn of each packed tensor, from chunk kc0 on
  const int t = lane % 4;
  const uint4* wq = qweight + ((size_t)tn * chunks + kc0) * 32 + lane;
  const uint2* sq = scales + (size_t)tn * groups * 8 + g;
  const unsigned short* zq = qzeros + (size_t)tn * groups * 8 + g;
  // group of chunk kc = kc / cpg by multiply-high: exact for kc * cpg < 2^32
  const u32 gmagic = cpg == 1 ? 0u : 0xffffffffu / (u32)cpg + 1u;
  const u32 zero_rt = (u32)M >> 31;  // 0 at run time, unknown to the compiler (fake dependency)

  // loads of batch b (predicated per chunk: a batch past the end loads nothing, without a branch)
  auto load_batch = [&](int b, DecodeBatch<U>& r, u32 dep) {
    const int rcb = (b * KW + wk) * U;                  // first chunk of the batch in the slice
    const uint4* wb = wq + (size_t)rcb * 32 + dep;      // dep == 0: ties the issue to the previous batch
#pragma unroll
    for (int c = 0; c < U; ++c)  // L1::no_allocate: read once
      r.w[c] = ld_stream16<1>(wb + c * 32, active && rcb + c < nch_b);
#pragma unroll
    for (int i = 0; i < SPL; ++i) {
      const int rc = rcb + t * SPL + i;
      const bool ok = active && rc < nch_b;
      const u32 kc = (u32)(kc0 + rc);
      const u32 grp = cpg == 1 ? kc : __umulhi(kc, gmagic);
      r.s[i] = ok ? __ldg(sq + (size_t)grp * 8) : make_uint2(0, 0);
      r.z[i] = ok ? (u32)__ldg(zq + (size_t)grp * 8) : 0u;
    }
  };

  DecodeBatch<U> buf[2];  // indexed only by unrolled constants: stays in registers
  load_batch(0, buf[0], 0u);

  cp_async_wait<0>();
  __syncthreads();  // activations are in shared memory; no barrier in the main loop

  float acc[2][MB][4];   // acc[i][mb][e]: C[m = 8 mb + 2t + e % 2][n = 32 tn + 16 i + g + 8 (e / 2)]
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][mb][e] = 0.f;

  if (active) {
    // ldmatrix.x4 (non-transposed) of 8 rows x 32 k of A: lane L gives row 8 mb + L % 8 at k 8 (L / 8)
    // of the chunk, so register q = (k-step q / 2, B register q % 2). Rows >= M read the zero vector.
    u32 a_addr[MB];  // shared address of the lane's row at the warp's first chunk
    u32 a_step[MB];  // bytes to the next chunk: 64, or 0 for the zero vector
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      const int row = DEC_A_LDSM_ROW(lane, mb, 0);  // chunk rc adds 32 rc halfs (64 bytes) to the column
      a_addr[mb] = smem_addr(row < M ? A_s + row * pitch + DEC_A_LDSM_COL(lane, mb, 0) : A_s + M * pitch);
      a_step[mb] = row < M ? 64 : 0;
    }
    // The mma multiplies exact (code - zero) values (fp16 or bf16 alike); the fp32 sums of each scale
    // block (GCH chunks, one group) are scaled into acc at its end: one multiply per weight pair less
    // than scaling the weights, and no rounding of code * scale to T (measured: equal or faster at
    // every shape), so bf16 loses nothing here but the output rounding.
    float accg[2][MB][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int e = 0; e < 4; ++e) accg[i][mb][e] = 0.f;

    auto compute = [&](int b, const DecodeBatch<U>& r) {
      typename D::Zero zp[4];
      half2 sc[4];  // fp16 scales: only widened to fp32 (exact) for the block sums
#pragma unroll
      for (int c = 0; c < U; ++c) {
        const int rc = (b * KW + wk) * U + c;  // chunks past nch_b hold zero weights and zero activations
        if (c % GCH == 0) {  // column 8 j + g of the tile: zero nibble j, scale j, from lane 4 g + c / SPL
          const int src = (lane & ~3) | (c / SPL);
          const u32 s01 = __shfl_sync(0xffffffffu, r.s[c % SPL].x, src);
          const u32 s23 = __shfl_sync(0xffffffffu, r.s[c % SPL].y, src);
          const u32 zw = __shfl_sync(0xffffffffu, r.z[c % SPL], src);
          typename D::T2 z[4];
          D::codes8(zw, z);  // pair j = (zero of sub-tile j, 0)
          sc[0] = __low2half2(as_half2(s01)); sc[1] = __high2half2(as_half2(s01));
          sc[2] = __low2half2(as_half2(s23)); sc[3] = __high2half2(as_half2(s23));
#pragma unroll
          for (int j = 0; j < 4; ++j) zp[j] = D::make_zero(D::low2(z[j]));
        }
        u32 act[MB][4];
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) ldmatrix_x4_addr(act[mb], a_addr[mb] + rc * a_step[mb]);
        const u32 words[4] = {r.w[c].x, r.w[c].y, r.w[c].z, r.w[c].w};
        u32 b[4][4];  // b[j][2 s + q]: register q of k16 step s for n8 sub-tile j (quick_gemm's B fragment)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const typename D::Zero zj[4] = {zp[j], zp[j], zp[j], zp[j]};
          D::dequant8_unscaled(words[j], zj, b[j]);
        }
#pragma unroll
        for (int s = 0; s < 2; ++s)
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const u32 wa[4] = {b[2 * i][2 * s], b[2 * i + 1][2 * s], b[2 * i][2 * s + 1], b[2 * i + 1][2 * s + 1]};
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) D::mma(accg[i][mb], wa, act[mb][2 * s], act[mb][2 * s + 1]);
          }
        if (c % GCH == GCH - 1) {  // end of a scale block: acc += scale * block sums
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const float s_lo = __low2float(sc[2 * i]), s_hi = __low2float(sc[2 * i + 1]);  // rows g, g + 8
#pragma unroll
            for (int mb = 0; mb < MB; ++mb)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                acc[i][mb][e] = fmaf(accg[i][mb][e], e < 2 ? s_lo : s_hi, acc[i][mb][e]);
                accg[i][mb][e] = 0.f;
              }
          }
        }
      }
    };

    // batch b + 1 is issued once batch b has arrived (dep), then flies while batch b is computed
    // (no branch between the wait and the loads: ptxas would wait again after the merge)
    for (int b = 0; b < nb; b += 2) {
      load_batch(b + 1, buf[1], buf[0].w[U - 1].w & zero_rt);
      compute(b, buf[0]);
      load_batch(b + 2, buf[0], buf[1].w[U - 1].w & zero_rt);
      if (b + 1 < nb) compute(b + 1, buf[1]);
    }
  }

  // ---- the KW warps of a tile column add their sums in warp order (fixed: deterministic)
  if constexpr (KW > 1) {
    float* red = reinterpret_cast<float*>(A_s);  // reuses the activations' space
    __syncthreads();                             // every warp is done with the activations
    if (wk > 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            red[DEC_RED_ROW(lane, (wk - 1) * NWN + wn, (i * MB + mb) * 4 + e) * 256 * MB +  // rows of 256 MB floats
                DEC_RED_COL(lane, (wk - 1) * NWN + wn, (i * MB + mb) * 4 + e)] = acc[i][mb][e];
    }
    __syncthreads();
    if (wk > 0) return;
    for (int k2 = 1; k2 < KW; ++k2) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc[i][mb][e] += red[DEC_RED_ROW(lane, (k2 - 1) * NWN + wn, (i * MB + mb) * 4 + e) * 256 * MB +
                                 DEC_RED_COL(lane, (k2 - 1) * NWN + wn, (i * MB + mb) * 4 + e)];
    }
  }
  if (!active) return;

  // ---- epilogue
  const int splits = gridDim.y;
  if (splits == 1) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = 32 * tn + 16 * i + g + 8 * h;
        const float bn = bias != nullptr ? D::to_float(bias[n]) : 0.f;
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int m = 8 * mb + 2 * t + e;
            if (m < M) C[(size_t)m * N + n] = D::from_float(acc[i][mb][2 * h + e] + bn);
          }
      }
    return;
  }
  float* part = partial + (size_t)blockIdx.y * M * N;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = 32 * tn + 16 * i + g + 8 * h;
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int m = 8 * mb + 2 * t + e;
          if (m < M) part[(size_t)m * N + n] = acc[i][mb][2 * h + e];
        }
    }
  if (splitk_warp_arrive(counters + tn, splits)) splitk_reduce_strip32<4>(partial, splits, M, N, 32 * tn, bias, C);
}
