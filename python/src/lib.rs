//! `moellava._moellava`: the native half of the Python package. The public API (argument
//! normalisation, PIL images, numpy arrays, dataclasses, docstrings) lives in `moellava/__init__.py`;
//! this module exposes the runtime as plainly as possible: paths, bytes, strings and JSON.
//!
//! Every call that computes releases the GIL. Generations run on a helper thread while the calling
//! thread waits with the GIL released and checks for signals, so Ctrl-C stops a long answer
//! (`KeyboardInterrupt`) at the next token.

mod errors;
mod model;

/// Large buffers start on a cache line (ggml's AMX kernel is ~1.5× slower on misaligned outputs).
#[global_allocator]
static ALLOC: moellava_kernels::alloc::CacheAligned = moellava_kernels::alloc::CacheAligned;

use std::path::PathBuf;

use moellava_convert::{ConvertOptions, PlanChoice, Preset};
use moellava_kernels::QuantType;
use moellava_runtime::eval::pope;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use errors::{convert_error, runtime_error, Error, FormatError, ImageError, ModelError};

/// A quant type by ggml's name, or a `ValueError` naming the argument.
fn quant(arg: &str, v: Option<String>) -> PyResult<Option<QuantType>> {
    v.map(|s| QuantType::parse(&s).map_err(|e| PyValueError::new_err(format!("{arg}: {e}")))).transpose()
}

/// Converts a Hugging Face checkpoint into one GGUF file; returns the paths written.
#[pyfunction]
#[pyo3(signature = (hf_dir, output, *, vision_tower=None, preset=None, all=None, experts=None, dense=None,
                    embeddings=None, router=None, vision=None, projector=None, split=false, force=false))]
#[allow(clippy::too_many_arguments)]
fn convert(
    py: Python<'_>,
    hf_dir: PathBuf,
    output: PathBuf,
    vision_tower: Option<PathBuf>,
    preset: Option<String>,
    all: Option<String>,
    experts: Option<String>,
    dense: Option<String>,
    embeddings: Option<String>,
    router: Option<String>,
    vision: Option<String>,
    projector: Option<String>,
    split: bool,
    force: bool,
) -> PyResult<Vec<PathBuf>> {
    let plan = PlanChoice {
        preset: preset.map(|p| Preset::parse(&p).map_err(|e| PyValueError::new_err(format!("preset: {e}")))).transpose()?,
        all: quant("all", all)?,
        experts: quant("experts", experts)?,
        dense: quant("dense", dense)?,
        embeddings: quant("embeddings", embeddings)?,
        router: quant("router", router)?,
        vision: quant("vision", vision)?,
        projector: quant("projector", projector)?,
    };
    let opts = ConvertOptions { input: hf_dir, vision_tower, output, plan, split, force };
    py.allow_threads(|| moellava_convert::prepare(opts).and_then(|c| c.run(&mut |_| {}))).map_err(convert_error)
}

/// Scores POPE answers; returns the JSON text of `moellava pope score --json`.
#[pyfunction]
fn pope_score_json(py: Python<'_>, annotation_dir: PathBuf, question_file: PathBuf, result_file: PathBuf) -> PyResult<String> {
    py.allow_threads(|| {
        let questions = pope::read_questions(&question_file)?;
        let answers = pope::read_answers(&result_file)?;
        let score = pope::score(&questions, &answers, &annotation_dir)?;
        Ok(serde_json::to_string(&score).expect("a score is plain data"))
    })
    .map_err(runtime_error)
}

#[pymodule]
fn _moellava(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<Error>())?;
    m.add("FormatError", py.get_type::<FormatError>())?;
    m.add("ModelError", py.get_type::<ModelError>())?;
    m.add("ImageError", py.get_type::<ImageError>())?;
    m.add_class::<model::NativeModel>()?;
    m.add_class::<model::NativeStream>()?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(pope_score_json, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
