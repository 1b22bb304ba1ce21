//! `moellava serve`: an OpenAI-style chat API with images, and a web page to chat about a picture.

use anyhow::{bail, Result};
use clap::Args;
use moellava_server::{Limits, ServeOptions};

use super::options::ModelArgs;

/// Serve a model over HTTP: an OpenAI-compatible `POST /v1/chat/completions` (images inline as
/// `data:image/...;base64,` URLs; `stream: true` for server-sent events), `GET /v1/models`,
/// `GET /health`, `GET /metrics` (Prometheus), and at `/` a page to drop in a picture and ask about it.
///
/// Requests share the model through continuous batching: every running conversation advances one token
/// per decode step, all in one pass over the weights (up to --max-batch at once); a new request's
/// picture and prompt are processed between steps. Answers are the same as run alone.
///
/// Examples:
///   moellava serve -m phi2-q4.gguf --port 8080
///   curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \
///     -d '{"messages": [{"role": "user", "content": "Hello"}], "temperature": 0}'
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests that may wait for a batch slot; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_queue: usize,
    /// Conversations decoded together in one step (each keeps its own KV cache in RAM).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub max_batch: usize,
    /// Require `Authorization: Bearer KEY` on /v1/* (the page asks for it).
    #[arg(long, value_name = "KEY", env = "MOELLAVA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest request body.
    #[arg(long, default_value_t = 32 << 20, value_name = "BYTES")]
    pub max_body_bytes: usize,
    /// Largest image file (decoded from base64).
    #[arg(long, default_value_t = 16 << 20, value_name = "BYTES")]
    pub max_image_bytes: usize,
    /// Largest image, width × height (checked from its header before decoding).
    #[arg(long, default_value_t = 4096 * 4096, value_name = "N")]
    pub max_image_pixels: u64,
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.max_queue == 0 || a.max_batch == 0 {
        bail!("--max-queue and --max-batch must be at least 1 (got {} and {})", a.max_queue, a.max_batch);
    }
    if a.api_key.as_deref().is_some_and(str::is_empty) {
        bail!("--api-key must not be empty");
    }
    let (model, _) = a.model.load()?;
    let model_id = a.model.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "moellava".into());
    let limits =
        Limits { max_body_bytes: a.max_body_bytes, max_image_bytes: a.max_image_bytes, max_image_pixels: a.max_image_pixels };
    moellava_server::serve(
        model,
        model_id,
        ServeOptions { host: a.host, port: a.port, max_queue: a.max_queue, max_batch: a.max_batch, api_key: a.api_key, limits },
    )
}
