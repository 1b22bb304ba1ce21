// Host driver for kernels/tests/cuda_dequant_host.rs: runs dequant.cuh's dq32<TY> (the code every CUDA
// kernel reads weights with) on the CPU, so its block layouts are checked against ggml without a GPU.
// Input file: records of (u32 type id, u32 rows, u32 cols, u64 byte count, bytes); output file: the
// dequantised values of every record, f32, in order.
#include "common.cuh"
#include "dequant.cuh"

#include <cstdio>
#include <vector>

template <int TY>
static void dequant_rows(const u8* w, u32 rows, u32 cols, size_t row_bytes, float* out) {
    for (u32 r = 0; r < rows; r++)
        for (u32 c = 0; c < cols / 32; c++) dq32<TY>(w + r * row_bytes, (int)c, out + (size_t)r * cols + 32 * c);
}

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    FILE* in = std::fopen(argv[1], "rb");
    FILE* out = std::fopen(argv[2], "wb");
    if (!in || !out) return 2;
    u32 hdr[3];
    unsigned long long nbytes;
    while (std::fread(hdr, 4, 3, in) == 3) {
        if (std::fread(&nbytes, 8, 1, in) != 1) return 3;
        std::vector<u8> w(nbytes);
        if (std::fread(w.data(), 1, nbytes, in) != nbytes) return 3;
        const u32 ty = hdr[0], rows = hdr[1], cols = hdr[2];
        std::vector<float> y((size_t)rows * cols);
        const size_t rb = nbytes / rows;
        switch (ty) {
            case TY_F32: dequant_rows<TY_F32>(w.data(), rows, cols, rb, y.data()); break;
            case TY_F16: dequant_rows<TY_F16>(w.data(), rows, cols, rb, y.data()); break;
            case TY_BF16: dequant_rows<TY_BF16>(w.data(), rows, cols, rb, y.data()); break;
            case TY_Q8_0: dequant_rows<TY_Q8_0>(w.data(), rows, cols, rb, y.data()); break;
            case TY_Q4_0: dequant_rows<TY_Q4_0>(w.data(), rows, cols, rb, y.data()); break;
            case TY_Q4_1: dequant_rows<TY_Q4_1>(w.data(), rows, cols, rb, y.data()); break;
            case TY_Q5_0: dequant_rows<TY_Q5_0>(w.data(), rows, cols, rb, y.data()); break;
            case TY_Q5_1: dequant_rows<TY_Q5_1>(w.data(), rows, cols, rb, y.data()); break;
            case TY_Q4_K: dequant_rows<TY_Q4_K>(w.data(), rows, cols, rb, y.data()); break;
            case TY_Q5_K: dequant_rows<TY_Q5_K>(w.data(), rows, cols, rb, y.data()); break;
            case TY_Q6_K: dequant_rows<TY_Q6_K>(w.data(), rows, cols, rb, y.data()); break;
            default: return 4;
        }
        std::fwrite(y.data(), 4, y.size(), out);
    }
    std::fclose(out);
    return 0;
}
