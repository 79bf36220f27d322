// Hopper (sm_90a) tensor-core wrappers: wgmma with the A operand in registers and B in shared
// memory, its fences, and the shared-memory matrix descriptor. Only cuda/quick_sm90.cu includes this
// file, and only NVRTC with -arch=sm_90a accepts it (wgmma is not part of plain sm_90 or sm_100).
#pragma once
#include "quant_common.cuh"

namespace qc {

// Matrix descriptor of a K-major operand tile in the 128-byte swizzle (PTX ISA, "Matrix Descriptor
// Format"): rows of 64 fp16 (128 bytes), 8-row atoms of 1024 bytes; the tile must start on a
// 1024-byte boundary. Bits 0-13 start address >> 4, 16-29 leading byte offset >> 4 (unused by
// swizzled K-major layouts: 1), 32-45 stride byte offset >> 4 (1024: next 8-row atom), 62-63 the
// swizzle mode (1 = 128B). A k16 step inside the 64-wide row starts 32 bytes further: the hardware
// applies the swizzle to the address bits, as the TMA copy that wrote the tile did (the
// CU_TENSOR_MAP_SWIZZLE_128B of quickcupy.kernels.x_tensor_map: chunk c of row r at chunk c ^ (r % 8)).
__device__ __forceinline__ unsigned long long wgmma_desc_sw128(u32 smem_byte_addr) {
  return (unsigned long long)((smem_byte_addr & 0x3FFFF) >> 4) | (1ull << 16) | ((1024ull >> 4) << 32) |
         (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory"); }

// mbarriers (shared-memory arrival counters with a phase bit) that let warpgroups of one block run
// out of step: "full" when a ring slot's cp.async copies landed, "empty" when its readers are done.
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" :: "r"(bar) : "memory");
}
// Arrives on `bar` once all cp.async copies this thread issued before it have landed (.noinc: the
// arrival is one of the count given to mbar_init).
__device__ __forceinline__ void cp_async_mbar_arrive(u32 bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" :: "r"(bar) : "memory");
}
// Blocks until the phase with parity `parity` of `bar` has completed.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}

// Tensor memory accelerator (TMA). A 2-D tensor map made on the host (cuTensorMapEncodeTiled, see
// quickcupy.kernels.x_tensor_map) is a 128-byte kernel parameter; a box of it lands in shared memory
// already in the swizzle the map names, and the copy completes on an mbarrier ("complete_tx": the
// barrier waits for the bytes announced with mbar_arrive_expect_tx). Copies by the async proxy need
// no proxy fence before wgmma reads them, and none before generic reads once the barrier completed.
struct alignas(64) TensorMap {
  unsigned long long opaque[16];
};
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
// Box (x = innermost coordinate, y) of `map` into shared memory at `dst`, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(u32 dst, const TensorMap* map, int x, int y, u32 bar) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
               :: "r"(dst), "l"(reinterpret_cast<unsigned long long>(map)), "r"(x), "r"(y), "r"(bar) : "memory");
}
// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global `src` to shared `dst`.
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

// D (64 x NT, fp32) += A (64 x 16, T = half or __nv_bfloat16, registers) * B (16 x NT, T, shared
// memory, K-major, descriptor desc_b), issued by one warpgroup. Warp w of the group holds rows
// 16 w .. 16 w + 15 of A and D in the mma.m16n8k16 fragment layouts: a[0..3] as mma's A; d[4 i + e]
// as mma's C of the n8 block i (rows g, g + 8; columns 8 i + 2 t, + 1). Instances for NT = 64, 128, 256.
template <int NT, typename T>
__device__ __forceinline__ void wgmma_rs(float (&d)[NT / 2], const u32 (&a)[4], unsigned long long desc_b);

// The asm operands of one instance: the NT / 2 accumulators are operands %0 .. %(NT/2 - 1)
// (QC_WGMMA_D<NT>: their text, QC_WGMMA_F<NT>: their "+f" bindings); then a[0..3], desc_b and the
// scale-d flag (QC_WGMMA_A<NT>: their text; the flag is 1: D accumulates).
#define QC_F8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
                 "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define QC_WGMMA_F64 QC_F8(0), QC_F8(8), QC_F8(16), QC_F8(24)
#define QC_WGMMA_F128 QC_WGMMA_F64, QC_F8(32), QC_F8(40), QC_F8(48), QC_F8(56)
#define QC_WGMMA_F256 QC_WGMMA_F128, QC_F8(64), QC_F8(72), QC_F8(80), QC_F8(88), QC_F8(96), QC_F8(104), \
                      QC_F8(112), QC_F8(120)
#define QC_WGMMA_D64 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define QC_WGMMA_D128 QC_WGMMA_D64 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, " \
                      "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define QC_WGMMA_D256 QC_WGMMA_D128 ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, " \
                      "%78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
                      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
                      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define QC_WGMMA_A64 "{%32, %33, %34, %35}, %36", "%37"
#define QC_WGMMA_A128 "{%64, %65, %66, %67}, %68", "%69"
#define QC_WGMMA_A256 "{%128, %129, %130, %131}, %132", "%133"
#define QC_WGMMA_ASM(NT, PTX, A, FLAG)                                                              \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " FLAG ", 0;\n"                                  \
               "wgmma.mma_async.sync.aligned.m64n" #NT "k16.f32." PTX "." PTX " {" QC_WGMMA_D##NT     \
               "}, " A ", p, 1, 1, 0;\n}\n"                                                        \
               : QC_WGMMA_F##NT                                                                     \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1))
#define QC_WGMMA_CALL(NT, PTX, AF) QC_WGMMA_ASM(NT, PTX, AF)
// wgmma_rs<NT, T> with T's PTX type name PTX ("f16", "bf16").
#define QC_WGMMA_RS(NT, T, PTX)                                                                     \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_rs<NT, T>(float (&d)[NT / 2], const u32 (&a)[4],           \
                                                  unsigned long long desc_b) {                     \
    QC_WGMMA_CALL(NT, PTX, QC_WGMMA_A##NT);                                                        \
  }
QC_WGMMA_RS(64, half, "f16")
QC_WGMMA_RS(64, __nv_bfloat16, "bf16")
QC_WGMMA_RS(128, half, "f16")
QC_WGMMA_RS(128, __nv_bfloat16, "bf16")
QC_WGMMA_RS(256, half, "f16")
QC_WGMMA_RS(256, __nv_bfloat16, "bf16")
#undef QC_WGMMA_RS
#undef QC_WGMMA_CALL
#undef QC_WGMMA_ASM
#undef QC_WGMMA_A256
#undef QC_WGMMA_A128
#undef QC_WGMMA_A64
#undef QC_WGMMA_D256
#undef QC_WGMMA_D128
#undef QC_WGMMA_D64
#undef QC_WGMMA_F256
#undef QC_WGMMA_F128
#undef QC_WGMMA_F64
#undef QC_F8

}  // namespace qc
