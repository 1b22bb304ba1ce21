//! Lazy, validating reader of `.safetensors` files (memory-mapped).
//!
//! Format (huggingface/safetensors): u64 little-endian header length N, N bytes of JSON
//! `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data;
//! offsets are relative to the first byte after the header. Everything is validated on open: header
//! length bounded by the file and by 100 MB (the library's own cap), JSON, known dtypes, shapes whose
//! byte size equals the offsets, data inside the file, no overlaps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use moellava_runtime::mmap::Bytes;

use crate::error::{file_err, ConvertError, Result};

/// The safetensors library refuses headers above 100 MB; so do we.
const MAX_HEADER: u64 = 100_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "F64" => Dtype::F64,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "I16" => Dtype::I16,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "BOOL" => Dtype::Bool,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    /// The float types a checkpoint's weights may be stored in.
    pub fn is_weight_float(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: Dtype,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

impl TensorEntry {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One open `.safetensors` file.
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: Bytes,
    /// Tensors in data order.
    entries: Vec<(String, TensorEntry)>,
    index: HashMap<String, usize>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let bytes = Bytes::map(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
        bytes.advise_sequential();
        let buf = bytes.as_slice();
        if buf.len() < 8 {
            return Err(file_err(path, format!("safetensors header truncated: file has {} bytes, needs at least 8", buf.len())));
        }
        let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        if n > MAX_HEADER || n > (buf.len() - 8) as u64 {
            return Err(file_err(
                path,
                format!("safetensors header length {n} exceeds the file ({} bytes) or the 100 MB cap", buf.len()),
            ));
        }
        let data_start = 8 + n as usize;
        let header: serde_json::Value = serde_json::from_slice(&buf[8..data_start])
            .map_err(|e| file_err(path, format!("safetensors header is not valid JSON: {e}")))?;
        let obj = header.as_object().ok_or_else(|| file_err(path, "safetensors header is not a JSON object"))?;
        let mut entries = Vec::with_capacity(obj.len());
        for (name, v) in obj {
            if name == "__metadata__" {
                continue;
            }
            entries.push((name.clone(), parse_entry(path, name, v, data_start, buf.len())?));
        }
        entries.sort_by_key(|(_, e)| (e.start, e.end));
        for w in entries.windows(2) {
            if w[1].1.start < w[0].1.end {
                return Err(file_err(path, format!("tensors '{}' and '{}' overlap", w[0].0, w[1].0)));
            }
        }
        let index = entries.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        Ok(SafetensorsFile { path: path.to_path_buf(), bytes, entries, index })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in data order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.index.get(name).map(|i| &self.entries[*i].1)
    }

    /// Raw bytes of a tensor.
    pub fn raw(&self, name: &str) -> Option<&[u8]> {
        self.entry(name).map(|e| &self.bytes.as_slice()[e.start..e.end])
    }

    /// Copies elements `[first, first + out.len())` of a float tensor (in row-major order) into `out` as f32.
    pub fn read_f32(&self, name: &str, first: usize, out: &mut [f32]) -> Result<()> {
        let e = self.entry(name).ok_or_else(|| ConvertError::Tensor {
            path: self.path.display().to_string(),
            tensor: name.to_string(),
            what: "is not in this file".into(),
        })?;
        if first + out.len() > e.n_elements() {
            return Err(ConvertError::Tensor {
                path: self.path.display().to_string(),
                tensor: name.to_string(),
                what: format!("read of elements {first}..{} past its {} elements", first + out.len(), e.n_elements()),
            });
        }
        let sz = e.dtype.size();
        let (from, to) = (e.start + first * sz, e.start + (first + out.len()) * sz);
        let src = &self.bytes.as_slice()[from..to];
        match e.dtype {
            Dtype::F32 => {
                out.iter_mut().zip(src.chunks_exact(4)).for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            Dtype::F16 => {
                out.iter_mut().zip(src.chunks_exact(2)).for_each(|(o, b)| *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            }
            Dtype::BF16 => out
                .iter_mut()
                .zip(src.chunks_exact(2))
                .for_each(|(o, b)| *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
            other => {
                return Err(ConvertError::Tensor {
                    path: self.path.display().to_string(),
                    tensor: name.to_string(),
                    what: format!("has dtype {other:?}, expected F32, F16 or BF16"),
                })
            }
        }
        // Each source byte is read once: give the pages back so RSS stays bounded on huge checkpoints.
        self.bytes.release(from, to - from);
        Ok(())
    }
}

fn parse_entry(path: &Path, name: &str, v: &serde_json::Value, data_start: usize, file_len: usize) -> Result<TensorEntry> {
    let bad = |what: String| ConvertError::Tensor { path: path.display().to_string(), tensor: name.to_string(), what };
    let dtype_s = v["dtype"].as_str().ok_or_else(|| bad("has no dtype in the safetensors header".into()))?;
    let dtype = Dtype::parse(dtype_s).ok_or_else(|| bad(format!("has unknown dtype '{dtype_s}'")))?;
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .ok_or_else(|| bad("has no shape in the safetensors header".into()))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("has a shape that is not a list of non-negative integers".into()))?;
    let offs =
        v["data_offsets"].as_array().filter(|a| a.len() == 2).ok_or_else(|| bad("has no [begin, end] data_offsets".into()))?;
    let (b, e) = match (offs[0].as_u64(), offs[1].as_u64()) {
        (Some(b), Some(e)) if b <= e => (b as usize, e as usize),
        _ => return Err(bad(format!("has invalid data_offsets {offs:?}"))),
    };
    let n = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d)).and_then(|n| n.checked_mul(dtype.size()));
    if n != Some(e - b) {
        return Err(bad(format!("shape {shape:?} of {dtype_s} needs {n:?} bytes but data_offsets span {}", e - b)));
    }
    let (start, end) = (data_start.saturating_add(b), data_start.saturating_add(e));
    if end > file_len {
        return Err(bad(format!("data ends at byte {end}, past the end of the file ({file_len} bytes): the file is truncated")));
    }
    Ok(TensorEntry { dtype, shape, start, end })
}
