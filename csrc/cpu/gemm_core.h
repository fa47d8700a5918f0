#pragma once
// The GEMM core under an fp32 kernel of ours (Winograd's GEMMs, the implicit GEMM): our AVX2
// micro-kernel (avx2_gemm.h), our AVX-512 one (avx512_gemm.h; bit-identical results), or oneDNN's
// brgemm as shipped inside ATen (at::native::cpublas::brgemm: JIT code for the CPU's widest ISA,
// another summation order). ops_cpu.cpp picks it per call; the caller has checked the CPU has it.

namespace resnet_fused {

enum class Fp32Core { kAvx2, kAvx512, kBrgemm };

}  // namespace resnet_fused
