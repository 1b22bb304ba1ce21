//! `moellava serve`: an OpenAI-style chat API with images over one loaded model, with continuous
//! batching of decode steps, and a page to chat about a picture.
//!
//! ```text
//! handlers (tokio) ──Job──▶ bounded queue ──▶ scheduler thread: admit ≤1 (image + prefill), then one
//!      ▲                                        batched decode step for all running sequences
//!      └───────── Event (Started, Text…, Done | Failed) per request ◀──┘
//! ```
//! - [`api`]: the request schema → prompt, image, options; [`error`]: OpenAI-shaped errors;
//! - [`scheduler`]: the batching loop; [`routes`]: HTTP and SSE; [`metrics`]: `/metrics`.

pub mod api;
pub mod error;
pub mod metrics;
pub mod routes;
pub mod scheduler;

use std::sync::Arc;

use anyhow::Context;
use moellava_runtime::Model;

pub use api::Limits;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    pub max_queue: usize,
    pub max_batch: usize,
    pub api_key: Option<String>,
    pub limits: Limits,
}

/// Serves `model` until Ctrl-C (or SIGTERM). Prints the address it listens on (port 0 picks a free one).
pub fn serve(model: Model, model_id: String, o: ServeOptions) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    rt.block_on(async move {
        let model = Arc::new(model);
        let metrics = Arc::new(metrics::Metrics::default());
        let queue =
            scheduler::start(model.clone(), o.max_queue, o.max_batch, metrics.clone()).context("starting the scheduler")?;
        let app = Arc::new(routes::App::new(queue, metrics, model, model_id.clone(), o.api_key.clone(), o.limits.clone()));
        let listener = tokio::net::TcpListener::bind((o.host.as_str(), o.port))
            .await
            .with_context(|| format!("listening on {}:{} (--host, --port)", o.host, o.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "moellava serve: {model_id} on http://{addr}/ (OpenAI API at http://{addr}/v1; batch ≤ {}, queue ≤ {}{})",
            o.max_batch,
            o.max_queue,
            if o.api_key.is_some() { ", API key required" } else { "" }
        );
        axum::serve(listener, routes::router(app)).with_graceful_shutdown(shutdown()).await.context("serving HTTP")
    })
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    eprintln!("moellava serve: shutting down");
}
