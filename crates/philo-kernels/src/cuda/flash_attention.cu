// Flash attention, forward and backward, on tensor cores (mma.sync m16n8k16, bf16 or f16 inputs,
// f32 accumulation), for head dims that are multiples of 16.
//
// Layouts (d contiguous everywhere):
//   q       [B, H, S, D]   strides q_b, q_h, q_s
//   k, v    [B, KVH, T, D] strides k_b, k_h, k_t (shared by k and v); query head h reads KV head
//           h / (H / KVH)
//   out     [B, S, H, D]   contiguous (what o_proj reads as [B, S, H·D])
//   lse     [B, H, S]      f32, natural log of the softmax denominator (+inf for a query that
//           sees no key, so that its backward terms vanish)
//   seg     [B, T] int32 or null: 0 marks padding; a query attends only to keys of its own
//           segment. Query i sits at key position past + i, past = T − S.
// A key j is visible to query position i when j ≤ i, i − j < window and the segments allow it.
// The plain reference of both passes is `attention::reference` on the Rust side.
#include "common.cuh"

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};
template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

// B fragment (k16 × n8) of a row-major [k][n] tile in shared memory: ldmatrix with transpose.
// `row0` points at element (k0, n0); `ld` is the row stride in elements.
template <typename T>
__device__ __forceinline__ void load_b_trans(const T* row0, int ld, uint32_t& b0, uint32_t& b1) {
    int lane = threadIdx.x % 32;
    const T* p = row0 + (lane % 16) * ld;
    uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(b0), "=r"(b1)
                 : "r"(addr));
}

__device__ __forceinline__ uint32_t ld32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Copies a [rows][D] tile (global row stride `stride`) to shared memory (row stride D + 8) in
// 16-byte pieces; rows at or past `valid` are zero-filled.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* src, size_t stride, int rows, int valid) {
    constexpr int V = D / 8;  // 16-byte vectors per row
    for (int i = threadIdx.x; i < rows * V; i += blockDim.x) {
        int r = i / V, c = (i % V) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < valid) val = *reinterpret_cast<const uint4*>(src + r * stride + c);
        *reinterpret_cast<uint4*>(dst + r * (D + 8) + c) = val;
    }
}

__device__ __forceinline__ bool visible(int key, int qpos, int T_, int window, const int* seg_b,
                                        int qseg) {
    if (key >= T_ || key > qpos || qpos - key >= window) return false;
    if (seg_b) {
        int ks = seg_b[key];
        return ks != 0 && ks == qseg;
    }
    return true;
}

constexpr float LOG2E = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------
// Forward: one block = 4 warps = 64 queries of one (batch, head); key tiles of 64.
template <typename T, int D>
__device__ void flash_forward(const T* q, const T* k, const T* v, const int* seg, T* out,
                              float* lse, int B, int H, int KVH, int S, int T_, long q_b, long q_h,
                              long q_s, long k_b, long k_h, long k_t, int window, float scale) {
    constexpr int BM = 64, BN = 64, LD = D + 8;
    __shared__ __align__(16) T ks[BN * LD];
    __shared__ __align__(16) T vs[BN * LD];
    __shared__ int kseg[BN];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int bh = blockIdx.y, b = bh / H, h = bh % H, kvh = h / (H / KVH);
    int q0 = blockIdx.x * BM, wq0 = q0 + warp * 16;
    int past = T_ - S;
    const T* qp = q + b * q_b + h * q_h;
    const T* kp = k + b * k_b + kvh * k_h;
    const T* vp = v + b * k_b + kvh * k_h;
    const int* seg_b = seg ? seg + (size_t)b * T_ : nullptr;

    // This warp's 16 query rows as A fragments (rows g and g + 8).
    uint32_t qf[D / 16][4];
    int r0 = wq0 + g, r1 = wq0 + g + 8;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
        int c = kc * 16 + 2 * t;
        qf[kc][0] = r0 < S ? ld32(qp + r0 * q_s + c) : 0;
        qf[kc][1] = r1 < S ? ld32(qp + r1 * q_s + c) : 0;
        qf[kc][2] = r0 < S ? ld32(qp + r0 * q_s + c + 8) : 0;
        qf[kc][3] = r1 < S ? ld32(qp + r1 * q_s + c + 8) : 0;
    }
    int qpos0 = past + r0, qpos1 = past + r1;
    int qseg0 = (seg_b && r0 < S) ? seg_b[qpos0] : 0, qseg1 = (seg_b && r1 < S) ? seg_b[qpos1] : 0;

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    float sl2 = scale * LOG2E;

    // Keys this block can see: from the window's start for its first query to its last query.
    int last_q = min(q0 + BM, S) - 1 + past;
    long first_key = (long)past + q0 - window + 1;
    int kt0 = first_key > 0 ? (int)(first_key / BN) : 0;
    int kt1 = min(last_q, T_ - 1) / BN;
    for (int kt = kt0; kt <= kt1; ++kt) {
        int k0 = kt * BN;
        __syncthreads();
        load_tile<T, D>(ks, kp + (size_t)k0 * k_t, k_t, BN, T_ - k0);
        load_tile<T, D>(vs, vp + (size_t)k0 * k_t, k_t, BN, T_ - k0);
        if (threadIdx.x < BN) kseg[threadIdx.x] = (seg_b && k0 + threadIdx.x < T_) ? seg_b[k0 + threadIdx.x] : 0;
        __syncthreads();

        float s[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int kc = 0; kc < D / 16; ++kc) {
                const T* kr = ks + (j * 8 + g) * LD + kc * 16 + 2 * t;
                Mma<T>::run(s[j], qf[kc], ld32(kr), ld32(kr + 8));
            }
        }
        // Mask, scale to log2 units, running max.
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int kl = j * 8 + 2 * t + (e & 1), key = k0 + kl;
                bool row1 = e >= 2;
                int qpos = row1 ? qpos1 : qpos0;
                bool ok = (row1 ? r1 : r0) < S &&
                          visible(key, qpos, T_, window, seg_b ? kseg - k0 : nullptr,
                                  row1 ? qseg1 : qseg0);
                float val = ok ? s[j][e] * sl2 : -INFINITY;
                s[j][e] = val;
                if (row1) mx1 = fmaxf(mx1, val); else mx0 = fmaxf(mx0, val);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
        float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        // A row that has seen no key yet keeps exponent base 0 so that exp2 stays finite.
        float u0 = n0 == -INFINITY ? 0.f : n0, u1 = n1 == -INFINITY ? 0.f : n1;
        float a0 = exp2f(m0 - u0), a1 = exp2f(m1 - u1);
        m0 = n0; m1 = n1;
        l0 *= a0; l1 *= a1;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) { o[i][0] *= a0; o[i][1] *= a0; o[i][2] *= a1; o[i][3] *= a1; }
        uint32_t pf[BN / 16][4];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            float p0 = exp2f(s[j][0] - u0), p1 = exp2f(s[j][1] - u0);
            float p2 = exp2f(s[j][2] - u1), p3 = exp2f(s[j][3] - u1);
            l0 += p0 + p1; l1 += p2 + p3;
            pf[j / 2][(j % 2) * 2 + 0] = Mma<T>::pack(p0, p1);
            pf[j / 2][(j % 2) * 2 + 1] = Mma<T>::pack(p2, p3);
        }
#pragma unroll
        for (int kc = 0; kc < BN / 16; ++kc) {
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                uint32_t b0, b1;
                load_b_trans<T>(vs + kc * 16 * LD + dn * 8, LD, b0, b1);
                Mma<T>::run(o[dn], pf[kc], b0, b1);
            }
        }
    }
    l0 += __shfl_xor_sync(0xffffffff, l0, 1);
    l0 += __shfl_xor_sync(0xffffffff, l0, 2);
    l1 += __shfl_xor_sync(0xffffffff, l1, 1);
    l1 += __shfl_xor_sync(0xffffffff, l1, 2);
    float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
        int c = dn * 8 + 2 * t;
        if (r0 < S) *reinterpret_cast<uint32_t*>(out + (((size_t)b * S + r0) * H + h) * D + c) = Mma<T>::pack(o[dn][0] * i0, o[dn][1] * i0);
        if (r1 < S) *reinterpret_cast<uint32_t*>(out + (((size_t)b * S + r1) * H + h) * D + c) = Mma<T>::pack(o[dn][2] * i1, o[dn][3] * i1);
    }
    if (t == 0) {
        if (r0 < S) lse[((size_t)b * H + h) * S + r0] = l0 > 0.f ? (m0 + log2f(l0)) / LOG2E : INFINITY;
        if (r1 < S) lse[((size_t)b * H + h) * S + r1] = l1 > 0.f ? (m1 + log2f(l1)) / LOG2E : INFINITY;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, step 1: delta[b, h, i] = Σ_d dO·O (f32), one warp per query row.
template <typename T>
__device__ void flash_delta(const T* out, const T* dout, float* delta, int B, int H, int S, int D) {
    size_t row = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32;  // over B·S·H
    if (row >= (size_t)B * S * H) return;
    int lane = threadIdx.x % 32;
    float acc = 0.f;
    for (int c = lane; c < D; c += 32) acc += to_f32(out[row * D + c]) * to_f32(dout[row * D + c]);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
    int h = row % H;
    size_t bs = row / H;
    int b = bs / S, i = bs % S;
    if (lane == 0) delta[((size_t)b * H + h) * S + i] = acc;
}

// Backward, step 2: one block = 4 warps = 64 keys of one (batch, query head); query tiles of 32.
// dK and dV (per query head, f32) are written directly; dQ is accumulated atomically into a
// zeroed f32 buffer [B, H, S, D].
template <typename T, int D>
__device__ void flash_backward(const T* q, const T* k, const T* v, const int* seg, const T* dout,
                               const float* lse, const float* delta, float* dq, float* dk, float* dv,
                               int B, int H, int KVH, int S, int T_, long q_b, long q_h, long q_s,
                               long k_b, long k_h, long k_t, int window, float scale) {
    constexpr int BK = 64, BQ = 32, LD = D + 8, LDS = BK + 8;
    __shared__ __align__(16) T qs[BQ * LD];
    __shared__ __align__(16) T dos[BQ * LD];
    __shared__ __align__(16) T kst[BK * LD];
    __shared__ __align__(16) T dss[BQ * LDS];
    __shared__ float qlse[BQ], qdelta[BQ];
    __shared__ int qseg[BQ];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int bh = blockIdx.y, b = bh / H, h = bh % H, kvh = h / (H / KVH);
    int k0 = blockIdx.x * BK, wk0 = k0 + warp * 16;
    int past = T_ - S;
    const T* qp = q + b * q_b + h * q_h;
    const T* kp = k + b * k_b + kvh * k_h;
    const T* vp = v + b * k_b + kvh * k_h;
    const T* dop = dout + (size_t)b * S * H * D + (size_t)h * D;  // row stride H·D
    const int* seg_b = seg ? seg + (size_t)b * T_ : nullptr;

    load_tile<T, D>(kst, kp + (size_t)k0 * k_t, k_t, BK, T_ - k0);
    // This warp's 16 keys as A fragments of K and V.
    uint32_t kf[D / 16][4], vf[D / 16][4];
    int r0 = wk0 + g, r1 = wk0 + g + 8;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
        int c = kc * 16 + 2 * t;
        kf[kc][0] = r0 < T_ ? ld32(kp + r0 * k_t + c) : 0;
        kf[kc][1] = r1 < T_ ? ld32(kp + r1 * k_t + c) : 0;
        kf[kc][2] = r0 < T_ ? ld32(kp + r0 * k_t + c + 8) : 0;
        kf[kc][3] = r1 < T_ ? ld32(kp + r1 * k_t + c + 8) : 0;
        vf[kc][0] = r0 < T_ ? ld32(vp + r0 * k_t + c) : 0;
        vf[kc][1] = r1 < T_ ? ld32(vp + r1 * k_t + c) : 0;
        vf[kc][2] = r0 < T_ ? ld32(vp + r0 * k_t + c + 8) : 0;
        vf[kc][3] = r1 < T_ ? ld32(vp + r1 * k_t + c + 8) : 0;
    }
    int kseg0 = (seg_b && r0 < T_) ? seg_b[r0] : 0, kseg1 = (seg_b && r1 < T_) ? seg_b[r1] : 0;
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
        dka[i][0] = dka[i][1] = dka[i][2] = dka[i][3] = dva[i][0] = dva[i][1] = dva[i][2] = dva[i][3] = 0.f;
    float sl2 = scale * LOG2E;

    // Queries that can see a key of this block: positions k0 .. last key + window − 1.
    int first_q = max(k0 - past, 0);
    long last_pos = (long)min(k0 + BK, T_) - 1 + window - 1;
    int last_q = (int)min((long)S - 1, last_pos - past);
    for (int qt = first_q / BQ; qt * BQ <= last_q; ++qt) {
        int q0 = qt * BQ;
        __syncthreads();
        load_tile<T, D>(qs, qp + (size_t)q0 * q_s, q_s, BQ, S - q0);
        load_tile<T, D>(dos, dop + (size_t)q0 * H * D, (size_t)H * D, BQ, S - q0);
        if (threadIdx.x < BQ) {
            int i = q0 + threadIdx.x;
            qlse[threadIdx.x] = i < S ? lse[((size_t)b * H + h) * S + i] * LOG2E : INFINITY;
            qdelta[threadIdx.x] = i < S ? delta[((size_t)b * H + h) * S + i] : 0.f;
            qseg[threadIdx.x] = (seg_b && i < S) ? seg_b[past + i] : 0;
        }
        __syncthreads();
        // Sᵀ (16 keys × 32 queries) and dPᵀ = V·dOᵀ.
        float st[BQ / 8][4], dpt[BQ / 8][4];
#pragma unroll
        for (int j = 0; j < BQ / 8; ++j) {
            st[j][0] = st[j][1] = st[j][2] = st[j][3] = 0.f;
            dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.f;
#pragma unroll
            for (int kc = 0; kc < D / 16; ++kc) {
                const T* qr = qs + (j * 8 + g) * LD + kc * 16 + 2 * t;
                Mma<T>::run(st[j], kf[kc], ld32(qr), ld32(qr + 8));
                const T* dr = dos + (j * 8 + g) * LD + kc * 16 + 2 * t;
                Mma<T>::run(dpt[j], vf[kc], ld32(dr), ld32(dr + 8));
            }
        }
        // Pᵀ = exp(S·scale − lse) where visible; dSᵀ = Pᵀ ∘ (dPᵀ − delta) · scale.
        uint32_t pa[BQ / 16][4], dsa[BQ / 16][4];
#pragma unroll
        for (int j = 0; j < BQ / 8; ++j) {
            float p[4], ds[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int ql = j * 8 + 2 * t + (e & 1), i = q0 + ql;
                int key = e >= 2 ? r1 : r0;
                int ks_ = e >= 2 ? kseg1 : kseg0;
                bool ok = i < S && key < T_ && key <= past + i && past + i - key < window &&
                          (!seg_b || (ks_ != 0 && ks_ == qseg[ql]));
                p[e] = ok ? exp2f(st[j][e] * sl2 - qlse[ql]) : 0.f;
                ds[e] = p[e] * (dpt[j][e] - qdelta[ql]) * scale;
            }
            pa[j / 2][(j % 2) * 2 + 0] = Mma<T>::pack(p[0], p[1]);
            pa[j / 2][(j % 2) * 2 + 1] = Mma<T>::pack(p[2], p[3]);
            dsa[j / 2][(j % 2) * 2 + 0] = Mma<T>::pack(ds[0], ds[1]);
            dsa[j / 2][(j % 2) * 2 + 1] = Mma<T>::pack(ds[2], ds[3]);
            // dS (queries × keys) for dQ = dS·K, through shared memory.
            int ql = j * 8 + 2 * t, kl0 = warp * 16 + g;
            dss[ql * LDS + kl0] = from_f32<T>(ds[0]);
            dss[(ql + 1) * LDS + kl0] = from_f32<T>(ds[1]);
            dss[ql * LDS + kl0 + 8] = from_f32<T>(ds[2]);
            dss[(ql + 1) * LDS + kl0 + 8] = from_f32<T>(ds[3]);
        }
        // dV += Pᵀ·dO, dK += dSᵀ·Q.
#pragma unroll
        for (int kc = 0; kc < BQ / 16; ++kc) {
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                uint32_t b0, b1;
                load_b_trans<T>(dos + kc * 16 * LD + dn * 8, LD, b0, b1);
                Mma<T>::run(dva[dn], pa[kc], b0, b1);
                load_b_trans<T>(qs + kc * 16 * LD + dn * 8, LD, b0, b1);
                Mma<T>::run(dka[dn], dsa[kc], b0, b1);
            }
        }
        __syncthreads();
        // dQ[q0 .. q0+32) += dS·K: warp w takes query rows (w / 2)·16 and half the d columns.
        {
            int mt = warp / 2, n_begin = (warp % 2) * (D / 16), n_end = n_begin + D / 16;
            uint32_t af[BK / 16][4];
#pragma unroll
            for (int kc = 0; kc < BK / 16; ++kc) {
                const T* a = dss + (mt * 16 + g) * LDS + kc * 16 + 2 * t;
                af[kc][0] = ld32(a);
                af[kc][1] = ld32(a + 8 * LDS);
                af[kc][2] = ld32(a + 8);
                af[kc][3] = ld32(a + 8 * LDS + 8);
            }
            for (int dn = n_begin; dn < n_end; ++dn) {
                float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int kc = 0; kc < BK / 16; ++kc) {
                    uint32_t b0, b1;
                    load_b_trans<T>(kst + kc * 16 * LD + dn * 8, LD, b0, b1);
                    Mma<T>::run(acc, af[kc], b0, b1);
                }
                int i0 = q0 + mt * 16 + g, c = dn * 8 + 2 * t;
                float* dqr = dq + (((size_t)b * H + h) * S) * D;
                if (i0 < S) { atomicAdd(dqr + (size_t)i0 * D + c, acc[0]); atomicAdd(dqr + (size_t)i0 * D + c + 1, acc[1]); }
                if (i0 + 8 < S) { atomicAdd(dqr + (size_t)(i0 + 8) * D + c, acc[2]); atomicAdd(dqr + (size_t)(i0 + 8) * D + c + 1, acc[3]); }
            }
        }
    }
    // dK, dV of this warp's keys, per query head: [B, H, T, D] f32.
    size_t base = ((size_t)b * H + h) * T_;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
        int c = dn * 8 + 2 * t;
        if (r0 < T_) {
            dk[(base + r0) * D + c] = dka[dn][0]; dk[(base + r0) * D + c + 1] = dka[dn][1];
            dv[(base + r0) * D + c] = dva[dn][0]; dv[(base + r0) * D + c + 1] = dva[dn][1];
        }
        if (r1 < T_) {
            dk[(base + r1) * D + c] = dka[dn][2]; dk[(base + r1) * D + c + 1] = dka[dn][3];
            dv[(base + r1) * D + c] = dva[dn][2]; dv[(base + r1) * D + c + 1] = dva[dn][3];
        }
    }
}

#define FLASH(name, T, D)                                                                          \
    extern "C" __global__ void __launch_bounds__(128) flash_forward_##name##_d##D(                 \
        const T* q, const T* k, const T* v, const int* seg, T* out, float* lse, int B, int H,      \
        int KVH, int S, int T_, long q_b, long q_h, long q_s, long k_b, long k_h, long k_t,        \
        int window, float scale) {                                                                 \
        flash_forward<T, D>(q, k, v, seg, out, lse, B, H, KVH, S, T_, q_b, q_h, q_s, k_b, k_h,     \
                            k_t, window, scale);                                                   \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_backward_##name##_d##D(                \
        const T* q, const T* k, const T* v, const int* seg, const T* dout, const float* lse,       \
        const float* delta, float* dq, float* dk, float* dv, int B, int H, int KVH, int S, int T_, \
        long q_b, long q_h, long q_s, long k_b, long k_h, long k_t, int window, float scale) {     \
        flash_backward<T, D>(q, k, v, seg, dout, lse, delta, dq, dk, dv, B, H, KVH, S, T_, q_b,    \
                             q_h, q_s, k_b, k_h, k_t, window, scale);                              \
    }
#define FLASH_ALL(name, T) \
    FLASH(name, T, 16) FLASH(name, T, 32) FLASH(name, T, 64) FLASH(name, T, 96) FLASH(name, T, 128)
FLASH_ALL(bf16, __nv_bfloat16)
FLASH_ALL(f16, __half)

#define DELTA(name, T)                                                                            \
    extern "C" __global__ void flash_delta_##name(const T* out, const T* dout, float* delta,     \
                                                  int B, int H, int S, int D) {                   \
        flash_delta<T>(out, dout, delta, B, H, S, D);                                             \
    }
DELTA(bf16, __nv_bfloat16)
DELTA(f16, __half)
