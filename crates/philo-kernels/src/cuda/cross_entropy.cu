// Cross-entropy of a chunk of logit rows against one target each, with the gradient of its
// logits: the caller feeds row chunks, so f32 logits of the whole batch never exist.
//   logits [rows, V] (compute dtype, read as f32 like transformers' `logits.float()`)
//   loss[r] = logsumexp(logits[r]) − logits[r, target[r]]            (f32)
//   grad[r]   = (softmax(logits[r]) − onehot(target[r])) · grad_scale (compute dtype)
// One block per row.
#include "common.cuh"

// Pieces of 8 logits a thread holds in the one-read kernel.
constexpr int CE_VPT = 4;

// The row read once into registers (V a multiple of 8, at most 8·CE_VPT·blockDim, rows 16-byte
// aligned): max, sum and gradient from the same values. The three-pass loop below read the row
// three times with 2-byte loads, at about 1.2 TB/s.
template <typename T>
__device__ void cross_entropy_in_registers(const T* x, uint32_t target, float* loss, T* dx, int V,
                                           float grad_scale) {
    float v[CE_VPT][8];
    float mx = -INFINITY;
#pragma unroll
    for (int k = 0; k < CE_VPT; ++k) {
        int c = (threadIdx.x + k * blockDim.x) * 8;
        if (c < V) {
            load8(x + c, v[k]);
#pragma unroll
            for (int j = 0; j < 8; ++j) mx = fmaxf(mx, v[k][j]);
        }
    }
    mx = block_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < CE_VPT; ++k) {
        int c = (threadIdx.x + k * blockDim.x) * 8;
        if (c < V) {
#pragma unroll
            for (int j = 0; j < 8; ++j) sum += expf(v[k][j] - mx);
        }
    }
    sum = block_sum(sum);
    float lse = mx + logf(sum);
    if (threadIdx.x == 0) loss[blockIdx.x] = lse - to_f32(x[target]);
#pragma unroll
    for (int k = 0; k < CE_VPT; ++k) {
        int c = (threadIdx.x + k * blockDim.x) * 8;
        if (c < V) {
            float o[8];
#pragma unroll
            for (int j = 0; j < 8; ++j)
                o[j] = (expf(v[k][j] - lse) - (c + j == (int)target ? 1.f : 0.f)) * grad_scale;
            store8(dx + c, o);
        }
    }
}

template <typename T>
__device__ void cross_entropy(const T* logits, const uint32_t* targets, float* loss, T* grad, int V,
                              float grad_scale) {
    const T* x = logits + (size_t)blockIdx.x * V;
    T* dx = grad + (size_t)blockIdx.x * V;
    if (V % 8 == 0 && V <= 8 * CE_VPT * (int)blockDim.x &&
        ((uintptr_t)x | (uintptr_t)dx) % (8 * sizeof(T)) == 0) {
        cross_entropy_in_registers(x, targets[blockIdx.x], loss, dx, V, grad_scale);
        return;
    }
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, to_f32(x[i]));
    mx = block_max(mx);
    float sum = 0.f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(to_f32(x[i]) - mx);
    sum = block_sum(sum);
    float lse = mx + logf(sum);
    uint32_t target = targets[blockIdx.x];
    if (threadIdx.x == 0) loss[blockIdx.x] = lse - to_f32(x[target]);
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float p = expf(to_f32(x[i]) - lse);
        dx[i] = from_f32<T>((p - (i == (int)target ? 1.f : 0.f)) * grad_scale);
    }
}

#define CE(name, T)                                                                          \
    extern "C" __global__ void cross_entropy_##name(const T* logits, const uint32_t* targets, \
                                                    float* loss, T* grad, int V,              \
                                                    float grad_scale) {                       \
        cross_entropy<T>(logits, targets, loss, grad, V, grad_scale);                         \
    }
FOR_EACH_FLOAT(CE)
