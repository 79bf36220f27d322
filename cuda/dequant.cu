// Dequantizes a weight in the QUICK layout (pack_quick) to fp16 or bf16 W (N, K) row-major, for the
// "dequant" path of quickcupy.gemm: y = x @ W.T by cuBLAS (cupy.matmul), which wins once M is large
// enough that the GEMM is compute-bound and cuBLAS' wgmma beats any mma.sync kernel.
//
// Block: DEQUANT_THREADS = 128 threads (4 warps); warp w of block (bx, by) takes the 32 x 32 tile
// (tile_k = 4 bx + w, tile_n = by): ONE 16-byte load per lane of its 4 words (the same load as
// quick_gemm.cu), the same in-register conversion, then 16 32-bit pair stores. Lane L = 4 g + t holds, in
// half2 h = 2 s + r of word j, the rows k = 32 tile_k + 16 s + 8 r + 2 t (+1) of column
// n = 32 tile_n + 8 j + g: the 4 lanes of one g write 16 contiguous bytes of row n.
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
    T* row = W + (size_t)(32 * tile_n + 8 * j + g) * K + 32 * tile_k + 2 * t;
#pragma unroll
    for (int p = 0; p < 4; ++p)  // p = 2 s + r: rows 16 s + 8 r + 2 t, + 1
      *reinterpret_cast<u32*>(row + 16 * (p / 2) + 8 * (p % 2)) = h[p];
  }
}
