//! One GPU: its context and stream, our compiled kernels, and a safe function per kernel.
//!
//! Every launch checks the sizes of the buffers it is given against the dimensions it passes (the
//! `SAFETY` condition of each `launch`: the kernel reads and writes only inside those sizes), so the
//! callers (the runtime's `cuda` backend) hold no `unsafe`. Kernels run in order on one stream;
//! [`Gpu::download`] waits for them.
//!
//! Dimension legend: x, y activations `[T, K]` / `[T, N]` f32 row-major; W `[N, K]` in a ggml type
//! (`row_bytes` bytes per row); KV rows `[P, cols]` in f32 or f16.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

use super::{nvrtc, type_suffix, SOURCES};
use crate::cpu::attention::AttnShape;
use crate::cpu::Activation;
use crate::QuantType;

/// Below this many rows `matmul` runs the matvec kernel (weights streamed once per 8 rows); from it
/// on, the weight is dequantised to f32 once and multiplied with the tiled GEMM.
pub const GEMM_MIN_ROWS: usize = 16;
/// Rows per block of the matvec kernel's token loop (`MV_MAX_T` in matmul.cu).
const MV_MAX_T: usize = 8;
/// Output rows per block of the matvec kernels (`MV_WARPS` in matmul.cu).
const MV_WARPS: usize = 4;
/// The largest KV length the attention kernel keeps its scores for in shared memory (48 KiB).
pub const MAX_ATTENTION_KEYS: usize = 48 * 1024 / 4 - 32 - 256;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no usable CUDA driver: {0}")]
    NoDriver(String),
    #[error("no CUDA device (the driver reports {0})")]
    NoDevice(String),
    #[error("CUDA error: {0}")]
    Driver(String),
    #[error("{0}")]
    Compile(String),
    #[error("kernel `{0}` is not in the compiled PTX of {1}")]
    MissingKernel(String, &'static str),
    #[error("{0}")]
    Shape(String),
}

type Result<T> = std::result::Result<T, GpuError>;

fn drv<T>(r: std::result::Result<T, cudarc::driver::DriverError>) -> Result<T> {
    r.map_err(|e| GpuError::Driver(format!("{e:?}")))
}

/// A launch's outcome (cudarc returns timing events we do not ask for).
fn launched<T>(r: std::result::Result<T, cudarc::driver::DriverError>) -> Result<()> {
    drv(r).map(|_| ())
}

/// A weight matrix uploaded in its own type.
pub struct DevWeight {
    pub bytes: CudaSlice<u8>,
    pub qtype: QuantType,
    pub rows: usize,
    pub cols: usize,
}

impl DevWeight {
    pub fn row_bytes(&self) -> usize {
        self.bytes.len() / self.rows.max(1)
    }
}

/// The buffer of cached key or value rows, in the cache's element type.
pub enum KvBuf {
    F32(CudaSlice<f32>),
    F16(CudaSlice<u16>),
}

impl KvBuf {
    pub fn as_ref(&self) -> KvRef<'_> {
        match self {
            KvBuf::F32(s) => KvRef::F32(s),
            KvBuf::F16(s) => KvRef::F16(s),
        }
    }
}

/// Borrowed keys or values: cache rows, or a prompt's own (f32) k and v.
#[derive(Clone, Copy)]
pub enum KvRef<'a> {
    F32(&'a CudaSlice<f32>),
    F16(&'a CudaSlice<u16>),
}

impl KvRef<'_> {
    fn len(&self) -> usize {
        match self {
            KvRef::F32(s) => s.len(),
            KvRef::F16(s) => s.len(),
        }
    }
}

/// Cached key or value rows `[rows, cols]`; the buffer has room for [`DevKv::capacity`] rows.
pub struct DevKv {
    pub buf: KvBuf,
    pub rows: usize,
    pub cols: usize,
}

impl DevKv {
    pub fn capacity(&self) -> usize {
        self.buf.as_ref().len() / self.cols.max(1)
    }
}

pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<String, CudaFunction>,
    /// The device's name, as the driver gives it.
    pub name: String,
    /// Compute capability as one number (90 for 9.0).
    pub arch: u32,
}

/// Host memory the driver has page-locked in place (a read-only registration of a mapped file), so
/// copies from it run at full PCIe speed without a staging copy. Unregistered on drop; the owner must
/// keep the memory mapped until then.
pub struct PinnedRange {
    ptr: usize,
    ctx: Arc<CudaContext>,
}

impl Drop for PinnedRange {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` was registered by `Gpu::pin_read_only` and not unregistered since.
        let _ = unsafe { cudarc::driver::sys::cuMemHostUnregister(self.ptr as *mut std::ffi::c_void) };
    }
}

/// Whether a CUDA driver library can be opened at all (no device needed).
pub fn driver_present() -> bool {
    // SAFETY: a dlopen probe of cudarc's candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

fn grid_1d(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(GpuError::Shape(what()))
    }
}

impl Gpu {
    /// Opens device `ordinal`, compiles (or reads from the PTX cache) every kernel file for its
    /// architecture and loads them.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if !driver_present() {
            return Err(GpuError::NoDriver("libcuda.so was not found by the loader".into()));
        }
        let count = drv(CudaContext::device_count())?;
        if count as usize <= ordinal {
            return Err(GpuError::NoDevice(format!("{count} device(s), asked for #{ordinal}")));
        }
        let ctx = drv(CudaContext::new(ordinal))?;
        let (major, minor) = drv(ctx.compute_capability())?;
        let arch = (major * 10 + minor) as u32;
        let name = drv(ctx.name())?;
        let stream = ctx.default_stream();
        let mut funcs = HashMap::new();
        for (file, source) in SOURCES {
            let cubin = nvrtc::cached_cubin(file, source, arch).map_err(GpuError::Compile)?;
            let module = drv(ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)))?;
            for (f, kernel) in super::kernel_names() {
                if f == file {
                    let func = module.load_function(&kernel).map_err(|_| GpuError::MissingKernel(kernel.clone(), file))?;
                    funcs.insert(kernel, func);
                }
            }
        }
        Ok(Gpu { ctx, stream, funcs, name, arch })
    }

    /// Page-locks `host` in place, read-only (CUDA ≥ 11.1), so the experts' host copies are pinned
    /// without a second copy of them. The caller keeps `host` alive and mapped while the result lives.
    pub fn pin_read_only(&self, host: &[u8]) -> Result<PinnedRange> {
        drv(self.ctx.bind_to_thread())?;
        let flags = cudarc::driver::sys::CU_MEMHOSTREGISTER_READ_ONLY | cudarc::driver::sys::CU_MEMHOSTREGISTER_PORTABLE;
        // SAFETY: registering a readable host range with the READ_ONLY flag only page-locks it; the
        // driver never writes through it. The range stays valid while the returned guard lives.
        let r = unsafe { cudarc::driver::sys::cuMemHostRegister_v2(host.as_ptr() as *mut std::ffi::c_void, host.len(), flags) };
        drv(r.result())?;
        Ok(PinnedRange { ptr: host.as_ptr() as usize, ctx: self.ctx.clone() })
    }

    /// (free, total) bytes of device memory.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        drv(self.ctx.mem_get_info())
    }

    fn f(&self, name: &str) -> &CudaFunction {
        // Every name in kernel_names() was loaded by `open` (or it failed).
        &self.funcs[name]
    }

    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        drv(self.stream.clone_htod(data))
    }

    pub fn download(&self, x: &CudaSlice<f32>) -> Result<Vec<f32>> {
        drv(self.stream.clone_dtoh(x))
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        drv(self.stream.alloc_zeros(n.max(1)))
    }

    /// `dst[at..at + n] = src[..n]`.
    pub fn copy_into(&self, src: &CudaSlice<f32>, n: usize, dst: &mut CudaSlice<f32>, at: usize) -> Result<()> {
        check(n <= src.len() && at + n <= dst.len(), || {
            format!("copy of {n} of {} values at {at} into {}", src.len(), dst.len())
        })?;
        drv(self.stream.memcpy_dtod(&src.slice(..n), &mut dst.slice_mut(at..at + n)))
    }

    /// Device-to-device copy bandwidth in GB/s (bytes read + written per second) over `bytes`-sized
    /// buffers, best of 5 copies: the HBM roofline that decode is compared with.
    pub fn copy_bandwidth_gb_s(&self, bytes: usize) -> Result<f64> {
        let n = bytes / 4;
        let src = self.zeros::<f32>(n)?;
        let mut dst = self.zeros::<f32>(n)?;
        let mut best = f64::MAX;
        for _ in 0..5 {
            self.synchronize()?;
            let t = std::time::Instant::now();
            drv(self.stream.memcpy_dtod(&src, &mut dst))?;
            self.synchronize()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(2.0 * (n * 4) as f64 / best / 1e9)
    }

    /// Host-to-device copy bandwidth in GB/s from `host` (best of 3 copies of it).
    pub fn h2d_gb_s(&self, host: &[u8]) -> Result<f64> {
        let mut best = f64::MAX;
        for _ in 0..3 {
            self.synchronize()?;
            let t = std::time::Instant::now();
            let d = self.upload(host)?;
            self.synchronize()?;
            best = best.min(t.elapsed().as_secs_f64());
            drop(d);
        }
        Ok(host.len() as f64 / best / 1e9)
    }

    pub fn synchronize(&self) -> Result<()> {
        drv(self.stream.synchronize())
    }

    pub fn upload_weight(&self, bytes: &[u8], qtype: QuantType, rows: usize, cols: usize) -> Result<DevWeight> {
        let expected = qtype.ggml().row_bytes(cols as u64).map(|r| r as usize * rows);
        check(cols.is_multiple_of(32) && expected == Some(bytes.len()), || {
            format!("weight [{rows}, {cols}] {qtype:?}: {} bytes, expected {expected:?}", bytes.len())
        })?;
        Ok(DevWeight { bytes: self.upload(bytes)?, qtype, rows, cols })
    }

    /// `y[t, n] = W[n, :] · x[t, :]` with the matvec kernel: each output's sum is formed the same way
    /// whatever `t_rows` is (a row's result does not depend on the other rows).
    pub fn matvec(&self, w: &DevWeight, x: &CudaSlice<f32>, t_rows: usize) -> Result<CudaSlice<f32>> {
        let grid = (w.rows.div_ceil(MV_WARPS) as u32, t_rows.div_ceil(MV_MAX_T).max(1) as u32, 1);
        self.launch_matvec("matvec", (grid, 32 * MV_WARPS as u32), w, x, t_rows)
    }

    /// [`Gpu::matvec`]'s plain reference (`matvec_ref_*`: one thread per output, chunks in order).
    pub fn matvec_ref(&self, w: &DevWeight, x: &CudaSlice<f32>, t_rows: usize) -> Result<CudaSlice<f32>> {
        let grid = ((t_rows * w.rows).div_ceil(128).max(1) as u32, 1, 1);
        self.launch_matvec("matvec_ref", (grid, 128), w, x, t_rows)
    }

    /// Launches `{kind}_{type}` (parameters `(u8* W, i64 row_bytes, f32* x, f32* y, i32 N, i32 K,
    /// i32 T)`) with `(grid, threads per block)`.
    fn launch_matvec(
        &self,
        kind: &str,
        (grid, block): ((u32, u32, u32), u32),
        w: &DevWeight,
        x: &CudaSlice<f32>,
        t_rows: usize,
    ) -> Result<CudaSlice<f32>> {
        let (n, k) = (w.rows, w.cols);
        check(x.len() >= t_rows * k, || format!("{kind}: x has {} values, [{t_rows}, {k}] needs more", x.len()))?;
        let mut y = self.zeros::<f32>(t_rows * n)?;
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        let f = self.f(&format!("{kind}_{}", type_suffix(w.qtype)));
        let (rb, ni, ki, ti) = (w.row_bytes() as i64, n as i32, k as i32, t_rows as i32);
        // SAFETY: W holds n rows of rb bytes, x ≥ t_rows·k values, y t_rows·n values (checked above);
        // both kernel kinds take (u8*, i64, f32*, f32*, i32, i32, i32) and bound their indices by N and T.
        launched(unsafe {
            self.stream.launch_builder(f).arg(&w.bytes).arg(&rb).arg(x).arg(&mut y).arg(&ni).arg(&ki).arg(&ti).launch(cfg)
        })?;
        Ok(y)
    }

    /// `x[T, K] · Wᵀ`: matvec below [`GEMM_MIN_ROWS`] rows, else dequantise + tiled GEMM.
    pub fn matmul(&self, w: &DevWeight, x: &CudaSlice<f32>, t_rows: usize) -> Result<CudaSlice<f32>> {
        if t_rows < GEMM_MIN_ROWS {
            return self.matvec(w, x, t_rows);
        }
        let (n, k) = (w.rows, w.cols);
        check(x.len() >= t_rows * k, || format!("matmul: x has {} values, [{t_rows}, {k}] needs more", x.len()))?;
        let mut wf = self.zeros::<f32>(n * k)?;
        let rb = w.row_bytes() as i64;
        let (ni, ki, mi) = (n as i32, k as i32, t_rows as i32);
        let f = self.f(&format!("dequant_{}", type_suffix(w.qtype)));
        // SAFETY: W holds n rows of rb bytes; wf has n·k values; one thread per 32-value chunk (n·k/32).
        launched(unsafe {
            self.stream.launch_builder(f).arg(&w.bytes).arg(&rb).arg(&mut wf).arg(&ni).arg(&ki).launch(grid_1d(n * k / 32))
        })?;
        let mut y = self.zeros::<f32>(t_rows * n)?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(64) as u32, t_rows.div_ceil(64) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: A = x [t_rows, k], B = wf [n, k], C = y [t_rows, n]; the kernel bounds-checks tile edges.
        launched(unsafe {
            self.stream.launch_builder(self.f("sgemm_nt")).arg(x).arg(&wf).arg(&mut y).arg(&mi).arg(&ni).arg(&ki).launch(cfg)
        })?;
        Ok(y)
    }

    /// One launch for all routed pairs of a MoE projection: `y[s, :] = W_e · x[t, :]` with
    /// t = `slot_token[s]`, e = `slot_expert[s]`, W the stacked `[E·N, K]` tensor (`experts` experts).
    pub fn matvec_experts(
        &self,
        w: &DevWeight,
        experts: usize,
        x: &CudaSlice<f32>,
        t_rows: usize,
        slot_token: &[i32],
        slot_expert: &[i32],
    ) -> Result<CudaSlice<f32>> {
        let (n, k, s) = (w.rows / experts.max(1), w.cols, slot_token.len());
        check(w.rows.is_multiple_of(experts.max(1)) && slot_expert.len() == s, || {
            format!("expert matvec: {} rows over {experts} experts, {s} slots", w.rows)
        })?;
        check(slot_token.iter().all(|t| (*t as usize) < t_rows) && slot_expert.iter().all(|e| (*e as usize) < experts), || {
            "expert matvec: a slot names a token or expert out of range".into()
        })?;
        check(x.len() >= t_rows * k, || format!("expert matvec: x has {} values, [{t_rows}, {k}] needs more", x.len()))?;
        if s == 0 {
            return self.zeros::<f32>(0);
        }
        let (st, se) = (self.upload(slot_token)?, self.upload(slot_expert)?);
        let mut y = self.zeros::<f32>(s * n)?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(MV_WARPS) as u32, s.max(1) as u32, 1),
            block_dim: (32 * MV_WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rb, ni, ki) = (w.row_bytes() as i64, n as i32, k as i32);
        let f = self.f(&format!("matvec_experts_{}", type_suffix(w.qtype)));
        // SAFETY: every slot's token < t_rows and expert < experts (checked), so rows read stay in W and x;
        // y has s·n values; parameters (u8*, i64, f32*, f32*, i32*, i32*, i32, i32).
        launched(unsafe {
            self.stream
                .launch_builder(f)
                .arg(&w.bytes)
                .arg(&rb)
                .arg(x)
                .arg(&mut y)
                .arg(&st)
                .arg(&se)
                .arg(&ni)
                .arg(&ki)
                .launch(cfg)
        })?;
        Ok(y)
    }

    fn elementwise(&self, kernel: &str, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>) -> Result<()> {
        check(y.len() >= x.len(), || format!("{kernel}: {} values against {}", x.len(), y.len()))?;
        let n = x.len() as i64;
        // SAFETY: both buffers hold at least n values; parameters (f32*, const f32*, i64).
        launched(unsafe { self.stream.launch_builder(self.f(kernel)).arg(x).arg(y).arg(&n).launch(grid_1d(n as usize)) })
    }

    pub fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>) -> Result<()> {
        self.elementwise("add", x, y)
    }

    pub fn mul(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>) -> Result<()> {
        self.elementwise("mul", x, y)
    }

    pub fn add_bias(&self, x: &mut CudaSlice<f32>, bias: &CudaSlice<f32>) -> Result<()> {
        let (n, cols) = (x.len() as i64, bias.len() as i32);
        check(cols > 0 && x.len().is_multiple_of(bias.len()), || format!("bias of {cols} over {n} values"))?;
        // SAFETY: x has n values, bias `cols` and the kernel indexes bias by i % cols.
        launched(unsafe {
            self.stream.launch_builder(self.f("add_bias")).arg(x).arg(bias).arg(&n).arg(&cols).launch(grid_1d(n as usize))
        })
    }

    pub fn activate(&self, x: &mut CudaSlice<f32>, a: Activation) -> Result<()> {
        let kind: i32 = match a {
            Activation::GeluErf => 0,
            Activation::GeluTanh => 1,
            Activation::QuickGelu => 2,
            Activation::Silu => 3,
        };
        let n = x.len() as i64;
        // SAFETY: x has n values; parameters (f32*, i64, i32).
        launched(unsafe { self.stream.launch_builder(self.f("activate")).arg(x).arg(&n).arg(&kind).launch(grid_1d(n as usize)) })
    }

    /// Layer norm of each row of `x` (`cols` wide) with weight `w` and optional bias `b`.
    pub fn layer_norm(
        &self,
        x: &mut CudaSlice<f32>,
        cols: usize,
        w: &CudaSlice<f32>,
        b: Option<&CudaSlice<f32>>,
        eps: f32,
    ) -> Result<()> {
        check(w.len() == cols && b.is_none_or(|b| b.len() == cols) && x.len().is_multiple_of(cols), || {
            format!("layer norm of width {cols}")
        })?;
        let rows = (x.len() / cols) as u32;
        let cfg = LaunchConfig { grid_dim: (rows.max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let c = cols as i32;
        let mut launch = self.stream.launch_builder(self.f("layer_norm"));
        launch.arg(x).arg(w);
        let null = 0u64;
        match b {
            Some(b) => launch.arg(b),
            None => launch.arg(&null),
        };
        launch.arg(&c).arg(&eps);
        // SAFETY: one block per row of `cols` values; w (and b when given) hold cols values; a null b is
        // tested by the kernel; parameters (f32*, const f32*, const f32*, i32, f32).
        launched(unsafe { launch.launch(cfg) })
    }

    pub fn rms_norm(&self, x: &mut CudaSlice<f32>, cols: usize, w: &CudaSlice<f32>, eps: f32) -> Result<()> {
        check(w.len() == cols && x.len().is_multiple_of(cols), || format!("rms norm of width {cols}"))?;
        let rows = (x.len() / cols) as u32;
        let cfg = LaunchConfig { grid_dim: (rows.max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let c = cols as i32;
        // SAFETY: one block per row of `cols` values; w holds cols values; parameters (f32*, const f32*, i32, f32).
        launched(unsafe { self.stream.launch_builder(self.f("rms_norm")).arg(x).arg(w).arg(&c).arg(&eps).launch(cfg) })
    }

    pub fn rope_neox(
        &self,
        x: &mut CudaSlice<f32>,
        n_head: usize,
        head_dim: usize,
        rot_dims: usize,
        pos: &CudaSlice<i32>,
        base: f32,
    ) -> Result<()> {
        let rows = pos.len();
        check(x.len() == rows * n_head * head_dim && rot_dims <= head_dim && rot_dims.is_multiple_of(2), || {
            format!("rope: {} values for {rows} rows of {n_head}×{head_dim}, {rot_dims} rotated", x.len())
        })?;
        let (r, h, d, rd) = (rows as i32, n_head as i32, head_dim as i32, rot_dims as i32);
        // SAFETY: x is [rows, n_head·head_dim], positions has `rows` entries, rot_dims ≤ head_dim (checked).
        launched(unsafe {
            self.stream
                .launch_builder(self.f("rope_neox"))
                .arg(x)
                .arg(pos)
                .arg(&r)
                .arg(&h)
                .arg(&d)
                .arg(&rd)
                .arg(&base)
                .launch(grid_1d(rows * n_head * rot_dims / 2))
        })
    }

    /// Columns `[col0, col0 + width)` of `x` (`cols` wide).
    pub fn copy_cols(&self, x: &CudaSlice<f32>, cols: usize, col0: usize, width: usize) -> Result<CudaSlice<f32>> {
        check(col0 + width <= cols && x.len().is_multiple_of(cols.max(1)), || {
            format!("columns {col0}..{} of {cols}", col0 + width)
        })?;
        let rows = x.len() / cols.max(1);
        let mut y = self.zeros::<f32>(rows * width)?;
        let (r, sc, dc, c0) = (rows as i32, cols as i32, width as i32, col0 as i32);
        // SAFETY: x is [rows, cols], y [rows, width], col0 + width ≤ cols (checked).
        launched(unsafe {
            self.stream
                .launch_builder(self.f("copy_cols"))
                .arg(x)
                .arg(&mut y)
                .arg(&r)
                .arg(&sc)
                .arg(&dc)
                .arg(&c0)
                .launch(grid_1d(rows * width))
        })?;
        Ok(y)
    }

    pub fn gather_rows(&self, x: &CudaSlice<f32>, cols: usize, rows: &[usize]) -> Result<CudaSlice<f32>> {
        let have = x.len() / cols.max(1);
        check(rows.iter().all(|r| *r < have), || format!("gather of rows {rows:?} from {have}"))?;
        if rows.is_empty() {
            return self.zeros::<f32>(0); // nothing to copy (an expert no token kept)
        }
        let ids: Vec<i32> = rows.iter().map(|r| *r as i32).collect();
        let ids_d = self.upload(&ids)?;
        let mut y = self.zeros::<f32>(rows.len() * cols)?;
        let (n, c) = (rows.len() as i32, cols as i32);
        // SAFETY: every id < rows of x (checked); y is [ids, cols].
        launched(unsafe {
            self.stream
                .launch_builder(self.f("gather_rows"))
                .arg(x)
                .arg(&mut y)
                .arg(&ids_d)
                .arg(&n)
                .arg(&c)
                .launch(grid_1d(rows.len() * cols))
        })?;
        Ok(y)
    }

    pub fn scatter_add_rows(
        &self,
        dst: &mut CudaSlice<f32>,
        cols: usize,
        src: &CudaSlice<f32>,
        rows: &[usize],
        weights: &[f32],
    ) -> Result<()> {
        let have = dst.len() / cols.max(1);
        check(rows.len() == weights.len() && src.len() >= rows.len() * cols && rows.iter().all(|r| *r < have), || {
            format!("scatter of {} rows into {have}", rows.len())
        })?;
        let ids: Vec<i32> = rows.iter().map(|r| *r as i32).collect();
        let (ids_d, w_d) = (self.upload(&ids)?, self.upload(weights)?);
        let (n, c) = (rows.len() as i32, cols as i32);
        // SAFETY: every id < rows of dst, src holds n rows of cols (checked); one thread per column.
        launched(unsafe {
            self.stream
                .launch_builder(self.f("scatter_add_rows"))
                .arg(dst)
                .arg(src)
                .arg(&ids_d)
                .arg(&w_d)
                .arg(&n)
                .arg(&c)
                .launch(grid_1d(cols))
        })
    }

    /// A zeroed buffer of `len` values starting with the first `used` values of `old`.
    fn grown<T: DeviceRepr + ValidAsZeroBits>(&self, old: &CudaSlice<T>, used: usize, len: usize) -> Result<CudaSlice<T>> {
        let mut new = self.zeros::<T>(len)?;
        if used > 0 {
            drv(self.stream.memcpy_dtod(&old.slice(..used), &mut new.slice_mut(..used)))?;
        }
        Ok(new)
    }

    pub fn kv_with_capacity(&self, cols: usize, f16: bool, capacity: usize) -> Result<DevKv> {
        let n = capacity.max(1) * cols;
        let buf = if f16 { KvBuf::F16(self.zeros(n)?) } else { KvBuf::F32(self.zeros(n)?) };
        Ok(DevKv { buf, rows: 0, cols })
    }

    /// Appends the first `n` values of `src` (rows `[n / cols, cols]` f32), growing the buffer
    /// (doubling) when full.
    pub fn kv_append(&self, kv: &mut DevKv, src: &CudaSlice<f32>, n: usize) -> Result<()> {
        check(n <= src.len() && n.is_multiple_of(kv.cols.max(1)), || format!("KV append of {n} values to width {}", kv.cols))?;
        if n == 0 {
            return Ok(());
        }
        let src = src.slice(..n);
        let add = n / kv.cols.max(1);
        if kv.rows + add > kv.capacity() {
            let len = (kv.rows + add).max(2 * kv.capacity()) * kv.cols;
            let used = kv.rows * kv.cols;
            kv.buf = match &kv.buf {
                KvBuf::F32(old) => KvBuf::F32(self.grown(old, used, len)?),
                KvBuf::F16(old) => KvBuf::F16(self.grown(old, used, len)?),
            };
        }
        let at = kv.rows * kv.cols;
        match &mut kv.buf {
            KvBuf::F32(d) => drv(self.stream.memcpy_dtod(&src, &mut d.slice_mut(at..at + n)))?,
            KvBuf::F16(d) => {
                let n64 = n as i64;
                let mut dst = d.slice_mut(at..at + n);
                // SAFETY: dst is a view of exactly n values; src a view of n values.
                launched(unsafe {
                    self.stream.launch_builder(self.f("f32_to_f16")).arg(&src).arg(&mut dst).arg(&n64).launch(grid_1d(n))
                })?;
            }
        }
        kv.rows += add;
        Ok(())
    }

    /// Attention of q `[T, n_head·hd]` over the first `p` rows of k and v (see attention.cu).
    pub fn attention(
        &self,
        q: &CudaSlice<f32>,
        k: KvRef<'_>,
        v: KvRef<'_>,
        p: usize,
        shape: AttnShape,
    ) -> Result<CudaSlice<f32>> {
        let AttnShape { n_head, n_kv_head: n_kv, head_dim: hd, first_pos, causal, scale } = shape;
        let t = q.len() / (n_head * hd).max(1);
        check(p <= MAX_ATTENTION_KEYS && hd <= 256 && n_kv > 0 && n_head % n_kv == 0, || {
            format!("attention over {p} keys (at most {MAX_ATTENTION_KEYS}), head dim {hd} (at most 256), {n_head} heads / {n_kv} KV heads")
        })?;
        check(k.len() >= p * n_kv * hd && v.len() >= p * n_kv * hd, || format!("attention: KV shorter than {p} rows"))?;
        let mut out = self.zeros::<f32>(t * n_head * hd)?;
        if t == 0 {
            return Ok(out);
        }
        let cfg = LaunchConfig {
            grid_dim: (n_head as u32, t as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: ((hd + 32 + p) * 4) as u32,
        };
        let args = [p, n_head, n_kv, hd, first_pos].map(|v| v as i32);
        let causal = causal as i32;
        let mut launch = match (k, v) {
            (KvRef::F32(k), KvRef::F32(v)) => {
                let mut l = self.stream.launch_builder(self.f("attention_f32"));
                l.arg(q).arg(k).arg(v);
                l
            }
            (KvRef::F16(k), KvRef::F16(v)) => {
                let mut l = self.stream.launch_builder(self.f("attention_f16"));
                l.arg(q).arg(k).arg(v);
                l
            }
            _ => return Err(GpuError::Shape("attention: K and V in different types".into())),
        };
        launch.arg(&mut out);
        for a in &args {
            launch.arg(a);
        }
        launch.arg(&causal).arg(&scale);
        // SAFETY: q is [t, n_head·hd], k and v hold ≥ p rows of n_kv·hd (checked), out [t, n_head·hd];
        // shared memory hd + 32 + p floats as the kernel lays it out.
        launched(unsafe { launch.launch(cfg) })?;
        Ok(out)
    }
}
