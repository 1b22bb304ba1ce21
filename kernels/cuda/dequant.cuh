// dequant.cuh — ggml's weight formats, 32 values at a time.
//
// `dq32<TY>(row, c, out)` writes values [32c, 32c+32) of one weight row (the row's bytes start at
// `row`) into out[0..32] as f32, with the same arithmetic as ggml's dequantize_row_* (and gguf-py's
// quants.py): every kernel that reads weights goes through it, and kernels/tests/cuda_host_check.cpp
// checks it on the host against ggml for every type, so the layouts below are tested without a GPU.
//
// Type ids (TY) — must equal `CudaType::id()` in kernels/src/cuda/types.rs:
//   0 f32  1 f16  2 bf16  3 q8_0  4 q4_0  5 q4_1  6 q5_0  7 q5_1  8 q4_k  9 q5_k  10 q6_k
//
// Block layouts (bytes):
//   q8_0 34: d f16 | qs[32] i8                              x = d·q
//   q4_0 18: d f16 | qs[16] (lo nibble: x[l], hi: x[l+16])  x = d·(q−8)
//   q4_1 20: d f16 | m f16 | qs[16]                         x = d·q + m
//   q5_0 22: d f16 | qh u32 (bit l: 5th bit of x[l]) | qs[16]   x = d·(q−16)
//   q5_1 24: d f16 | m f16 | qh u32 | qs[16]                x = d·q + m
//   q4_k 144 per 256: d f16 | dmin f16 | scales[12] (8 six-bit scale/min pairs) | qs[128]
//        sub-block j (32 values): nibbles of qs[32(j/2) ..] (lo for even j, hi for odd); x = d·sc_j·q − dmin·m_j
//   q5_k 176 per 256: as q4_k with qh[32] before qs: bit j of qh[l] is the 5th bit of value l of sub-block j
//   q6_k 210 per 256: ql[128] | qh[64] | scales[16] i8 | d f16; x = d·sc·(q−32), 16 values per scale

#define TY_F32 0
#define TY_F16 1
#define TY_BF16 2
#define TY_Q8_0 3
#define TY_Q4_0 4
#define TY_Q4_1 5
#define TY_Q5_0 6
#define TY_Q5_1 7
#define TY_Q4_K 8
#define TY_Q5_K 9
#define TY_Q6_K 10

// Six-bit scale and min of sub-block j (0..8) of a q4_k / q5_k super-block.
DEV void k_scale_min(const u8* s, int j, int* sc, int* mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

template <int TY>
DEV void dq32(const u8* row, int c, float* out) {
    if (TY == TY_F32) {
        const u8* p = row + 128 * c;
        for (int l = 0; l < 32; l++) out[l] = bits_to_f32(rd32(p + 4 * l));
    } else if (TY == TY_F16) {
        const u8* p = row + 64 * c;
        for (int l = 0; l < 32; l++) out[l] = rdh(p + 2 * l);
    } else if (TY == TY_BF16) {
        const u8* p = row + 64 * c;
        for (int l = 0; l < 32; l++) out[l] = bits_to_f32((u32)rd16(p + 2 * l) << 16);
    } else if (TY == TY_Q8_0) {
        const u8* b = row + 34 * c;
        const float d = rdh(b);
        for (int l = 0; l < 32; l++) out[l] = d * (float)(i8)b[2 + l];
    } else if (TY == TY_Q4_0) {
        const u8* b = row + 18 * c;
        const float d = rdh(b);
        for (int l = 0; l < 16; l++) {
            out[l] = d * (float)((int)(b[2 + l] & 0x0f) - 8);
            out[l + 16] = d * (float)((int)(b[2 + l] >> 4) - 8);
        }
    } else if (TY == TY_Q4_1) {
        const u8* b = row + 20 * c;
        const float d = rdh(b), m = rdh(b + 2);
        for (int l = 0; l < 16; l++) {
            out[l] = d * (float)(b[4 + l] & 0x0f) + m;
            out[l + 16] = d * (float)(b[4 + l] >> 4) + m;
        }
    } else if (TY == TY_Q5_0) {
        const u8* b = row + 22 * c;
        const float d = rdh(b);
        const u32 qh = rd32(b + 2);
        for (int l = 0; l < 16; l++) {
            const int lo = (b[6 + l] & 0x0f) | (((qh >> l) & 1) << 4);
            const int hi = (b[6 + l] >> 4) | (((qh >> (l + 16)) & 1) << 4);
            out[l] = d * (float)(lo - 16);
            out[l + 16] = d * (float)(hi - 16);
        }
    } else if (TY == TY_Q5_1) {
        const u8* b = row + 24 * c;
        const float d = rdh(b), m = rdh(b + 2);
        const u32 qh = rd32(b + 4);
        for (int l = 0; l < 16; l++) {
            const int lo = (b[8 + l] & 0x0f) | (((qh >> l) & 1) << 4);
            const int hi = (b[8 + l] >> 4) | (((qh >> (l + 16)) & 1) << 4);
            out[l] = d * (float)lo + m;
            out[l + 16] = d * (float)hi + m;
        }
    } else if (TY == TY_Q4_K || TY == TY_Q5_K) {
        const int bytes = TY == TY_Q4_K ? 144 : 176;
        const u8* b = row + bytes * (c / 8);
        const int j = c % 8;
        int sc, mn;
        k_scale_min(b + 4, j, &sc, &mn);
        const float d = rdh(b) * (float)sc, m = rdh(b + 2) * (float)mn;
        const u8* qs = b + (TY == TY_Q4_K ? 16 : 48) + 32 * (j / 2);
        const int shift = 4 * (j % 2);
        for (int l = 0; l < 32; l++) {
            int q = (qs[l] >> shift) & 0x0f;
            if (TY == TY_Q5_K) q |= ((b[16 + l] >> j) & 1) << 4;
            out[l] = d * (float)q - m;
        }
    } else if (TY == TY_Q6_K) {
        const u8* b = row + 210 * (c / 8);
        const int j = c % 8, half = j / 4, k = j % 4;
        const u8* ql = b + 64 * half + 32 * (k % 2);
        const u8* qh = b + 128 + 32 * half;
        const i8* sc = (const i8*)(b + 192);
        const float d = rdh(b + 208);
        const int lshift = 4 * (k / 2), hshift = 2 * k;
        for (int l = 0; l < 32; l++) {
            const int q = (((ql[l] >> lshift) & 0x0f) | (((qh[l] >> hshift) & 3) << 4)) - 32;
            out[l] = d * (float)sc[2 * j + l / 16] * (float)q;
        }
    }
}
