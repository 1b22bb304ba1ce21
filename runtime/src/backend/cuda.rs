//! The CUDA backend: activations live in device memory; weights are uploaded in their own ggml type on
//! first use and stay resident; every op is one of our kernels (kernels/cuda/*.cu, launched through
//! `moellava_kernels::cuda::device::Gpu`).
//!
//! Errors: the ops of the [`Backend`] trait that return no `Result` (norms, element-wise ops) record
//! the first device error; the next call that returns a `Result` (`matmul`, `embed`) reports it, so a
//! failed launch never goes unnoticed and never panics.
//!
//! Experts: by default every expert a prompt routes to is uploaded and kept. With
//! [`CudaBackend::enable_expert_tier`] (`--gpu-mem`) they hold VRAM under a byte budget, least recently
//! used evicted first, copied from the file's map (page-locked in place when the driver allows) on a
//! miss, or computed on the CPU from it (`--miss-policy`; decisions in [`super::vram`]). Experts held
//! by the RAM expert cache (`--expert-ram`) are uploaded for each use.
//!
//! Not yet here (issue 8): copies on a second stream with next-layer prefetch, tensor-core prefill.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;
use moellava_kernels::cpu::{self, Activation};
use moellava_kernels::cuda::device::{DevKv, DevWeight, Gpu, GpuError, KvRef};

use super::vram::{self, GpuMem, MissPolicy, Plan, VramCounters, VramPlan};
use super::{AttnShape, Backend, KvType};
use crate::error::{Result, RuntimeError};
use crate::gguf::GgufFile;
use crate::model::weights::Weight;
use crate::tensor_class::TensorClass;
use moellava_kernels::cuda::device::PinnedRange;

/// `[rows, cols]` f32 in device memory; clones share the buffer until one is written (copy on write).
#[derive(Clone)]
pub struct GpuMat {
    buf: Arc<CudaSlice<f32>>,
    rows: usize,
    cols: usize,
}

pub struct CudaBackend {
    gpu: Gpu,
    /// Weights mapped from the file, by (address, length) of their bytes: stable for the map's life.
    weights: Mutex<HashMap<Key, Arc<DevWeight>>>,
    /// Bias and norm vectors by (address, length): model parameters, which the `Backend` contract
    /// keeps alive and unchanged for the backend's life, so each is uploaded once.
    vectors: Mutex<HashMap<Key, Arc<CudaSlice<f32>>>>,
    error: Mutex<Option<GpuError>>,
    /// A one-value buffer standing in for a matrix whose own could not be made (after an error).
    null: Arc<CudaSlice<f32>>,
    tier: Mutex<Option<ExpertTier>>,
    /// The positions of the last `rope` call, on the host and on the device.
    last_positions: Mutex<Option<Positions>>,
}

/// The VRAM expert tier: which experts are resident (by the address and length of their mapped bytes).
struct ExpertTier {
    plan: VramPlan<Key>,
    resident: HashMap<Key, Arc<DevWeight>>,
    policy: MissPolicy,
    pcie_gb_s: f64,
    cpu_gb_s: f64,
    /// The map page-locked in place. Fields drop in order: this unregisters before `_file` (which
    /// keeps the map alive) is released.
    pinned: Option<PinnedRange>,
    _file: Arc<GgufFile>,
}

/// The VRAM tier's settings and counters, for reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TierReport {
    pub budget_bytes: u64,
    pub resident_bytes: u64,
    pub miss_policy: MissPolicy,
    pub pinned: bool,
    pub pcie_gb_s: f64,
    pub cpu_gb_s: f64,
    pub counters: VramCounters,
}

/// Where one matmul's weight is.
enum Placement {
    Gpu(Arc<DevWeight>),
    Cpu,
}

impl From<GpuError> for RuntimeError {
    fn from(e: GpuError) -> RuntimeError {
        RuntimeError::Gpu(e.to_string())
    }
}

/// Rotary positions as the caller gave them, and their device copy.
type Positions = (Vec<usize>, Arc<CudaSlice<i32>>);

/// Where host bytes are: (address, length), the key of the upload tables.
type Key = (usize, usize);

fn key_of<T>(bytes: &[T]) -> Key {
    (bytes.as_ptr() as usize, bytes.len())
}

impl CudaBackend {
    /// Opens GPU `ordinal` and prepares the kernels (compiled by NVRTC, or read from the PTX cache).
    pub fn open(ordinal: usize) -> Result<CudaBackend> {
        let gpu = Gpu::open(ordinal)?;
        let null = Arc::new(gpu.zeros::<f32>(1)?);
        Ok(CudaBackend {
            gpu,
            weights: Mutex::default(),
            vectors: Mutex::default(),
            error: Mutex::default(),
            null,
            tier: Mutex::default(),
            last_positions: Mutex::default(),
        })
    }

    /// Keeps the experts of `file` (the model's own map) in VRAM under `gpu_mem`; misses follow
    /// `policy`. Page-locks the map read-only for fast copies (a warning, and pageable copies, when the
    /// driver refuses); measures PCIe and CPU-memory speeds for `--miss-policy auto`. Returns the budget.
    pub fn enable_expert_tier(&self, file: &Arc<GgufFile>, gpu_mem: GpuMem, policy: MissPolicy) -> Result<u64> {
        let (mut dense, mut experts) = (0u64, 0u64);
        for t in file.meta.tensors() {
            match TensorClass::of(&t.name) {
                TensorClass::Experts => experts += t.n_bytes,
                _ => dense += t.n_bytes,
            }
        }
        if experts == 0 {
            return Err(RuntimeError::Unsupported("--gpu-mem: this is a dense model (no experts to keep in VRAM)".into()));
        }
        let (free, _) = self.gpu.mem_info()?;
        let budget = gpu_mem.bytes(free as u64, dense, experts);
        let pinned = match self.gpu.pin_read_only(file.bytes()) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!(
                    "warning: could not page-lock the model file for copies ({e}); experts are copied from pageable memory"
                );
                None
            }
        };
        let probe = &file.bytes()[..file.bytes().len().min(256 << 20)];
        let pcie_gb_s = self.gpu.h2d_gb_s(probe)?;
        let cpu_gb_s = moellava_kernels::cpu::bandwidth::read_gb_s(1 << 28);
        *self.tier.lock().expect("tier") = Some(ExpertTier {
            plan: VramPlan::new(budget),
            resident: HashMap::new(),
            policy,
            pcie_gb_s,
            cpu_gb_s,
            pinned,
            _file: file.clone(),
        });
        Ok(budget)
    }

    /// The VRAM tier's settings and counters (`None` without `--gpu-mem`).
    pub fn tier_report(&self) -> Option<TierReport> {
        let t = self.tier.lock().ok()?;
        let t = t.as_ref()?;
        Some(TierReport {
            budget_bytes: t.plan.budget(),
            resident_bytes: t.plan.used(),
            miss_policy: t.policy,
            pinned: t.pinned.is_some(),
            pcie_gb_s: t.pcie_gb_s,
            cpu_gb_s: t.cpu_gb_s,
            counters: t.plan.counters,
        })
    }

    /// The device's name and compute capability ("NVIDIA H100 80GB HBM3, sm_90").
    pub fn describe(&self) -> String {
        format!("{}, sm_{}", self.gpu.name, self.gpu.arch)
    }

    /// Bytes of device memory (free, total).
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        Ok(self.gpu.mem_info()?)
    }

    /// Device copy bandwidth (GB/s read + written), the roofline for decode.
    pub fn copy_bandwidth_gb_s(&self, bytes: usize) -> Result<f64> {
        Ok(self.gpu.copy_bandwidth_gb_s(bytes)?)
    }

    /// `x · Wᵀ` by the plain reference kernel (`matvec_ref_*`), for tests of the fast kernels.
    pub fn matmul_reference(&self, x: &GpuMat, w: &Weight) -> Result<GpuMat> {
        let d = self.weight(w)?;
        Ok(self.mat(self.gpu.matvec_ref(&d, &x.buf, x.rows)?, x.rows, w.rows))
    }

    /// Bytes of weights uploaded so far.
    pub fn resident_weight_bytes(&self) -> usize {
        self.weights.lock().map(|w| w.values().map(|d| d.bytes.len()).sum()).unwrap_or(0)
    }

    fn record(&self, r: std::result::Result<(), GpuError>) {
        if let Err(e) = r {
            if let Ok(mut slot) = self.error.lock() {
                slot.get_or_insert(e);
            }
        }
    }

    /// The first error recorded by an op that cannot return one.
    fn pending(&self) -> Result<()> {
        match self.error.lock().ok().and_then(|mut e| e.take()) {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn upload(&self, w: &Weight) -> Result<Arc<DevWeight>> {
        Ok(Arc::new(self.gpu.upload_weight(w.bytes(), w.qtype, w.rows, w.cols)?))
    }

    fn weight(&self, w: &Weight) -> Result<Arc<DevWeight>> {
        if w.file_range().is_none() {
            // A RAM expert-cache slot: its bytes change when the slot is reused.
            return self.upload(w);
        }
        let key = key_of(w.bytes());
        if let Some(d) = self.weights.lock().expect("weight table").get(&key) {
            return Ok(d.clone());
        }
        let d = self.upload(w)?;
        self.weights.lock().expect("weight table").insert(key, d.clone());
        Ok(d)
    }

    /// Where `w` is multiplied for a call of `rows` rows: experts go through the VRAM tier when it
    /// is on; everything else is uploaded once and kept.
    fn place(&self, w: &Weight, rows: usize) -> Result<Placement> {
        if w.file_range().is_some() && TensorClass::of(&w.name) == TensorClass::Experts {
            let mut guard = self.tier.lock().expect("tier");
            if let Some(tier) = guard.as_mut() {
                let key = key_of(w.bytes());
                let cpu = vram::cpu_wins(tier.policy, rows, tier.pcie_gb_s, tier.cpu_gb_s);
                let load = |tier: &mut ExpertTier| -> Result<Placement> {
                    let d = self.upload(w)?;
                    tier.resident.insert(key, d.clone());
                    Ok(Placement::Gpu(d))
                };
                return match tier.plan.plan(&key, w.n_bytes() as u64, cpu) {
                    Plan::Cpu => Ok(Placement::Cpu),
                    Plan::Stream => Ok(Placement::Gpu(self.upload(w)?)),
                    Plan::Hit => match tier.resident.get(&key) {
                        Some(d) => Ok(Placement::Gpu(d.clone())),
                        None => load(tier), // its copy failed earlier
                    },
                    Plan::Load { evict } => {
                        for k in &evict {
                            tier.resident.remove(k);
                        }
                        load(tier)
                    }
                };
            }
        }
        Ok(Placement::Gpu(self.weight(w)?))
    }

    /// `x · Wᵀ` on the CPU (a miss the policy sends there): ggml on the mapped bytes, result uploaded.
    fn matmul_on_cpu(&self, x: &GpuMat, w: &Weight, per_row: bool) -> Result<GpuMat> {
        let xh = self.to_host(x);
        self.pending()?;
        let mut out = vec![0f32; x.rows * w.rows];
        if per_row {
            cpu::matmul_per_token(w.mat(), &xh, &mut out)?;
        } else {
            cpu::matmul(w.mat(), &xh, &mut out)?;
        }
        Ok(self.from_host(out, w.rows))
    }

    /// `positions` on the device. Every layer's q and k of one forward call rotate by the same
    /// positions, so the last upload is kept and reused: one copy per call instead of two per layer.
    fn positions(&self, positions: &[usize]) -> std::result::Result<Arc<CudaSlice<i32>>, GpuError> {
        let mut last = self.last_positions.lock().expect("positions");
        if let Some((p, d)) = last.as_ref() {
            if p.as_slice() == positions {
                return Ok(d.clone());
            }
        }
        let pos: Vec<i32> = positions.iter().map(|p| *p as i32).collect();
        let d = Arc::new(self.gpu.upload(&pos)?);
        *last = Some((positions.to_vec(), d.clone()));
        Ok(d)
    }

    fn vector(&self, v: &[f32]) -> std::result::Result<Arc<CudaSlice<f32>>, GpuError> {
        let key = key_of(v);
        if let Some(d) = self.vectors.lock().expect("vector table").get(&key) {
            return Ok(d.clone());
        }
        let d = Arc::new(self.gpu.upload(v)?);
        self.vectors.lock().expect("vector table").insert(key, d.clone());
        Ok(d)
    }

    fn mat(&self, buf: CudaSlice<f32>, rows: usize, cols: usize) -> GpuMat {
        GpuMat { buf: Arc::new(buf), rows, cols }
    }

    /// Attention of `q` over the first `p` rows of `k` and `v`, `[T, n_head·head_dim]`.
    fn attend(&self, q: &GpuMat, k: KvRef<'_>, v: KvRef<'_>, p: usize, s: AttnShape) -> GpuMat {
        let cols = s.n_head * s.head_dim;
        match self.gpu.attention(&q.buf, k, v, p, s) {
            Ok(b) => self.mat(b, q.rows, cols),
            Err(e) => self.failed(e, q.rows, cols),
        }
    }

    /// Stands in for a result that could not be made: the error is recorded (and reported by the next
    /// fallible call); later ops on this stand-in fail their size checks instead of touching memory.
    fn failed(&self, e: GpuError, rows: usize, cols: usize) -> GpuMat {
        self.record(Err(e));
        GpuMat { buf: self.null.clone(), rows, cols }
    }
}

impl Backend for CudaBackend {
    type Act = GpuMat;
    type Kv = DevKv;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn from_host(&self, data: Vec<f32>, cols: usize) -> GpuMat {
        let rows = data.len() / cols.max(1);
        match if data.is_empty() { self.gpu.zeros::<f32>(1) } else { self.gpu.upload(&data) } {
            Ok(b) => self.mat(b, rows, cols),
            Err(e) => self.failed(e, rows, cols),
        }
    }

    fn to_host(&self, x: &GpuMat) -> Vec<f32> {
        match self.gpu.download(&x.buf) {
            Ok(mut v) => {
                v.truncate(x.rows * x.cols);
                v
            }
            Err(e) => {
                self.record(Err(e));
                vec![0.0; x.rows * x.cols]
            }
        }
    }

    fn shape(&self, x: &GpuMat) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn matmul(&self, x: &GpuMat, w: &Weight) -> Result<GpuMat> {
        self.pending()?;
        match self.place(w, x.rows)? {
            Placement::Gpu(d) => Ok(self.mat(self.gpu.matmul(&d, &x.buf, x.rows)?, x.rows, w.rows)),
            Placement::Cpu => self.matmul_on_cpu(x, w, false),
        }
    }

    fn matmul_per_row(&self, x: &GpuMat, w: &Weight) -> Result<GpuMat> {
        self.pending()?;
        match self.place(w, x.rows)? {
            Placement::Gpu(d) => Ok(self.mat(self.gpu.matvec(&d, &x.buf, x.rows)?, x.rows, w.rows)),
            Placement::Cpu => self.matmul_on_cpu(x, w, true),
        }
    }

    fn embed(&self, table: &Weight, ids: &[u32]) -> Result<GpuMat> {
        self.pending()?;
        // A few rows of the table: decoded on the host (ggml) and uploaded, rather than the whole
        // vocabulary-sized table kept in VRAM for them.
        let mut out = vec![0f32; ids.len() * table.cols];
        cpu::get_rows(table.mat(), ids, &mut out)?;
        Ok(self.from_host(out, table.cols))
    }

    fn add_bias(&self, x: &mut GpuMat, bias: &[f32]) {
        if x.rows == 0 {
            return;
        }
        let r = self.vector(bias).and_then(|b| self.gpu.add_bias(Arc::make_mut(&mut x.buf), &b));
        self.record(r);
    }

    fn layer_norm(&self, x: &mut GpuMat, w: &[f32], b: Option<&[f32]>, eps: f32) {
        if x.rows == 0 {
            return;
        }
        let r = (|| {
            let wd = self.vector(w)?;
            let bd = b.map(|b| self.vector(b)).transpose()?;
            self.gpu.layer_norm(Arc::make_mut(&mut x.buf), x.cols, &wd, bd.as_deref(), eps)
        })();
        self.record(r);
    }

    fn rms_norm(&self, x: &mut GpuMat, w: &[f32], eps: f32) {
        if x.rows == 0 {
            return;
        }
        let r = self.vector(w).and_then(|wd| self.gpu.rms_norm(Arc::make_mut(&mut x.buf), x.cols, &wd, eps));
        self.record(r);
    }

    fn activate(&self, x: &mut GpuMat, a: Activation) {
        if x.rows == 0 {
            return;
        }
        let r = self.gpu.activate(Arc::make_mut(&mut x.buf), a);
        self.record(r);
    }

    fn mul(&self, x: &mut GpuMat, y: &GpuMat) {
        if x.rows == 0 {
            return;
        }
        let r = self.gpu.mul(Arc::make_mut(&mut x.buf), &y.buf);
        self.record(r);
    }

    fn add(&self, x: &mut GpuMat, y: &GpuMat) {
        if x.rows == 0 {
            return;
        }
        let r = self.gpu.add(Arc::make_mut(&mut x.buf), &y.buf);
        self.record(r);
    }

    fn rope(&self, x: &mut GpuMat, n_head: usize, head_dim: usize, rot_dims: usize, positions: &[usize], base: f32) {
        if x.rows == 0 {
            return;
        }
        let r = self
            .positions(positions)
            .and_then(|pos| self.gpu.rope_neox(Arc::make_mut(&mut x.buf), n_head, head_dim, rot_dims, &pos, base));
        self.record(r);
    }

    fn attention(&self, q: &GpuMat, k: &GpuMat, v: &GpuMat, s: AttnShape) -> GpuMat {
        self.attend(q, KvRef::F32(&k.buf), KvRef::F32(&v.buf), k.rows, s)
    }

    fn attention_cached(&self, q: &GpuMat, k: &DevKv, v: &DevKv, s: AttnShape) -> GpuMat {
        self.attend(q, k.buf.as_ref(), v.buf.as_ref(), k.rows, s)
    }

    fn split_cols(&self, x: &GpuMat, widths: &[usize]) -> Vec<GpuMat> {
        let mut at = 0;
        widths
            .iter()
            .map(|w| {
                let r = self.gpu.copy_cols(&x.buf, x.cols, at, *w);
                at += w;
                match r {
                    Ok(b) => self.mat(b, x.rows, *w),
                    Err(e) => self.failed(e, x.rows, *w),
                }
            })
            .collect()
    }

    fn gather_rows(&self, x: &GpuMat, rows: &[usize]) -> GpuMat {
        match self.gpu.gather_rows(&x.buf, x.cols, rows) {
            Ok(b) => self.mat(b, rows.len(), x.cols),
            Err(e) => self.failed(e, rows.len(), x.cols),
        }
    }

    fn scatter_add_rows(&self, dst: &mut GpuMat, src: &GpuMat, rows: &[usize], weights: &[f32]) {
        if rows.is_empty() {
            return;
        }
        let r = self.gpu.scatter_add_rows(Arc::make_mut(&mut dst.buf), dst.cols, &src.buf, rows, weights);
        self.record(r);
    }

    fn concat_rows(&self, parts: &[&GpuMat]) -> GpuMat {
        let cols = parts.first().map_or(0, |p| p.cols);
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let r = (|| {
            let mut out = self.gpu.zeros::<f32>(rows * cols)?;
            let mut at = 0;
            for p in parts {
                let n = p.rows * p.cols;
                if n > 0 {
                    self.gpu.copy_into(&p.buf, n, &mut out, at)?;
                    at += n;
                }
            }
            Ok(out)
        })();
        match r {
            Ok(b) => self.mat(b, rows, cols),
            Err(e) => self.failed(e, rows, cols),
        }
    }

    fn kv_with_capacity(&self, cols: usize, ty: KvType, rows: usize) -> DevKv {
        match self.gpu.kv_with_capacity(cols, ty == KvType::F16, rows) {
            Ok(kv) => kv,
            Err(e) => {
                self.record(Err(e));
                // A one-row cache; the recorded error stops the caller at its next matmul.
                self.gpu.kv_with_capacity(cols, ty == KvType::F16, 1).expect("the CUDA device cannot allocate one KV row")
            }
        }
    }

    fn kv_append(&self, dst: &mut DevKv, src: &GpuMat) {
        let r = self.gpu.kv_append(dst, &src.buf, src.rows * src.cols);
        self.record(r);
    }

    fn zeros(&self, rows: usize, cols: usize) -> GpuMat {
        match self.gpu.zeros::<f32>(rows * cols) {
            Ok(b) => self.mat(b, rows, cols),
            Err(e) => self.failed(e, rows, cols),
        }
    }
}
