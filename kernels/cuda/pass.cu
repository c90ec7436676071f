// The row operations of the written-out training pass on the GPU (lm/src/backprop.rs with
// its CUDA backend): RMSNorm, the head layout change with RoPE, silu(g)·u, the embedding
// lookup and its gradient, and the sums and copies between them; for decoding, the KV
// cache's writes and greedy decoding's argmax. The products are cuBLAS's;
// attention's softmax and the cross-entropy are fused.cu's.
//
// Values are `act` (bf16.cuh: f32, or bf16 in the module compiled with ACT_BF16); every sum
// and product is f32, and a kernel rounds what it writes once. The partial sums of a
// weight's gradient stay f32.
//
// Each kernel's CPU reference is the function of kernels/src/ops/ that launches it (the
// launcher sits beside the reference); the device tests compare them (kernels/tests/pass_ops.rs).
// The sums that make a weight's gradient run in a fixed order (partials per chunk of rows,
// then the chunks in order; each embedding row's lookups in row order), so a step has the
// same bits on every run.

typedef unsigned long long u64;
typedef unsigned int u32;

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// The sum of x over a block of BLOCK threads (a multiple of 32), returned to every thread.
#define BLOCK 256
__device__ float block_sum(float x) {
    __shared__ float part[BLOCK / 32];
    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    x = warp_sum(x);
    __syncthreads();  // part may still be read by the previous call
    if (lane == 0) part[warp] = x;
    __syncthreads();
    float s = 0.f;
    for (int w = 0; w < BLOCK / 32; w++) s += part[w];
    return s;
}

// y = x · r · w, r = 1/√(mean(x²) + ε) per row of h. One block per row.
extern "C" __global__ void rmsnorm_fwd(const act* x, const act* w, act* y, u32 h, float eps) {
    const u64 row = blockIdx.x;
    const act* xr = x + row * h;
    float ss = 0.f;
    for (u32 j = threadIdx.x; j < h; j += BLOCK) ss += ld(xr[j]) * ld(xr[j]);
    const float r = 1.f / sqrtf(block_sum(ss) / (float)h + eps);
    act* yr = y + row * h;
    for (u32 j = threadIdx.x; j < h; j += BLOCK) st(&yr[j], ld(xr[j]) * r * ld(w[j]));
}

// dx = r·(dy ⊙ w) − x·r³·Σ(dy w x)/h per row; dw_part[chunk] = Σ over the chunk's rows of
// dy ⊙ x · r. One block per chunk of `per` rows (the CPU reference's ROWS_PER_TASK); the
// partials are summed in chunk order by col_sum.
extern "C" __global__ void rmsnorm_bwd(const act* dy, const act* x, const act* w, act* dx,
                                       float* dw_part, u32 rows, u32 h, u32 per, float eps) {
    const u64 chunk = blockIdx.x;
    float* part = dw_part + chunk * h;
    for (u32 j = threadIdx.x; j < h; j += BLOCK) part[j] = 0.f;
    const u64 end = min((u64)rows, (chunk + 1) * per);
    for (u64 row = chunk * per; row < end; row++) {
        const act* xr = x + row * h;
        const act* gr = dy + row * h;
        float ss = 0.f, s = 0.f;
        for (u32 j = threadIdx.x; j < h; j += BLOCK) {
            const float xj = ld(xr[j]);
            ss += xj * xj;
            s += ld(gr[j]) * ld(w[j]) * xj;
        }
        ss = block_sum(ss);
        s = block_sum(s);
        const float r = 1.f / sqrtf(ss / (float)h + eps);
        const float c = r * r * r * s / (float)h;
        act* dr = dx + row * h;
        // Each thread owns its columns of the partial: no two threads touch one.
        for (u32 j = threadIdx.x; j < h; j += BLOCK) {
            const float xj = ld(xr[j]), gj = ld(gr[j]);
            st(&dr[j], r * gj * ld(w[j]) - xj * c);
            part[j] += gj * xj * r;
        }
    }
}

// part[k] = Σ of rows k·per .. (k+1)·per of x [rows, cols], column by column. Grid
// (column blocks, chunks).
extern "C" __global__ void col_partial(const act* x, float* part, u32 rows, u32 cols, u32 per) {
    const u32 j = blockIdx.x * BLOCK + threadIdx.x;
    if (j >= cols) return;
    const u64 k = blockIdx.y;
    const u64 end = min((u64)rows, (k + 1) * per);
    float s = 0.f;
    for (u64 r = k * per; r < end; r++) s += ld(x[r * cols + j]);
    part[k * cols + j] = s;
}

// out[j] = Σ_k part[k, j] in k order (+ out[j] first when `accumulate`).
extern "C" __global__ void col_sum(const float* part, act* out, u32 parts, u32 cols,
                                   u32 accumulate) {
    const u32 j = blockIdx.x * BLOCK + threadIdx.x;
    if (j >= cols) return;
    float s = 0.f;
    for (u64 k = 0; k < parts; k++) s += part[k * cols + j];
    st(&out[j], accumulate ? ld(out[j]) + s : s);
}

// y[r, j] += b[j] over rows of `cols`.
extern "C" __global__ void add_bias(act* y, const act* b, u64 n, u32 cols) {
    const u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x;
    if (i < n) st(&y[i], ld(y[i]) + ld(b[i % cols]));
}

// acc += x.
extern "C" __global__ void add_into(act* acc, const act* x, u64 n) {
    const u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x;
    if (i < n) st(&acc[i], ld(acc[i]) + ld(x[i]));
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// y = silu(g) ⊙ u.
extern "C" __global__ void swiglu_fwd(const act* g, const act* u, act* y, u64 n) {
    const u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x;
    if (i >= n) return;
    const float gi = ld(g[i]);
    st(&y[i], gi * sigmoid(gi) * ld(u[i]));
}

// dg = dy ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g))), du = dy ⊙ silu(g).
extern "C" __global__ void swiglu_bwd(const act* dy, const act* g, const act* u, act* dg,
                                      act* du, u64 n) {
    const u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x;
    if (i >= n) return;
    const float gi = ld(g[i]), dyi = ld(dy[i]);
    const float s = sigmoid(gi);
    st(&dg[i], dyi * ld(u[i]) * s * (1.f + gi * (1.f - s)));
    st(&du[i], dyi * gi * s);
}

// The head layout change of attention, with RoPE's rotation when cos is not null:
// to_heads (`inverse` 0) takes x [rows, heads·hd] to y [batch, heads, t, hd]; `inverse` 1
// the way back. cos/sin: [rows, hd/2], each row's angles; `sign` −1 rotates back (a
// gradient). One thread per (row, head, j < hd/2): it moves elements j and j + hd/2.
extern "C" __global__ void heads(const act* x, const act* cos, const act* sin, act* y,
                                 u32 rows, u32 t, u32 nheads, u32 hd, float sign, u32 inverse) {
    const u32 half = hd / 2;
    const u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x;
    if (i >= (u64)rows * nheads * half) return;
    const u32 j = i % half;
    const u64 rh = i / half;
    const u32 head = rh % nheads;
    const u64 row = rh / nheads;
    const u64 b = row / t, pos = row % t;
    const u64 flat = (row * nheads + head) * hd;          // [rows, heads·hd]
    const u64 major = ((b * nheads + head) * t + pos) * hd;  // [batch, heads, t, hd]
    const act* src = x + (inverse ? major : flat);
    act* dst = y + (inverse ? flat : major);
    if (cos) {
        const float x1 = ld(src[j]), x2 = ld(src[j + half]);
        const float c = ld(cos[row * half + j]), s = sign * ld(sin[row * half + j]);
        st(&dst[j], x1 * c - x2 * s);
        st(&dst[j + half], x2 * c + x1 * s);
    } else {
        dst[j] = src[j];
        dst[j + half] = src[j + half];
    }
}

// cache[blk, at + i, :] = x[blk, i, :]: x [blocks, t, width] into cache [blocks, cap,
// width] (a decoding step's keys or values). One thread per element of x.
extern "C" __global__ void write_cache(const act* x, act* cache, u64 n, u32 t, u32 cap, u32 at,
                                       u32 width) {
    const u64 e = (u64)blockIdx.x * BLOCK + threadIdx.x;
    if (e >= n) return;
    const u64 block = (u64)t * width;
    cache[(e / block * cap + at) * width + e % block] = x[e];
}

// Greedy decoding's choice: idx[r] = where row r of x [rows, width] first holds its largest
// value, NaNs passed over; 0 when x[r, 0] is NaN. That is the CPU's running maximum
// (rows::argmax_rows: candle's argmax), which replaces its value only by a strictly larger
// one, so ties go to the lowest index and a NaN first value is never replaced. Each thread
// keeps the best (value, index) of its columns, then the block's best by the same order
// (larger value, then lower index): a total order, so any reduction tree gives the same.
// One block per row.
#define NONE 0xffffffffu
__device__ __forceinline__ void keep_best(float& best, u32& at, float v, u32 i) {
    if (i != NONE && (at == NONE || v > best || (v == best && i < at))) {
        best = v;
        at = i;
    }
}

extern "C" __global__ void argmax_rows(const act* x, u32* idx, u32 width) {
    __shared__ float part_v[BLOCK / 32];
    __shared__ u32 part_i[BLOCK / 32];
    const act* xr = x + (u64)blockIdx.x * width;
    float best = 0.f;
    u32 at = NONE;
    for (u32 j = threadIdx.x; j < width; j += BLOCK) {
        const float v = ld(xr[j]);
        if (v == v) keep_best(best, at, v, j);  // v != v: NaN
    }
    for (int o = 16; o > 0; o /= 2) {
        const float v = __shfl_xor_sync(0xffffffffu, best, o);
        const u32 i = __shfl_xor_sync(0xffffffffu, at, o);
        keep_best(best, at, v, i);
    }
    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        part_v[warp] = best;
        part_i[warp] = at;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < BLOCK / 32; w++) keep_best(best, at, part_v[w], part_i[w]);
        const float first = ld(xr[0]);
        idx[blockIdx.x] = (at == NONE || first != first) ? 0u : at;
    }
}

// out[r] = table[idx[r]], rows of `width`. One block per row.
extern "C" __global__ void gather_rows(const act* table, const u32* idx, act* out, u32 width) {
    const u64 r = blockIdx.x;
    const act* src = table + (u64)idx[r] * width;
    for (u32 j = threadIdx.x; j < width; j += BLOCK) out[r * width + j] = src[j];
}

// out[idx[r]] = src[r], rows of `width` (the indices distinct). One block per row.
extern "C" __global__ void scatter_rows(const act* src, const u32* idx, act* out, u32 width) {
    const u64 r = blockIdx.x;
    act* dst = out + (u64)idx[r] * width;
    for (u32 j = threadIdx.x; j < width; j += BLOCK) dst[j] = src[r * width + j];
}

// The embedding's gradient: d_embed[ids[k]] += dx[rows[starts[k]]] + dx[rows[starts[k]+1]] + …
// for each distinct looked-up id k, its rows in order (the CPU's row-by-row loop, the same
// sum). One block per distinct id.
extern "C" __global__ void embed_bwd(const act* dx, const u32* ids, const u32* starts,
                                     const u32* rows, act* d_embed, u32 width) {
    const u32 k = blockIdx.x;
    act* dst = d_embed + (u64)ids[k] * width;
    for (u32 j = threadIdx.x; j < width; j += BLOCK) {
        float acc = ld(dst[j]);
        for (u32 i = starts[k]; i < starts[k + 1]; i++) acc += ld(dx[(u64)rows[i] * width + j]);
        st(&dst[j], acc);
    }
}
