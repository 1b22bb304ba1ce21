//! Streams planned tensors from the checkpoint's memory maps through the quantizer into the GGUF
//! writer, a bounded chunk of rows at a time: peak memory is one chunk, never a whole tensor.

use std::path::Path;

use moellava_kernels::quant;
use moellava_kernels::QuantType;
use moellava_runtime::gguf::{GgufWriter, TensorSpec, Value};

use crate::checkpoint::Checkpoint;
use crate::error::{ConvertError, Result};
use crate::name_map::{Origin, OutTensor};

/// f32 elements per chunk (16 MiB): bounds the converter's working memory.
const CHUNK_ELEMENTS: usize = 4 << 20;

/// A tensor with the type it is written in.
#[derive(Clone, Debug)]
pub struct Planned {
    pub tensor: OutTensor,
    pub qtype: QuantType,
}

impl Planned {
    pub fn spec(&self) -> TensorSpec {
        TensorSpec::from_shape(self.tensor.name.clone(), self.qtype.ggml(), &self.tensor.shape)
    }

    pub fn out_bytes(&self) -> u64 {
        self.qtype.bytes_for(self.tensor.n_elements() / self.tensor.row_len(), self.tensor.row_len()).unwrap_or(0) as u64
    }
}

/// Progress of a conversion, reported between chunks.
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    pub tensor: &'a str,
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

pub struct Inputs<'a> {
    pub checkpoint: &'a Checkpoint,
    pub tower: &'a Checkpoint,
}

impl<'a> Inputs<'a> {
    pub fn of(&self, o: Origin) -> &'a Checkpoint {
        match o {
            Origin::Checkpoint => self.checkpoint,
            Origin::Tower => self.tower,
        }
    }

    /// Source bytes a planned tensor reads (what "before" means in the size summary).
    pub fn source_bytes(&self, t: &OutTensor) -> u64 {
        t.sources
            .iter()
            .filter_map(|s| self.of(s.origin).get(&s.name))
            .map(|(_, e)| {
                let all = (e.end - e.start) as u64;
                match t.rows {
                    Some(r) => all / e.shape[0].max(1) as u64 * r as u64,
                    None => all,
                }
            })
            .sum()
    }
}

/// Writes one GGUF file: metadata, then every tensor streamed in order.
pub fn write_gguf(
    path: &Path,
    kvs: &[(String, Value)],
    tensors: &[Planned],
    inputs: &Inputs,
    progress: &mut dyn FnMut(Progress),
    bytes_done: &mut u64,
    bytes_total: u64,
) -> Result<()> {
    let mut w = GgufWriter::create(path, kvs, tensors.iter().map(Planned::spec).collect())?;
    for (i, p) in tensors.iter().enumerate() {
        w.begin_tensor(&p.tensor.name)?;
        if p.tensor.sources.is_empty() {
            w.write_data(&vec![0u8; p.out_bytes() as usize])?;
        }
        // Sources are concatenated along the outermost dimension; a row may span two sources (the
        // parts of a fused QKV bias), so rows are quantized from a carry-over buffer.
        let row_len = p.tensor.row_len();
        let per_chunk = (CHUNK_ELEMENTS / row_len).max(1) * row_len;
        let mut pending: Vec<f32> = Vec::new();
        let mut out = Vec::new();
        for src in &p.tensor.sources {
            let (file, entry) = inputs.of(src.origin).get(&src.name).ok_or_else(|| ConvertError::Tensor {
                path: inputs.of(src.origin).dir.display().to_string(),
                tensor: src.name.clone(),
                what: "disappeared between planning and writing".into(),
            })?;
            let total = match p.tensor.rows {
                Some(r) => r * (entry.n_elements() / entry.shape[0].max(1)),
                None => entry.n_elements(),
            };
            let mut done = 0;
            while done < total {
                let n = per_chunk.min(total - done);
                let at = pending.len();
                pending.resize(at + n, 0.0);
                file.read_f32(&src.name, done, &mut pending[at..])?;
                let whole = pending.len() / row_len * row_len;
                out.resize(p.qtype.bytes_for(whole / row_len, row_len).unwrap_or(0), 0);
                quant::quantize_rows_par(p.qtype, &pending[..whole], row_len, &mut out)?;
                w.write_data(&out)?;
                pending.drain(..whole);
                done += n;
                *bytes_done += n as u64 * entry.dtype.size() as u64;
                progress(Progress {
                    tensor: &p.tensor.name,
                    tensors_done: i,
                    tensors_total: tensors.len(),
                    bytes_done: *bytes_done,
                    bytes_total,
                });
            }
        }
        debug_assert!(pending.is_empty(), "sources of {} are not a whole number of rows", p.tensor.name);
        w.end_tensor()?;
    }
    progress(Progress {
        tensor: "",
        tensors_done: tensors.len(),
        tensors_total: tensors.len(),
        bytes_done: *bytes_done,
        bytes_total,
    });
    w.finish()?;
    Ok(())
}
