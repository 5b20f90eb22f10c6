// Cross-entropy of a chunk of logit rows against one target each, with the gradient of its
// logits: the caller feeds row chunks, so f32 logits of the whole batch never exist.
//   logits [rows, V] (compute dtype, read as f32 like transformers' `logits.float()`)
//   loss[r] = logsumexp(logits[r]) − logits[r, target[r]]            (f32)
//   grad[r]   = (softmax(logits[r]) − onehot(target[r])) · grad_scale (compute dtype)
// One block per row.
#include "common.cuh"

template <typename T>
__device__ void cross_entropy(const T* logits, const uint32_t* targets, float* loss, T* grad, int V,
                              float grad_scale) {
    const T* x = logits + (size_t)blockIdx.x * V;
    T* dx = grad + (size_t)blockIdx.x * V;
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
