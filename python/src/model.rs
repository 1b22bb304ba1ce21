//! `NativeModel` (one loaded GGUF, its own thread pool) and `NativeStream` (an answer arriving piece
//! by piece). Both are shared freely between Python threads: the model is read-only once loaded, and
//! each call keeps its own KV cache.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::Duration;

use moellava_runtime::backend::KvType;
use moellava_runtime::experts::{Budget, Policy};
use moellava_runtime::image::{self, Rgb8};
use moellava_runtime::sampler::SamplingOptions;
use moellava_runtime::{Answer, GenerateOptions, Model, RuntimeError};
use pyo3::exceptions::{PyRuntimeError, PyStopIteration, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::{runtime_error, runtime_error_in, ModelError};

/// How often a waiting call checks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// What a generation thread sends: text as it is final, then the answer (or the error).
enum Event {
    Piece(String),
    Done(Result<Answer, RuntimeError>),
}

/// The loaded model and the pool its computations run in (`threads`).
struct Shared {
    model: Model,
    pool: rayon::ThreadPool,
}

#[pyclass(frozen, module = "moellava._moellava")]
pub struct NativeModel {
    shared: Arc<Shared>,
}

/// An image given as a path, as encoded file bytes, or as raw RGB rows (a PIL image, converted by
/// the Python side).
fn decode_image(
    path: Option<PathBuf>,
    encoded: Option<Vec<u8>>,
    rgb: Option<(usize, usize, Vec<u8>)>,
) -> Result<Option<Rgb8>, RuntimeError> {
    match (path, encoded, rgb) {
        (Some(p), None, None) => image::load(&p).map(Some),
        (None, Some(b), None) => image::decode(&b, "image bytes").map(Some),
        (None, None, Some((width, height, data))) => {
            if width == 0 || height == 0 || data.len() != width * height * 3 {
                return Err(RuntimeError::Image(format!(
                    "raw RGB image of {width}×{height} needs {} bytes, got {}",
                    width * height * 3,
                    data.len()
                )));
            }
            Ok(Some(Rgb8 { width, height, data }))
        }
        (None, None, None) => Ok(None),
        _ => Err(RuntimeError::Image("give one image (a path, file bytes or a PIL image), not several".into())),
    }
}

#[allow(clippy::too_many_arguments)]
fn options(
    max_new_tokens: usize,
    temperature: f32,
    top_p: f32,
    top_k: usize,
    repetition_penalty: f32,
    seed: u64,
    ignore_eos: bool,
    cancel: &Arc<AtomicBool>,
) -> PyResult<GenerateOptions> {
    let sampling = SamplingOptions { temperature, top_k, top_p, repetition_penalty, seed };
    sampling.validate().map_err(PyValueError::new_err)?;
    Ok(GenerateOptions { max_new_tokens, sampling, ignore_eos, cancel: Some(cancel.clone()), ..GenerateOptions::default() })
}

/// Starts one answer on its own thread; its pieces and result arrive on the returned channel.
fn spawn_answer(
    shared: Arc<Shared>,
    image: Option<Rgb8>,
    prompt: String,
    raw_prompt: bool,
    opts: GenerateOptions,
    stream: bool,
) -> PyResult<Receiver<Event>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("moellava-answer".into())
        .spawn(move || {
            let s = &shared;
            let result = s.pool.install(|| {
                s.model.answer(image.as_ref(), &prompt, raw_prompt, &opts, &mut |piece| {
                    if stream {
                        let _ = tx.send(Event::Piece(piece.to_string()));
                    }
                })
            });
            let _ = tx.send(Event::Done(result));
        })
        .map_err(|e| PyRuntimeError::new_err(format!("starting a generation thread: {e}")))?;
    Ok(rx)
}

/// Waits for the next event with the GIL released, checking for Ctrl-C after every event and every
/// [`SIGNAL_POLL`] without one (tokens can come faster than that poll, so a check on timeouts alone
/// would never run); a signal sets `cancel` (the generation stops at its next token) and is raised.
/// `rx` is moved into the GIL-free wait and back (a `Receiver` may cross threads but not be shared).
fn next_event(py: Python<'_>, rx: &mut Option<Receiver<Event>>, cancel: &AtomicBool) -> PyResult<Option<Event>> {
    loop {
        let Some(r) = rx.take() else { return Ok(None) };
        let (r, got) = py.allow_threads(move || {
            let got = r.recv_timeout(SIGNAL_POLL);
            (r, got)
        });
        *rx = Some(r);
        if let Err(e) = py.check_signals() {
            cancel.store(true, Ordering::Relaxed);
            return Err(e);
        }
        match got {
            Ok(ev) => return Ok(Some(ev)),
            Err(RecvTimeoutError::Disconnected) => return Ok(None),
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

fn answer_json(a: &Answer) -> String {
    serde_json::to_string(a).expect("an answer is plain data")
}

#[pymethods]
impl NativeModel {
    #[new]
    #[pyo3(signature = (path, threads=None, kv_cache=None, expert_ram=None, expert_policy="lru", prefetch=false))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        threads: Option<usize>,
        kv_cache: Option<String>,
        expert_ram: Option<String>,
        expert_policy: &str,
        prefetch: bool,
    ) -> PyResult<NativeModel> {
        if threads == Some(0) {
            return Err(PyValueError::new_err("threads must be at least 1"));
        }
        let kv: Option<KvType> =
            kv_cache.map(|s| s.parse().map_err(|e: String| PyValueError::new_err(format!("kv_cache: {e}")))).transpose()?;
        let policy: Policy = expert_policy.parse().map_err(|e: String| PyValueError::new_err(format!("expert_policy: {e}")))?;
        let budget: Option<Budget> =
            expert_ram.map(|b| b.parse().map_err(|e: String| PyValueError::new_err(format!("expert_ram {e}")))).transpose()?;
        if prefetch && budget.is_none() {
            return Err(PyValueError::new_err("prefetch needs expert_ram (without a budget every expert is resident)"));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.unwrap_or(0))
            .thread_name(|i| format!("moellava-{i}"))
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("setting up the thread pool: {e}")))?;
        let context = format!("loading {}", path.display());
        let model = py.allow_threads(|| -> Result<Model, RuntimeError> {
            let mut model = Model::load(&path)?;
            if let Some(t) = kv {
                model.kv_type = t;
            }
            if let Some(b) = budget {
                model.enable_expert_cache_from_file(&path, b, policy, prefetch)?;
            }
            Ok(model)
        });
        let model = model.map_err(|e| runtime_error_in(&context, e))?;
        Ok(NativeModel { shared: Arc::new(Shared { model, pool }) })
    }

    /// Facts about the model, as JSON: family, MoE layout, vision tower, context length, threads.
    fn info_json(&self) -> String {
        let m = &self.shared.model;
        let c = &m.config;
        serde_json::json!({
            "architecture": c.llm.family.arch(),
            "n_layer": c.llm.n_layer,
            "n_embd": c.llm.n_embd,
            "n_vocab": c.llm.n_vocab,
            "context_length": c.llm.context_length,
            "moe_layers": c.moe.as_ref().map(|x| x.layers.clone()),
            "n_expert": c.moe.as_ref().map(|x| x.n_expert),
            "vision": c.vision.is_some(),
            "image_tokens": c.vision.as_ref().map(|v| v.image_tokens),
            "kv_cache": m.kv_type,
            "threads": self.shared.pool.current_num_threads(),
            "expert_cache": m.expert_cache_report(),
        })
        .to_string()
    }

    /// An answer as an iterator of text pieces; the whole answer follows in `answer_json` (the Python
    /// side's `ask` drains a stream).
    #[pyo3(signature = (prompt, image_path=None, image_bytes=None, image_rgb=None, raw_prompt=false,
                        max_new_tokens=128, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0,
                        ignore_eos=false))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: String,
        image_path: Option<PathBuf>,
        image_bytes: Option<Vec<u8>>,
        image_rgb: Option<(usize, usize, Vec<u8>)>,
        raw_prompt: bool,
        max_new_tokens: usize,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        repetition_penalty: f32,
        seed: u64,
        ignore_eos: bool,
    ) -> PyResult<NativeStream> {
        let cancel = Arc::new(AtomicBool::new(false));
        let opts = options(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, ignore_eos, &cancel)?;
        let image = py.allow_threads(|| decode_image(image_path, image_bytes, image_rgb)).map_err(runtime_error)?;
        let rx = spawn_answer(self.shared.clone(), image, prompt, raw_prompt, opts, true)?;
        Ok(NativeStream { rx: Mutex::new(Some(rx)), cancel, answer: Mutex::new(None) })
    }

    /// The float32 logits of the last prompt position (len(tokenizer) values, little-endian bytes).
    #[pyo3(signature = (prompt, image_path=None, image_bytes=None, image_rgb=None, raw_prompt=false))]
    fn logits_bytes<'py>(
        &self,
        py: Python<'py>,
        prompt: String,
        image_path: Option<PathBuf>,
        image_bytes: Option<Vec<u8>>,
        image_rgb: Option<(usize, usize, Vec<u8>)>,
        raw_prompt: bool,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let cancel = Arc::new(AtomicBool::new(false));
        let opts = options(0, 0.0, 1.0, 0, 1.0, 0, false, &cancel)?;
        let image = py.allow_threads(|| decode_image(image_path, image_bytes, image_rgb)).map_err(runtime_error)?;
        let mut rx = Some(spawn_answer(self.shared.clone(), image, prompt, raw_prompt, opts, false)?);
        let answer = loop {
            match next_event(py, &mut rx, &cancel)? {
                Some(Event::Piece(_)) => {}
                Some(Event::Done(r)) => break r.map_err(runtime_error)?,
                None => return Err(PyRuntimeError::new_err("the generation thread ended without an answer")),
            }
        };
        let bytes: Vec<u8> = answer.last_prompt_logits.iter().flat_map(|x| x.to_le_bytes()).collect();
        Ok(PyBytes::new(py, &bytes))
    }

    /// The expert cache's counters as JSON (`null` without `expert_ram`).
    fn expert_cache_json(&self) -> String {
        serde_json::to_string(&self.shared.model.expert_cache_report()).expect("plain data")
    }
}

/// Pieces of one answer; after the last one, `answer_json` holds the whole answer.
#[pyclass(frozen, module = "moellava._moellava")]
pub struct NativeStream {
    rx: Mutex<Option<Receiver<Event>>>,
    cancel: Arc<AtomicBool>,
    answer: Mutex<Option<String>>,
}

#[pymethods]
impl NativeStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<String> {
        // try_lock, never lock: a second reader blocking here would hold the GIL that the first one
        // needs back when its wait ends.
        let mut guard = match self.rx.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return Err(ModelError::new_err("a stream is read by one thread at a time")),
        };
        if guard.is_none() {
            return Err(PyStopIteration::new_err(()));
        }
        match next_event(py, &mut guard, &self.cancel)? {
            Some(Event::Piece(p)) => Ok(p),
            Some(Event::Done(r)) => {
                *guard = None;
                let a = r.map_err(runtime_error)?;
                *self.answer.lock().unwrap_or_else(|e| e.into_inner()) = Some(answer_json(&a));
                Err(PyStopIteration::new_err(()))
            }
            None => {
                *guard = None;
                Err(PyRuntimeError::new_err("the generation thread ended without an answer"))
            }
        }
    }

    /// The whole answer as JSON once the stream is exhausted, else `None`.
    fn answer_json(&self) -> Option<String> {
        self.answer.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the generation at its next token (also done when the stream is dropped).
    fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Drop for NativeStream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}
