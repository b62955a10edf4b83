//! The generation queue: a bounded list of waiting jobs and one worker thread that owns the
//! model and runs them one at a time, off the async runtime's threads.
//!
//! A job carries a cancel flag (set when its client goes away or its time runs out; the
//! sampling loop checks it before every step), a channel for progress events (dropped when
//! full: progress is advisory) and a one-shot channel for its result.

use crate::imageio::{ImageBatch, png_bytes};
use crate::model::LoadedModel;
use crate::sampler::{GenerateOptions, SamplerChoice, SamplerKind, generate};
use burn::tensor::Device;
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
    pub steps: usize,
    pub sampler: SamplerKind,
    pub eta: f64,
    pub guidance: f32,
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
    /// Starts the worker thread that owns `model` (on `device`) and returns the queue that
    /// feeds it, holding at most `capacity` waiting jobs.
    pub fn start(model: LoadedModel, device: Device, capacity: usize) -> Self {
        let (tx, rx) = sync_channel::<Job>(capacity);
        let stats = Arc::new(Stats::default());
        let s = stats.clone();
        std::thread::Builder::new()
            .name("diffuse-worker".into())
            .spawn(move || worker(model, device, rx, s))
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

fn worker(model: LoadedModel, device: Device, rx: Receiver<Job>, stats: Arc<Stats>) {
    for job in rx {
        stats.waiting.fetch_sub(1, Ordering::Relaxed);
        // Past its deadline the handler has answered 504 (and dropped its ticket, which sets
        // the cancel flag too): that is a time-out, not a client that left.
        let outcome = if Instant::now() >= job.deadline {
            Err(JobError::TimedOut)
        } else if job.cancel.load(Ordering::Relaxed) {
            Err(JobError::Cancelled)
        } else {
            stats.running.fetch_add(1, Ordering::Relaxed);
            let r = run(&model, &device, &job, &stats);
            stats.running.fetch_sub(1, Ordering::Relaxed);
            r
        };
        let counter = match &outcome {
            Ok(_) => &stats.completed,
            Err(JobError::Cancelled) => &stats.cancelled,
            Err(JobError::TimedOut) => &stats.timed_out,
            Err(JobError::Failed(_)) => &stats.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // The handler may be gone (client left): nothing to tell then.
        let _ = job.done.send(outcome);
    }
}

fn run(
    model: &LoadedModel,
    device: &Device,
    job: &Job,
    stats: &Stats,
) -> Result<JobOutput, JobError> {
    let t0 = Instant::now();
    let spec = &job.spec;
    let choice = SamplerChoice {
        steps: spec.steps,
        eta: spec.eta,
        ..Default::default()
    };
    let mut sampler = model
        .scheduler
        .build(spec.sampler, &model.schedule, &choice)
        .map_err(|e| JobError::Failed(format!("{e:#}")))?;
    let total = sampler.timesteps().len();
    let _ = job.progress.try_send(Progress::Started);
    let opts = GenerateOptions {
        n: spec.n,
        classes: spec.classes.clone(),
        guidance: spec.guidance,
        seed: spec.seed,
        cancel: Some(job.cancel.clone()),
    };
    let mut on_step = |i: usize, _: &burn::tensor::Tensor<4>| {
        if Instant::now() >= job.deadline {
            job.cancel.store(true, Ordering::Relaxed);
        }
        // A client that stopped reading its stream has left.
        if job.progress.is_closed() && job.done.is_closed() {
            job.cancel.store(true, Ordering::Relaxed);
        }
        let _ = job.progress.try_send(Progress::Step { step: i + 1, total });
    };
    let x = generate(
        &model.unet,
        model.config.unet.num_classes,
        model.config.image_shape(),
        sampler.as_mut(),
        &opts,
        device,
        &mut on_step,
    );
    if job.cancel.load(Ordering::Relaxed) {
        return Err(if Instant::now() >= job.deadline {
            JobError::TimedOut
        } else {
            JobError::Cancelled
        });
    }
    let batch = ImageBatch::from_tensor(x);
    let mut pngs = Vec::with_capacity(batch.len());
    for i in 0..batch.len() {
        let png = png_bytes(&batch.image(i).to_rgb8())
            .map_err(|e| JobError::Failed(format!("cannot encode PNG: {e}")))?;
        pngs.push(png);
    }
    let seconds = t0.elapsed().as_secs_f64();
    stats.record(seconds);
    Ok(JobOutput { pngs, seconds })
}
