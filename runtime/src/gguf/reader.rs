//! GGUF reader: parses and validates the header, metadata and tensor table of a GGUF v2/v3 file
//! (little-endian) before anything is used.
//!
//! Nothing is trusted: every count and length is checked against the bytes that remain before
//! anything is allocated, so a crafted file cannot make the reader allocate more than a small multiple
//! of its own size, loop for long, or panic. Every error names the byte offset where the file went wrong.
//! Tensor data is never copied: [`GgufFile::tensor_data`] borrows it from the memory map.
//!
//! Dimension order: `TensorInfo::dims` is ggml's `ne` (innermost first, as stored in the file);
//! `TensorInfo::shape` is the row-major (PyTorch) order, outermost first. This file is the one place
//! where one becomes the other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use moellava_kernels::quant::{GgmlType, QuantType};

use super::value::{Array, Value, ValueType};
use super::GgufError;
use crate::mmap::Bytes;

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_NAME`: tensor names must be shorter (llama.cpp rejects longer ones).
pub const MAX_TENSOR_NAME: usize = 64;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ggml_type: GgmlType,
    /// ggml `ne` order: `dims[0]` is the row length (innermost, contiguous).
    pub dims: Vec<u64>,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Row-major shape, outermost first (PyTorch order): the reverse of `dims`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|d| *d as usize).collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Elements per row (`ne[0]`).
    pub fn row_len(&self) -> usize {
        self.dims[0] as usize
    }

    /// Number of rows (all dims but the first).
    pub fn n_rows(&self) -> usize {
        self.dims[1..].iter().product::<u64>() as usize
    }

    /// The computable type, if moellava computes with this tensor's type.
    pub fn quant_type(&self) -> Option<QuantType> {
        QuantType::from_ggml(self.ggml_type)
    }
}

/// Everything in a GGUF file but the tensor data.
#[derive(Clone, Debug)]
pub struct GgufMeta {
    pub version: u32,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    pub file_len: u64,
    kvs: Vec<(String, Value)>,
    kv_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// A bounds-checked little-endian cursor over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn bad(offset: usize, what: impl Into<String>) -> GgufError {
    GgufError::Format { file: None, offset: offset as u64, what: what.into() }
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(bad(self.pos, format!("file ends inside {what}: needs {n} bytes, {} left", self.remaining())));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count whose elements each take at least `min_size` bytes: rejected before any allocation
    /// when the rest of the file could not hold them.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize, GgufError> {
        let at = self.pos;
        let n = self.u64(what)?;
        let fits = n.checked_mul(min_size as u64).is_some_and(|b| b <= self.remaining() as u64);
        if !fits {
            return Err(bad(at, format!("{what} is {n}, but only {} bytes remain in the file", self.remaining())));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.count(1, &format!("{what} length"))?;
        let at = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| bad(at + e.utf8_error().valid_up_to(), format!("{what} is not valid UTF-8")))
    }

    fn value_type(&mut self, what: &str) -> Result<ValueType, GgufError> {
        let at = self.pos;
        let id = self.u32(what)?;
        ValueType::from_id(id).ok_or_else(|| bad(at, format!("{what} has unknown value type {id} (known: 0..=12)")))
    }

    fn scalar(&mut self, t: ValueType, key: &str) -> Result<Value, GgufError> {
        let what = format!("value of '{key}'");
        Ok(match t {
            ValueType::U8 => Value::U8(self.array::<1>(&what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(&what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(&what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            ValueType::Bool => {
                let at = self.pos;
                match self.array::<1>(&what)?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => return Err(bad(at, format!("{what} is a bool stored as {b}, expected 0 or 1"))),
                }
            }
            ValueType::String => Value::String(self.string(&what)?),
            ValueType::Array => self.array_value(key)?,
        })
    }

    fn array_value(&mut self, key: &str) -> Result<Value, GgufError> {
        let at = self.pos;
        let elem = self.value_type(&format!("element type of array '{key}'"))?;
        if elem == ValueType::Array {
            return Err(bad(at, format!("'{key}' is an array of arrays; nested arrays are not supported")));
        }
        let n = self.count(elem.min_size(), &format!("element count of array '{key}'"))?;
        macro_rules! collect {
            ($variant:ident, $ty:ty) => {{
                let raw = self.take(n * std::mem::size_of::<$ty>(), &format!("array '{key}'"))?;
                Array::$variant(
                    raw.chunks_exact(std::mem::size_of::<$ty>()).map(|c| <$ty>::from_le_bytes(c.try_into().unwrap())).collect(),
                )
            }};
        }
        let arr = match elem {
            ValueType::U8 => Array::U8(self.take(n, &format!("array '{key}'"))?.to_vec()),
            ValueType::I8 => collect!(I8, i8),
            ValueType::U16 => collect!(U16, u16),
            ValueType::I16 => collect!(I16, i16),
            ValueType::U32 => collect!(U32, u32),
            ValueType::I32 => collect!(I32, i32),
            ValueType::F32 => collect!(F32, f32),
            ValueType::U64 => collect!(U64, u64),
            ValueType::I64 => collect!(I64, i64),
            ValueType::F64 => collect!(F64, f64),
            ValueType::Bool => {
                let start = self.pos;
                let raw = self.take(n, &format!("array '{key}'"))?;
                if let Some(i) = raw.iter().position(|b| *b > 1) {
                    return Err(bad(start + i, format!("element {i} of bool array '{key}' is {}, expected 0 or 1", raw[i])));
                }
                Array::Bool(raw.iter().map(|b| *b == 1).collect())
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(&format!("element {i} of array '{key}'"))?);
                }
                Array::String(v)
            }
            ValueType::Array => unreachable!("rejected above"),
        };
        Ok(Value::Array(arr))
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

impl GgufMeta {
    /// Parses and validates a whole GGUF file held in `buf`.
    pub fn parse(buf: &[u8]) -> Result<GgufMeta, GgufError> {
        let mut c = Cursor { buf, pos: 0 };
        let magic = c.take(4, "the magic")?;
        if magic != GGUF_MAGIC {
            return Err(bad(0, format!("not a GGUF file: magic is {:?}, expected \"GGUF\"", String::from_utf8_lossy(magic))));
        }
        let version = c.u32("the version")?;
        match version {
            2 | 3 => {}
            0 => return Err(bad(4, "GGUF version 0 is invalid (expected 2 or 3)")),
            1 => return Err(bad(4, "GGUF version 1 is not supported (expected 2 or 3)")),
            v if v & 0xFFFF == 0 => {
                return Err(bad(4, format!("version {v:#x} looks byte-swapped: big-endian GGUF is not supported")))
            }
            v => return Err(bad(4, format!("unsupported GGUF version {v} (expected 2 or 3)"))),
        }
        // Minimum bytes of one tensor-table entry (1-byte name, 1 dim) and of one key/value pair.
        let n_tensors = c.count(8 + 1 + 4 + 8 + 4 + 8, "tensor count")?;
        let n_kv = c.count(8 + 1 + 4 + 1, "metadata key/value count")?;

        let mut kvs = Vec::with_capacity(n_kv);
        let mut kv_index = HashMap::with_capacity(n_kv);
        for i in 0..n_kv {
            let at = c.pos;
            let key = c.string(&format!("key {i}"))?;
            if key.is_empty() {
                return Err(bad(at, format!("key {i} is empty")));
            }
            if kv_index.contains_key(&key) {
                return Err(bad(at, format!("duplicate key '{key}'")));
            }
            let t = c.value_type(&format!("type of '{key}'"))?;
            let value = c.scalar(t, &key)?;
            kv_index.insert(key.clone(), kvs.len());
            kvs.push((key, value));
        }

        let alignment = match kv_index.get(ALIGNMENT_KEY).map(|i| &kvs[*i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if a.is_power_of_two() => *a as u64,
            Some(Value::U32(a)) => return Err(bad(c.pos, format!("'{ALIGNMENT_KEY}' is {a}, expected a power of two"))),
            Some(v) => return Err(bad(c.pos, format!("'{ALIGNMENT_KEY}' has type {}, expected u32", v.type_name()))),
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let info = read_tensor_info(&mut c, i)?;
            if tensor_index.contains_key(&info.name) {
                return Err(bad(c.pos, format!("duplicate tensor name '{}'", info.name)));
            }
            tensor_index.insert(info.name.clone(), tensors.len());
            tensors.push(info);
        }

        let file_len = buf.len() as u64;
        let data_offset = align_up(c.pos as u64, alignment).ok_or_else(|| bad(c.pos, "data section offset overflows"))?;
        let mut expected = 0u64;
        for t in &tensors {
            if t.offset != expected {
                return Err(bad(
                    data_offset as usize,
                    format!(
                        "tensor '{}' has data offset {}, expected {expected} (the padded end of the previous tensor)",
                        t.name, t.offset
                    ),
                ));
            }
            let end = data_offset.checked_add(t.offset).and_then(|o| o.checked_add(t.n_bytes));
            if end.is_none_or(|e| e > file_len) {
                return Err(bad(
                    file_len as usize,
                    format!(
                        "data of tensor '{}' ({} bytes at {}) runs past the end of the file",
                        t.name,
                        t.n_bytes,
                        data_offset + t.offset
                    ),
                ));
            }
            expected = align_up(t.offset + t.n_bytes, alignment)
                .ok_or_else(|| bad(data_offset as usize, "data section size overflows"))?;
        }
        Ok(GgufMeta { version, alignment, data_offset, file_len, kvs, kv_index, tensors, tensor_index })
    }

    /// Metadata in file order.
    pub fn kvs(&self) -> &[(String, Value)] {
        &self.kvs
    }

    /// The tensor table in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv_index.get(key).map(|i| &self.kvs[*i].1)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|i| &self.tensors[*i])
    }

    fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey { key: key.to_string() })
    }

    fn type_err(key: &str, expected: &'static str, v: &Value) -> GgufError {
        GgufError::KeyType { key: key.to_string(), expected, got: v.type_name() }
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            v => Err(Self::type_err(key, "string", v)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(Self::type_err(key, "bool", v)),
        }
    }

    /// A non-negative integer of any integer type that fits `usize`.
    pub fn get_usize(&self, key: &str) -> Result<usize, GgufError> {
        let v = self.require(key)?;
        v.as_integer().and_then(|i| usize::try_from(i).ok()).ok_or_else(|| Self::type_err(key, "a non-negative integer", v))
    }

    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.require(key)?;
        v.as_integer().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| Self::type_err(key, "u32", v))
    }

    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        let v = self.require(key)?;
        v.as_integer().and_then(|i| i64::try_from(i).ok()).ok_or_else(|| Self::type_err(key, "an integer", v))
    }

    /// A float of either float type (f64 rounds to f32).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        match self.require(key)? {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            v => Err(Self::type_err(key, "f32", v)),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<&Array, GgufError> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            v => Err(Self::type_err(key, "array", v)),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<&[String], GgufError> {
        match self.require(key)? {
            Value::Array(Array::String(v)) => Ok(v),
            v => Err(Self::type_err(key, "array[string]", v)),
        }
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        match self.require(key)? {
            Value::Array(Array::F32(v)) => Ok(v.clone()),
            Value::Array(Array::F64(v)) => Ok(v.iter().map(|x| *x as f32).collect()),
            v => Err(Self::type_err(key, "array[f32]", v)),
        }
    }

    /// An array of non-negative integers of any integer type.
    pub fn get_usize_array(&self, key: &str) -> Result<Vec<usize>, GgufError> {
        let v = self.require(key)?;
        let ints = match v {
            Value::Array(a) => a.integers(),
            _ => None,
        };
        ints.and_then(|ints| ints.into_iter().map(|i| usize::try_from(i).ok()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| Self::type_err(key, "array of non-negative integers", v))
    }

    /// An array of integers of any integer type, as i32 (e.g. token types).
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        let v = self.require(key)?;
        let ints = match v {
            Value::Array(a) => a.integers(),
            _ => None,
        };
        ints.and_then(|ints| ints.into_iter().map(|i| i32::try_from(i).ok()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| Self::type_err(key, "array of i32", v))
    }
}

fn read_tensor_info(c: &mut Cursor, i: usize) -> Result<TensorInfo, GgufError> {
    let at = c.pos;
    let name = c.string(&format!("name of tensor {i}"))?;
    if name.is_empty() || name.len() >= MAX_TENSOR_NAME {
        return Err(bad(at, format!("tensor {i} name '{name}' has {} bytes, expected 1..{MAX_TENSOR_NAME}", name.len())));
    }
    let at = c.pos;
    let n_dims = c.u32(&format!("n_dims of '{name}'"))? as usize;
    if !(1..=MAX_DIMS).contains(&n_dims) {
        return Err(bad(at, format!("tensor '{name}' has {n_dims} dimensions, expected 1..={MAX_DIMS}")));
    }
    let mut dims = Vec::with_capacity(n_dims);
    let mut n_elements = 1u64;
    for d in 0..n_dims {
        let at = c.pos;
        let ne = c.u64(&format!("dimension {d} of '{name}'"))?;
        if ne == 0 || ne > i64::MAX as u64 {
            return Err(bad(at, format!("tensor '{name}' dimension {d} is {ne}, expected 1..=2^63-1")));
        }
        n_elements = n_elements
            .checked_mul(ne)
            .filter(|n| *n <= i64::MAX as u64)
            .ok_or_else(|| bad(at, format!("tensor '{name}' has more elements than fit in 63 bits")))?;
        dims.push(ne);
    }
    let at = c.pos;
    let type_id = c.u32(&format!("type of '{name}'"))?;
    let ggml_type =
        GgmlType::from_id(type_id).ok_or_else(|| bad(at, format!("tensor '{name}' has unknown ggml type {type_id}")))?;
    if dims[0] % ggml_type.block_size() as u64 != 0 {
        return Err(bad(
            at,
            format!(
                "tensor '{name}' has rows of {} elements, not a multiple of the {ggml_type} block size {}",
                dims[0],
                ggml_type.block_size()
            ),
        ));
    }
    let n_bytes = (n_elements / ggml_type.block_size() as u64)
        .checked_mul(ggml_type.type_size() as u64)
        .ok_or_else(|| bad(at, format!("size of tensor '{name}' overflows")))?;
    let offset = c.u64(&format!("data offset of '{name}'"))?;
    Ok(TensorInfo { name, ggml_type, dims, offset, n_bytes })
}

/// A GGUF file opened for use: the validated metadata plus the memory-mapped bytes.
pub struct GgufFile {
    pub meta: GgufMeta,
    bytes: Bytes,
    path: PathBuf,
}

impl GgufFile {
    /// Memory-maps and validates `path`. Errors name the file and the byte offset.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref().to_path_buf();
        let with_path = |e: GgufError| e.in_file(&path);
        let bytes = Bytes::map(&path).map_err(|source| GgufError::Io { path: path.display().to_string(), source })?;
        let meta = GgufMeta::parse(bytes.as_slice()).map_err(with_path)?;
        Ok(GgufFile { meta, bytes, path })
    }

    /// Validates a GGUF image held in memory (tests, fuzzing).
    pub fn from_vec(data: Vec<u8>) -> Result<GgufFile, GgufError> {
        let meta = GgufMeta::parse(&data)?;
        Ok(GgufFile { meta, bytes: Bytes::Owned(data), path: PathBuf::from("<memory>") })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bytes of a tensor listed in this file's table.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.meta.data_offset + t.offset) as usize;
        &self.bytes.as_slice()[start..start + t.n_bytes as usize]
    }

    /// A tensor by name, with its bytes.
    pub fn tensor(&self, name: &str) -> Result<(&TensorInfo, &[u8]), GgufError> {
        let t = self.meta.tensor_info(name).ok_or_else(|| GgufError::MissingTensor { name: name.to_string() })?;
        Ok((t, self.tensor_data(t)))
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// Drops this process's pages of `[offset, offset + len)` ([`Bytes::release`]): a hint, after
    /// which a read of the range maps it back from the file.
    pub fn release(&self, offset: usize, len: usize) {
        self.bytes.release(offset, len);
    }
}
