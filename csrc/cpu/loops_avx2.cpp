// The fp32 CPU loops of loops.h compiled for AVX2 (+FMA, which -ffp-contract=off keeps
// from changing any result): 8 lanes of Philox and of the polynomial Box-Muller.
// kernels_cpu.cpp calls these only when the CPU reports AVX2 and FMA at run time, so
// the extension still runs on any x86-64 CPU (no -march=native).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
#define FF_HAVE_AVX2_LOOPS 1
#endif
#include "loops.h"

namespace fused_flat {
namespace cpu {

void perturb_pairs_f32_avx2(float* p, int64_t j0, int64_t j1, int64_t offset, PhiloxKey key,
                            int64_t step, uint32_t tag, float sigma) {
  perturb_pairs<float, float>(p, j0, j1, offset, key, step, tag, sigma);
}

void update_pairs_f32_avx2(int variant, float* p, const float* g, float* m, int64_t j0,
                           int64_t j1, int64_t offset, PhiloxKey key, int64_t step,
                           uint32_t restore_tag, const StepArgs<float>& a) {
  update_pairs_dispatch<float, float>(variant, p, g, m, j0, j1, offset, key, step, restore_tag, a);
}

}  // namespace cpu
}  // namespace fused_flat
