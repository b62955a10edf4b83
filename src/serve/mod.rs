//! `diffuse serve`: an HTTP API and a web page for generating images.
//!
//! Routes: `GET /` (the page), `GET /health`, `GET /v1/models`, `POST /v1/generate`.
//! Generation runs on one worker thread that owns the model ([`jobs`]); handlers only queue
//! jobs and wait, so the async runtime never blocks. The queue is bounded (503 with
//! `Retry-After` past it), every request has a time limit (504), request bodies are capped
//! (413), and a client that disconnects cancels its job. No request names a file: the server
//! reads only the model it was started with.
//!
//! `POST /v1/generate` answers `image/png` for one image, JSON with base64 PNGs for several
//! (or when the request's `Accept` is `application/json`), and server-sent events (`queued`,
//! `started`, `progress`, then `done` or `error`) when `Accept` is `text/event-stream`.

pub mod api;
pub mod jobs;
pub mod load;

use crate::pipeline::Generator;
use api::{ErrorBody, GenerateRequest, GenerateResponse, Limits, ModelInfo};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use jobs::{JobError, JobOutput, JobSpec, Progress, Queue, Ticket};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Server settings (`diffuse serve` flags).
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// Most jobs waiting (beyond the one running).
    pub queue: usize,
    pub max_n: usize,
    pub max_steps: usize,
    pub max_body_bytes: usize,
    /// Per-request time limit, queueing included.
    pub timeout: Duration,
    /// Images denoised at once (`None`: [`Pipeline::default_batch`]).
    pub batch: Option<usize>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            queue: 16,
            max_n: 16,
            max_steps: 1000,
            max_body_bytes: 16 * 1024,
            timeout: Duration::from_secs(300),
            batch: None,
        }
    }
}

/// What every handler shares.
pub struct AppState {
    queue: Queue,
    info: ModelInfo,
    served: api::Served,
    timeout: Duration,
    limits: Limits,
    next_seed: AtomicU64,
}

/// The page at `/`.
const PAGE: &str = include_str!("page.html");

/// Builds the router for a loaded model, starting its worker thread.
pub fn app(generator: Generator, cfg: &ServeConfig) -> Router {
    let limits = Limits {
        max_n: cfg.max_n,
        max_steps: cfg.max_steps,
        max_body_bytes: cfg.max_body_bytes,
        timeout_s: cfg.timeout.as_secs(),
    };
    let timesteps = generator
        .as_diffusion()
        .map_or(0, |p| p.model.scheduler.len());
    let served = api::Served::of(&generator);
    let info = ModelInfo::new(generator.source(), &served, timesteps, limits.clone());
    let seed0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let state = Arc::new(AppState {
        queue: Queue::start(generator, cfg.queue, cfg.batch),
        info,
        served,
        timeout: cfg.timeout,
        limits,
        next_seed: AtomicU64::new(seed0 % 1_000_000_007),
    });
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/generate", post(generate))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .with_state(state)
}

/// Binds, prints the address (`listening on http://HOST:PORT`) and serves until Ctrl-C.
pub fn serve(generator: Generator, cfg: ServeConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let local: SocketAddr = listener.local_addr()?;
        let router = app(generator, &cfg);
        println!("listening on http://{local}");
        if !local.ip().is_loopback() {
            eprintln!(
                "note: {} is reachable from other machines; the API has no authentication",
                local.ip()
            );
        }
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}

fn json_error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(ErrorBody { error: msg.into() })).into_response()
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn not_found() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "no such route (GET /, /health, /v1/models; POST /v1/generate)",
    )
}

async fn method_not_allowed() -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed here (GET /, /health, /v1/models; POST /v1/generate)",
    )
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    let st = &s.queue.stats;
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    axum::Json(serde_json::json!({
        "status": "ok",
        "queue": {
            "waiting": st.waiting.load(Ordering::Relaxed),
            "running": st.running.load(Ordering::Relaxed),
            "capacity": s.queue.capacity,
        },
        "jobs": {
            "completed": l(&st.completed),
            "cancelled": l(&st.cancelled),
            "timed_out": l(&st.timed_out),
            "failed": l(&st.failed),
            "rejected_queue_full": l(&st.rejected_full),
        },
        "rss_bytes": crate::bench::current_rss_bytes(),
        "peak_rss_bytes": crate::bench::peak_rss_bytes(),
    }))
    .into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(serde_json::json!({ "models": [s.info] })).into_response()
}

fn wants(headers: &HeaderMap, mime: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim().starts_with(mime)))
}

async fn generate(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            let status = e.status();
            let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!(
                    "request body is larger than {} bytes",
                    s.limits.max_body_bytes
                )
            } else {
                format!("cannot read the request body: {e}")
            };
            return json_error(status, msg);
        }
    };
    // serde would also read a struct from a JSON array, by position; only objects name
    // their fields.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|&b| b != b'{') {
        return json_error(
            StatusCode::BAD_REQUEST,
            "request body is not a valid generate request: it must be a JSON object",
        );
    }
    let req: GenerateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                format!("request body is not a valid generate request: {e}"),
            );
        }
    };
    let seed = s.next_seed.fetch_add(1, Ordering::Relaxed);
    let spec = match api::validate_served(&req, &s.served, s.info.timesteps, &s.limits, seed) {
        Ok(spec) => spec,
        Err(msg) => return json_error(StatusCode::BAD_REQUEST, msg),
    };
    let ticket = match s.queue.submit(spec.clone(), s.timeout) {
        Ok(t) => t,
        Err(full) => {
            let mut r = json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the queue is full ({} jobs waiting); try again later",
                    s.queue.capacity
                ),
            );
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(full.retry_after.as_secs()),
            );
            return r;
        }
    };
    if wants(&headers, "text/event-stream") {
        return stream(ticket, spec, s.timeout).into_response();
    }
    let json = spec.n > 1 || wants(&headers, "application/json");
    // If the client disconnects, this future is dropped with the ticket, which cancels the job.
    let mut ticket = ticket;
    let outcome = tokio::time::timeout(s.timeout, &mut ticket.done).await;
    let out = match outcome {
        Err(_) => {
            ticket.cancel();
            return json_error(StatusCode::GATEWAY_TIMEOUT, timeout_msg(s.timeout));
        }
        Ok(Err(_)) => return json_error(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping"),
        Ok(Ok(Err(e))) => return job_error(e, s.timeout),
        Ok(Ok(Ok(out))) => out,
    };
    let prompt_truncated = out.prompt_truncated;
    if json {
        axum::Json(response_body(&spec, out)).into_response()
    } else {
        let mut r = (
            [(header::CONTENT_TYPE, HeaderValue::from_static("image/png"))],
            out.pngs.into_iter().next().unwrap_or_default(),
        )
            .into_response();
        r.headers_mut()
            .insert("x-seed", HeaderValue::from(spec.seed));
        if prompt_truncated {
            r.headers_mut()
                .insert("x-prompt-truncated", HeaderValue::from_static("true"));
        }
        r
    }
}

fn timeout_msg(t: Duration) -> String {
    format!(
        "generation did not finish within the server's {} s limit; ask for fewer images or steps",
        t.as_secs()
    )
}

fn job_error(e: JobError, timeout: Duration) -> Response {
    match e {
        JobError::TimedOut => json_error(StatusCode::GATEWAY_TIMEOUT, timeout_msg(timeout)),
        JobError::Cancelled => json_error(StatusCode::SERVICE_UNAVAILABLE, "the job was cancelled"),
        JobError::Failed(m) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("generation failed: {m}"),
        ),
    }
}

fn response_body(spec: &JobSpec, out: JobOutput) -> GenerateResponse {
    let b64 = base64::engine::general_purpose::STANDARD;
    GenerateResponse {
        images: out.pngs.iter().map(|p| b64.encode(p)).collect(),
        seed: spec.seed,
        steps: spec.diffusion.then_some(spec.steps),
        sampler: spec.diffusion.then(|| spec.sampler.name()),
        temperature: spec.temperature,
        classes: spec.classes.clone(),
        prompt: (!spec.prompt.is_empty()).then(|| spec.prompt.clone()),
        prompt_truncated: out.prompt_truncated,
        seconds: out.seconds,
    }
}

/// Server-sent events for one job. Dropping the stream (the client left) drops the ticket,
/// which cancels the job.
fn stream(
    ticket: Ticket,
    spec: JobSpec,
    timeout: Duration,
) -> Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let events = futures_util::stream::unfold(St::Queued(ticket, spec), move |st| async move {
        match st {
            St::Queued(t, spec) => {
                let ev = Event::default()
                    .event("queued")
                    .data(serde_json::json!({ "seed": spec.seed }).to_string());
                Some((Ok(ev), St::Running(t, spec)))
            }
            St::Running(mut t, spec) => {
                let next = tokio::time::timeout_at(deadline, async {
                    tokio::select! {
                        biased;
                        p = t.progress.recv(), if !t.progress.is_closed() => match p {
                            Some(p) => Ok(p),
                            None => Err(None),
                        },
                        r = &mut t.done => Err(Some(r)),
                    }
                })
                .await;
                let (ev, st) = match next {
                    Err(_) => {
                        t.cancel();
                        (error_event(&timeout_msg(timeout)), St::Finished)
                    }
                    Ok(Ok(Progress::Started)) => (
                        Event::default().event("started").data("{}"),
                        St::Running(t, spec),
                    ),
                    Ok(Ok(Progress::Step { step, total })) => (
                        Event::default()
                            .event("progress")
                            .data(serde_json::json!({ "step": step, "total": total }).to_string()),
                        St::Running(t, spec),
                    ),
                    // Progress channel closed: wait for the result.
                    Ok(Err(None)) => {
                        let r = tokio::time::timeout_at(deadline, &mut t.done).await;
                        finish(r.map_err(|_| ()), &spec, timeout, &t)
                    }
                    Ok(Err(Some(r))) => finish(Ok(r), &spec, timeout, &t),
                };
                Some((Ok(ev), st))
            }
            St::Finished => None,
        }
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

/// Where an event stream is.
enum St {
    Queued(Ticket, JobSpec),
    Running(Ticket, JobSpec),
    Finished,
}

type DoneResult = Result<Result<JobOutput, JobError>, tokio::sync::oneshot::error::RecvError>;

/// The last event of a stream, from the job's outcome (`Err(())`: out of time).
fn finish(r: Result<DoneResult, ()>, spec: &JobSpec, timeout: Duration, t: &Ticket) -> (Event, St) {
    let ev = match r {
        Err(()) => {
            t.cancel();
            error_event(&timeout_msg(timeout))
        }
        Ok(Err(_)) => error_event("the server is stopping"),
        Ok(Ok(Err(JobError::TimedOut))) => error_event(&timeout_msg(timeout)),
        Ok(Ok(Err(JobError::Cancelled))) => error_event("the job was cancelled"),
        Ok(Ok(Err(JobError::Failed(m)))) => error_event(&format!("generation failed: {m}")),
        Ok(Ok(Ok(out))) => {
            let body = serde_json::to_string(&response_body(spec, out)).unwrap_or_default();
            Event::default().event("done").data(body)
        }
    };
    (ev, St::Finished)
}

fn error_event(msg: &str) -> Event {
    Event::default()
        .event("error")
        .data(serde_json::json!({ "error": msg }).to_string())
}
