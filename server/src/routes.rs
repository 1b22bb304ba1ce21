//! The HTTP side: `/v1/chat/completions` (plain JSON or server-sent events in OpenAI's chunk format),
//! `/v1/models`, `/health`, `/metrics` and the chat page at `/`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use moellava_runtime::model::config::ChatTemplate;
use moellava_runtime::Model;
use serde_json::{json, Value};
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio_stream::wrappers::ReceiverStream;

use crate::api::{self, JobSpec, Limits};
use crate::error::ApiError;
use crate::metrics::{Metrics, Outcome};
use crate::scheduler::{Event, Job, Queue};

/// The chat page: one self-contained file (no CDN; nothing outside can be fetched).
const PAGE: &str = include_str!("page.html");

pub struct App {
    pub queue: Queue,
    pub metrics: Arc<Metrics>,
    pub model: Arc<Model>,
    /// The name clients see (`/v1/models`, `model` in every answer): the file's stem.
    pub model_id: String,
    pub created: u64,
    pub api_key: Option<String>,
    pub limits: Limits,
    pub template: ChatTemplate,
    next_id: AtomicU64,
}

impl App {
    pub fn new(
        queue: Queue,
        metrics: Arc<Metrics>,
        model: Arc<Model>,
        model_id: String,
        api_key: Option<String>,
        limits: Limits,
    ) -> App {
        let template = model.config.chat.clone();
        App { queue, metrics, model, model_id, created: unix_now(), api_key, limits, template, next_id: AtomicU64::new(1) }
    }
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .fallback(|| async {
            ApiError::invalid(None, "no such endpoint (see /v1/chat/completions, /v1/models, /health, /metrics)")
                .with_status(StatusCode::NOT_FOUND)
        })
        .with_state(app)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.api_key else { return Ok(()) };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

async fn health(State(app): State<Arc<App>>) -> Json<Value> {
    let m = &app.metrics;
    Json(json!({
        "status": "ok",
        "model": app.model_id,
        "active": m.active.load(Ordering::Relaxed),
        "queued": m.queued.load(Ordering::Relaxed),
    }))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let body = app.metrics.render(&app.model_id, app.model.expert_cache_report());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        return e.into_response();
    }
    Json(json!({
        "object": "list",
        "data": [{ "id": app.model_id, "object": "model", "created": app.created, "owned_by": "moellava" }],
    }))
    .into_response()
}

/// Checks the key, reads the body within `--max-body-bytes` and parses it (images decoded off the
/// async threads).
async fn read_request(app: &Arc<App>, headers: &HeaderMap, req: Request) -> Result<JobSpec, ApiError> {
    authorize(app, headers)?;
    let limit = app.limits.max_body_bytes;
    let body = axum::body::to_bytes(req.into_body(), limit).await.map_err(|_| {
        ApiError::invalid(None, format!("the request body is over {limit} bytes (--max-body-bytes)"))
            .with_status(StatusCode::PAYLOAD_TOO_LARGE)
            .with_code("body_too_large")
    })?;
    let a = app.clone();
    tokio::task::spawn_blocking(move || api::parse(&body, &a.template, &a.limits))
        .await
        .map_err(|e| ApiError::internal(format!("request parser: {e}")))?
}

async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, req: Request) -> Response {
    let arrived = Instant::now();
    let spec = match read_request(&app, &headers, req).await {
        Ok(s) => s,
        Err(e) => {
            app.metrics.count(Outcome::Invalid);
            return e.into_response();
        }
    };
    let (stream, include_usage) = (spec.stream, spec.include_usage);
    let (tx, mut rx) = mpsc::unbounded_channel();
    if let Err(e) = app.queue.submit(Job { spec, arrived, events: tx }) {
        app.metrics.count(if e.status == StatusCode::SERVICE_UNAVAILABLE { Outcome::Rejected } else { Outcome::Failed });
        return e.into_response();
    }
    // Until the prompt is in, errors (a bad image, a prompt over the context) are still HTTP errors.
    let prompt_tokens = match rx.recv().await {
        Some(Event::Started { prompt_tokens }) => prompt_tokens,
        Some(Event::Failed(e)) => return e.into_response(),
        _ => return ApiError::internal("the scheduler dropped the request").into_response(),
    };
    let reply = Reply {
        id: format!("chatcmpl-{}", app.next_id.fetch_add(1, Ordering::Relaxed)),
        created: unix_now(),
        model: app.model_id.clone(),
        prompt_tokens,
    };
    if stream {
        reply.stream(rx, include_usage)
    } else {
        reply.whole(rx).await
    }
}

/// What every object of one answer carries.
struct Reply {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
}

impl Reply {
    fn usage(&self, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    async fn whole(self, mut rx: UnboundedReceiver<Event>) -> Response {
        loop {
            match rx.recv().await {
                Some(Event::Done { finish_reason, completion_tokens, text }) => {
                    return Json(json!({
                        "id": self.id,
                        "object": "chat.completion",
                        "created": self.created,
                        "model": self.model,
                        "choices": [{
                            "index": 0,
                            "message": { "role": "assistant", "content": text },
                            "finish_reason": finish_reason,
                        }],
                        "usage": self.usage(completion_tokens),
                    }))
                    .into_response()
                }
                Some(Event::Failed(e)) => return e.into_response(),
                Some(_) => {}
                None => return ApiError::internal("the scheduler dropped the request").into_response(),
            }
        }
    }

    /// Server-sent events: a first chunk with the role, one per piece of text, one with the finish
    /// reason, the usage chunk when asked for (`stream_options.include_usage`), then `[DONE]`. When the
    /// client goes away the stream is dropped, and with it `rx`: the scheduler drops the sequence.
    fn stream(self, mut rx: UnboundedReceiver<Event>, include_usage: bool) -> Response {
        let (tx, out) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
        tokio::spawn(async move {
            let chunk = |delta: Value, finish: Option<&str>| {
                let c = json!({
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
                });
                Ok(SseEvent::default().data(c.to_string()))
            };
            if tx.send(chunk(json!({ "role": "assistant", "content": "" }), None)).await.is_err() {
                return;
            }
            // The answer's leading whitespace is dropped, as from the whole answer.
            let mut started = false;
            while let Some(ev) = rx.recv().await {
                let sent = match ev {
                    Event::Text(t) => {
                        let t = if started { t.as_str() } else { t.trim_start() };
                        if t.is_empty() {
                            continue;
                        }
                        started = true;
                        tx.send(chunk(json!({ "content": t }), None)).await
                    }
                    Event::Done { finish_reason, completion_tokens, .. } => {
                        let _ = tx.send(chunk(json!({}), Some(finish_reason))).await;
                        if include_usage {
                            let u = json!({
                                "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "choices": [], "usage": self.usage(completion_tokens),
                            });
                            let _ = tx.send(Ok(SseEvent::default().data(u.to_string()))).await;
                        }
                        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                        return;
                    }
                    Event::Failed(e) => {
                        let _ = tx.send(Ok(SseEvent::default().data(e.body().to_string()))).await;
                        return;
                    }
                    Event::Started { .. } => Ok(()),
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        Sse::new(ReceiverStream::new(out)).keep_alive(KeepAlive::default()).into_response()
    }
}
