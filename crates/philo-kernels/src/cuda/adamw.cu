// The optimizer's element-wise passes over f32 LoRA parameters, one launch per tensor:
//   sum_of_squares: *total += Σ x² (one f32 accumulator shared by all tensors of a step; each
//                   block adds its partial sum)
//   adamw:          PyTorch's AdamW in place on p, m, v from g·grad_scale
// The reference is `adamw::reference` on the Rust side.
#include "common.cuh"

extern "C" __global__ void sum_of_squares(const float* x, size_t n, float* total) {
    float acc = 0.f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc += x[i] * x[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) atomicAdd(total, acc);
}

// p ← p·(1 − lr·wd); m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
// p ← p − step_size · m / (sqrt(v)/bias2_sqrt + eps), step_size = lr / (1 − β1ᵗ).
// 1 − β1 and 1 − β2 come from the host, computed before rounding to f32.
extern "C" __global__ void adamw(float* p, float* m, float* v, const float* g, size_t n,
                                 float grad_scale, float decay, float beta1, float one_minus_beta1,
                                 float beta2, float one_minus_beta2, float bias2_sqrt, float eps,
                                 float step_size) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float gi = g[i] * grad_scale;
        float mi = beta1 * m[i] + one_minus_beta1 * gi;
        float vi = beta2 * v[i] + one_minus_beta2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) / bias2_sqrt + eps);
    }
}
