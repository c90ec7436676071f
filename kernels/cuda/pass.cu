// The row operations of the written-out training pass on the GPU (lm/src/backprop.rs with
// its CUDA backend): RMSNorm, the head layout change with RoPE, silu(g)·u, the embedding
// lookup and its gradient, and the sums and copies between them. The products are cuBLAS's;
// attention's softmax and the cross-entropy are fused.cu's.
//
// Each kernel's CPU reference is the function of kernels/src/ops/ that launches it (the
// launcher sits beside the reference); the device tests compare them (kernels/tests/device.rs).
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
extern "C" __global__ void rmsnorm_fwd(const float* x, const float* w, float* y, u32 h,
                                       float eps) {
    const u64 row = blockIdx.x;
    const float* xr = x + row * h;
    float ss = 0.f;
    for (u32 j = threadIdx.x; j < h; j += BLOCK) ss += xr[j] * xr[j];
    const float r = 1.f / sqrtf(block_sum(ss) / (float)h + eps);
    float* yr = y + row * h;
    for (u32 j = threadIdx.x; j < h; j += BLOCK) yr[j] = xr[j] * r * w[j];
}

// dx = r·(dy ⊙ w) − x·r³·Σ(dy w x)/h per row; dw_part[chunk] = Σ over the chunk's rows of
// dy ⊙ x · r. One block per chunk of `per` rows (the CPU reference's ROWS_PER_TASK); the
// partials are summed in chunk order by col_sum.
extern "C" __global__ void rmsnorm_bwd(const float* dy, const float* x, const float* w, float* dx,
                                       float* dw_part, u32 rows, u32 h, u32 per, float eps) {
    const u64 chunk = blockIdx.x;
    float* part = dw_part + chunk * h;
    for (u32 j = threadIdx.x; j < h; j += BLOCK) part[j] = 0.f;
    const u64 end = min((u64)rows, (chunk + 1) * per);
    for (u64 row = chunk * per; row < end; row++) {
        const float* xr = x + row * h;
        const float* gr = dy + row * h;
        float ss = 0.f, s = 0.f;
        for (u32 j = threadIdx.x; j < h; j += BLOCK) {
            ss += xr[j] * xr[j];
            s += gr[j] * w[j] * xr[j];
        }
        ss = block_sum(ss);
        s = block_sum(s);
        const float r = 1.f / sqrtf(ss / (float)h + eps);
        const float c = r * r * r * s / (float)h;
        float* dr = dx + row * h;
        // Each thread owns its columns of the partial: no two threads touch one.
        for (u32 j = threadIdx.x; j < h; j += BLOCK) {
            dr[j] = r * gr[j] * w[j] - xr[j] * c;
            part[j] += gr[j] * xr[j] * r;
        }
    }
}

// part[k] = Σ of rows k·per .. (k+1)·per of x [rows, cols], column by column. Grid
// (column blocks, chunks).
extern "C" __global__ void col_partial(const float* x, float* part, u32 rows, u32 cols, u32 per) {
    const u32 j = blockIdx.x * BLOCK + threadIdx.x;
    if (j >= cols) return;
    const u64 k = blockIdx.y;
    const u64 end = min((u64)rows, (k + 1) * per);
    float s = 0.f;
    for (u64 r = k * per; r < end; r++) s += x[r * cols + j];
    part[k * cols + j] = s;
}

// out[j] = Σ_k part[k, j] in k order (+ out[j] first when `accumulate`).
extern "C" __global__ void col_sum(const float* part, float* out, u32 parts, u32 cols,
                                   u32 accumulate) {
    const u32 j = blockIdx.x * BLOCK + threadIdx.x;
    if (j >= cols) return;
    float s = 0.f;
    for (u64 k = 0; k < parts; k++) s += part[k * cols + j];
    out[j] = accumulate ? out[j] + s : s;
}

// y[r, j] += b[j] over rows of `cols`.
extern "C" __global__ void add_bias(float* y, const float* b, u64 n, u32 cols) {
    const u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x;
    if (i < n) y[i] += b[i % cols];
}

// acc += x.
extern "C" __global__ void add_into(float* acc, const float* x, u64 n) {
    const u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x;
    if (i < n) acc[i] += x[i];
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// y = silu(g) ⊙ u.
extern "C" __global__ void swiglu_fwd(const float* g, const float* u, float* y, u64 n) {
    const u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x;
    if (i < n) y[i] = g[i] * sigmoid(g[i]) * u[i];
}

// dg = dy ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g))), du = dy ⊙ silu(g).
extern "C" __global__ void swiglu_bwd(const float* dy, const float* g, const float* u, float* dg,
                                      float* du, u64 n) {
    const u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x;
    if (i >= n) return;
    const float s = sigmoid(g[i]);
    dg[i] = dy[i] * u[i] * s * (1.f + g[i] * (1.f - s));
    du[i] = dy[i] * g[i] * s;
}

// The head layout change of attention, with RoPE's rotation when cos is not null:
// to_heads (`inverse` 0) takes x [rows, heads·hd] to y [batch, heads, t, hd]; `inverse` 1
// the way back. cos/sin: [rows, hd/2], each row's angles; `sign` −1 rotates back (a
// gradient). One thread per (row, head, j < hd/2): it moves elements j and j + hd/2.
extern "C" __global__ void heads(const float* x, const float* cos, const float* sin, float* y,
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
    const float* src = x + (inverse ? major : flat);
    float* dst = y + (inverse ? flat : major);
    const float x1 = src[j], x2 = src[j + half];
    if (cos) {
        const float c = cos[row * half + j], s = sign * sin[row * half + j];
        dst[j] = x1 * c - x2 * s;
        dst[j + half] = x2 * c + x1 * s;
    } else {
        dst[j] = x1;
        dst[j + half] = x2;
    }
}

// out[r] = table[idx[r]], rows of `width`. One block per row.
extern "C" __global__ void gather_rows(const float* table, const u32* idx, float* out, u32 width) {
    const u64 r = blockIdx.x;
    const float* src = table + (u64)idx[r] * width;
    for (u32 j = threadIdx.x; j < width; j += BLOCK) out[r * width + j] = src[j];
}

// out[idx[r]] = src[r], rows of `width` (the indices distinct). One block per row.
extern "C" __global__ void scatter_rows(const float* src, const u32* idx, float* out, u32 width) {
    const u64 r = blockIdx.x;
    float* dst = out + (u64)idx[r] * width;
    for (u32 j = threadIdx.x; j < width; j += BLOCK) dst[j] = src[r * width + j];
}

// The embedding's gradient: d_embed[ids[k]] += dx[rows[starts[k]]] + dx[rows[starts[k]+1]] + …
// for each distinct looked-up id k, its rows in order (the CPU's row-by-row loop, the same
// sum). One block per distinct id.
extern "C" __global__ void embed_bwd(const float* dx, const u32* ids, const u32* starts,
                                     const u32* rows, float* d_embed, u32 width) {
    const u32 k = blockIdx.x;
    float* dst = d_embed + (u64)ids[k] * width;
    for (u32 j = threadIdx.x; j < width; j += BLOCK) {
        float acc = dst[j];
        for (u32 i = starts[k]; i < starts[k + 1]; i++) acc += dx[(u64)rows[i] * width + j];
        dst[j] = acc;
    }
}
