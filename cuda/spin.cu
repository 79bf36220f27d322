// Keeps one thread busy for `ns` nanoseconds of the GPU's global timer: quickcupy/timing.py queues
// it ahead of timed work so the host can launch that work while the GPU waits, and the CUDA events
// then measure the GPU's time alone, without Python's launch overhead.
__device__ __forceinline__ unsigned long long globaltimer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

extern "C" __global__ void quickcupy_spin(unsigned long long ns) {
  const unsigned long long t0 = globaltimer_ns();
  while (globaltimer_ns() - t0 < ns) {
  }
}
