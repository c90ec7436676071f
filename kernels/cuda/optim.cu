// The optimizer step and the weight EMA on the GPU, one launch for every parameter tensor.
//
// Each kernel walks a table of tensors (pointers and lengths) cut into fixed-size chunks:
// block b processes chunk chunks[b] of tensor table[chunks[b].tensor]. The arithmetic is the
// CPU reference's (kernels/src/adamw.rs, kernels/src/ema.rs), operation for operation, with
// the rounding of each step made explicit (__fmaf_rn, __fmul_rn, ...) so that the compiler
// cannot contract or reorder it: the GPU result is meant to equal the CPU one bit for bit.
//
// bf16 is handled as raw 16-bit words (bf16.cuh, prepended): a bf16 gradient is widened to
// f32, and the bf16 copy of θ that the model computes with is rounded to nearest even from
// the f32 master weights.

typedef unsigned long long u64;
typedef unsigned int u32;

// One parameter tensor. `param` is the model's lower-precision copy of θ (bf16), or 0 when
// the model computes with θ itself (f32). `ema` is 0 when the EMA is not updated.
struct Entry {
    float* theta;
    const void* grad;  // f32, or bf16 when the kernel's name says so
    float* m;
    float* v;
    float* ema;
    bf16* param;
    u64 n;
    u64 vec4;  // 1 when every pointer is 16-byte aligned and n % 4 == 0
};

struct Chunk {
    u32 tensor;
    u32 index;  // the chunk's first element is index * chunk_elems
};

// One optimizer step, computed on the host: `Step` in adamw.rs, passed unchanged.
struct Step {
    float lr, beta1, beta2, eps;
    float decay;       // 1 - lr * weight_decay
    float scale_m;     // 1 / (1 - beta1^t)
    float scale_v;     // 1 / (1 - beta2^t)
    float grad_scale;  // gradient clipping: min(1, clip / ||g||)
    float ema_weight;  // 1 - beta of the EMA (0: this step does not blend)
};

// s + w * (t - s): the blend both the moments and the EMA use (ema.rs: blend).
__device__ __forceinline__ float blend(float s, float t, float w) {
    return __fmaf_rn(w, __fsub_rn(t, s), s);
}

// One AdamW element (adamw.rs: update). Returns the new θ; updates m and v.
__device__ __forceinline__ float adamw(float theta, float g, float& m, float& v, const Step& s) {
    m = blend(g, m, s.beta1);
    float g2 = __fmul_rn(g, g);
    v = blend(g2, v, s.beta2);
    float m_hat = __fmul_rn(m, s.scale_m);
    float v_hat = __fmul_rn(v, s.scale_v);
    float update = __fdiv_rn(m_hat, __fadd_rn(__fsqrt_rn(v_hat), s.eps));
    return __fsub_rn(__fmul_rn(theta, s.decay), __fmul_rn(s.lr, update));
}

template <bool BF16_GRAD>
__device__ __forceinline__ float load_grad(const void* g, u64 i, float scale) {
    float x = BF16_GRAD ? bf16_to_f32(((const bf16*)g)[i]) : ((const float*)g)[i];
    // The CPU path multiplies by the clip factor only when it clips; so does this.
    return scale == 1.0f ? x : __fmul_rn(x, scale);
}

template <bool BF16_GRAD, bool EMA>
__device__ __forceinline__ void step_one(const Entry& e, u64 i, const Step& s) {
    float g = load_grad<BF16_GRAD>(e.grad, i, s.grad_scale);
    float m = e.m[i], v = e.v[i];
    float theta = adamw(e.theta[i], g, m, v, s);
    e.theta[i] = theta;
    e.m[i] = m;
    e.v[i] = v;
    if (EMA) e.ema[i] = blend(e.ema[i], theta, s.ema_weight);
    if (e.param) e.param[i] = f32_to_bf16(theta);
}

template <bool BF16_GRAD>
__device__ __forceinline__ float4 load_grad4(const void* g, u64 i, float scale) {
    float4 x;
    if (BF16_GRAD) {
        uint2 w = *(const uint2*)((const bf16*)g + i);
        x = make_float4(__uint_as_float(w.x << 16), __uint_as_float(w.x & 0xffff0000u),
                        __uint_as_float(w.y << 16), __uint_as_float(w.y & 0xffff0000u));
    } else {
        x = *(const float4*)((const float*)g + i);
    }
    if (scale != 1.0f) {
        x.x = __fmul_rn(x.x, scale); x.y = __fmul_rn(x.y, scale);
        x.z = __fmul_rn(x.z, scale); x.w = __fmul_rn(x.w, scale);
    }
    return x;
}

// Four consecutive elements with 16-byte loads and stores: the same arithmetic as step_one.
template <bool BF16_GRAD, bool EMA>
__device__ __forceinline__ void step_four(const Entry& e, u64 i, const Step& s) {
    float4 g = load_grad4<BF16_GRAD>(e.grad, i, s.grad_scale);
    float4 t = *(float4*)(e.theta + i);
    float4 m = *(float4*)(e.m + i);
    float4 v = *(float4*)(e.v + i);
    t.x = adamw(t.x, g.x, m.x, v.x, s);
    t.y = adamw(t.y, g.y, m.y, v.y, s);
    t.z = adamw(t.z, g.z, m.z, v.z, s);
    t.w = adamw(t.w, g.w, m.w, v.w, s);
    *(float4*)(e.theta + i) = t;
    *(float4*)(e.m + i) = m;
    *(float4*)(e.v + i) = v;
    if (EMA) {
        float4 a = *(float4*)(e.ema + i);
        a.x = blend(a.x, t.x, s.ema_weight);
        a.y = blend(a.y, t.y, s.ema_weight);
        a.z = blend(a.z, t.z, s.ema_weight);
        a.w = blend(a.w, t.w, s.ema_weight);
        *(float4*)(e.ema + i) = a;
    }
    if (e.param) {
        uint2 w;
        w.x = (u32)f32_to_bf16(t.x) | ((u32)f32_to_bf16(t.y) << 16);
        w.y = (u32)f32_to_bf16(t.z) | ((u32)f32_to_bf16(t.w) << 16);
        *(uint2*)(e.param + i) = w;
    }
}

template <bool BF16_GRAD, bool EMA>
__device__ void adamw_chunk(const Entry* table, const Chunk* chunks, u32 chunk_elems, Step s) {
    const Chunk c = chunks[blockIdx.x];
    const Entry e = table[c.tensor];
    const u64 start = (u64)c.index * chunk_elems;
    const u64 end = min(start + chunk_elems, e.n);
    if (e.vec4) {
        for (u64 i = start + 4 * threadIdx.x; i < end; i += 4 * blockDim.x)
            step_four<BF16_GRAD, EMA>(e, i, s);
    } else {
        for (u64 i = start + threadIdx.x; i < end; i += blockDim.x)
            step_one<BF16_GRAD, EMA>(e, i, s);
    }
}

// θ, m, v ← AdamW(θ, g, m, v) for every tensor of the table.
extern "C" __global__ void adamw_f32(const Entry* table, const Chunk* chunks, u32 chunk_elems, Step s) {
    adamw_chunk<false, false>(table, chunks, chunk_elems, s);
}
extern "C" __global__ void adamw_bf16(const Entry* table, const Chunk* chunks, u32 chunk_elems, Step s) {
    adamw_chunk<true, false>(table, chunks, chunk_elems, s);
}

// The AdamW step, then θ̄ ← θ̄ + (1−β)(θ − θ̄) with the new θ, in the same pass over memory.
extern "C" __global__ void adamw_ema_f32(const Entry* table, const Chunk* chunks, u32 chunk_elems, Step s) {
    adamw_chunk<false, true>(table, chunks, chunk_elems, s);
}
extern "C" __global__ void adamw_ema_bf16(const Entry* table, const Chunk* chunks, u32 chunk_elems, Step s) {
    adamw_chunk<true, true>(table, chunks, chunk_elems, s);
}

// A parameter tensor whose optimizer state is kept in bf16 or as compensated pairs
// (kernels/src/optim/bf16.rs: Store). A pair holds x = hi + lo in two bf16 words: hi is x
// rounded to nearest even, lo the rest rounded likewise. 0 marks a buffer that is absent.
struct MixedEntry {
    void* theta;        // f32, or bf16 (the high half when theta_lo is set)
    bf16* theta_lo;
    const void* grad;   // f32 or bf16
    void* m;            // m and v: both f32 or both bf16
    void* v;
    void* ema;          // f32, or bf16 (the high half when ema_lo is set); 0: no blend
    bf16* ema_lo;
    bf16* param;        // the model's bf16 copy of f32 master weights
    u64 n;
    u64 flags;          // MIXED_* bits
};

#define MIXED_THETA_BF16 1ull
#define MIXED_GRAD_BF16 2ull
#define MIXED_MOMENTS_BF16 4ull
#define MIXED_EMA_BF16 8ull

// A stored value widened to f32 (a pair's sum is exact: lo is below half a unit of hi).
__device__ __forceinline__ float mixed_get(const void* p, const bf16* lo, bool is_bf16, u64 i) {
    if (!is_bf16) return ((const float*)p)[i];
    float hi = bf16_to_f32(((const bf16*)p)[i]);
    return lo ? __fadd_rn(hi, bf16_to_f32(lo[i])) : hi;
}

// x stored: as it is, rounded to nearest even, or split into hi + lo.
__device__ __forceinline__ void mixed_put(void* p, bf16* lo, bool is_bf16, u64 i, float x) {
    if (!is_bf16) {
        ((float*)p)[i] = x;
        return;
    }
    bf16 hi = f32_to_bf16(x);
    ((bf16*)p)[i] = hi;
    if (lo) lo[i] = f32_to_bf16(__fsub_rn(x, bf16_to_f32(hi)));
}

// AdamW and, when ema is set, the EMA blend, over state stored as each entry says:
// bf16.rs's adamw_mixed, element for element (θ̄ is blended with the new θ before θ is
// stored). One element per thread per iteration: the flags are the same for a whole tensor,
// so the branches do not diverge.
extern "C" __global__ void adamw_mixed(const MixedEntry* table, const Chunk* chunks, u32 chunk_elems, Step s) {
    const Chunk c = chunks[blockIdx.x];
    const MixedEntry e = table[c.tensor];
    const u64 start = (u64)c.index * chunk_elems;
    const u64 end = min(start + chunk_elems, e.n);
    const bool tb = e.flags & MIXED_THETA_BF16, mb = e.flags & MIXED_MOMENTS_BF16;
    const bool eb = e.flags & MIXED_EMA_BF16;
    for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        float g = (e.flags & MIXED_GRAD_BF16) ? load_grad<true>(e.grad, i, s.grad_scale)
                                              : load_grad<false>(e.grad, i, s.grad_scale);
        float m = mixed_get(e.m, 0, mb, i), v = mixed_get(e.v, 0, mb, i);
        float x = adamw(mixed_get(e.theta, e.theta_lo, tb, i), g, m, v, s);
        mixed_put(e.m, 0, mb, i, m);
        mixed_put(e.v, 0, mb, i, v);
        if (e.ema) mixed_put(e.ema, e.ema_lo, eb, i, blend(mixed_get(e.ema, e.ema_lo, eb, i), x, s.ema_weight));
        if (e.param) e.param[i] = f32_to_bf16(x);
        mixed_put(e.theta, e.theta_lo, tb, i, x);
    }
}

// The EMA alone: θ̄ ← θ̄ + w(θ − θ̄) for every tensor (uses the entries' ema and theta).
extern "C" __global__ void ema_blend(const Entry* table, const Chunk* chunks, u32 chunk_elems, float w) {
    const Chunk c = chunks[blockIdx.x];
    const Entry e = table[c.tensor];
    const u64 start = (u64)c.index * chunk_elems;
    const u64 end = min(start + chunk_elems, e.n);
    if (e.vec4) {
        for (u64 i = start + 4 * threadIdx.x; i < end; i += 4 * blockDim.x) {
            float4 a = *(float4*)(e.ema + i);
            const float4 t = *(const float4*)(e.theta + i);
            a.x = blend(a.x, t.x, w);
            a.y = blend(a.y, t.y, w);
            a.z = blend(a.z, t.z, w);
            a.w = blend(a.w, t.w, w);
            *(float4*)(e.ema + i) = a;
        }
    } else {
        for (u64 i = start + threadIdx.x; i < end; i += blockDim.x)
            e.ema[i] = blend(e.ema[i], e.theta[i], w);
    }
}

// Σ (a − b)² over every tensor of the table, in f64, one partial sum per chunk (block), in
// the order of kernels/src/norm.rs: thread t sums the quads t, t + 256, ... of its chunk (each
// quad's elements in order), then the block adds the 256 thread sums as a tree. `a` sits in
// the entry's grad slot (f32, or bf16 when the name says so), `b` in theta (0: b = 0).
#define SUM_THREADS 256
template <bool BF16_A>
__device__ void sum_sq_chunk(const Entry* table, const Chunk* chunks, u32 chunk_elems, double* partials) {
    __shared__ double sums[SUM_THREADS];
    const Chunk c = chunks[blockIdx.x];
    const Entry e = table[c.tensor];
    const u64 start = (u64)c.index * chunk_elems;
    const u64 end = min(start + chunk_elems, e.n);
    double acc = 0.0;
    for (u64 q = start + 4 * threadIdx.x; q < end; q += 4 * SUM_THREADS) {
        float a[4] = {0.f, 0.f, 0.f, 0.f}, b[4] = {0.f, 0.f, 0.f, 0.f};
        const int k_end = (int)min((u64)4, end - q);
        if (e.vec4) {
            float4 x = load_grad4<BF16_A>(e.grad, q, 1.0f);
            a[0] = x.x; a[1] = x.y; a[2] = x.z; a[3] = x.w;
            if (e.theta) {
                float4 y = *(const float4*)(e.theta + q);
                b[0] = y.x; b[1] = y.y; b[2] = y.z; b[3] = y.w;
            }
        } else {
            for (int k = 0; k < k_end; k++) {
                a[k] = load_grad<BF16_A>(e.grad, q + k, 1.0f);
                if (e.theta) b[k] = e.theta[q + k];
            }
        }
        for (int k = 0; k < k_end; k++) {
            double d = __dsub_rn((double)a[k], (double)b[k]);
            acc = __dadd_rn(acc, __dmul_rn(d, d));
        }
    }
    sums[threadIdx.x] = acc;
    __syncthreads();
    for (int s = SUM_THREADS / 2; s > 0; s /= 2) {
        if (threadIdx.x < s) sums[threadIdx.x] = __dadd_rn(sums[threadIdx.x], sums[threadIdx.x + s]);
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = sums[0];
}

extern "C" __global__ void sum_sq_f32(const Entry* table, const Chunk* chunks, u32 chunk_elems, double* partials) {
    sum_sq_chunk<false>(table, chunks, chunk_elems, partials);
}
extern "C" __global__ void sum_sq_bf16(const Entry* table, const Chunk* chunks, u32 chunk_elems, double* partials) {
    sum_sq_chunk<true>(table, chunks, chunk_elems, partials);
}
