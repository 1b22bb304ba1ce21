// attention.cu — softmax attention of queries over keys and values (prompt and decode alike).
//
// Dimension legend: q [T, n_head·hd] f32; k, v [P, n_kv·hd] in f32 (`attention_f32`) or f16
// (`attention_f16`, the KV cache's default type); out [T, n_head·hd] f32. Query t sits at position
// first_pos + t and, when causal, sees keys 0..=first_pos + t. Head h reads KV head h / (n_head / n_kv)
// (grouped-query attention). Plain reference: the CPU backend's attention (kernels/src/cpu/attention.rs).
//
// One block per (head, query); dynamic shared memory: hd + 32 + P floats (the query, a reduction
// scratch, the scores). Scores: one thread per key; output: one thread per head dimension.

template <int KV_F16>
DEV float kv_at(const void* base, long long i) {
    if (KV_F16) return h2f(((const u16*)base)[i]);
    return ((const float*)base)[i];
}

template <int KV_F16>
DEV void attend(const float* q, const void* k, const void* v, float* out, int P, int n_head, int n_kv, int hd,
                int first_pos, int causal, float scale) {
    extern __shared__ float sm[];
    float* sq = sm;
    float* red = sm + hd;
    float* sc = red + 32;
    const int h = blockIdx.x, t = blockIdx.y, tid = threadIdx.x, bd = blockDim.x;
    const int kvh = h / (n_head / n_kv);
    const long long qw = (long long)n_head * hd, kw = (long long)n_kv * hd;
    const int vis = causal ? min(first_pos + t + 1, P) : P;
    for (int d = tid; d < hd; d += bd) sq[d] = q[t * qw + h * hd + d];
    __syncthreads();
    float mx = -3.402823466e38f;
    for (int j = tid; j < vis; j += bd) {
        const long long at = j * kw + (long long)kvh * hd;
        float s = 0.0f;
        for (int d = 0; d < hd; d++) s += sq[d] * kv_at<KV_F16>(k, at + d);
        s *= scale;
        sc[j] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_max(mx, red);
    float sum = 0.0f;
    for (int j = tid; j < vis; j += bd) {
        const float e = expf(sc[j] - mx);
        sc[j] = e;
        sum += e;
    }
    sum = block_sum(sum, red);  // its leading __syncthreads also publishes sc[]
    const float inv = 1.0f / sum;
    for (int d = tid; d < hd; d += bd) {
        float acc = 0.0f;
        for (int j = 0; j < vis; j++) acc += sc[j] * kv_at<KV_F16>(v, j * kw + (long long)kvh * hd + d);
        out[t * qw + h * hd + d] = acc * inv;
    }
}

extern "C" __global__ void attention_f32(const float* q, const float* k, const float* v, float* out, int P,
                                         int n_head, int n_kv, int hd, int first_pos, int causal, float scale) {
    attend<0>(q, k, v, out, P, n_head, n_kv, hd, first_pos, causal, scale);
}

extern "C" __global__ void attention_f16(const float* q, const u16* k, const u16* v, float* out, int P,
                                         int n_head, int n_kv, int hd, int first_pos, int causal, float scale) {
    attend<1>(q, k, v, out, P, n_head, n_kv, hd, first_pos, causal, scale);
}
