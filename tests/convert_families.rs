//! Every family × tower, and dense checkpoints, convert at f32, f16, q8_0 and every preset; gguf-py's
//! reader finds each tensor with its planned type and shape, and its dequantized values equal the
//! source tensors within the type's error (f32 exact, f16 one rounding; quantized types within NMSE
//! bounds) — tools/checks/verify_conversion.py.

mod common;

use common::{Ckpt, ALL_MOE};
use moellava_convert::{ConvertOptions, PlanChoice, Preset};
use moellava_kernels::QuantType;
use moellava_runtime::gguf::GgufFile;
use serde_json::json;

fn plans() -> Vec<(&'static str, PlanChoice)> {
    let ty = |q| PlanChoice { all: Some(q), ..Default::default() };
    let pre = |p| PlanChoice { preset: Some(p), ..Default::default() };
    vec![
        ("f32", ty(QuantType::F32)),
        ("f16", ty(QuantType::F16)),
        ("q8_0", ty(QuantType::Q8_0)),
        ("preset-q4", pre(Preset::Q4)),
        ("preset-q5", pre(Preset::Q5)),
        ("preset-q8", pre(Preset::Q8)),
        ("preset-f16", pre(Preset::F16)),
    ]
}

#[test]
fn every_family_converts_at_every_plan_and_matches_its_sources() {
    let Some(py) = common::python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for c in ALL_MOE.iter().copied().chain([
        Ckpt::dense("phi2", "clip"),
        Ckpt::dense("stablelm", "siglip"),
        Ckpt::dense("qwen", "clip"),
    ]) {
        let dir = common::checkpoint(c, &[]).unwrap();
        for (plan_name, plan) in plans() {
            let out = tmp.path().join(format!("{}-{plan_name}.gguf", c.key()));
            let opts = ConvertOptions {
                input: dir.join("model"),
                vision_tower: None,
                output: out.clone(),
                plan,
                split: false,
                force: false,
            };
            let conv = moellava_convert::prepare(opts).unwrap_or_else(|e| panic!("{} {plan_name}: {e}", c.key()));
            conv.run(&mut |_| {}).unwrap();
            // Our own reader agrees on the tensor count and the MoE metadata.
            let f = GgufFile::open(&out).unwrap();
            assert_eq!(f.meta.tensors().len(), conv.tensors.len());
            assert_eq!(f.meta.get("moellava.moe.layers").is_some(), !c.dense, "{}", c.key());
            let tensors: Vec<_> = conv
                .tensors
                .iter()
                .map(|p| {
                    let sources: Vec<_> = p
                        .tensor
                        .sources
                        .iter()
                        .map(|s| json!({"file": conv.source_file(s).unwrap(), "name": s.name}))
                        .collect();
                    json!({"name": p.tensor.name, "type": p.qtype.name(), "shape": p.tensor.shape, "rows": p.tensor.rows, "sources": sources})
                })
                .collect();
            files.push(json!({"gguf": out, "tensors": tensors}));
        }
    }
    let manifest = tmp.path().join("manifest.json");
    std::fs::write(&manifest, json!({ "files": files }).to_string()).unwrap();
    let out = common::run_python(&py, "tools/checks/verify_conversion.py", &[manifest.to_str().unwrap()]);
    assert!(out.contains("tensors match their sources") && !out.contains(".gguf:"), "{out}");
}

#[test]
fn fallbacks_and_plan_are_recorded() {
    // SigLIP's 160-wide tower and 320-wide FFN cannot take q4_k (256-value blocks): they fall back to q5_0.
    let Some(dir) = common::checkpoint(Ckpt::moe("stablelm", "siglip"), &[]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.gguf");
    let plan = PlanChoice { all: Some(QuantType::Q4_K), ..Default::default() };
    let opts =
        ConvertOptions { input: dir.join("model"), vision_tower: None, output: out.clone(), plan, split: false, force: false };
    let conv = moellava_convert::prepare(opts).unwrap();
    let fb: Vec<_> = conv.fallbacks.iter().map(|f| (f.class.name(), f.from.name(), f.to.name())).collect();
    assert!(fb.contains(&("vision", "q4_k", "q5_0")), "{fb:?}");
    assert!(fb.contains(&("projector", "q4_k", "q5_0")), "{fb:?}");
    conv.run(&mut |_| {}).unwrap();
    let f = GgufFile::open(&out).unwrap();
    assert!(f.meta.get_str("moellava.quant_plan").unwrap().starts_with("experts=q4_k dense=q4_k"));
    assert_eq!(f.meta.tensor_info("v.blk.0.ffn_up.weight").unwrap().ggml_type.name(), "q5_0");
    assert_eq!(f.meta.tensor_info("blk.0.ffn_up_exps.weight").unwrap().shape(), vec![4, 768, 256]);
    assert_eq!(f.meta.tensor_info("blk.0.attn_norm.weight").unwrap().ggml_type.name(), "f32");
}
