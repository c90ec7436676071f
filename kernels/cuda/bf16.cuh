// bf16 as raw 16-bit words (no headers needed under NVRTC), and the element type of the
// written-out training pass. Prepended to each .cu file of this directory when it is
// compiled (kernels/src/cuda.rs: `source`).
//
// Widening a bf16 to f32 is exact; narrowing rounds to nearest even and keeps NaN a NaN
// (the CPU's half::bf16::from_f32).

typedef unsigned short bf16;

__device__ __forceinline__ float bf16_to_f32(bf16 x) {
    return __uint_as_float(((unsigned int)x) << 16);
}

__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                       // round to nearest even
    return (bf16)(u >> 16);
}

// `act`: what pass.cu and fused.cu store activations, weights and gradients as — f32, or
// bf16 when compiled with ACT_BF16 defined. The arithmetic is f32 either way: each kernel
// widens what it reads (ld) and rounds what it writes (st) once.
#ifdef ACT_BF16
typedef bf16 act;
#else
typedef float act;
#endif

__device__ __forceinline__ float ld(float x) { return x; }
__device__ __forceinline__ float ld(bf16 x) { return bf16_to_f32(x); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(bf16* p, float v) { *p = f32_to_bf16(v); }
