//! What `moellava inspect` reports about a GGUF file: metadata, tokenizer summary, the tensor
//! table, bytes per tensor class and expert bytes per MoE layer — as text or as one JSON object.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Value as Json};

use crate::gguf::{GgufMeta, Value};
use crate::tensor_class::TensorClass;

/// Arrays longer than this are shortened in reports.
pub const ARRAY_PREVIEW: usize = 16;

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ClassBytes {
    pub tensors: usize,
    pub bytes: u64,
    pub params: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ExpertLayer {
    pub layer: usize,
    pub tensors: usize,
    pub bytes: u64,
    pub n_expert: u64,
    pub bytes_per_expert: u64,
}

/// Sizes of a GGUF's tensors grouped by class and by MoE layer.
#[derive(Clone, Debug)]
pub struct Report<'a> {
    pub meta: &'a GgufMeta,
    pub classes: BTreeMap<TensorClass, ClassBytes>,
    pub expert_layers: Vec<ExpertLayer>,
}

impl<'a> Report<'a> {
    pub fn new(meta: &'a GgufMeta) -> Report<'a> {
        let mut classes: BTreeMap<TensorClass, ClassBytes> = BTreeMap::new();
        let mut layers: BTreeMap<usize, ExpertLayer> = BTreeMap::new();
        for t in meta.tensors() {
            let c = classes.entry(TensorClass::of(&t.name)).or_default();
            c.tensors += 1;
            c.bytes += t.n_bytes;
            c.params += t.n_elements();
            if let Some(layer) = TensorClass::expert_layer(&t.name) {
                // Stacked experts: the outermost dimension (ne[last]) is the expert index.
                let n_expert = if t.dims.len() >= 3 { *t.dims.last().unwrap_or(&1) } else { 1 };
                let e = layers.entry(layer).or_insert(ExpertLayer { layer, tensors: 0, bytes: 0, n_expert, bytes_per_expert: 0 });
                e.tensors += 1;
                e.bytes += t.n_bytes;
                e.n_expert = e.n_expert.max(n_expert);
            }
        }
        let expert_layers = layers
            .into_values()
            .map(|mut l| {
                l.bytes_per_expert = l.bytes / l.n_expert.max(1);
                l
            })
            .collect();
        Report { meta, classes, expert_layers }
    }

    pub fn total_bytes(&self) -> u64 {
        self.classes.values().map(|c| c.bytes).sum()
    }

    fn architecture(&self) -> Option<&str> {
        self.meta.get_str("general.architecture").ok()
    }

    /// The `--json` object: `metadata`, `tensors`, `classes` (+ `file`, `expert_layers`).
    pub fn to_json(&self) -> Json {
        let metadata: serde_json::Map<String, Json> =
            self.meta.kvs().iter().map(|(k, v)| (k.clone(), v.to_json(ARRAY_PREVIEW))).collect();
        let tensors: Vec<Json> = self
            .meta
            .tensors()
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "type": t.ggml_type.name(),
                    "shape": t.shape(),
                    "ne": t.dims,
                    "offset": self.meta.data_offset + t.offset,
                    "bytes": t.n_bytes,
                    "class": TensorClass::of(&t.name),
                })
            })
            .collect();
        let classes: serde_json::Map<String, Json> =
            self.classes.iter().map(|(c, b)| (c.name().to_string(), serde_json::to_value(b).unwrap_or(Json::Null))).collect();
        json!({
            "file": {
                "version": self.meta.version,
                "bytes": self.meta.file_len,
                "alignment": self.meta.alignment,
                "data_offset": self.meta.data_offset,
                "tensor_count": self.meta.tensors().len(),
                "kv_count": self.meta.kvs().len(),
            },
            "metadata": metadata,
            "tensors": tensors,
            "classes": classes,
            "expert_layers": self.expert_layers,
        })
    }

    /// The human-readable report.
    pub fn render_text(&self, file_name: &str) -> String {
        let m = self.meta;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{file_name}: GGUF v{}, {}, {} tensors, {} metadata keys, alignment {}",
            m.version,
            human_bytes(m.file_len),
            m.tensors().len(),
            m.kvs().len(),
            m.alignment
        );
        let arch = self.architecture().unwrap_or("(none)");
        let name = m.get_str("general.name").unwrap_or("");
        let _ = writeln!(s, "architecture: {arch}{}", if name.is_empty() { String::new() } else { format!("   name: {name}") });
        self.render_keys(&mut s, "hyper-parameters", |k| self.architecture().is_some_and(|a| k.starts_with(&format!("{a}."))));
        self.render_keys(&mut s, "MoE", |k| k.starts_with("moellava."));
        self.render_keys(&mut s, "vision", |k| k.starts_with("clip."));
        self.render_tokenizer(&mut s);
        self.render_keys(&mut s, "other metadata", |k| {
            !(k.starts_with("tokenizer.")
                || k.starts_with("moellava.")
                || k.starts_with("clip.")
                || self.architecture().is_some_and(|a| k.starts_with(&format!("{a}."))))
        });
        let _ = writeln!(s, "\ntensors (shape is row-major, outermost first):");
        let w = m.tensors().iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
        let _ = writeln!(s, "  {:<w$}  {:<7}  {:<22}  {:>12}  {:>12}", "name", "type", "shape", "bytes", "offset");
        for t in m.tensors() {
            let shape = format!("{:?}", t.shape());
            let _ = writeln!(
                s,
                "  {:<w$}  {:<7}  {:<22}  {:>12}  {:>12}",
                t.name,
                t.ggml_type.name(),
                shape,
                t.n_bytes,
                m.data_offset + t.offset
            );
        }
        let _ = writeln!(s, "\nbytes per class:");
        let total = self.total_bytes().max(1);
        for (c, b) in &self.classes {
            let pct = 100.0 * b.bytes as f64 / total as f64;
            let _ = writeln!(s, "  {:<11} {:>5} tensors  {:>12}  {:5.1}%", c.name(), b.tensors, human_bytes(b.bytes), pct);
        }
        if !self.expert_layers.is_empty() {
            let _ = writeln!(s, "\nexpert bytes per MoE layer:");
            for l in &self.expert_layers {
                let _ = writeln!(
                    s,
                    "  blk.{:<3} {} experts × {} = {}",
                    l.layer,
                    l.n_expert,
                    human_bytes(l.bytes_per_expert),
                    human_bytes(l.bytes)
                );
            }
        }
        s
    }

    fn render_keys(&self, s: &mut String, title: &str, pick: impl Fn(&str) -> bool) {
        let keys: Vec<_> = self.meta.kvs().iter().filter(|(k, _)| pick(k)).collect();
        if keys.is_empty() {
            return;
        }
        let _ = writeln!(s, "{title}:");
        for (k, v) in keys {
            let _ = writeln!(s, "  {k} = {}", brief(v));
        }
    }

    fn render_tokenizer(&self, s: &mut String) {
        let m = self.meta;
        let Ok(model) = m.get_str("tokenizer.ggml.model") else { return };
        let count = |k: &str| m.get_array(k).map(|a| a.len()).unwrap_or(0);
        let id = |k: &str| m.get_usize(k).map(|v| v.to_string()).unwrap_or_else(|_| "-".into());
        let _ = writeln!(
            s,
            "tokenizer: model {model}, pre {}, {} tokens, {} merges, bos {}, eos {}, pad {}",
            m.get_str("tokenizer.ggml.pre").unwrap_or("-"),
            count("tokenizer.ggml.tokens"),
            count("tokenizer.ggml.merges"),
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id"),
            id("tokenizer.ggml.padding_token_id"),
        );
    }
}

/// One-line rendering of a value: arrays shortened to their first elements.
fn brief(v: &Value) -> String {
    match v {
        Value::Array(a) => {
            let items: Vec<String> = a.to_json(8).iter().map(|j| j.to_string()).collect();
            let more = if a.len() > 8 { format!(", … ({} total)", a.len()) } else { String::new() };
            format!("[{}{more}]", items.join(", "))
        }
        Value::String(x) if x.len() > 120 => format!("{:?}… ({} bytes)", x.chars().take(100).collect::<String>(), x.len()),
        v => v.to_json(0).to_string(),
    }
}

/// 1536 → "1.50 KiB".
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}
