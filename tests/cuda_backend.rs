//! The CUDA backend against the CPU backend: every kernel on the same inputs and quantised weights,
//! then whole models of all three families (prompt logits with an image, greedy tokens).
//!
//! Needs a GPU: where `CudaBackend::open` fails (no driver, no device, no NVRTC) each test prints
//! `skipped: <reason>` and passes; CI has no GPU, so these run only on a machine that has one
//! (`cargo test --release --test cuda_backend -- --nocapture`). The kernels' weight decoding is
//! checked without a GPU by kernels/tests/cuda_dequant_host.rs, their compilation by cuda_compile.rs.
//!
//! The model tests convert generated checkpoints, or, with `MOELLAVA_CUDA_MODELS=DIR`, load
//! `DIR/{phi2,stablelm,qwen}-{q4,f16}.gguf` converted beforehand (what `make gpu-bundle` carries to a
//! GPU machine that has neither the Python venv nor room for the checkpoints).

mod common;
#[allow(dead_code)] // this file uses the F16 and q4 bounds only
#[path = "common/tolerance.rs"]
mod tolerance;

use common::Ckpt;
use moellava_kernels::cpu::Activation;
use moellava_kernels::quant::{dequantize_rows, quantize_rows_vec};
use moellava_kernels::QuantType;
use moellava_runtime::backend::cpu::CpuBackend;
use moellava_runtime::backend::cuda::CudaBackend;
use moellava_runtime::backend::{AttnShape, Backend, KvType};
use moellava_runtime::image;
use moellava_runtime::model::llm::Trace;
use moellava_runtime::model::moe::Gating;
use moellava_runtime::model::weights::Weight;
use moellava_runtime::model::{GenerateOptions, Model};

/// Kernel outputs against an exact reference: f32 arithmetic in another summation order (the matmul
/// reference is f64 over ggml's dequantised weights, since the CPU backend rounds activations to 8 or
/// 16 bits for ggml's dot products and the GPU kernels do not); the bar for f16 compute is 5e-4.
const KERNEL_NMSE: f64 = 1e-6;

fn gpu() -> Option<CudaBackend> {
    match CudaBackend::open(0) {
        Ok(b) => {
            println!("GPU: {}", b.describe());
            Some(b)
        }
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

/// `{backbone}-{plan}.gguf`: from `MOELLAVA_CUDA_MODELS`, or converted from a generated checkpoint
/// into `tmp` (`None`, with the reason printed, when neither is possible).
fn model_file(backbone: &'static str, plan: &str, tmp: &std::path::Path) -> Option<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("MOELLAVA_CUDA_MODELS") {
        let p = std::path::Path::new(&dir).join(format!("{backbone}-{plan}.gguf"));
        return p.exists().then_some(p).or_else(|| {
            println!("skipped {backbone} {plan}: no {backbone}-{plan}.gguf in MOELLAVA_CUDA_MODELS");
            None
        });
    }
    let dir = common::checkpoint(Ckpt::moe(backbone, "clip"), &[])?;
    let path = tmp.join(format!("{backbone}-{plan}.gguf"));
    let args: &[&str] = if plan == "q4" { &["--preset", "q4"] } else { &["--type", "f16"] };
    common::convert(&dir, &path, args);
    Some(path)
}

fn nmse(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let err: f64 = got.iter().zip(want).map(|(g, w)| (*g as f64 - *w as f64).powi(2)).sum();
    let norm: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    err / norm.max(1e-30)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = nmse(got, want);
    assert!(e <= tol, "{what}: NMSE {e:.3e} > {tol:.0e}");
}

fn signal(n: usize, k: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * k).sin() * (1.0 + 0.5 * ((i as f32) * 0.01).cos())).collect()
}

fn weight(q: QuantType, rows: usize, cols: usize) -> Weight {
    let bytes = quantize_rows_vec(q, &signal(rows * cols, 0.37), cols).unwrap();
    Weight::from_bytes(&format!("test.{q:?}"), bytes, q, rows, cols)
}

#[test]
fn matmul_matches_cpu_for_every_type_and_row_count() {
    let Some(g) = gpu() else { return };
    let (n, k) = (96, 512);
    for q in QuantType::ALL {
        let w = weight(q, n, k);
        let mut wdq = vec![0f32; n * k];
        dequantize_rows(q, w.bytes(), &mut wdq).unwrap();
        for t in [1, 3, 9, 40] {
            let x = signal(t * k, 0.11);
            let want: Vec<f32> = (0..t * n)
                .map(|i| {
                    let (r, c) = (i / n, i % n);
                    (0..k).map(|j| x[r * k + j] as f64 * wdq[c * k + j] as f64).sum::<f64>() as f32
                })
                .collect();
            let cpu = CpuBackend.to_host(&CpuBackend.matmul(&CpuBackend.from_host(x.clone(), k), &w).unwrap());
            let xg = g.from_host(x, k);
            let got = g.to_host(&g.matmul(&xg, &w).unwrap());
            let plain = g.to_host(&g.matmul_reference(&xg, &w).unwrap());
            println!(
                "{q:?} T={t}: NMSE vs exact: gpu {:.2e}, gpu plain kernel {:.2e}, cpu (ggml, rounded activations) {:.2e}",
                nmse(&got, &want),
                nmse(&plain, &want),
                nmse(&cpu, &want)
            );
            assert_close(&format!("{q:?} plain matvec T={t}"), &plain, &want, KERNEL_NMSE);
            assert_close(&format!("{q:?} matmul T={t}"), &got, &plain, KERNEL_NMSE);
            // Per-row results are the same whatever the batch: compare each row alone, bit for bit.
            let batch = g.to_host(&g.matmul_per_row(&xg, &w).unwrap());
            for r in 0..t {
                let alone = g.to_host(&g.matmul_per_row(&g.gather_rows(&xg, &[r]), &w).unwrap());
                assert_eq!(&batch[r * n..(r + 1) * n], &alone[..], "{q:?}: row {r} of {t} differs from alone");
            }
        }
    }
}

#[test]
fn element_and_row_ops_match_cpu() {
    let Some(g) = gpu() else { return };
    let (rows, cols) = (7, 320);
    let x = signal(rows * cols, 0.23);
    let y = signal(rows * cols, 0.41);
    let w = signal(cols, 0.05);
    let b = signal(cols, 0.07);
    let check = |what: &str,
                 cpu: &dyn Fn(&mut moellava_runtime::backend::cpu::HostMat),
                 gpu_op: &dyn Fn(&mut <CudaBackend as Backend>::Act)| {
        let mut c = CpuBackend.from_host(x.clone(), cols);
        cpu(&mut c);
        let mut d = g.from_host(x.clone(), cols);
        gpu_op(&mut d);
        assert_close(what, &g.to_host(&d), &c.data, KERNEL_NMSE);
    };
    check("add_bias", &|m| CpuBackend.add_bias(m, &b), &|m| g.add_bias(m, &b));
    check("layer_norm", &|m| CpuBackend.layer_norm(m, &w, Some(&b), 1e-5), &|m| g.layer_norm(m, &w, Some(&b), 1e-5));
    check("layer_norm (no bias)", &|m| CpuBackend.layer_norm(m, &w, None, 1e-5), &|m| g.layer_norm(m, &w, None, 1e-5));
    check("rms_norm", &|m| CpuBackend.rms_norm(m, &w, 1e-6), &|m| g.rms_norm(m, &w, 1e-6));
    for a in [Activation::GeluErf, Activation::GeluTanh, Activation::QuickGelu, Activation::Silu] {
        check(&format!("{a:?}"), &|m| CpuBackend.activate(m, a), &|m| g.activate(m, a));
    }
    let (yc, yg) = (CpuBackend.from_host(y.clone(), cols), g.from_host(y.clone(), cols));
    check("mul", &|m| CpuBackend.mul(m, &yc), &|m| g.mul(m, &yg));
    check("add", &|m| CpuBackend.add(m, &yc), &|m| g.add(m, &yg));
    // Rope: 5 heads of 64, 32 rotated (Phi-2's partial rotary), positions not in order.
    let pos = [0, 5, 17, 300, 2047, 9, 1];
    check("rope", &|m| CpuBackend.rope(m, 5, 64, 32, &pos, 10000.0), &|m| g.rope(m, 5, 64, 32, &pos, 10000.0));
    // Split, gather, scatter, concat.
    let (xc, xg) = (CpuBackend.from_host(x.clone(), cols), g.from_host(x.clone(), cols));
    for (pc, pg) in CpuBackend.split_cols(&xc, &[64, 192, 64]).iter().zip(g.split_cols(&xg, &[64, 192, 64])) {
        assert_eq!(g.to_host(&pg), pc.data, "split_cols");
    }
    let rows_sel = [6, 0, 3];
    assert_eq!(g.to_host(&g.gather_rows(&xg, &rows_sel)), CpuBackend.gather_rows(&xc, &rows_sel).data, "gather_rows");
    let src = signal(3 * cols, 0.9);
    let (mut dc, mut dg) = (CpuBackend.from_host(x.clone(), cols), g.from_host(x.clone(), cols));
    CpuBackend.scatter_add_rows(&mut dc, &CpuBackend.from_host(src.clone(), cols), &[2, 5, 2], &[0.25, 0.5, 0.75]);
    g.scatter_add_rows(&mut dg, &g.from_host(src, cols), &[2, 5, 2], &[0.25, 0.5, 0.75]);
    assert_close("scatter_add_rows", &g.to_host(&dg), &dc.data, KERNEL_NMSE);
    let cat = g.concat_rows(&[&xg, &g.zeros(0, cols), &g.gather_rows(&xg, &[1])]);
    assert_eq!(g.shape(&cat), (rows + 1, cols));
    assert_eq!(g.to_host(&cat), CpuBackend.concat_rows(&[&xc, &CpuBackend.gather_rows(&xc, &[1])]).data, "concat_rows");
}

#[test]
fn attention_matches_cpu_prompt_and_cached() {
    let Some(g) = gpu() else { return };
    // 8 query heads over 2 KV heads (grouped-query), head dim 64.
    let (nh, nkv, hd) = (8, 2, 64);
    for (t, first_pos, causal) in [(5, 0, true), (1, 37, true), (4, 20, true), (6, 0, false)] {
        let p = first_pos + t;
        let q = signal(t * nh * hd, 0.13);
        let k = signal(p * nkv * hd, 0.29);
        let v = signal(p * nkv * hd, 0.31);
        let s = AttnShape { n_head: nh, n_kv_head: nkv, head_dim: hd, first_pos, causal, scale: 1.0 / (hd as f32).sqrt() };
        let want = CpuBackend.attention(
            &CpuBackend.from_host(q.clone(), nh * hd),
            &CpuBackend.from_host(k.clone(), nkv * hd),
            &CpuBackend.from_host(v.clone(), nkv * hd),
            s,
        );
        let (qg, kg, vg) = (g.from_host(q.clone(), nh * hd), g.from_host(k.clone(), nkv * hd), g.from_host(v.clone(), nkv * hd));
        assert_close(
            &format!("attention t={t} at {first_pos}"),
            &g.to_host(&g.attention(&qg, &kg, &vg, s)),
            &want.data,
            KERNEL_NMSE,
        );
        for ty in [KvType::F32, KvType::F16] {
            // The cache starts too small: appending must grow it.
            let (mut kc, mut vc) = (CpuBackend.kv_with_capacity(nkv * hd, ty, 1), CpuBackend.kv_with_capacity(nkv * hd, ty, 1));
            let (mut kd, mut vd) = (g.kv_with_capacity(nkv * hd, ty, 1), g.kv_with_capacity(nkv * hd, ty, 1));
            for range in [0..p / 2, p / 2..p] {
                let cols = nkv * hd;
                let kk = k[range.start * cols..range.end * cols].to_vec();
                let vv = v[range.start * cols..range.end * cols].to_vec();
                CpuBackend.kv_append(&mut kc, &CpuBackend.from_host(kk.clone(), cols));
                CpuBackend.kv_append(&mut vc, &CpuBackend.from_host(vv.clone(), cols));
                g.kv_append(&mut kd, &g.from_host(kk, cols));
                g.kv_append(&mut vd, &g.from_host(vv, cols));
            }
            let want = CpuBackend.attention_cached(&CpuBackend.from_host(q.clone(), nh * hd), &kc, &vc, s);
            let got = g.to_host(&g.attention_cached(&qg, &kd, &vd, s));
            assert_close(&format!("cached attention {ty} t={t} at {first_pos}"), &got, &want.data, KERNEL_NMSE);
        }
    }
}

/// `max |a − b| / max |b|`, the metric of the documented model tolerances (tests/common/tolerance.rs).
fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let num = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max);
    num / b.iter().map(|y| (*y as f64).abs()).fold(1e-30, f64::max)
}

/// The prompt's last-position logits and 8 greedy tokens of a model, on any backend.
fn prompt_and_tokens<B: Backend>(m: &Model<B>, img: &image::Rgb8) -> (Vec<f32>, Vec<u32>) {
    let prompt = m.question_prompt("What is in the picture?", true);
    let input = m.prepare(&prompt, Some(img)).unwrap();
    let mut c = m.new_kv_cache(input.ids.len() + 1);
    let logits = m.forward(input.embeds, &mut c, &mut Gating::Deterministic, &mut Trace::default()).unwrap();
    m.end_sequence().unwrap();
    let o = GenerateOptions { max_new_tokens: 8, ignore_eos: true, ..GenerateOptions::default() };
    let tokens = m.generate(m.prepare(&prompt, Some(img)).unwrap(), &o, &mut |_| {}).unwrap().tokens;
    (logits, tokens)
}

/// Whole models: at f16 (the CPU rounds activations to f16 for ggml's dot products, the GPU keeps
/// f32) within the documented F16 tolerance and the same 8 greedy tokens; at the q4 preset (the CPU
/// also rounds activations to 8 bits) within the documented q4 bound and the same first token.
#[test]
fn whole_models_match_cpu_on_every_family() {
    let Some(_) = gpu() else { return };
    let img = image::load(&common::root().join("tests/fixtures/images/wide.png")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for backbone in ["phi2", "stablelm", "qwen"] {
        for plan in ["q4", "f16"] {
            let Some(path) = model_file(backbone, plan, tmp.path()) else { continue };
            let (want, want_tokens) = prompt_and_tokens(&Model::load(&path).unwrap(), &img);
            let (got, tokens) = prompt_and_tokens(&Model::load_with(&path, CudaBackend::open(0).unwrap()).unwrap(), &img);
            let e = max_rel(&got, &want);
            println!("{backbone} {plan}: prompt logits max-rel {e:.2e}, tokens cuda {tokens:?} cpu {want_tokens:?}");
            let (bound, agree) =
                if plan == "f16" { (tolerance::F16_REL, tolerance::F16_GREEDY_AGREE) } else { (tolerance::Q4_PRESET_REL, 1) };
            assert!(e <= bound, "{backbone} {plan}: prompt logits max-rel {e:.2e} > {bound:.0e}");
            assert_eq!(tokens[..agree], want_tokens[..agree], "{backbone} {plan}: greedy tokens differ between cuda and cpu");
        }
    }
}

/// The VRAM tier at 25 % of the experts: with `copy` the very logits and tokens of the all-resident
/// GPU run (same kernels on the same bytes); with `cpu` and `auto` some experts run on the CPU (rounded
/// activations), so the q4 bound and the first token; resident bytes never above the budget.
#[test]
fn expert_tier_under_a_small_budget() {
    use moellava_runtime::backend::vram::{GpuMem, MissPolicy};
    let Some(_) = gpu() else { return };
    let img = image::load(&common::root().join("tests/fixtures/images/wide.png")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let Some(path) = model_file("phi2", "q4", tmp.path()) else { return };
    let (want, want_tokens) = prompt_and_tokens(&Model::load_with(&path, CudaBackend::open(0).unwrap()).unwrap(), &img);
    for policy in [MissPolicy::Copy, MissPolicy::Cpu, MissPolicy::Auto] {
        let gpu = Model::load_with(&path, CudaBackend::open(0).unwrap()).unwrap();
        let budget = gpu.backend.enable_expert_tier(&gpu.file, "25%".parse::<GpuMem>().unwrap(), policy).unwrap();
        let (got, tokens) = prompt_and_tokens(&gpu, &img);
        let r = gpu.backend.tier_report().unwrap();
        println!("{policy:?}: {r:?}");
        if policy == MissPolicy::Copy {
            assert_eq!(got, want, "copy at 25%: logits differ from the all-resident run");
            assert_eq!(tokens, want_tokens, "copy at 25%: tokens differ from the all-resident run");
        } else {
            let e = max_rel(&got, &want);
            assert!(e <= tolerance::Q4_PRESET_REL, "{policy:?} at 25%: max-rel {e:.2e}");
            assert_eq!(tokens[0], want_tokens[0], "{policy:?} at 25%: first token");
        }
        assert_eq!(r.budget_bytes, budget);
        assert!(r.resident_bytes <= budget, "resident {} > budget {budget}", r.resident_bytes);
        assert!(r.counters.misses > 0, "a 25% budget must miss");
        if policy == MissPolicy::Cpu {
            assert_eq!(r.counters.cpu_computed, r.counters.misses);
        }
    }
}
