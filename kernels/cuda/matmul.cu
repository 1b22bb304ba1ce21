// matmul.cu — y = x · Wᵀ with W in any ggml type we ship (dequantised on the fly by dq32<TY>).
//
// Dimension legend: W [N, K] (row n = `row_bytes` bytes), x [T, K] f32, y [T, N] f32;
// for the expert-indexed variant W is the stacked [E·N, K] tensor and y [S, N] has one row per
// routed (token, expert) slot.
//
// Four kernels per type:
//   matvec_ref_<ty>      the plain reference: one thread per output, the row's chunks in order. Slow;
//                        the GPU tests check the fast kernels against it (and it against f64).
//   matvec_<ty>          decode: one warp per output row, lanes stride over 32-value chunks, up to
//                        MV_MAX_T tokens per block share each dequantised chunk. The reduction order
//                        of y[t, n] does not depend on T, so a batch of sequences gets exactly what
//                        each gets alone (Backend::matmul_per_row).
//   matvec_experts_<ty>  one launch for all routed (token, expert) pairs of a MoE projection.
//   dequant_<ty>         W → f32 [N, K] scratch, for the prefill GEMM below.
// plus `sgemm_nt` (C = A·Bᵀ, f32, shared-memory tiles) for prefill.
// Plain reference: the CPU backend (ggml vec_dot); the GPU tests compare against it per type.

#define MV_WARPS 4
#define MV_MAX_T 8

DEV float dot32(const float* w, const float* x) {
    float s = 0.0f;
    for (int l = 0; l < 32; l++) s += w[l] * x[l];
    return s;
}

template <int TY>
DEV void matvec(const u8* W, long long row_bytes, const float* x, float* y, int N, int K, int T) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;  // whole warps leave together
    const int t0 = blockIdx.y * MV_MAX_T;
    const int nt = min(T - t0, MV_MAX_T);
    const u8* row = W + (long long)n * row_bytes;
    float acc[MV_MAX_T];
    for (int i = 0; i < MV_MAX_T; i++) acc[i] = 0.0f;
    float w[32];
    for (int c = lane; c < K / 32; c += 32) {
        dq32<TY>(row, c, w);
        for (int i = 0; i < MV_MAX_T; i++)
            if (i < nt) acc[i] += dot32(w, x + (long long)(t0 + i) * K + 32 * c);
    }
    for (int i = 0; i < MV_MAX_T; i++) {
        if (i < nt) {
            const float s = warp_sum(acc[i]);
            if (lane == 0) y[(long long)(t0 + i) * N + n] = s;
        }
    }
}

// y[t, n], one thread each, chunks in order. grid ⌈T·N/128⌉, block 128.
template <int TY>
DEV void matvec_ref(const u8* W, long long row_bytes, const float* x, float* y, int N, int K, int T) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)T * N) return;
    const int t = (int)(i / N), n = (int)(i % N);
    float w[32], acc = 0.0f;
    for (int c = 0; c < K / 32; c++) {
        dq32<TY>(W + (long long)n * row_bytes, c, w);
        acc += dot32(w, x + (long long)t * K + 32 * c);
    }
    y[i] = acc;
}

// Slot s: token slot_token[s] through expert slot_expert[s] → y[s, :]. grid (⌈N/MV_WARPS⌉, S).
template <int TY>
DEV void matvec_experts(const u8* W, long long row_bytes, const float* x, float* y, const int* slot_token,
                        const int* slot_expert, int N, int K) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    const int s = blockIdx.y;
    const u8* row = W + ((long long)slot_expert[s] * N + n) * row_bytes;
    const float* xt = x + (long long)slot_token[s] * K;
    float acc = 0.0f, w[32];
    for (int c = lane; c < K / 32; c += 32) {
        dq32<TY>(row, c, w);
        acc += dot32(w, xt + 32 * c);
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(long long)s * N + n] = acc;
}

// One thread per 32-value chunk of W. grid ⌈N·K/32 / 256⌉, block 256.
template <int TY>
DEV void dequant(const u8* W, long long row_bytes, float* out, int N, int K) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int chunks = K / 32;
    if (i >= (long long)N * chunks) return;
    const int n = (int)(i / chunks), c = (int)(i % chunks);
    dq32<TY>(W + (long long)n * row_bytes, c, out + (long long)n * K + 32 * c);
}

#define MATMUL_KERNELS(name, TY)                                                                          \
    extern "C" __global__ void matvec_ref_##name(const u8* W, long long rb, const float* x, float* y,     \
                                                 int N, int K, int T) {                                   \
        matvec_ref<TY>(W, rb, x, y, N, K, T);                                                             \
    }                                                                                                     \
    extern "C" __global__ void matvec_##name(const u8* W, long long rb, const float* x, float* y, int N,  \
                                             int K, int T) {                                              \
        matvec<TY>(W, rb, x, y, N, K, T);                                                                 \
    }                                                                                                     \
    extern "C" __global__ void matvec_experts_##name(const u8* W, long long rb, const float* x, float* y, \
                                                     const int* st, const int* se, int N, int K) {        \
        matvec_experts<TY>(W, rb, x, y, st, se, N, K);                                                    \
    }                                                                                                     \
    extern "C" __global__ void dequant_##name(const u8* W, long long rb, float* out, int N, int K) {       \
        dequant<TY>(W, rb, out, N, K);                                                                    \
    }

MATMUL_KERNELS(f32, TY_F32)
MATMUL_KERNELS(f16, TY_F16)
MATMUL_KERNELS(bf16, TY_BF16)
MATMUL_KERNELS(q8_0, TY_Q8_0)
MATMUL_KERNELS(q4_0, TY_Q4_0)
MATMUL_KERNELS(q4_1, TY_Q4_1)
MATMUL_KERNELS(q5_0, TY_Q5_0)
MATMUL_KERNELS(q5_1, TY_Q5_1)
MATMUL_KERNELS(q4_k, TY_Q4_K)
MATMUL_KERNELS(q5_k, TY_Q5_K)
MATMUL_KERNELS(q6_k, TY_Q6_K)

// C[M, N] = A[M, K] · B[N, K]ᵀ, all f32 row-major. Tiles of 64×64 outputs, 16 of K at a time; 256
// threads, each owning a 4×4 block of C. grid (⌈N/64⌉, ⌈M/64⌉).
#define GT 64
#define GK 16
extern "C" __global__ void sgemm_nt(const float* A, const float* B, float* C, int M, int N, int K) {
    __shared__ float As[GK][GT + 4];
    __shared__ float Bs[GK][GT + 4];
    const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;
    const int m0 = blockIdx.y * GT, n0 = blockIdx.x * GT;
    float acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += GK) {
        for (int e = tid; e < GT * GK; e += 256) {
            const int r = e / GK, kk = e % GK, gk = k0 + kk;
            As[kk][r] = (m0 + r < M && gk < K) ? A[(long long)(m0 + r) * K + gk] : 0.0f;
            Bs[kk][r] = (n0 + r < N && gk < K) ? B[(long long)(n0 + r) * K + gk] : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < GK; kk++) {
            float a[4], b[4];
            for (int i = 0; i < 4; i++) a[i] = As[kk][tr * 4 + i];
            for (int j = 0; j < 4; j++) b[j] = Bs[kk][tc * 4 + j];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; i++) {
        const int m = m0 + tr * 4 + i;
        if (m >= M) continue;
        for (int j = 0; j < 4; j++) {
            const int n = n0 + tc * 4 + j;
            if (n < N) C[(long long)m * N + n] = acc[i][j];
        }
    }
}
