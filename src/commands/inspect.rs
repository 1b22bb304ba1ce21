//! `moellava inspect FILE.gguf [--json]`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use moellava_runtime::gguf::GgufFile;
use moellava_runtime::inspect::Report;

/// Show what a GGUF file holds: architecture and hyper-parameters, tokenizer, the tensor table,
/// bytes per tensor class (experts, attention, dense FFN, embeddings, router, vision, projector,
/// norms) and expert bytes per MoE layer.
///
/// Reads any GGUF v2/v3 file (ours, llama.cpp's, or the `gguf` Python package's) and validates it
/// completely first: a malformed file gives a one-line error naming the byte offset, and exit code 1.
///
/// Example: moellava inspect model.gguf --json | jq '.classes'
#[derive(Args)]
pub struct InspectArgs {
    /// The GGUF file.
    pub file: PathBuf,
    /// Print one JSON object: `metadata` (key → value; arrays longer than 16 are shortened to 16
    /// items and a "… N more" marker), `tensors` (list of {name, type, shape, ne, offset, bytes, class};
    /// `shape` is row-major, `ne` ggml order, `offset` absolute in the file), `classes` (class → {tensors,
    /// bytes, params}), `expert_layers` and `file`.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let file = GgufFile::open(&args.file)?;
    let report = Report::new(&file.meta);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.render_text(&args.file.display().to_string()));
    }
    Ok(())
}
