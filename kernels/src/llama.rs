//! llama.cpp itself, through `llama-cpp-sys-2`: the independent reference for dense backbones
//! (our converted files must load there and give the same logits) and the speed peer of `bench`.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::sync::Once;

use llama_cpp_sys_2 as sys;

#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    #[error("llama.cpp could not load {0} (run with MOELLAVA_LLAMA_LOG=1 to see its log)")]
    Load(String),
    #[error("llama.cpp: {0}")]
    Call(String),
}

static BACKEND: Once = Once::new();

/// Discards llama.cpp's and ggml's log lines unless MOELLAVA_LLAMA_LOG is set (diagnostics only; no
/// numerics change); errors always go to stderr. Installed for ggml by `quant::init` too, so that
/// ggml's per-tensor notes (e.g. each AMX repack) stay out of the CLI's output.
pub(crate) unsafe extern "C" fn quiet_log(level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    let wanted = level == sys::GGML_LOG_LEVEL_ERROR || std::env::var_os("MOELLAVA_LLAMA_LOG").is_some();
    if wanted && !text.is_null() {
        // SAFETY: llama.cpp passes a NUL-terminated string valid for the duration of the call.
        eprint!("{}", unsafe { CStr::from_ptr(text) }.to_string_lossy());
    }
}

fn init_backend() {
    BACKEND.call_once(|| {
        // SAFETY: process-wide initialisation, serialised by `Once`; the callback is a `'static` fn
        // that tolerates being called from any thread.
        unsafe {
            sys::llama_log_set(Some(quiet_log), std::ptr::null_mut());
            sys::llama_backend_init();
        }
    });
}

/// The file types of llama.cpp's own quantizer (`llama-quantize`) that tests and benchmarks use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlamaFtype {
    F16,
    Q8_0,
    Q4_0,
    /// llama.cpp's mixed q4_K/q6_K recipe.
    Q4KM,
}

/// Quantizes `input` into `output` with llama.cpp's own quantizer (what `llama-quantize` runs): a
/// file written by llama.cpp's tools, not ours.
pub fn quantize(input: &Path, output: &Path, ftype: LlamaFtype, threads: usize) -> Result<(), LlamaError> {
    init_backend();
    let c =
        |p: &Path| CString::new(p.to_string_lossy().as_bytes()).map_err(|_| LlamaError::Call(format!("path {}", p.display())));
    let (inp, out) = (c(input)?, c(output)?);
    let ftype = match ftype {
        LlamaFtype::F16 => sys::LLAMA_FTYPE_MOSTLY_F16,
        LlamaFtype::Q8_0 => sys::LLAMA_FTYPE_MOSTLY_Q8_0,
        LlamaFtype::Q4_0 => sys::LLAMA_FTYPE_MOSTLY_Q4_0,
        LlamaFtype::Q4KM => sys::LLAMA_FTYPE_MOSTLY_Q4_K_M,
    };
    // SAFETY: default params are plain data (null pointers for imatrix and overrides, which
    // llama_model_quantize accepts); both paths are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        let mut params = sys::llama_model_quantize_default_params();
        params.ftype = ftype;
        params.nthread = threads as i32;
        sys::llama_model_quantize(inp.as_ptr(), out.as_ptr(), &params)
    };
    if rc != 0 {
        return Err(LlamaError::Call(format!("llama_model_quantize {} → {} failed ({rc})", input.display(), output.display())));
    }
    Ok(())
}

/// A model loaded by llama.cpp (CPU only).
pub struct LlamaModel {
    model: *mut sys::llama_model,
}

// SAFETY: a llama_model is immutable after loading; llama.cpp allows using it from several threads
// (each context is separate). We never hand out the raw pointer.
unsafe impl Send for LlamaModel {}
// SAFETY: see `Send`: shared references only read the model.
unsafe impl Sync for LlamaModel {}

impl LlamaModel {
    pub fn load(path: &Path) -> Result<LlamaModel, LlamaError> {
        init_backend();
        let c_path = CString::new(path.to_string_lossy().as_bytes()).map_err(|_| LlamaError::Load(path.display().to_string()))?;
        // SAFETY: default params are plain data; the path is a valid NUL-terminated string that outlives the call.
        let model = unsafe {
            let mut params = sys::llama_model_default_params();
            params.n_gpu_layers = 0;
            sys::llama_model_load_from_file(c_path.as_ptr(), params)
        };
        if model.is_null() {
            return Err(LlamaError::Load(path.display().to_string()));
        }
        Ok(LlamaModel { model })
    }

    pub fn n_embd(&self) -> usize {
        // SAFETY: `self.model` is a live model (checked non-null at load, freed only in Drop).
        unsafe { sys::llama_model_n_embd(self.model) as usize }
    }

    pub fn n_layer(&self) -> usize {
        // SAFETY: as in `n_embd`.
        unsafe { sys::llama_model_n_layer(self.model) as usize }
    }

    pub fn n_vocab(&self) -> usize {
        // SAFETY: as in `n_embd`; the vocab pointer belongs to the model.
        unsafe { sys::llama_vocab_n_tokens(sys::llama_model_get_vocab(self.model)) as usize }
    }

    /// A metadata value as llama.cpp renders it.
    pub fn meta(&self, key: &str) -> Option<String> {
        let k = CString::new(key).ok()?;
        let mut buf = vec![0u8; 4096];
        // SAFETY: `buf` is writable for its length, which is passed; llama.cpp NUL-terminates within it.
        let n = unsafe { sys::llama_model_meta_val_str(self.model, k.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return None;
        }
        let s = CStr::from_bytes_until_nul(&buf).ok()?;
        Some(s.to_string_lossy().into_owned())
    }

    /// The logits llama.cpp computes for the last of `tokens` (one prompt, fresh context).
    pub fn last_logits(&self, tokens: &[u32], n_threads: usize) -> Result<Vec<f32>, LlamaError> {
        let mut ctx = LlamaContext::new(self, tokens.len() + 8, tokens.len().max(1), n_threads)?;
        ctx.decode(tokens)?;
        ctx.last_logits()
    }
}

/// A llama.cpp context (KV cache + compute buffers) over a loaded model.
pub struct LlamaContext<'m> {
    model: &'m LlamaModel,
    ctx: *mut sys::llama_context,
}

impl<'m> LlamaContext<'m> {
    /// A context of `n_ctx` positions accepting batches of up to `n_batch` tokens.
    pub fn new(model: &'m LlamaModel, n_ctx: usize, n_batch: usize, n_threads: usize) -> Result<LlamaContext<'m>, LlamaError> {
        // SAFETY: default params are plain data; the model is live for 'm, longer than the context.
        let ctx = unsafe {
            let mut cp = sys::llama_context_default_params();
            cp.n_ctx = n_ctx as u32;
            cp.n_batch = n_batch as u32;
            cp.n_ubatch = n_batch as u32;
            cp.n_threads = n_threads as i32;
            cp.n_threads_batch = n_threads as i32;
            cp.no_perf = true;
            sys::llama_init_from_model(model.model, cp)
        };
        if ctx.is_null() {
            return Err(LlamaError::Call("could not create a context".into()));
        }
        Ok(LlamaContext { model, ctx })
    }

    /// Appends `tokens` to the sequence (one batch) and computes the logits of the last one.
    pub fn decode(&mut self, tokens: &[u32]) -> Result<(), LlamaError> {
        if tokens.is_empty() {
            return Err(LlamaError::Call("no tokens".into()));
        }
        let mut toks: Vec<sys::llama_token> = tokens.iter().map(|t| *t as sys::llama_token).collect();
        // SAFETY: the batch borrows `toks`, which outlives the call; the context is live.
        let rc = unsafe { sys::llama_decode(self.ctx, sys::llama_batch_get_one(toks.as_mut_ptr(), toks.len() as i32)) };
        if rc != 0 {
            return Err(LlamaError::Call(format!("llama_decode returned {rc}")));
        }
        Ok(())
    }

    /// Logits of the last decoded token.
    pub fn last_logits(&self) -> Result<Vec<f32>, LlamaError> {
        // SAFETY: llama.cpp returns n_vocab floats owned by the context (alive here), or null.
        unsafe {
            let p = sys::llama_get_logits_ith(self.ctx, -1);
            if p.is_null() {
                return Err(LlamaError::Call("no logits".into()));
            }
            Ok(std::slice::from_raw_parts(p, self.model.n_vocab()).to_vec())
        }
    }

    /// Forgets every position (a fresh sequence).
    pub fn clear(&mut self) {
        // SAFETY: the memory handle belongs to the live context.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx), true) };
    }
}

impl Drop for LlamaContext<'_> {
    fn drop(&mut self) {
        // SAFETY: created by llama_init_from_model and freed exactly once.
        unsafe { sys::llama_free(self.ctx) };
    }
}

impl Drop for LlamaModel {
    fn drop(&mut self) {
        // SAFETY: the pointer came from llama_model_load_from_file and is freed exactly once.
        unsafe { sys::llama_model_free(self.model) };
    }
}
