// The two row-wise operations of a training step that candle runs as long chains of
// elementwise kernels (a profile of a SmolLM2 step: ~60% of the GPU time):
//
//   - attention's softmax over keys of scale·s + bias, and its backward;
//   - the cross-entropy of each row of logits against its target, and its backward.
//
// Each is one pass over a row (two for the cross-entropy's backward) instead of 6–10 full
// passes. The CPU references are kernels/src/softmax.rs and kernels/src/cross_entropy.rs;
// these are checked against them to a tolerance (expf and the order of the sums differ).
//
// Scores, probabilities and logits are `act` (bf16.cuh: f32, or bf16 in the module compiled
// with ACT_BF16; the written-out pass uses both, candle's custom ops f32); the arithmetic is
// f32, and each row's loss is written as f32.

typedef unsigned long long u64;
typedef unsigned int u32;
#define NEG_INF __int_as_float(0xff800000)  // -inf without math.h under NVRTC

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// y = softmax(scale·s + bias) over rows of n. s and y: [rows, n]; bias: [batch, 1, tq, n],
// shared by the `heads` rows of one query (row r = ((batch·heads + head)·tq + query)).
// One warp per row.
extern "C" __global__ void softmax_fwd(const act* s, const act* bias, act* y, u32 rows, u32 n,
                                       u32 heads, u32 tq, float scale) {
    const u64 row = ((u64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const u32 lane = threadIdx.x % 32;
    if (row >= rows) return;
    const act* x = s + row * n;
    const act* b = bias + ((row / ((u64)heads * tq)) * tq + row % tq) * n;
    float m = NEG_INF;
    for (u32 j = lane; j < n; j += 32) m = fmaxf(m, ld(x[j]) * scale + ld(b[j]));
    m = warp_max(m);
    float sum = 0.f;
    for (u32 j = lane; j < n; j += 32) sum += expf(ld(x[j]) * scale + ld(b[j]) - m);
    const float inv = 1.f / warp_sum(sum);
    act* out = y + row * n;
    for (u32 j = lane; j < n; j += 32) st(&out[j], expf(ld(x[j]) * scale + ld(b[j]) - m) * inv);
}

// ds = scale · y ⊙ (dy − Σ_j dy_j·y_j), row by row. One warp per row.
extern "C" __global__ void softmax_bwd(const act* dy, const act* y, act* ds, u32 rows, u32 n,
                                       float scale) {
    const u64 row = ((u64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const u32 lane = threadIdx.x % 32;
    if (row >= rows) return;
    const act* g = dy + row * n;
    const act* p = y + row * n;
    float dot = 0.f;
    for (u32 j = lane; j < n; j += 32) dot += ld(g[j]) * ld(p[j]);
    dot = warp_sum(dot);
    act* out = ds + row * n;
    for (u32 j = lane; j < n; j += 32) st(&out[j], scale * ld(p[j]) * (ld(g[j]) - dot));
}

// (max, Σ exp(x − max)) of a row in one pass (the online softmax), combined over a block.
#define XENT_THREADS 256
__device__ float row_logsumexp(const act* x, u32 v) {
    __shared__ float sm[XENT_THREADS / 32], ss[XENT_THREADS / 32];
    float m = NEG_INF, s = 0.f;
    for (u32 j = threadIdx.x; j < v; j += XENT_THREADS) {
        const float a = ld(x[j]);
        if (a > m) {
            s = s * expf(m - a) + 1.f;
            m = a;
        } else {
            s += expf(a - m);
        }
    }
    // Combine (m, s) pairs: first within each warp, then across the block's warps.
    for (int o = 16; o > 0; o /= 2) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        const float mm = fmaxf(m, m2);
        s = (m == NEG_INF ? 0.f : s * expf(m - mm)) + (m2 == NEG_INF ? 0.f : s2 * expf(m2 - mm));
        m = mm;
    }
    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    float M = NEG_INF;
    for (int w = 0; w < XENT_THREADS / 32; w++) M = fmaxf(M, sm[w]);
    float S = 0.f;
    for (int w = 0; w < XENT_THREADS / 32; w++)
        if (sm[w] != NEG_INF) S += ss[w] * expf(sm[w] - M);
    __syncthreads();
    return M + logf(S);
}

// nll[r] = logsumexp(logits[r]) − logits[r, targets[r]]. One block per row of v logits.
extern "C" __global__ void xent_fwd(const act* logits, const u32* targets, float* nll, u32 v) {
    const u64 row = blockIdx.x;
    const act* x = logits + row * v;
    const float lse = row_logsumexp(x, v);
    const u32 t = targets[row];
    // A target outside the vocabulary gives NaN (training stops on it), not a stray read.
    if (threadIdx.x == 0) nll[row] = t < v ? lse - ld(x[t]) : __int_as_float(0x7fc00000);
}

// dlogits[r] = g[r] · (softmax(logits[r]) − onehot(targets[r])). One block per row.
extern "C" __global__ void xent_bwd(const act* logits, const u32* targets, const float* g,
                                    act* dlogits, u32 v) {
    const u64 row = blockIdx.x;
    const act* x = logits + row * v;
    const float lse = row_logsumexp(x, v);
    const float gr = g[row];
    const u32 t = targets[row];
    act* out = dlogits + row * v;
    for (u32 j = threadIdx.x; j < v; j += XENT_THREADS)
        st(&out[j], gr * (expf(ld(x[j]) - lse) - (j == t ? 1.f : 0.f)));
}
