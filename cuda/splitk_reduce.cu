// Sums the fp32 partial products of a split-K GEMM: out[m, n] = sum_s partial[s, m, n] (+ bias[n]).
// One thread per 4 consecutive outputs (N % 4 == 0); a fixed summation order keeps it deterministic.
#include <cuda_fp16.h>

extern "C" __global__ void splitk_reduce(const float* __restrict__ partial, const half* __restrict__ bias,
                                         half* __restrict__ out, int splits, int M, int N) {
  const long long i = (blockIdx.x * (long long)blockDim.x + threadIdx.x) * 4;
  const long long total = (long long)M * N;
  if (i >= total) return;
  float4 acc = *reinterpret_cast<const float4*>(partial + i);
  for (int s = 1; s < splits; ++s) {
    const float4 p = *reinterpret_cast<const float4*>(partial + s * total + i);
    acc.x += p.x; acc.y += p.y; acc.z += p.z; acc.w += p.w;
  }
  if (bias != nullptr) {
    const int n = static_cast<int>(i % N);
    acc.x += __half2float(bias[n]); acc.y += __half2float(bias[n + 1]);
    acc.z += __half2float(bias[n + 2]); acc.w += __half2float(bias[n + 3]);
  }
  half2* o = reinterpret_cast<half2*>(out + i);
  o[0] = __floats2half2_rn(acc.x, acc.y);
  o[1] = __floats2half2_rn(acc.z, acc.w);
}
