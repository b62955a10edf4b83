//! The training loop every family shares: batches built two steps ahead on a loader thread,
//! one [`Learner::step`] per batch, a line of `metrics.jsonl` per step, checkpoints every N
//! steps and at the end (or when `--minutes` run out), preview grids, and the loss plot. What a
//! step does (the objective, the optimisers, the EMA) is the family's, behind [`Learner`].

use super::metrics::{self, MetricLine};
use super::{RunLock, RunPaths, RunSpec, StepReport, TrainConfig};
use crate::data::{self, Dataset, HostBatch};
use anyhow::{Context, Result};
use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

/// What one step reports.
pub(crate) struct StepOutcome {
    /// The loss the progress bar and the loss plot show.
    pub loss: f64,
    /// The learning rate of the step.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Further figures of the family, into `metrics.jsonl` by name.
    pub extra: Vec<(&'static str, f64)>,
}

/// One family's training state and step.
pub(crate) trait Learner {
    /// Trains on `batch` as step `step`; errors name the step.
    fn step(&mut self, batch: HostBatch, step: usize) -> Result<StepOutcome>;
    /// Writes the checkpoint and the model file at `step` (atomically).
    fn save(&self, paths: &RunPaths, step: usize) -> Result<()>;
    /// Saves the preview grid of `step`.
    fn preview(&self, paths: &RunPaths, step: usize) -> Result<()>;
}

/// Where a loop starts and how long it may run.
pub(crate) struct Span {
    /// The first step to train.
    pub start: usize,
    /// `metrics.jsonl` as [`metrics::restore`] opened it, with the training time its lines had
    /// taken.
    pub metrics: (File, f64),
    /// Stop after the first step that ends past this many minutes.
    pub minutes: Option<f64>,
}

/// Trains from `span.start` to `tc.steps` (or until the minutes run out), appending to the
/// metrics. Returns the last step done. An error from `on_step` stops the run after writing
/// the checkpoint of the step just done, and is returned.
pub(crate) fn run_loop(
    tc: &TrainConfig,
    ds: Arc<Dataset>,
    paths: &RunPaths,
    span: Span,
    learner: &mut dyn Learner,
    on_step: &mut dyn FnMut(&StepReport) -> Result<()>,
) -> Result<usize> {
    let Span {
        start,
        metrics: (mut metrics, elapsed_before),
        minutes,
    } = span;
    let (tx, rx) = std::sync::mpsc::sync_channel::<HostBatch>(2);
    {
        let (b, seed, flip, end) = (tc.batch_size, tc.seed, tc.hflip, tc.steps);
        std::thread::spawn(move || {
            for s in start..end {
                if tx
                    .send(data::batch_for_step(&ds, s, b, seed, flip))
                    .is_err()
                {
                    break;
                }
            }
        });
    }
    let t0 = Instant::now();
    // The step of the last checkpoint written (the resumed one at first; 0: none).
    let mut saved = start;
    for step in start..tc.steps {
        let batch = rx.recv().context("the data loader stopped")?;
        let out = learner.step(batch, step).map_err(|e| {
            let kept = match saved {
                0 => "no checkpoint was written yet".to_string(),
                s => format!("the checkpoint of step {s} is kept"),
            };
            match e.downcast::<Diverged>() {
                Ok(d) => anyhow::anyhow!("{}; {kept}; {}", d.what, d.advice),
                Err(e) => anyhow::anyhow!("{e:#}; {kept}"),
            }
        })?;
        let done = step + 1;
        let elapsed = elapsed_before + t0.elapsed().as_secs_f64();
        let line = MetricLine {
            step: done,
            loss: out.loss,
            lr: out.lr,
            grad_norm: out.grad_norm,
            elapsed,
            extra: out.extra.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        };
        metrics::append(&mut metrics, &line)?;
        let report = StepReport {
            step: done,
            total: tc.steps,
            loss: out.loss,
            lr: out.lr,
            elapsed,
        };
        if let Err(e) = on_step(&report) {
            // The caller stopped the run (Ctrl-C in Python): the step just taken is kept.
            learner.save(paths, done)?;
            save_loss_plot(paths, done)?;
            eprintln!(
                "stopped at step {done}; its checkpoint is written, and --resume continues from it"
            );
            return Err(e);
        }
        let out_of_time = minutes.is_some_and(|m| t0.elapsed().as_secs_f64() >= m * 60.0);
        let last = done == tc.steps || out_of_time;
        if done % tc.checkpoint_every == 0 || last {
            learner.save(paths, done)?;
            saved = done;
        }
        if tc.sample_every > 0 && (done % tc.sample_every == 0 || last) {
            learner.preview(paths, done)?;
        }
        if out_of_time && done < tc.steps {
            save_loss_plot(paths, done)?;
            return Ok(done);
        }
    }
    save_loss_plot(paths, tc.steps)?;
    Ok(tc.steps)
}

/// `loss.png` from the metrics up to `step`.
fn save_loss_plot(paths: &RunPaths, step: usize) -> Result<()> {
    let all = super::read_metrics(&paths.metrics(), step);
    let pts: Vec<(f64, f64)> = all.iter().map(|m| (m.step as f64, m.loss)).collect();
    crate::plot::save_loss_curve(&pts, &paths.loss_plot())
}

/// What every family's `train` does before building its networks: checks the run (its
/// config, the backend, `--minutes`, a resume target of `resume_step`), sets the matmul
/// precision, takes the run folder's lock and writes `config.json` atomically.
pub(crate) fn open_run<R: RunSpec>(
    cfg: &R,
    out: &std::path::Path,
    resume_step: Option<usize>,
    minutes: Option<f64>,
) -> Result<(RunPaths, RunLock)> {
    cfg.validate()?;
    crate::device::check_training_backend()?;
    super::check_minutes(minutes)?;
    let tc = cfg.train();
    crate::kernels::set_matmul_mode(tc.precision)?;
    let paths = RunPaths::new(out);
    let lock = super::claim_run_folder(out)?;
    if let Some(step) = resume_step {
        super::check_resume_target(step, tc.steps, out)?;
    }
    crate::files::write_atomic(
        &paths.config(),
        serde_json::to_string_pretty(cfg)?.as_bytes(),
    )?;
    Ok((paths, lock))
}

/// A batch's classes with label dropout: each replaced by the null class `K` with probability
/// `p` (one draw per image from `rng`); `None` for an unconditioned model.
pub(crate) fn dropped_labels(
    num_classes: Option<usize>,
    labels: &Option<Vec<usize>>,
    p: f64,
    rng: &mut impl rand::Rng,
) -> Option<Vec<usize>> {
    match (num_classes, labels) {
        (Some(k), Some(l)) => Some(
            l.iter()
                .map(|&y| if rng.gen_bool(p) { k } else { y })
                .collect(),
        ),
        _ => None,
    }
}

/// One optimiser update of a network that keeps an EMA: the global gradient norm, the AdamW
/// step at `step`'s learning rate with the gradients clipped to `tc.grad_clip`, then the EMA
/// moved towards the new weights. Returns the network, its EMA, the learning rate and the norm.
pub(crate) fn update_with_ema<M: burn::module::Module>(
    opt: &mut super::adamw::AdamW,
    net: M,
    ema: M,
    grads: &burn::optim::GradientsParams,
    tc: &TrainConfig,
    step: usize,
) -> (M, M, f64, f64) {
    use super::{adamw, ema as avg};
    let gn = adamw::grad_norm(&net, grads);
    let lr = tc.lr_at(step);
    let net = opt.step(net, grads, lr, adamw::clip_scale(gn, tc.grad_clip));
    let ema = avg::update(ema, &net, avg::decay_at(tc.ema_decay, step as u64));
    (net, ema, lr, gn)
}

/// A loss beyond this is taken as divergence: a working GAN's hinge losses stay near 1 and a
/// likelihood family's loss (nats per sub-pixel) below ln 256 = 5.5 once it has started.
pub(crate) const DIVERGED: f64 = 1e4;

/// A step whose losses were non-finite or beyond [`DIVERGED`]. [`run_loop`], which knows the
/// last checkpoint written, turns it into the run's error line.
#[derive(Debug)]
pub(crate) struct Diverged {
    /// `"{what} diverged at step N (losses)"`.
    what: String,
    /// What to change.
    advice: &'static str,
}

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}; {}", self.what, self.advice)
    }
}

impl std::error::Error for Diverged {}

/// Stops a step whose losses are non-finite or beyond [`DIVERGED`] with a [`Diverged`] naming
/// the (1-based) step and the losses; `advice` says what to change.
pub(crate) fn check_diverged(
    what: &str,
    losses: &[(&str, f64)],
    step: usize,
    advice: &'static str,
) -> Result<()> {
    if losses
        .iter()
        .all(|(_, v)| v.is_finite() && v.abs() <= DIVERGED)
    {
        return Ok(());
    }
    let shown: Vec<String> = losses.iter().map(|(k, v)| format!("{k} {v}")).collect();
    Err(Diverged {
        what: format!(
            "{what} diverged at step {} ({})",
            step + 1,
            shown.join(", ")
        ),
        advice,
    }
    .into())
}
