// common.cuh — what every moellava CUDA kernel file starts with (the Rust side prepends it to each
// .cu before NVRTC compiles it; the host check in kernels/tests/cuda_host_check.cpp includes it with
// a C++ compiler, so everything here also has a host definition).
//
// No CUDA headers: NVRTC from PyPI's wheel ships without cuda_fp16.h, so f16 <-> f32 goes through
// PTX `cvt` on the device and an exact bit-level conversion on the host.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef signed char i8;

#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
#define DEV static __device__ __forceinline__
#define ON_DEVICE 1

DEV float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

DEV u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

DEV float bits_to_f32(u32 b) { return __uint_as_float(b); }

// Sum (or, with MAX, maximum) of `v` over the 32 lanes of a warp (every lane gets it).
template <bool MAX>
DEV float warp_reduce(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        const float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = MAX ? fmaxf(v, u) : v + u;
    }
    return v;
}

// The same over the block (blockDim.x a multiple of 32, at most 1024); `scratch` holds 32 floats.
template <bool MAX>
DEV float block_reduce(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_reduce<MAX>(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : (MAX ? -3.402823466e38f : 0.0f);
    return warp_reduce<MAX>(v);
}

DEV float warp_sum(float v) { return warp_reduce<false>(v); }
DEV float block_sum(float v, float* scratch) { return block_reduce<false>(v, scratch); }
DEV float block_max(float v, float* scratch) { return block_reduce<true>(v, scratch); }

#else  // host C++ (the dequantisation check)
#include <cstring>
#include <cmath>
#define DEV static inline
#define ON_DEVICE 0

DEV float bits_to_f32(u32 b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

// IEEE binary16 -> binary32, exact (subnormals, inf, nan).
DEV float h2f(u16 h) {
    const u32 sign = (u32)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (man << 13));
    if (exp != 0) return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
    const float v = (float)man * 5.9604644775390625e-8f;  // man * 2^-24
    return sign ? -v : v;
}
#endif

// Little-endian reads at any byte offset (ggml blocks are packed: a 22-byte q5_0 block puts a u32 at
// offset 2, so no wider-than-byte alignment can be assumed except for the leading f16 scales).
DEV u16 rd16(const u8* p) { return (u16)(p[0] | (p[1] << 8)); }
DEV u32 rd32(const u8* p) { return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24); }
DEV float rdh(const u8* p) { return h2f(rd16(p)); }
