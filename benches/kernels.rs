//! Criterion benches of the hot CPU kernels, each with a throughput figure (criterion prints it per
//! second): weight bytes for the decode matvec (memory-bound: compare with the bandwidth probe), multiply-
//! accumulates ("elements") for the prefill matmul and attention (compute-bound). Where the CPU has a
//! repacked layout for a type (AMX, interleaved), its kernel is measured beside the plain one
//! (`matvec/q4_k_AMX/…`, `prefill_matmul/packed_AMX/…`); where our own one-token kernel replaces
//! ggml's on that layout (q4_K and q8_0 on AMX, q4_K and q4_0 on the interleaved `CPU_REPACK`),
//! ggml's is measured beside it (`…_AMX_ggml`, `…_CPU_REPACK_ggml`), and where our own kernel replaces
//! ggml's `vec_dot` on plain rows (q8_0 on AVX2), `vec_dot` beside it (`q8_0_vec_dot`).
//!
//!   cargo bench --bench kernels                 # all
//!   cargo bench --bench kernels -- matvec/q4_k  # one group/type
//!
//! Shapes are Phi-2's (hidden 2560, FFN 10240, 32 heads of 80). Figures for a machine: BENCHMARKS.md.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moellava_kernels::cpu::{attention as attn, bandwidth, gemm, matmul, matmul_vec_dot, packed, q8_0_rows_matvec, QMatRef};
use moellava_kernels::quant::{quantize_rows_par, QuantType};

const HIDDEN: usize = 2560;

/// Large buffers start on a cache line (ggml's AMX kernel is ~1.5× slower on misaligned outputs).
#[global_allocator]
static ALLOC: moellava_kernels::alloc::CacheAligned = moellava_kernels::alloc::CacheAligned;
const FFN: usize = 10240;
const N_HEAD: usize = 32;
const HEAD_DIM: usize = 80;

fn signal(n: usize, k: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * k).sin() * 0.05).collect()
}

fn weights(q: QuantType, rows: usize, cols: usize) -> Vec<u8> {
    let f = signal(rows * cols, 0.37);
    let mut out = vec![0u8; q.bytes_for(rows, cols).unwrap()];
    quantize_rows_par(q, &f, cols, &mut out).unwrap();
    out
}

/// Whether one token through plain rows of `q` runs our own kernel (q8_0 on AVX2,
/// `q8_0_rows_matvec`) rather than ggml's `vec_dot` per row; ggml's is then measured beside it.
fn own_plain_rows(q: QuantType) -> bool {
    q == QuantType::Q8_0 && q8_0_rows_matvec::available()
}

const TYPES: [QuantType; 5] = [QuantType::Q4_0, QuantType::Q4_K, QuantType::Q5_K, QuantType::Q8_0, QuantType::F16];

/// Decode: one token through an expert's up projection (10240 × 2560), weight bytes per second.
fn matvec(c: &mut Criterion) {
    matvec_group(c, "matvec", 20, FFN, &TYPES);
    // The same kernels on a weight that stays in L2 (1024 × 2560: at most 1.4 MB per core at q8_0 with
    // two threads): the bytes/s the kernel can consume when memory is not the limit, i.e. its compute
    // ceiling. Decode is memory-bound only where this is well above the bandwidth probe's figure.
    matvec_group(c, "matvec_l2", 50, 1024, &[QuantType::Q4_0, QuantType::Q4_K, QuantType::Q8_0]);
}

/// One token through the same `rows × 2560` matrix every call, plain and (where a layout takes the
/// type) packed, weight bytes per second.
fn matvec_group(c: &mut Criterion, name: &str, samples: usize, rows: usize, types: &[QuantType]) {
    let mut g = c.benchmark_group(name);
    g.sample_size(samples);
    let x = signal(HIDDEN, 0.11);
    let shape = format!("{rows}x{HIDDEN}");
    for &q in types {
        let w = weights(q, rows, HIDDEN);
        let m = QMatRef::new(&w, q, rows, HIDDEN).unwrap();
        let mut y = vec![0f32; rows];
        g.throughput(Throughput::Bytes(w.len() as u64));
        g.bench_function(BenchmarkId::new(q.name(), &shape), |b| b.iter(|| matmul(m, black_box(&x), &mut y).unwrap()));
        if own_plain_rows(q) {
            g.bench_function(BenchmarkId::new(format!("{}_vec_dot", q.name()), &shape), |b| {
                b.iter(|| matmul_vec_dot(m, black_box(&x), &mut y).unwrap())
            });
        }
        if let Some(p) = packed::pack(m).unwrap() {
            g.bench_function(BenchmarkId::new(format!("{}_{}", q.name(), p.layout), &shape), |b| {
                b.iter(|| gemm::gemm_packed(&p, black_box(&x), &mut y).unwrap())
            });
            if gemm::uses_own_matvec(&p) {
                g.bench_function(BenchmarkId::new(format!("{}_{}_ggml", q.name(), p.layout), &shape), |b| {
                    b.iter(|| gemm::gemm_packed_ggml(&p, black_box(&x), &mut y).unwrap())
                });
            }
        }
    }
    g.finish();
}

/// Prefill through an FFN-sized matrix (10240 × 2560, an expert's up projection) repacked, at 128 and
/// 512 tokens: ggml's kernel in one call for all tokens (`one_call`) against `gemm_packed` (`ours`:
/// for q4_K in the AMX layout our AMX-BF16 kernel, `q4k_amx`; q4_K and q4_0 in the interleaved one
/// our AVX2 GEMMs, `q4k_x8_gemm` and `q4_0_x8_gemm`; q8_0, which stays on ggml's kernel, as a
/// control); multiply-accumulates per second.
fn prefill_ffn(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefill_ffn");
    g.sample_size(10);
    for q in [QuantType::Q4_K, QuantType::Q4_0, QuantType::Q8_0] {
        let w = weights(q, FFN, HIDDEN);
        let Some(p) = packed::pack(QMatRef::new(&w, q, FFN, HIDDEN).unwrap()).unwrap() else { continue };
        for t in [128usize, 512] {
            let x = signal(t * HIDDEN, 0.11);
            let mut y = vec![0f32; t * FFN];
            g.throughput(Throughput::Elements((t * FFN * HIDDEN) as u64));
            let id = |who: &str| BenchmarkId::new(format!("{}_{}_{who}", q.name(), p.layout), t);
            g.bench_function(id("one_call"), |b| b.iter(|| gemm::gemm_packed_ggml(&p, black_box(&x), &mut y).unwrap()));
            g.bench_function(id("ours"), |b| b.iter(|| gemm::gemm_packed(&p, black_box(&x), &mut y).unwrap()));
        }
    }
    g.finish();
}

/// A MoE expert's row count, rarely a multiple of 32, through StableLM's expert down matrix
/// (2048 × 5632, q4_K): ggml's one call with a partial 32-row block inside, against `gemm_packed`
/// (our AMX-BF16 kernel where the CPU has AMX; our AVX2 GEMM on the interleaved layout; else whole
/// blocks in one ggml call, the rest in a call of its own); multiply-accumulates per second.
fn prefill_leftover(c: &mut Criterion) {
    let (n, k) = (2048, 5632);
    let mut g = c.benchmark_group("prefill_leftover");
    g.sample_size(10);
    let w = weights(QuantType::Q4_K, n, k);
    let Some(p) = packed::pack(QMatRef::new(&w, QuantType::Q4_K, n, k).unwrap()).unwrap() else { return };
    for t in [38usize, 70] {
        let x = signal(t * k, 0.11);
        let mut y = vec![0f32; t * n];
        g.throughput(Throughput::Elements((t * n * k) as u64));
        let id = |who: &str| BenchmarkId::new(format!("q4_k_{}_{who}", p.layout), t);
        g.bench_function(id("one_call"), |b| b.iter(|| gemm::gemm_packed_ggml(&p, black_box(&x), &mut y).unwrap()));
        g.bench_function(id("ours"), |b| b.iter(|| gemm::gemm_packed(&p, black_box(&x), &mut y).unwrap()));
    }
    g.finish();
}

/// A few tokens (what a MoE expert gets in prefill) through StableLM's expert down matrix (2048 ×
/// 5632) in the interleaved layout, q4_K and q4_0: our GEMM (`gemm`) against our one-token kernel
/// once per token (`per_token`) and ggml's GEMM (`ggml`), at 2 to 8 tokens; the crossing of the
/// first two is where `gemm::X8_GEMM_MIN_TOKENS_*` lie. Multiply-accumulates per second. Skips where
/// the CPU does not use the interleaved layout.
fn few_tokens(c: &mut Criterion) {
    use moellava_kernels::cpu::{q4_0_x8_gemm, q4_0_x8_matvec, q4k_x8_gemm, q4k_x8_matvec};
    let (n, k) = (2048, 5632);
    let mut g = c.benchmark_group("few_tokens");
    g.sample_size(20);
    for q in [QuantType::Q4_K, QuantType::Q4_0] {
        let w = weights(q, n, k);
        let Some(p) = packed::pack(QMatRef::new(&w, q, n, k).unwrap()).unwrap().filter(|p| p.layout == "CPU_REPACK") else {
            continue;
        };
        let (gemm, matvec) = match q {
            QuantType::Q4_K => (q4k_x8_gemm::matmul as gemm::Gemm, q4k_x8_matvec::matvec as gemm::Matvec),
            _ => (q4_0_x8_gemm::matmul as gemm::Gemm, q4_0_x8_matvec::matvec as gemm::Matvec),
        };
        for t in [2usize, 3, 4, 6, 8] {
            let x = signal(t * k, 0.11);
            let mut y = vec![0f32; t * n];
            let mut yu = vec![std::mem::MaybeUninit::new(0f32); t * n];
            g.throughput(Throughput::Elements((t * n * k) as u64));
            let id = |who: &str| BenchmarkId::new(format!("{}_{who}", q.name()), t);
            g.bench_function(id("gemm"), |b| b.iter(|| gemm(p.bytes(), p.padded_rows, k, n, black_box(&x), &mut yu).unwrap()));
            g.bench_function(id("per_token"), |b| {
                b.iter(|| {
                    for (xr, yr) in black_box(&x).chunks(k).zip(y.chunks_mut(n)) {
                        matvec(p.bytes(), p.padded_rows, xr, yr).unwrap();
                    }
                })
            });
            g.bench_function(id("ggml"), |b| b.iter(|| gemm::gemm_packed_ggml(&p, black_box(&x), &mut y).unwrap()));
        }
    }
    g.finish();
}

/// Prefill: 128 tokens through a 2560 × 2560 projection, by ggml's mul_mat, by per-row vec_dot and by
/// the repacked weight's kernel (AMX where the CPU has it);
/// multiply-accumulates per second.
fn prefill_matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefill_matmul");
    g.sample_size(10);
    let t = 128;
    let x = signal(t * HIDDEN, 0.11);
    for q in TYPES {
        let w = weights(q, HIDDEN, HIDDEN);
        let m = QMatRef::new(&w, q, HIDDEN, HIDDEN).unwrap();
        let mut y = vec![0f32; t * HIDDEN];
        g.throughput(Throughput::Elements((t * HIDDEN * HIDDEN) as u64));
        g.bench_function(BenchmarkId::new("ggml_mul_mat", q.name()), |b| {
            b.iter(|| gemm::gemm(m, black_box(&x), &mut y).unwrap())
        });
        g.bench_function(BenchmarkId::new("vec_dot_rows", q.name()), |b| {
            b.iter(|| matmul_vec_dot(m, black_box(&x), &mut y).unwrap())
        });
        if let Some(p) = packed::pack(m).unwrap() {
            g.bench_function(BenchmarkId::new(format!("packed_{}", p.layout), q.name()), |b| {
                b.iter(|| gemm::gemm_packed(&p, black_box(&x), &mut y).unwrap())
            });
        }
    }
    g.finish();
}

/// Causal attention over a 512-token prefill (QKᵀ and PV), multiply-accumulates per second.
fn attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    let t = 512;
    let w = N_HEAD * HEAD_DIM;
    let (q, k, v) = (signal(t * w, 0.13), signal(t * w, 0.17), signal(t * w, 0.19));
    // Causal: about t²/2 scores per head, each HEAD_DIM MACs for QKᵀ and again for PV.
    g.throughput(Throughput::Elements((t * t / 2 * HEAD_DIM * 2 * N_HEAD) as u64));
    let s = attn::AttnShape { n_head: N_HEAD, n_kv_head: N_HEAD, head_dim: HEAD_DIM, first_pos: 0, causal: true, scale: 0.11 };
    g.bench_function("batched_prefill_512_phi2", |b| b.iter(|| attn::attention_batched(black_box(&q), &k, &v, s)));
    g.bench_function("per_query_prefill_512_phi2", |b| b.iter(|| attn::attention_per_query(black_box(&q), &k, &v, s)));
    // the KV cache's default element type for quantised files
    let (k16, v16): (Vec<half::f16>, Vec<half::f16>) =
        (k.iter().map(|x| half::f16::from_f32(*x)).collect(), v.iter().map(|x| half::f16::from_f32(*x)).collect());
    g.bench_function("batched_prefill_512_phi2_f16", |b| b.iter(|| attn::attention_batched(black_box(&q), &k16, &v16, s)));
    g.finish();

    // Decode: one query over a 784-position cache (the 768-position image prompt + 16 tokens), one
    // layer; the throughput is the cache bytes read, f32 and f16 keys/values.
    let mut g = c.benchmark_group("attention_decode");
    let p = 784;
    let (q1, k, v) = (signal(w, 0.13), signal(p * w, 0.17), signal(p * w, 0.19));
    let (k16, v16): (Vec<half::f16>, Vec<half::f16>) =
        (k.iter().map(|x| half::f16::from_f32(*x)).collect(), v.iter().map(|x| half::f16::from_f32(*x)).collect());
    let s = attn::AttnShape { first_pos: p - 1, ..s };
    g.throughput(Throughput::Bytes((2 * p * w * 4) as u64));
    g.bench_function("per_query_784_phi2_f32", |b| b.iter(|| attn::attention_per_query(black_box(&q1), &k, &v, s)));
    g.throughput(Throughput::Bytes((2 * p * w * 2) as u64));
    g.bench_function("per_query_784_phi2_f16", |b| b.iter(|| attn::attention_per_query(black_box(&q1), &k16, &v16, s)));
    g.finish();
}

/// The memory-bandwidth probe `moellava bench` uses: a 512 MiB buffer read by all threads.
fn memory_bandwidth(c: &mut Criterion) {
    let mut g = c.benchmark_group("memory");
    g.sample_size(10);
    let bytes = 512usize << 20;
    let buf: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("read_512MiB", |b| b.iter(|| bandwidth::sum_parallel(black_box(&buf))));
    g.finish();
}

/// Decode as a model runs it: one token through a different 10240 × 2560 matrix each call, cycling over
/// copies that together hold ~1 GiB (far beyond the caches, as a model's layers are), weight bytes per
/// second. Compare with `matvec` (the same matrix again and again, cache-resident on a large-L3 CPU)
/// and with `memory/read_512MiB`: this is the streaming rate decode can actually reach.
fn matvec_streaming(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec_streaming");
    g.sample_size(20);
    let x = signal(HIDDEN, 0.11);
    let mut y = vec![0f32; FFN];
    for q in [QuantType::Q4_0, QuantType::Q4_K, QuantType::Q8_0] {
        let w = weights(q, FFN, HIDDEN);
        let copies = ((1usize << 30) / w.len()).max(2);
        let packed: Vec<_> =
            (0..copies).filter_map(|_| packed::pack(QMatRef::new(&w, q, FFN, HIDDEN).unwrap()).unwrap()).collect();
        let plain: Vec<Vec<u8>> = (0..copies).map(|_| w.clone()).collect();
        g.throughput(Throughput::Bytes(w.len() as u64));
        let mut i = 0;
        g.bench_function(BenchmarkId::new(q.name(), "10240x2560"), |b| {
            b.iter(|| {
                i = (i + 1) % copies;
                matmul(QMatRef::new(&plain[i], q, FFN, HIDDEN).unwrap(), black_box(&x), &mut y).unwrap()
            })
        });
        if own_plain_rows(q) {
            g.bench_function(BenchmarkId::new(format!("{}_vec_dot", q.name()), "10240x2560"), |b| {
                b.iter(|| {
                    i = (i + 1) % copies;
                    matmul_vec_dot(QMatRef::new(&plain[i], q, FFN, HIDDEN).unwrap(), black_box(&x), &mut y).unwrap()
                })
            });
        }
        drop(plain);
        if let Some(layout) = packed.first().map(|p| p.layout) {
            g.bench_function(BenchmarkId::new(format!("{}_{layout}", q.name()), "10240x2560"), |b| {
                b.iter(|| {
                    i = (i + 1) % packed.len();
                    gemm::gemm_packed(&packed[i], black_box(&x), &mut y).unwrap()
                })
            });
            if gemm::uses_own_matvec(&packed[0]) {
                g.bench_function(BenchmarkId::new(format!("{}_{layout}_ggml", q.name()), "10240x2560"), |b| {
                    b.iter(|| {
                        i = (i + 1) % packed.len();
                        gemm::gemm_packed_ggml(&packed[i], black_box(&x), &mut y).unwrap()
                    })
                });
            }
        }
    }
    g.finish();
}

criterion_group!(
    benches,
    matvec,
    matvec_streaming,
    prefill_matmul,
    prefill_ffn,
    prefill_leftover,
    few_tokens,
    attention,
    memory_bandwidth
);
criterion_main!(benches);
