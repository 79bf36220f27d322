// Sums the fp32 partial products of a split-K GEMM: out[m, n] = sum_s partial[s, m, n] (+ bias[n]).
// One thread per 4 consecutive outputs (N % 4 == 0); a fixed summation order keeps it deterministic.
// The partials of up to BATCH splits are loaded before any is added, so their latencies overlap
// (a plain loop would wait for each load in turn: 8 splits took 4.4 us at M = 1 on an H100).
#include "quant_common.cuh"

using namespace qc;

template <typename T>  // bias and out: half or __nv_bfloat16 (Dt<T>)
__global__ void __launch_bounds__(SPLITK_REDUCE_THREADS)
splitk_reduce(const float* __restrict__ partial, const T* __restrict__ bias, T* __restrict__ out,
              int splits, int M, int N) {
  using D = Dt<T>;
  constexpr int BATCH = 8;
  const long long i = (blockIdx.x * (long long)blockDim.x + threadIdx.x) * 4;
  const long long total = (long long)M * N;
  if (i >= total) return;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s0 = 0; s0 < splits; s0 += BATCH) {
    float4 p[BATCH];
#pragma unroll
    for (int b = 0; b < BATCH; ++b)
      p[b] = s0 + b < splits ? __ldg(reinterpret_cast<const float4*>(partial + (s0 + b) * total + i))
                             : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      acc.x += p[b].x; acc.y += p[b].y; acc.z += p[b].z; acc.w += p[b].w;
    }
  }
  if (bias != nullptr) {
    const int n = static_cast<int>(i % N);
    acc.x += D::to_float(bias[n]); acc.y += D::to_float(bias[n + 1]);
    acc.z += D::to_float(bias[n + 2]); acc.w += D::to_float(bias[n + 3]);
  }
  *reinterpret_cast<uint2*>(out + i) = make_uint2(D::from_float2(acc.x, acc.y), D::from_float2(acc.z, acc.w));
}
