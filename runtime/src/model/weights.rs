//! Weights as views into the memory-mapped GGUF, looked up by name with their expected shapes, or
//! into an expert-cache slot that holds a copy of the same bytes (`experts::cache`).

use std::sync::{Arc, OnceLock};

use moellava_kernels::cpu::packed::{self, PackedMat};
use moellava_kernels::cpu::QMatRef;
use moellava_kernels::quant;
use moellava_kernels::QuantType;

use crate::error::{Result, RuntimeError};
use crate::gguf::GgufFile;

/// Where a weight's bytes are: in the file's map (no copy), or in a buffer the expert cache filled.
#[derive(Clone)]
enum Storage {
    Mapped(Arc<GgufFile>),
    Resident(Arc<Box<[u8]>>),
}

/// A weight matrix `[rows, cols]` (row-major): `len` bytes at `offset` of its storage.
#[derive(Clone)]
pub struct Weight {
    storage: Storage,
    pub name: String,
    offset: usize,
    len: usize,
    pub qtype: QuantType,
    pub rows: usize,
    pub cols: usize,
    /// The CPU's repacked copy ([`Self::packed`]), shared by clones: made on first use. `None` for a
    /// weight that is never repacked (copies outside the map, e.g. an expert-cache slot's).
    repack: Option<Arc<OnceLock<Option<PackedMat>>>>,
}

impl Weight {
    pub fn bytes(&self) -> &[u8] {
        let all: &[u8] = match &self.storage {
            Storage::Mapped(f) => f.bytes(),
            Storage::Resident(b) => b,
        };
        &all[self.offset..self.offset + self.len]
    }

    /// The same matrix read from `buf[offset..]` (a copy of [`Self::bytes`] that the expert cache
    /// loaded into one of its slots).
    pub fn resident_copy(&self, buf: Arc<Box<[u8]>>, offset: usize) -> Weight {
        debug_assert!(offset + self.len <= buf.len());
        Weight { storage: Storage::Resident(buf), offset, repack: None, ..self.clone() }
    }

    /// A matrix held in its own buffer (`bytes`: `rows` rows in `qtype`), outside any file (tests,
    /// tools).
    pub fn from_bytes(name: &str, bytes: Vec<u8>, qtype: QuantType, rows: usize, cols: usize) -> Weight {
        let len = bytes.len();
        Weight {
            storage: Storage::Resident(Arc::new(bytes.into_boxed_slice())),
            name: name.to_string(),
            offset: 0,
            len,
            qtype,
            rows,
            cols,
            repack: None,
        }
    }

    /// Bytes of the matrix.
    pub fn n_bytes(&self) -> usize {
        self.len
    }

    pub fn mat(&self) -> QMatRef<'_> {
        QMatRef { data: self.bytes(), qtype: self.qtype, n_rows: self.rows, n_cols: self.cols }
    }

    /// Rows `[first, first + n)`: one expert of a stacked `[E·rows, cols]` tensor.
    pub fn slice_rows(&self, first: usize, n: usize) -> Weight {
        let rb = self.len / self.rows;
        Weight {
            storage: self.storage.clone(),
            name: self.name.clone(),
            offset: self.offset + first * rb,
            len: n * rb,
            qtype: self.qtype,
            rows: n,
            cols: self.cols,
            repack: None,
        }
    }

    /// The same mapped matrix with a repacked copy of its own ([`Self::packed`]), made at its first
    /// use: one expert of a stacked tensor, run from the map (no expert cache). A copy outside the map
    /// stays unpacked.
    pub fn with_own_repack(self) -> Weight {
        let repack = matches!(self.storage, Storage::Mapped(_)).then(Arc::default);
        Weight { repack, ..self }
    }

    /// The matrix in ggml-cpu's fastest layout for this CPU ([`packed`]: AMX tiles, or an interleaved
    /// repack), made on the first call and kept for the weight's life; the mapped pages of the original
    /// bytes are then released (only the copy is read from then on; a later read of the original, e.g.
    /// an embedding lookup in a tied table, maps them back from the file). `None` when the weight is
    /// not repacked: weights outside the map (an expert-cache slot's copy), a stacked tensor as a whole
    /// (its experts repack one by one, [`Self::with_own_repack`]), types or shapes no layout takes, or
    /// repacking turned off ([`packed::set_enabled`]).
    pub fn packed(&self) -> Option<&PackedMat> {
        let cell = self.repack.as_ref()?;
        if !packed::enabled() {
            return None;
        }
        cell.get_or_init(|| {
            // A failure (ggml could not allocate the copy) leaves the weight on the unpacked kernels.
            let p = packed::pack(self.mat()).ok().flatten();
            if p.is_some() {
                self.release_mapped();
            }
            p
        })
        .as_ref()
    }

    /// Gives the mapped pages of the original bytes back once a repacked copy replaces them (a later
    /// read maps them back from the file); nothing for a copy outside the map.
    fn release_mapped(&self) {
        if let Storage::Mapped(f) = &self.storage {
            f.release(self.offset, self.len);
        }
    }

    /// Byte range `(offset, len)` of the weight in the file (what the expert cache loads), or `None`
    /// for a resident copy.
    pub fn file_range(&self) -> Option<(usize, usize)> {
        matches!(self.storage, Storage::Mapped(_)).then_some((self.offset, self.len))
    }
}

/// Two matrices of one type and width, stacked by rows (`[a.rows + b.rows, cols]`) into one repacked
/// matrix: SwiGLU's gate and up, so the CPU multiplies both in one call, quantising the shared input
/// once (`Backend::gate_up`). Each output is the same dot product with the same converted input as
/// when the two run apart, so the results are the same bits.
pub struct StackedPair {
    a: Weight,
    b: Weight,
    packed: OnceLock<Option<PackedMat>>,
}

impl StackedPair {
    /// `None` unless both would be repacked on their own (weights in the file's map) and share type
    /// and shape.
    pub fn new(a: &Weight, b: &Weight) -> Option<Arc<StackedPair>> {
        let ok = a.repack.is_some() && b.repack.is_some() && a.qtype == b.qtype && (a.rows, a.cols) == (b.rows, b.cols);
        ok.then(|| Arc::new(StackedPair { a: a.clone(), b: b.clone(), packed: OnceLock::new() }))
    }

    /// The stacked matrix in ggml-cpu's fastest layout, made on the first call from a copy of both
    /// matrices' bytes, whose mapped pages are then released (as [`Weight::packed`] does). `None`
    /// where that weight would get none: repacking off, or no layout for the type and shape.
    pub fn packed(&self) -> Option<&PackedMat> {
        if !packed::enabled() {
            return None;
        }
        self.packed
            .get_or_init(|| {
                let (a, b) = (&self.a, &self.b);
                let mut bytes = Vec::with_capacity(a.len + b.len);
                bytes.extend_from_slice(a.bytes());
                bytes.extend_from_slice(b.bytes());
                let mat = QMatRef { data: &bytes, qtype: a.qtype, n_rows: a.rows + b.rows, n_cols: a.cols };
                let p = packed::pack(mat).ok().flatten();
                if p.is_some() {
                    a.release_mapped();
                    b.release_mapped();
                }
                p
            })
            .as_ref()
    }

    /// Rows of each matrix: of the stacked output's `2·rows()` columns, the first half is the first
    /// matrix's.
    pub fn rows(&self) -> usize {
        self.a.rows
    }
}

/// Typed access to the tensors of a GGUF file.
#[derive(Clone)]
pub struct WeightStore {
    file: Arc<GgufFile>,
}

impl WeightStore {
    pub fn new(file: Arc<GgufFile>) -> WeightStore {
        WeightStore { file }
    }

    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    pub fn has(&self, name: &str) -> bool {
        self.file.meta.tensor_info(name).is_some()
    }

    /// A tensor of row-major shape `shape`, seen as a matrix of `shape[..-1]` rows and `shape[-1]`
    /// columns (`matrix_cols` overrides the column count, e.g. a conv kernel flattened per output).
    fn get(&self, name: &str, shape: &[usize], matrix_cols: Option<usize>) -> Result<Weight> {
        self.get_as(name, shape, matrix_cols, true)
    }

    /// [`Self::get`]; `repack`: whether the CPU may keep a repacked copy ([`Weight::packed`]).
    fn get_as(&self, name: &str, shape: &[usize], matrix_cols: Option<usize>, repack: bool) -> Result<Weight> {
        let t = self.file.meta.tensor_info(name).ok_or_else(|| RuntimeError::MissingTensor { name: name.to_string() })?;
        if t.shape() != shape {
            return Err(RuntimeError::ShapeMismatch { name: name.to_string(), expected: shape.to_vec(), got: t.shape() });
        }
        let qtype = t
            .quant_type()
            .ok_or_else(|| RuntimeError::BadType { name: name.to_string(), got: t.ggml_type.name().to_string() })?;
        let total: usize = shape.iter().product();
        let cols = matrix_cols.unwrap_or(*shape.last().unwrap_or(&1));
        if !cols.is_multiple_of(qtype.block_size()) {
            return Err(RuntimeError::BadType { name: format!("{name} (as rows of {cols})"), got: qtype.name().to_string() });
        }
        let offset = (self.file.meta.data_offset + t.offset) as usize;
        Ok(Weight {
            storage: Storage::Mapped(self.file.clone()),
            name: name.to_string(),
            offset,
            len: t.n_bytes as usize,
            qtype,
            rows: total / cols,
            cols,
            repack: repack.then(Arc::default),
        })
    }

    /// A matrix `[rows, cols]`.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        self.get(name, &[rows, cols], None)
    }

    /// A tensor of any shape, viewed as a matrix with `cols` columns.
    pub fn matrix_of(&self, name: &str, shape: &[usize], cols: usize) -> Result<Weight> {
        self.get(name, shape, Some(cols))
    }

    /// Stacked experts `[n_expert, rows, cols]`, as one `[n_expert·rows, cols]` matrix. Not repacked as
    /// a whole: each expert's slice may be, on its own ([`Weight::with_own_repack`]).
    pub fn stacked(&self, name: &str, n_expert: usize, rows: usize, cols: usize) -> Result<Weight> {
        self.get_as(name, &[n_expert, rows, cols], None, false)
    }

    /// A tensor of `shape` dequantized to f32 (norms, biases, position tables: small).
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let w = self.get(name, shape, Some(*shape.last().unwrap_or(&1)))?;
        let mut out = vec![0f32; shape.iter().product()];
        quant::dequantize_rows(w.qtype, w.bytes(), &mut out)?;
        Ok(out)
    }

    /// Like [`Self::f32`] for an optional tensor.
    pub fn f32_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>> {
        if self.has(name) {
            self.f32(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}
