//! Streams planned tensors from the checkpoint's memory maps through the quantizer into the GGUF
//! writer, a bounded chunk of rows at a time: peak memory is one chunk, never a whole tensor.

use std::path::Path;

use moellava_kernels::quant;
use moellava_kernels::QuantType;
use moellava_runtime::gguf::{GgufWriter, TensorSpec, Value};

use crate::checkpoint::Checkpoint;
use crate::error::{ConvertError, Result};
use crate::name_map::{Origin, OutTensor, Source};

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

/// Where the values of source tensors come from: a checkpoint's files, or a generator.
pub trait SourceData {
    /// Elements `[first, first + out.len())` of `source` (row-major) as f32.
    fn read(&self, source: &Source, first: usize, out: &mut [f32]) -> Result<()>;
    /// Bytes one element takes in the source (for progress and the size summary).
    fn element_bytes(&self, source: &Source) -> u64;
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
}

impl SourceData for Inputs<'_> {
    fn read(&self, s: &Source, first: usize, out: &mut [f32]) -> Result<()> {
        let ck = self.of(s.origin);
        let (file, _) = ck.get(&s.name).ok_or_else(|| ConvertError::Tensor {
            path: ck.dir.display().to_string(),
            tensor: s.name.clone(),
            what: "disappeared between planning and writing".into(),
        })?;
        file.read_f32(&s.name, first, out)
    }

    fn element_bytes(&self, s: &Source) -> u64 {
        self.of(s.origin).get(&s.name).map_or(4, |(_, e)| e.dtype.size() as u64)
    }
}

/// Source bytes a planned tensor reads (what "before" means in the size summary).
pub fn source_bytes(data: &dyn SourceData, t: &OutTensor) -> u64 {
    t.sources.iter().map(|s| source_elements(t, s) as u64 * data.element_bytes(s)).sum()
}

/// Elements read from one source: all of it, or its first `rows` outer rows.
fn source_elements(t: &OutTensor, s: &Source) -> usize {
    let all: usize = s.shape.iter().product();
    match t.rows {
        Some(r) => r * (all / s.shape.first().copied().unwrap_or(1).max(1)),
        None => all,
    }
}

/// Writes one GGUF file: metadata, then every tensor streamed in order.
pub fn write_gguf(
    path: &Path,
    kvs: &[(String, Value)],
    tensors: &[Planned],
    data: &dyn SourceData,
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
            let total = source_elements(&p.tensor, src);
            let elem_bytes = data.element_bytes(src);
            let mut done = 0;
            while done < total {
                let n = per_chunk.min(total - done);
                let at = pending.len();
                pending.resize(at + n, 0.0);
                data.read(src, done, &mut pending[at..])?;
                let whole = pending.len() / row_len * row_len;
                out.resize(p.qtype.bytes_for(whole / row_len, row_len).unwrap_or(0), 0);
                quant::quantize_rows_par(p.qtype, &pending[..whole], row_len, &mut out)?;
                w.write_data(&out)?;
                pending.drain(..whole);
                done += n;
                *bytes_done += n as u64 * elem_bytes;
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
