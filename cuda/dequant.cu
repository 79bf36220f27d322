// Dequantizes a weight in the QUICK layout (pack_quick) to fp16 or bf16 W (N, K) row-major, for the
// "dequant" path of quickcupy.gemm: y = x @ W.T by cuBLAS (cupy.matmul), which wins once M is large
// enough that the GEMM is compute-bound and cuBLAS' wgmma beats any mma.sync kernel.
//
// Block: DEQUANT_THREADS = 128 threads (4 warps); warp w of block (bx, by) takes the 32 x 32 tile
// (tile_k = 4 bx + w, tile_n = by): ONE 16-byte load per lane of its 4 words (the same load as
// quick_gemm.cu), the same in-register conversion, then 4 16-byte stores. Lane L = 4 g + t holds, in
// half2 p = 2 s + r of word j, the rows k = 32 tile_k + 8 p + 2 t (+1) of column n = 32 tile_n + 8 j + g;
// the 4 lanes of one g transpose their pairs (4 x 4, by shuffles) so that lane t holds k = 32 tile_k
// + 8 t ... + 7: one 16-byte store per lane and word, the 4 lanes of a g writing row n's 64 bytes
// (whole 32-byte sectors; pair stores wrote each sector in two halves, from two instructions).
#include "quant_common.cuh"

using namespace qc;

template <typename T>  // W's type: half or __nv_bfloat16 (Dt<T>), the activations' of the matmul
__global__ void __launch_bounds__(DEQUANT_THREADS)
dequant_quick(const uint4* __restrict__ qweight, const unsigned short* __restrict__ qzeros,
              const uint2* __restrict__ scales, T* __restrict__ W, int N, int K, int group_size) {
  using D = Dt<T>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int tile_k = blockIdx.x * (DEQUANT_THREADS / 32) + warp, tile_n = blockIdx.y;
  const int chunks = K / 32, groups = K / group_size;
  if (tile_k >= chunks) return;
  const uint4 w = __ldg(qweight + ((size_t)tile_n * chunks + tile_k) * 32 + lane);
  const int grp = tile_k * 32 / group_size;
  const uint2 s = __ldg(scales + ((size_t)tile_n * groups + grp) * 8 + g);
  typename D::T2 z[4];
  D::codes8(__ldg(qzeros + ((size_t)tile_n * groups + grp) * 8 + g), z);  // pair j = (zero j, 0)
  const typename D::Scale sc[4] = {D::make_scale(__low2half2(as_half2(s.x))), D::make_scale(__high2half2(as_half2(s.x))),
                                   D::make_scale(__low2half2(as_half2(s.y))), D::make_scale(__high2half2(as_half2(s.y)))};
  const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const typename D::Zero zj = D::make_zero(D::low2(z[j]));
    const typename D::Zero zz[4] = {zj, zj, zj, zj};
    const typename D::Scale ss[4] = {sc[j], sc[j], sc[j], sc[j]};
    u32 h[4];
    D::dequant8(words[j], zz, ss, h);
    // Transpose among the 4 lanes of g: out[q] on lane t = h[t] of lane q (k = 8 t + 2 q, + 1). In
    // round r lane t receives from lane (t + r) % 4, which sends its h[(its t - r) % 4] = h[t].
    u32 out[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int send = (t - r) & 3, from = (t + r) & 3;
      const u32 v = send == 0 ? h[0] : send == 1 ? h[1] : send == 2 ? h[2] : h[3];
      const u32 got = __shfl_sync(0xffffffffu, v, (lane & ~3) | from);
#pragma unroll
      for (int q = 0; q < 4; ++q)
        if (q == from) out[q] = got;
    }
    T* row = W + (size_t)(32 * tile_n + 8 * j + g) * K + 32 * tile_k + 8 * t;
    *reinterpret_cast<uint4*>(row) = make_uint4(out[0], out[1], out[2], out[3]);
  }
}
