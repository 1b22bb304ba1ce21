//! Streaming GGUF v3 writer.
//!
//! The header (metadata and tensor table) is written first from [`TensorSpec`]s; then each tensor's
//! data is streamed in table order, in as many pieces as the caller likes, so a multi-GB model is never
//! held in memory. Output goes to `OUT.tmp` beside `OUT`; [`GgufWriter::finish`] flushes, fsyncs and
//! renames it. If the writer is dropped unfinished (an error, a panic) the temp file is removed, and
//! [`remove_incomplete_outputs`] does the same from a Ctrl-C handler, so no partial `OUT` ever exists.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use moellava_kernels::quant::GgmlType;

use super::reader::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS, MAX_TENSOR_NAME};
use super::value::{Array, Value};
use super::GgufError;

/// Temp files of writers still in progress, for the Ctrl-C handler.
static IN_PROGRESS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes the temp files of all unfinished writers (call from a signal handler before exiting).
pub fn remove_incomplete_outputs() {
    let paths = IN_PROGRESS.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

/// A tensor to be written: name, type and ggml `ne` dims (innermost first).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub ggml_type: GgmlType,
    pub dims: Vec<u64>,
}

impl TensorSpec {
    /// From a row-major (PyTorch order, outermost first) shape.
    pub fn from_shape(name: impl Into<String>, ggml_type: GgmlType, shape: &[usize]) -> TensorSpec {
        TensorSpec { name: name.into(), ggml_type, dims: shape.iter().rev().map(|d| *d as u64).collect() }
    }

    /// Data bytes, or an error naming the tensor when the spec is not writable.
    pub fn n_bytes(&self) -> Result<u64, GgufError> {
        let err = |what: String| GgufError::Write(format!("tensor '{}': {what}", self.name));
        if self.name.is_empty() || self.name.len() >= MAX_TENSOR_NAME {
            return Err(err(format!("name has {} bytes, expected 1..{MAX_TENSOR_NAME}", self.name.len())));
        }
        if self.dims.is_empty() || self.dims.len() > MAX_DIMS || self.dims.contains(&0) {
            return Err(err(format!("dims {:?} must be 1 to {MAX_DIMS} positive sizes", self.dims)));
        }
        let n = self.dims.iter().try_fold(1u64, |a, d| a.checked_mul(*d)).ok_or_else(|| err("size overflows".into()))?;
        let bs = self.ggml_type.block_size() as u64;
        if !self.dims[0].is_multiple_of(bs) {
            return Err(err(format!("row length {} is not a multiple of the {} block size {bs}", self.dims[0], self.ggml_type)));
        }
        (n / bs).checked_mul(self.ggml_type.type_size() as u64).ok_or_else(|| err("size overflows".into()))
    }
}

struct Planned {
    spec: TensorSpec,
    n_bytes: u64,
}

/// A GGUF file being written. See the module docs for the protocol.
pub struct GgufWriter {
    out: Option<BufWriter<File>>,
    final_path: PathBuf,
    tmp_path: PathBuf,
    alignment: u64,
    tensors: Vec<Planned>,
    /// Index of the tensor being written (or next to be written).
    current: usize,
    /// Bytes written of the current tensor; `None` between tensors.
    current_written: Option<u64>,
    position: u64,
}

fn io_err(path: &Path, e: std::io::Error) -> GgufError {
    GgufError::Io { path: path.display().to_string(), source: e }
}

impl GgufWriter {
    /// Creates `path.tmp` and writes the header: `kvs` in order, then the tensor table of `tensors`
    /// (their data follows through [`GgufWriter::write_tensor`] in this order).
    pub fn create(path: impl AsRef<Path>, kvs: &[(String, Value)], tensors: Vec<TensorSpec>) -> Result<GgufWriter, GgufError> {
        let final_path = path.as_ref().to_path_buf();
        let alignment = match kvs.iter().find(|(k, _)| k == ALIGNMENT_KEY).map(|(_, v)| v) {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if a.is_power_of_two() => *a as u64,
            Some(v) => return Err(GgufError::Write(format!("'{ALIGNMENT_KEY}' must be a power-of-two u32, got {v:?}"))),
        };
        check_kvs(kvs)?;
        let mut planned = Vec::with_capacity(tensors.len());
        let mut names = std::collections::HashSet::new();
        for spec in tensors {
            if !names.insert(spec.name.clone()) {
                return Err(GgufError::Write(format!("duplicate tensor name '{}'", spec.name)));
            }
            let n_bytes = spec.n_bytes()?;
            planned.push(Planned { spec, n_bytes });
        }
        let mut tmp_name = final_path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        tmp_name.push(".tmp");
        let tmp_path = final_path.with_file_name(tmp_name);
        let file = File::create(&tmp_path).map_err(|e| io_err(&tmp_path, e))?;
        IN_PROGRESS.lock().map(|mut v| v.push(tmp_path.clone())).ok();
        let mut w = GgufWriter {
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            final_path,
            tmp_path,
            alignment,
            tensors: planned,
            current: 0,
            current_written: None,
            position: 0,
        };
        w.write_header(kvs)?;
        Ok(w)
    }

    /// Path of the temp file being written.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp_path
    }

    fn raw(&mut self, bytes: &[u8]) -> Result<(), GgufError> {
        let out = self.out.as_mut().ok_or_else(|| GgufError::Write("writer already finished".into()))?;
        out.write_all(bytes).map_err(|e| io_err(&self.tmp_path, e))?;
        self.position += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), GgufError> {
        let rem = self.position % self.alignment;
        if rem != 0 {
            let zeros = vec![0u8; (self.alignment - rem) as usize];
            self.raw(&zeros)?;
        }
        Ok(())
    }

    fn write_header(&mut self, kvs: &[(String, Value)]) -> Result<(), GgufError> {
        let mut h = Vec::new();
        h.extend_from_slice(GGUF_MAGIC);
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        for (k, v) in kvs {
            put_str(&mut h, k);
            h.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut h, v);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut h, &t.spec.name);
            h.extend_from_slice(&(t.spec.dims.len() as u32).to_le_bytes());
            for d in &t.spec.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.spec.ggml_type.id().to_le_bytes());
            h.extend_from_slice(&offset.to_le_bytes());
            offset += t.n_bytes.div_ceil(self.alignment) * self.alignment;
        }
        self.raw(&h)?;
        self.pad()
    }

    fn expect_tensor(&self, name: &str) -> Result<&Planned, GgufError> {
        match self.tensors.get(self.current) {
            Some(t) if t.spec.name == name => Ok(t),
            Some(t) => Err(GgufError::Write(format!("tensor '{name}' written out of order: expected '{}' next", t.spec.name))),
            None => Err(GgufError::Write(format!("tensor '{name}' written after all {} planned tensors", self.tensors.len()))),
        }
    }

    /// Starts the data of tensor `name`, which must be the next one in the table.
    pub fn begin_tensor(&mut self, name: &str) -> Result<(), GgufError> {
        if let Some(done) = self.current_written {
            let t = &self.tensors[self.current];
            return Err(GgufError::Write(format!(
                "tensor '{}' unfinished ({done} of {} bytes) when '{name}' began",
                t.spec.name, t.n_bytes
            )));
        }
        self.expect_tensor(name)?;
        self.current_written = Some(0);
        Ok(())
    }

    /// Appends bytes to the current tensor.
    pub fn write_data(&mut self, bytes: &[u8]) -> Result<(), GgufError> {
        let done = self.current_written.ok_or_else(|| GgufError::Write("write_data outside begin_tensor/end_tensor".into()))?;
        let t = &self.tensors[self.current];
        if done + bytes.len() as u64 > t.n_bytes {
            return Err(GgufError::Write(format!(
                "tensor '{}' given {} bytes, expected {}",
                t.spec.name,
                done + bytes.len() as u64,
                t.n_bytes
            )));
        }
        self.raw(bytes)?;
        self.current_written = Some(done + bytes.len() as u64);
        Ok(())
    }

    /// Ends the current tensor: its byte count must be exact.
    pub fn end_tensor(&mut self) -> Result<(), GgufError> {
        let done = self.current_written.ok_or_else(|| GgufError::Write("end_tensor without begin_tensor".into()))?;
        let t = &self.tensors[self.current];
        if done != t.n_bytes {
            return Err(GgufError::Write(format!("tensor '{}' given {done} bytes, expected {}", t.spec.name, t.n_bytes)));
        }
        self.pad()?;
        self.current += 1;
        self.current_written = None;
        Ok(())
    }

    /// Writes a whole tensor at once.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<(), GgufError> {
        self.begin_tensor(name)?;
        self.write_data(bytes)?;
        self.end_tensor()
    }

    /// Checks that every tensor was written, flushes, fsyncs and renames the temp file to the output.
    pub fn finish(mut self) -> Result<PathBuf, GgufError> {
        if self.current != self.tensors.len() || self.current_written.is_some() {
            let missing = &self.tensors[self.current].spec.name;
            return Err(GgufError::Write(format!(
                "finished with tensor '{missing}' not written ({} of {} done)",
                self.current,
                self.tensors.len()
            )));
        }
        let out = self.out.take().ok_or_else(|| GgufError::Write("writer already finished".into()))?;
        let file = out.into_inner().map_err(|e| io_err(&self.tmp_path, e.into_error()))?;
        file.sync_all().map_err(|e| io_err(&self.tmp_path, e))?;
        drop(file);
        std::fs::rename(&self.tmp_path, &self.final_path).map_err(|e| io_err(&self.final_path, e))?;
        if let Some(dir) = self.final_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Persist the rename itself; not all filesystems allow opening a directory, so best effort.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        unregister(&self.tmp_path);
        Ok(self.final_path.clone())
    }
}

fn unregister(p: &Path) {
    if let Ok(mut v) = IN_PROGRESS.lock() {
        v.retain(|x| x != p);
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp_path);
            unregister(&self.tmp_path);
        }
    }
}

fn check_kvs(kvs: &[(String, Value)]) -> Result<(), GgufError> {
    let mut seen = std::collections::HashSet::new();
    for (k, _) in kvs {
        if k.is_empty() || !seen.insert(k.as_str()) {
            return Err(GgufError::Write(format!("metadata key '{k}' is empty or repeated")));
        }
    }
    Ok(())
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

fn put_value(h: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => h.push(*x),
        Value::I8(x) => h.push(*x as u8),
        Value::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => h.push(*x as u8),
        Value::String(s) => put_str(h, s),
        Value::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::Array(a) => {
            h.extend_from_slice(&(a.elem_type() as u32).to_le_bytes());
            h.extend_from_slice(&(a.len() as u64).to_le_bytes());
            put_array(h, a);
        }
    }
}

fn put_array(h: &mut Vec<u8>, a: &Array) {
    macro_rules! le {
        ($v:expr) => {
            for x in $v {
                h.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => h.extend_from_slice(v),
        Array::I8(v) => le!(v),
        Array::U16(v) => le!(v),
        Array::I16(v) => le!(v),
        Array::U32(v) => le!(v),
        Array::I32(v) => le!(v),
        Array::F32(v) => le!(v),
        Array::Bool(v) => h.extend(v.iter().map(|b| *b as u8)),
        Array::String(v) => v.iter().for_each(|s| put_str(h, s)),
        Array::U64(v) => le!(v),
        Array::I64(v) => le!(v),
        Array::F64(v) => le!(v),
    }
}
