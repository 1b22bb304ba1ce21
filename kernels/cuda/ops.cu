// ops.cu — the element-wise and per-row operations of the Backend interface on f32 activations.
//
// Dimension legend: x [rows, cols] f32 row-major; n = rows·cols. Plain reference for each: the
// function of the same name in kernels/src/cpu/ops.rs; the GPU tests compare each against it.
// Element-wise kernels: grid ⌈n/256⌉, block 256. Per-row kernels: one block of 256 per row.

#define GRID_STRIDE(i, n) for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
                               i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void add_bias(float* x, const float* b, long long n, int cols) {
    GRID_STRIDE(i, n) x[i] += b[i % cols];
}

extern "C" __global__ void add(float* x, const float* y, long long n) {
    GRID_STRIDE(i, n) x[i] += y[i];
}

extern "C" __global__ void mul(float* x, const float* y, long long n) {
    GRID_STRIDE(i, n) x[i] *= y[i];
}

// kind: 0 GELU (erf), 1 GELU (tanh), 2 quick GELU x·σ(1.702x), 3 SiLU — the order of `Activation`.
extern "C" __global__ void activate(float* x, long long n, int kind) {
    GRID_STRIDE(i, n) {
        const float v = x[i];
        float y;
        if (kind == 0) y = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        else if (kind == 1) y = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
        else if (kind == 2) y = v / (1.0f + expf(-1.702f * v));
        else y = v / (1.0f + expf(-v));
        x[i] = y;
    }
}

// (x − mean) / sqrt(var + eps) · w (+ b). b may be null. Two passes over the row (mean, then the
// centred variance), as the CPU version.
extern "C" __global__ void layer_norm(float* x, const float* w, const float* b, int cols, float eps) {
    __shared__ float red[32];
    float* row = x + (long long)blockIdx.x * cols;
    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s += row[i];
    const float mean = block_sum(s, red) / cols;
    float v = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) v += (row[i] - mean) * (row[i] - mean);
    const float inv = rsqrtf(block_sum(v, red) / cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) row[i] = (row[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
}

// x · rsqrt(mean(x²) + eps) · w.
extern "C" __global__ void rms_norm(float* x, const float* w, int cols, float eps) {
    __shared__ float red[32];
    float* row = x + (long long)blockIdx.x * cols;
    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s += row[i] * row[i];
    const float inv = rsqrtf(block_sum(s, red) / cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) row[i] = row[i] * inv * w[i];
}

// NeoX rotary embedding on the first `rot` dims of each head; positions[r] for row r. One thread per
// (row, head, pair i < rot/2): the angle pos / base^(2i/rot) in f32, as transformers computes it.
extern "C" __global__ void rope_neox(float* x, const int* positions, int rows, int n_head, int hd, int rot,
                                     float base) {
    const int half = rot / 2;
    GRID_STRIDE(e, (long long)rows * n_head * half) {
        const int i = (int)(e % half), h = (int)((e / half) % n_head), r = (int)(e / half / n_head);
        const float inv_freq = 1.0f / powf(base, (float)(2 * i) / (float)rot);
        const float angle = (float)positions[r] * inv_freq;
        float sn, cs;
        sincosf(angle, &sn, &cs);
        float* head = x + ((long long)r * n_head + h) * hd;
        const float a = head[i], b = head[i + half];
        head[i] = a * cs - b * sn;
        head[i + half] = b * cs + a * sn;
    }
}

// dst[r, c] = src[r, col0 + c] for a dst of `dst_cols` columns (one block of a column split).
extern "C" __global__ void copy_cols(const float* src, float* dst, int rows, int src_cols, int dst_cols, int col0) {
    GRID_STRIDE(e, (long long)rows * dst_cols) {
        const long long r = e / dst_cols;
        dst[e] = src[r * src_cols + col0 + e % dst_cols];
    }
}

// dst[i, :] = src[ids[i], :].
extern "C" __global__ void gather_rows(const float* src, float* dst, const int* ids, int n, int cols) {
    GRID_STRIDE(e, (long long)n * cols) dst[e] = src[(long long)ids[e / cols] * cols + e % cols];
}

// dst[ids[i], :] += weights[i] · src[i, :], i in order: one thread per column walks the rows, so a
// destination row named twice is summed in order, with no race.
extern "C" __global__ void scatter_add_rows(float* dst, const float* src, const int* ids, const float* weights,
                                            int n, int cols) {
    GRID_STRIDE(c, (long long)cols) {
        for (int i = 0; i < n; i++) dst[(long long)ids[i] * cols + c] += weights[i] * src[(long long)i * cols + c];
    }
}

// f32 → f16 (round to nearest even), for appending to an f16 KV cache.
extern "C" __global__ void f32_to_f16(const float* src, u16* dst, long long n) {
    GRID_STRIDE(i, n) dst[i] = f2h(src[i]);
}
