//! The generation queue: a bounded list of waiting jobs and one worker thread that owns the
//! model and runs them one at a time, off the async runtime's threads.
//!
//! A job carries a cancel flag (set when its client goes away or its time runs out; the
//! sampling loop checks it before every step), a channel for progress events (dropped when
//! full: progress is advisory) and a one-shot channel for its result.

use crate::imageio::png_bytes;
use crate::pipeline::{Conditioning, Generator, Request, Seeds};
use crate::sampler::{SamplerChoice, SamplerKind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A validated generation request.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    pub n: usize,
    /// Class per image (`None`: the model's unconditional distribution).
    pub classes: Option<Vec<usize>>,
    /// Text models: the prompt (empty: unconditional).
    pub prompt: String,
    /// Diffusion models: the sampler and its steps (other families ignore them).
    pub diffusion: bool,
    pub steps: usize,
    pub sampler: SamplerKind,
    pub eta: f64,
    pub guidance: f32,
    /// Guidance only at noise levels sigma in `[lo, hi]`.
    pub guidance_interval: Option<(f64, f64)>,
    /// Autoregressive models: the sampling temperature (`None`: 1).
    pub temperature: Option<f32>,
    pub seed: u64,
}

/// What a running job reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Taken off the queue; sampling begins.
    Started,
    /// `step` of `total` sampling steps done.
    Step { step: usize, total: usize },
}

/// A finished job: one PNG per image.
#[derive(Clone, Debug)]
pub struct JobOutput {
    pub pngs: Vec<Vec<u8>>,
    pub seconds: f64,
    /// Text models: the prompt was longer than the encoder reads and was cut.
    pub prompt_truncated: bool,
}

/// Why a job gave no images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobError {
    /// Its client went away (or the server is stopping).
    Cancelled,
    /// It did not finish within the request timeout.
    TimedOut,
    /// Generation itself failed; the message says why.
    Failed(String),
}

struct Job {
    spec: JobSpec,
    cancel: Arc<AtomicBool>,
    deadline: Instant,
    progress: mpsc::Sender<Progress>,
    done: oneshot::Sender<Result<JobOutput, JobError>>,
}

/// Counters for `/health` and the load test.
#[derive(Debug, Default)]
pub struct Stats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub timed_out: AtomicU64,
    pub failed: AtomicU64,
    pub rejected_full: AtomicU64,
    /// Seconds per finished job, a moving average (f64 bits), for Retry-After.
    sec_per_job: AtomicU64,
}

impl Stats {
    /// Seconds a job takes, a moving average of finished jobs (0 before the first).
    pub fn sec_per_job(&self) -> f64 {
        f64::from_bits(self.sec_per_job.load(Ordering::Relaxed))
    }

    fn record(&self, seconds: f64) {
        let old = self.sec_per_job();
        let new = if old == 0.0 {
            seconds
        } else {
            0.8 * old + 0.2 * seconds
        };
        self.sec_per_job.store(new.to_bits(), Ordering::Relaxed);
    }
}

/// The handle handlers hold: submits jobs, never blocks.
pub struct Queue {
    tx: Mutex<Option<SyncSender<Job>>>,
    pub capacity: usize,
    pub stats: Arc<Stats>,
}

/// A submitted job, as its handler sees it. Dropping it cancels the job (the client went
/// away) unless it finished.
pub struct Ticket {
    pub progress: mpsc::Receiver<Progress>,
    pub done: oneshot::Receiver<Result<JobOutput, JobError>>,
    cancel: Arc<AtomicBool>,
}

impl Ticket {
    /// Asks the worker to stop this job at its next step.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Refusal to queue: the queue is full.
#[derive(Debug)]
pub struct QueueFull {
    /// A guess at when a place frees up.
    pub retry_after: Duration,
}

impl Queue {
    /// Starts the worker thread that owns the pipeline and returns the queue that feeds it,
    /// holding at most `capacity` waiting jobs; `batch` images are denoised at once (`None`:
    /// the pipeline's default).
    pub fn start(generator: Generator, capacity: usize, batch: Option<usize>) -> Self {
        let (tx, rx) = sync_channel::<Job>(capacity);
        let stats = Arc::new(Stats::default());
        let s = stats.clone();
        std::thread::Builder::new()
            .name("diffuse-worker".into())
            .spawn(move || worker(generator, rx, s, batch))
            .expect("cannot start the generation thread");
        Self {
            tx: Mutex::new(Some(tx)),
            capacity,
            stats,
        }
    }

    /// Queues a job that must finish within `timeout`, or says the queue is full.
    pub fn submit(&self, spec: JobSpec, timeout: Duration) -> Result<Ticket, QueueFull> {
        let cancel = Arc::new(AtomicBool::new(false));
        let (ptx, prx) = mpsc::channel(64);
        let (dtx, drx) = oneshot::channel();
        let job = Job {
            spec,
            cancel: cancel.clone(),
            deadline: Instant::now() + timeout,
            progress: ptx,
            done: dtx,
        };
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let full = || {
            self.stats.rejected_full.fetch_add(1, Ordering::Relaxed);
            // The queue drains one job per `sec_per_job`: a place frees up after about one.
            let secs = self.stats.sec_per_job().ceil().clamp(1.0, 600.0);
            QueueFull {
                retry_after: Duration::from_secs(secs as u64),
            }
        };
        let Some(tx) = guard.as_ref() else {
            return Err(full());
        };
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(job) {
            Ok(()) => Ok(Ticket {
                progress: prx,
                done: drx,
                cancel,
            }),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                Err(full())
            }
        }
    }

    /// Stops taking jobs; the worker finishes the one in hand and exits.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Most images the worker puts in one batch.
pub const MAX_BATCH_IMAGES: usize = 32;

/// Jobs that can share one sampling loop: same sampler, steps, eta, guidance (and its
/// interval), temperature, and all with or all without classes. Seeds, classes and sizes may differ.
fn compatible(a: &JobSpec, b: &JobSpec) -> bool {
    a.sampler == b.sampler
        && a.steps == b.steps
        && a.eta.to_bits() == b.eta.to_bits()
        && a.guidance.to_bits() == b.guidance.to_bits()
        && a.guidance_interval.map(|(l, h)| (l.to_bits(), h.to_bits()))
            == b.guidance_interval.map(|(l, h)| (l.to_bits(), h.to_bits()))
        && a.temperature.map(f32::to_bits) == b.temperature.map(f32::to_bits)
        && a.classes.is_some() == b.classes.is_some()
}

fn worker(generator: Generator, rx: Receiver<Job>, stats: Arc<Stats>, chunk: Option<usize>) {
    // A job taken off the channel that could not join the last batch starts the next one.
    let mut next: Option<Job> = None;
    loop {
        let Some(first) = next.take().or_else(|| rx.recv().ok()) else {
            return;
        };
        // Whatever is waiting and fits joins the batch: under load, batches form by themselves.
        let mut batch = vec![first];
        let mut images = batch[0].spec.n;
        while images < MAX_BATCH_IMAGES {
            match rx.try_recv() {
                Ok(j)
                    if compatible(&batch[0].spec, &j.spec)
                        && images + j.spec.n <= MAX_BATCH_IMAGES =>
                {
                    images += j.spec.n;
                    batch.push(j);
                }
                Ok(j) => {
                    next = Some(j);
                    break;
                }
                Err(_) => break,
            }
        }
        stats.waiting.fetch_sub(batch.len(), Ordering::Relaxed);
        // Past its deadline the handler has answered 504 (and dropped its ticket, which sets
        // the cancel flag too): that is a time-out, not a client that left.
        let now = Instant::now();
        let (live, dead): (Vec<Job>, Vec<Job>) = batch
            .into_iter()
            .partition(|j| now < j.deadline && !j.cancel.load(Ordering::Relaxed));
        for j in dead {
            finish(j, Err(JobError::Cancelled), &stats);
        }
        if live.is_empty() {
            continue;
        }
        stats.running.fetch_add(live.len(), Ordering::Relaxed);
        // A panic in generation (a bug) fails this batch's jobs with a 500 naming it; the
        // worker lives on, so later requests are answered and /health stays true.
        let outcomes = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(&generator, &live, &stats, chunk)
        }))
        .unwrap_or_else(|p| {
            let what = crate::panic_message(p.as_ref());
            let e = format!("internal error (a bug in diffuse): generation panicked: {what}");
            live.iter()
                .map(|_| Err(JobError::Failed(e.clone())))
                .collect()
        });
        stats.running.fetch_sub(live.len(), Ordering::Relaxed);
        for (j, o) in live.into_iter().zip(outcomes) {
            finish(j, o, &stats);
        }
    }
}

/// Counts a job's outcome and hands it to its handler (if it is still there).
fn finish(job: Job, outcome: Result<JobOutput, JobError>, stats: &Stats) {
    let outcome = match outcome {
        Err(JobError::Cancelled) if Instant::now() >= job.deadline => Err(JobError::TimedOut),
        o => o,
    };
    let counter = match &outcome {
        Ok(_) => &stats.completed,
        Err(JobError::Cancelled) => &stats.cancelled,
        Err(JobError::TimedOut) => &stats.timed_out,
        Err(JobError::Failed(_)) => &stats.failed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let _ = job.done.send(outcome);
}

/// Runs compatible jobs as one batch; one outcome per job, in order.
fn run(
    generator: &Generator,
    jobs: &[Job],
    stats: &Stats,
    batch: Option<usize>,
) -> Vec<Result<JobOutput, JobError>> {
    let t0 = Instant::now();
    let spec = &jobs[0].spec;
    let n: usize = jobs.iter().map(|j| j.spec.n).sum();
    let fail = |e: anyhow::Error| {
        let e = JobError::Failed(format!("{e:#}"));
        jobs.iter().map(|_| Err(e.clone())).collect()
    };
    let cancel_all = Arc::new(AtomicBool::new(false));
    let mut req = Request::new(n, spec.sampler);
    req.steps = Some(spec.steps);
    req.options = SamplerChoice {
        eta: spec.eta,
        ..Default::default()
    };
    req.guidance = spec.guidance;
    req.guidance_interval = spec.guidance_interval;
    req.temperature = spec.temperature;
    req.seeds = Seeds::Parts(jobs.iter().map(|j| (j.spec.n, j.spec.seed)).collect());
    req.cancel = Some(cancel_all.clone());
    req.batch = batch;
    req.conditioning = if generator.cond().text {
        Conditioning::Prompts {
            prompts: jobs
                .iter()
                .map(|j| (j.spec.prompt.clone(), j.spec.n))
                .collect(),
            negative: None,
        }
    } else if spec.classes.is_some() {
        Conditioning::Classes(
            jobs.iter()
                .flat_map(|j| j.spec.classes.clone().unwrap_or_default())
                .collect(),
        )
    } else {
        Conditioning::None
    };
    // Option errors before the jobs are told they started.
    if let Some(Err(e)) = generator.as_diffusion().map(|p| p.sampler(&req)) {
        return fail(e);
    }
    for j in jobs {
        let _ = j.progress.try_send(Progress::Started);
    }
    let gone = |j: &Job| {
        // Out of time, cancelled, or a client that stopped reading its stream.
        Instant::now() >= j.deadline
            || j.cancel.load(Ordering::Relaxed)
            || (j.progress.is_closed() && j.done.is_closed())
    };
    let mut on_step = |s: &crate::pipeline::Step| {
        let mut all_gone = true;
        for j in jobs {
            if gone(j) {
                j.cancel.store(true, Ordering::Relaxed);
            } else {
                all_gone = false;
                let _ = j.progress.try_send(Progress::Step {
                    step: s.index + 1,
                    total: s.total,
                });
            }
        }
        if all_gone {
            cancel_all.store(true, Ordering::Relaxed);
        }
    };
    let out = match generator.run(&req, &mut on_step) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let truncated = out.prompt_truncated.clone();
    let batch = out.pixels();
    let seconds = t0.elapsed().as_secs_f64();
    let mut start = 0;
    let mut outcomes = Vec::with_capacity(jobs.len());
    for (k, j) in jobs.iter().enumerate() {
        let range = start..start + j.spec.n;
        start = range.end;
        if gone(j) {
            outcomes.push(Err(JobError::Cancelled));
            continue;
        }
        let pngs: Result<Vec<Vec<u8>>, JobError> = range
            .map(|i| {
                png_bytes(&batch.image(i).to_rgb8())
                    .map_err(|e| JobError::Failed(format!("cannot encode PNG: {e}")))
            })
            .collect();
        outcomes.push(pngs.map(|pngs| JobOutput {
            pngs,
            seconds,
            prompt_truncated: truncated.get(k).copied().unwrap_or(false),
        }));
    }
    stats.record(seconds);
    outcomes
}
