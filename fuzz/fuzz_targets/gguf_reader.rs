//! Fuzz target: the GGUF reader must turn any byte string into `Ok` or a clean `Err` — never a
//! panic, an abort, a hang or an allocation out of proportion to the input — and everything that
//! reads an accepted file (typed getters, the inspect report) must be as robust.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moellava_runtime::gguf::GgufFile;
use moellava_runtime::inspect::Report;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_vec(data.to_vec()) else { return };
    let meta = &file.meta;
    for (key, _) in meta.kvs() {
        let _ = meta.get_usize(key);
        let _ = meta.get_str(key);
        let _ = meta.get_f32(key);
        let _ = meta.get_usize_array(key);
        let _ = meta.get_str_array(key);
    }
    for t in meta.tensors() {
        let bytes = file.tensor_data(t);
        assert_eq!(bytes.len() as u64, t.n_bytes);
        let _ = t.shape();
    }
    let report = Report::new(meta);
    let _ = report.to_json();
    let _ = report.render_text("fuzz");
});
