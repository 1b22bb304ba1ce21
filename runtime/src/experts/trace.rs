//! Route traces (`--route-trace FILE.jsonl`): which experts each MoE layer chose, per forward call and
//! token, with the prefetch guess for the layer, so that cache policies can be replayed offline.
//!
//! ```text
//! {"kind":"header","version":1,"model":"m.gguf","n_expert":4,"top_k":2,"moe_layers":[1,3],"expert_bytes":N,"slot_bytes":S}
//! {"kind":"route","call":0,"seq":0,"pos":0,"layer":1,"experts":[[0,2],[1,2],…],"guess":null}
//! {"kind":"route","call":0,"seq":0,"pos":0,"layer":3,"experts":[[3,0],…],"guess":[0,3]}
//! ```
//! `experts[t]` are the choices of token `t` of the call that the capacity rule kept (normally both).
//! `guess` is what the previous MoE layer of the same call predicted for this layer (the next layer's
//! router applied to that layer's input); `null` for a call's first MoE layer. `seq` counts questions
//! (generations), `call` forward calls (a prefill, then one per decoded token).

use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceHeader {
    pub kind: String,
    pub version: u32,
    pub model: String,
    pub n_expert: usize,
    pub top_k: usize,
    pub moe_layers: Vec<usize>,
    pub expert_bytes: u64,
    pub slot_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteLine {
    pub kind: String,
    pub call: u64,
    pub seq: u64,
    pub pos: usize,
    pub layer: usize,
    pub experts: Vec<Vec<usize>>,
    pub guess: Option<Vec<usize>>,
}

impl RouteLine {
    /// The distinct experts the layer computes in this call, ascending.
    pub fn needed(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.experts.iter().flatten().copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// One MoE layer of one call: `(layer, kept experts per token, the guess for this layer)`.
pub type LayerRouting = (usize, Vec<Vec<usize>>, Option<Vec<usize>>);

/// Appends route lines to a trace file.
pub struct TraceWriter {
    out: BufWriter<std::fs::File>,
    path: std::path::PathBuf,
    call: u64,
    seq: u64,
}

impl TraceWriter {
    pub fn create(path: &Path, header: &TraceHeader) -> Result<TraceWriter> {
        let f = std::fs::File::create(path).map_err(|e| io_err(path, e))?;
        let mut w = TraceWriter { out: BufWriter::new(f), path: path.to_path_buf(), call: 0, seq: 0 };
        w.line(&serde_json::to_string(header).expect("plain data"))?;
        Ok(w)
    }

    fn line(&mut self, s: &str) -> Result<()> {
        writeln!(self.out, "{s}").map_err(|e| io_err(&self.path, e))
    }

    /// Records one forward call: per MoE layer `(layer, experts per token, guess)`.
    pub fn record_call(&mut self, pos: usize, layers: &[LayerRouting]) -> Result<()> {
        for (layer, experts, guess) in layers {
            let l = RouteLine {
                kind: "route".into(),
                call: self.call,
                seq: self.seq,
                pos,
                layer: *layer,
                experts: experts.clone(),
                guess: guess.clone(),
            };
            self.line(&serde_json::to_string(&l).expect("plain data"))?;
        }
        self.call += 1;
        Ok(())
    }

    /// Ends a generation (one question): flushes, so the file is complete up to here.
    pub fn end_sequence(&mut self) -> Result<()> {
        self.seq += 1;
        self.out.flush().map_err(|e| io_err(&self.path, e))
    }
}

fn io_err(path: &Path, e: std::io::Error) -> RuntimeError {
    RuntimeError::Unsupported(format!("route trace {}: {e}", path.display()))
}

/// Reads a trace: the header and the route lines, checked against it.
pub fn read(path: &Path) -> Result<(TraceHeader, Vec<RouteLine>)> {
    let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let bad = |n: usize, what: String| RuntimeError::Unsupported(format!("route trace {} line {n}: {what}", path.display()));
    let mut lines = std::io::BufReader::new(f).lines();
    let first = lines.next().ok_or_else(|| bad(1, "empty file; expected a header line".into()))?.map_err(|e| io_err(path, e))?;
    let header: TraceHeader = serde_json::from_str(&first).map_err(|e| bad(1, format!("not a trace header: {e}")))?;
    if header.kind != "header" || header.version != 1 {
        return Err(bad(1, format!("expected kind \"header\" version 1, got {:?} version {}", header.kind, header.version)));
    }
    let mut routes = Vec::new();
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        let line = line.map_err(|e| io_err(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: RouteLine = serde_json::from_str(&line).map_err(|e| bad(n, format!("not a route line: {e}")))?;
        if !header.moe_layers.contains(&r.layer) {
            return Err(bad(n, format!("layer {} is not a MoE layer of the header ({:?})", r.layer, header.moe_layers)));
        }
        let out_of_range = r.experts.iter().flatten().chain(r.guess.iter().flatten()).find(|e| **e >= header.n_expert);
        if let Some(e) = out_of_range {
            return Err(bad(n, format!("expert {e} ≥ n_expert {}", header.n_expert)));
        }
        routes.push(r);
    }
    Ok((header, routes))
}
