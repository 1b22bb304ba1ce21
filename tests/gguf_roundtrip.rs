//! GGUF writer → reader round trips, the writer's all-or-nothing output, and interoperability with
//! the `gguf` Python package in both directions.

mod common;

use std::path::Path;

use moellava_kernels::quant::{self, GgmlType, QuantType};
use moellava_runtime::gguf::{writer, Array, GgufFile, GgufWriter, TensorSpec, Value};
use serde_json::json;

fn sample_kvs() -> Vec<(String, Value)> {
    let kv = |k: &str, v: Value| (k.to_string(), v);
    vec![
        kv("general.architecture", "roundtrip".into()),
        kv("general.alignment", Value::U32(64)),
        kv("t.u8", Value::U8(255)),
        kv("t.i8", Value::I8(-128)),
        kv("t.u16", Value::U16(65535)),
        kv("t.i16", Value::I16(-32768)),
        kv("t.u32", Value::U32(u32::MAX)),
        kv("t.i32", Value::I32(i32::MIN)),
        kv("t.f32", Value::F32(0.1)),
        kv("t.bool", Value::Bool(false)),
        kv("t.string", "naïve ✓ \u{0}inside".into()),
        kv("t.u64", Value::U64(u64::MAX)),
        kv("t.i64", Value::I64(i64::MIN)),
        kv("t.f64", Value::F64(std::f64::consts::PI)),
        kv("t.arr_str", Value::Array(Array::String(vec!["Ġa".into(), "".into(), "<|endoftext|>".into()]))),
        kv("t.arr_u8", Value::Array(Array::U8(vec![0, 1, 255]))),
        kv("t.arr_i32", Value::Array(Array::I32(vec![-1, 0, i32::MAX]))),
        kv("t.arr_u32", Value::Array(Array::U32(vec![7, 8]))),
        kv("t.arr_f32", Value::Array(Array::F32(vec![0.5, -2.25]))),
        kv("t.arr_bool", Value::Array(Array::Bool(vec![true, false]))),
        kv("t.arr_i64", Value::Array(Array::I64(vec![i64::MIN, 3]))),
        kv("t.arr_f64", Value::Array(Array::F64(vec![1e300, -0.0]))),
    ]
}

/// (spec, bytes) for tensors of several types, quantized by ggml from a deterministic signal.
fn sample_tensors() -> Vec<(TensorSpec, Vec<u8>)> {
    let signal = |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32) * k).sin()).collect() };
    let mut out = Vec::new();
    for (name, q, shape) in [
        ("token_embd.weight", QuantType::F16, vec![10, 64]),
        ("blk.0.attn_qkv.bias", QuantType::F32, vec![96]),
        ("blk.0.ffn_up_exps.weight", QuantType::Q4_K, vec![4, 3, 256]),
        ("blk.0.ffn_down.weight", QuantType::Q8_0, vec![5, 96]),
        ("v.patch_embd.weight", QuantType::BF16, vec![2, 3, 14, 14]),
    ] {
        let n: usize = shape.iter().product();
        let data = quant::quantize_rows_vec(q, &signal(n, 0.37), *shape.last().unwrap()).unwrap();
        out.push((TensorSpec::from_shape(name, q.ggml(), &shape), data));
    }
    out
}

fn write_sample(path: &Path) {
    let tensors = sample_tensors();
    let mut w = GgufWriter::create(path, &sample_kvs(), tensors.iter().map(|(s, _)| s.clone()).collect()).unwrap();
    for (spec, data) in &tensors {
        // Stream in uneven pieces, as the converter does.
        w.begin_tensor(&spec.name).unwrap();
        for chunk in data.chunks(37) {
            w.write_data(chunk).unwrap();
        }
        w.end_tensor().unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn writer_output_reads_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rt.gguf");
    write_sample(&path);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.meta.version, 3);
    assert_eq!(f.meta.alignment, 64);
    assert_eq!(f.meta.data_offset % 64, 0);
    let want = sample_kvs();
    assert_eq!(f.meta.kvs().len(), want.len());
    for ((k1, v1), (k2, v2)) in f.meta.kvs().iter().zip(&want) {
        assert_eq!(k1, k2);
        assert_eq!(v1, v2, "value of {k1}");
    }
    for (spec, data) in sample_tensors() {
        let (info, bytes) = f.tensor(&spec.name).unwrap();
        assert_eq!(info.ggml_type, spec.ggml_type);
        assert_eq!(info.dims, spec.dims);
        assert_eq!(bytes, &data[..], "bytes of {}", spec.name);
        assert_eq!((f.meta.data_offset + info.offset) % 64, 0, "{} is aligned", spec.name);
    }
    assert_eq!(f.meta.tensor_info("blk.0.ffn_up_exps.weight").unwrap().shape(), vec![4, 3, 256]);
    assert!(!dir.path().join("rt.gguf.tmp").exists());
}

#[test]
fn typed_getters_name_key_and_types() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rt.gguf");
    write_sample(&path);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.meta.get_u32("t.u32").unwrap(), u32::MAX);
    assert_eq!(f.meta.get_usize("t.u8").unwrap(), 255);
    assert_eq!(f.meta.get_f32("t.f64").unwrap(), std::f64::consts::PI as f32);
    assert_eq!(f.meta.get_usize_array("t.arr_u32").unwrap(), vec![7, 8]);
    let e = f.meta.get_u32("t.string").unwrap_err().to_string();
    assert_eq!(e, "metadata key 't.string' has type string, expected u32");
    let e = f.meta.get_usize("t.i8").unwrap_err().to_string();
    assert!(e.contains("'t.i8'") && e.contains("non-negative"), "{e}");
    let e = f.meta.get_str_array("t.arr_i32").unwrap_err().to_string();
    assert!(e.contains("array[i32]") && e.contains("array[string]"), "{e}");
    assert_eq!(f.meta.get_str("nope").unwrap_err().to_string(), "metadata key 'nope' not found");
    assert_eq!(f.tensor("nope").unwrap_err().to_string(), "tensor 'nope' not found");
}

fn one_tensor_writer(path: &Path) -> GgufWriter {
    let spec = TensorSpec::from_shape("a", GgmlType::F32, &[2, 4]);
    GgufWriter::create(path, &[("general.architecture".into(), "x".into())], vec![spec]).unwrap()
}

#[test]
fn unfinished_writers_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let tmp = dir.path().join("out.gguf.tmp");

    // Dropped half-way (an error or panic upstream).
    let mut w = one_tensor_writer(&out);
    assert!(tmp.exists());
    w.begin_tensor("a").unwrap();
    w.write_data(&[0u8; 8]).unwrap();
    drop(w);
    assert!(!tmp.exists() && !out.exists());

    // finish() with a tensor missing is an error and removes the temp file.
    let w = one_tensor_writer(&out);
    let e = w.finish().unwrap_err().to_string();
    assert!(e.contains("'a' not written"), "{e}");
    assert!(!tmp.exists() && !out.exists());

    // Too many bytes, too few bytes, wrong order.
    let mut w = one_tensor_writer(&out);
    assert!(w.write_tensor("a", &[0u8; 36]).unwrap_err().to_string().contains("given 36 bytes, expected 32"));
    let mut w2 = one_tensor_writer(&dir.path().join("o2.gguf"));
    w2.begin_tensor("a").unwrap();
    w2.write_data(&[0u8; 4]).unwrap();
    assert!(w2.end_tensor().unwrap_err().to_string().contains("given 4 bytes, expected 32"));
    assert!(w.begin_tensor("b").is_err());
    drop((w, w2));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "temp files left behind");

    // The Ctrl-C path: the handler removes every in-progress temp file.
    let w = one_tensor_writer(&out);
    writer::remove_incomplete_outputs();
    assert!(!tmp.exists());
    drop(w);
}

#[test]
fn writer_rejects_invalid_specs() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.gguf");
    let kvs = [("general.architecture".to_string(), Value::from("x"))];
    let bad = |specs: Vec<TensorSpec>, kvs: &[(String, Value)]| GgufWriter::create(&p, kvs, specs).err().map(|e| e.to_string());
    let e = bad(vec![TensorSpec::from_shape("w", GgmlType::Q4_K, &[2, 100])], &kvs).unwrap();
    assert!(e.contains("'w'") && e.contains("block size 256"), "{e}");
    let e = bad(vec![TensorSpec::from_shape("w", GgmlType::F32, &[2]), TensorSpec::from_shape("w", GgmlType::F32, &[2])], &kvs)
        .unwrap();
    assert!(e.contains("duplicate tensor name 'w'"), "{e}");
    let e = bad(vec![TensorSpec::from_shape("n".repeat(64), GgmlType::F32, &[2])], &kvs).unwrap();
    assert!(e.contains("64 bytes"), "{e}");
    let e = bad(vec![], &[("general.alignment".into(), Value::U32(24))]).unwrap();
    assert!(e.contains("power-of-two"), "{e}");
    let e = bad(vec![], &[("k".into(), Value::U32(1)), ("k".into(), Value::U32(2))]).unwrap();
    assert!(e.contains("'k'"), "{e}");
    assert!(!p.exists() && !dir.path().join("x.gguf.tmp").exists());
}

fn expectation_json(kvs: &[(String, Value)], tensors: &[(TensorSpec, Vec<u8>)]) -> serde_json::Value {
    let kv: serde_json::Map<_, _> =
        kvs.iter().map(|(k, v)| (k.clone(), json!({"type": v.type_name(), "value": v.to_json(usize::MAX)}))).collect();
    let ts: Vec<_> = tensors
        .iter()
        .map(|(s, d)| json!({"name": s.name, "type": s.ggml_type.name(), "ne": s.dims, "sha256": common::sha256_hex(d)}))
        .collect();
    json!({"kv": kv, "tensors": ts})
}

#[test]
fn gguf_py_reads_our_files() {
    let Some(py) = common::python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.gguf");
    write_sample(&path);
    let expect = dir.path().join("expect.json");
    std::fs::write(&expect, expectation_json(&sample_kvs(), &sample_tensors()).to_string()).unwrap();
    let out =
        common::run_python(&py, "tools/checks/gguf_interop.py", &["read", path.to_str().unwrap(), expect.to_str().unwrap()]);
    assert!(out.contains("OK"), "{out}");
}

#[test]
fn we_read_gguf_py_files() {
    let Some(py) = common::python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("theirs.gguf");
    let expect = dir.path().join("expect.json");
    common::run_python(&py, "tools/checks/gguf_interop.py", &["write", path.to_str().unwrap(), expect.to_str().unwrap()]);
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&expect).unwrap()).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let got = expectation_json(
        f.meta.kvs(),
        &f.meta
            .tensors()
            .iter()
            .map(|t| {
                (TensorSpec { name: t.name.clone(), ggml_type: t.ggml_type, dims: t.dims.clone() }, f.tensor_data(t).to_vec())
            })
            .collect::<Vec<_>>(),
    );
    assert_eq!(got["tensors"], want["tensors"]);
    for (k, w) in want["kv"].as_object().unwrap() {
        let g = &got["kv"][k];
        assert_eq!(g["type"], w["type"], "type of {k}");
        if w["type"] == "f32" {
            assert_eq!(g["value"].as_f64().unwrap() as f32, w["value"].as_f64().unwrap() as f32, "{k}");
        } else if w["type"] == "array[f32]" {
            let a: Vec<f32> = g["value"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            let b: Vec<f32> = w["value"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            assert_eq!(a, b, "{k}");
        } else {
            assert_eq!(g["value"], w["value"], "value of {k}");
        }
    }
    // And `moellava inspect` describes it, in both forms.
    let out = common::run_moellava(&["inspect", path.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["metadata"]["t.string"], "héllo wörld ✓");
    assert_eq!(j["tensors"].as_array().unwrap().len(), 4);
    assert_eq!(j["classes"]["experts"]["bytes"], 288);
    let out = common::run_moellava(&["inspect", path.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("blk.0.ffn_up_exps.weight"));
}
