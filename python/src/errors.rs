//! The package's exceptions and how runtime errors map onto them. Messages are the CLI's: the same
//! text `moellava` prints after "error: ".

use moellava_convert::ConvertError;
use moellava_runtime::RuntimeError;
use pyo3::exceptions::{PyException, PyKeyboardInterrupt, PyValueError};
use pyo3::{create_exception, PyErr};

create_exception!(moellava, Error, PyException, "Base class of every error moellava raises.");
create_exception!(
    moellava,
    FormatError,
    Error,
    "A file is not what it should be: not a GGUF, a missing or misshapen tensor, a broken checkpoint or POPE file."
);
create_exception!(
    moellava,
    ModelError,
    Error,
    "The model cannot do what was asked: a prompt longer than the context, an option it does not support."
);
create_exception!(moellava, ImageError, Error, "An image could not be read or decoded.");

/// The exception for a runtime error. `context` prefixes the message as the CLI's context does
/// ("loading m.gguf: …"); empty for none.
pub fn runtime_error_in(context: &str, e: RuntimeError) -> PyErr {
    let msg = if context.is_empty() { e.to_string() } else { format!("{context}: {e}") };
    match e {
        RuntimeError::Gguf(_)
        | RuntimeError::MissingTensor { .. }
        | RuntimeError::ShapeMismatch { .. }
        | RuntimeError::BadType { .. }
        | RuntimeError::Tokenizer(_) => FormatError::new_err(msg),
        RuntimeError::Image(_) => ImageError::new_err(msg),
        RuntimeError::Cancelled => PyKeyboardInterrupt::new_err(msg),
        RuntimeError::Unsupported(_) | RuntimeError::Prompt(_) | RuntimeError::Kernel(_) | RuntimeError::Gpu(_) => {
            ModelError::new_err(msg)
        }
    }
}

pub fn runtime_error(e: RuntimeError) -> PyErr {
    runtime_error_in("", e)
}

/// A conversion error: bad choices are a `ValueError`, everything else is about the input files.
pub fn convert_error(e: ConvertError) -> PyErr {
    match e {
        ConvertError::Usage(m) => PyValueError::new_err(m),
        other => FormatError::new_err(other.to_string()),
    }
}
