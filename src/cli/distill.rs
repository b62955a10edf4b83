//! `diffuse distill`: a few-step student from a flow-matching teacher by consistency
//! distillation ([`crate::train::distill`]), trained, checkpointed and resumed like
//! `diffuse train`.

use super::precision_arg;
use super::train::{load_data, start_or_resume, train_with_bar};
use crate::device::inference_device;
use crate::kernels;
use crate::model::SamplingConfig;
use crate::pipeline::load_generator;
use crate::sampler::SamplerKind;
use crate::train::distill::{self, DistillConfig, MAX_GRID, TeacherSolver};
use crate::train::{self, LossWeighting, LrSchedule, RunConfig, RunPaths, TrainConfig};
use crate::unet::UNet;
use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct DistillArgs {
    /// The teacher: a flow-matching model (run folder, model file or shipped name), trained
    /// with `diffuse train --objective flow`.
    #[arg(long)]
    teacher: Option<String>,
    /// The images the student is trained on (the teacher's data).
    #[arg(long)]
    data: String,
    /// Run folder for config, checkpoints, metrics and sample grids.
    #[arg(long)]
    out: PathBuf,
    /// Continue the checkpoint in --out (its teacher travels in it).
    #[arg(long)]
    resume: bool,
    /// Model evaluations the student samples in by default (Euler in flow time); at most
    /// --grid, which should be a multiple of it.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// N: the time grid t = k/N the student learns consistency on (the most steps it samples in).
    #[arg(long, default_value_t = 32)]
    grid: usize,
    /// S: the pieces of time the student is consistent within (multistep consistency; 1: a
    /// plain consistency model) [default: --steps, so that each sampling step is one piece].
    #[arg(long)]
    segments: Option<usize>,
    /// The teacher's step between neighbouring grid times (heun: one more evaluation, a
    /// target on the teacher's path to second order).
    #[arg(long, value_enum, default_value_t = TeacherSolver::Heun)]
    teacher_solver: TeacherSolver,
    /// Training steps (with --resume: a new total to train to).
    #[arg(long)]
    train_steps: Option<usize>,
    /// Stop after this many minutes (with a checkpoint; --resume continues).
    #[arg(long)]
    minutes: Option<f64>,
    /// Guidance weight of the teacher, distilled into the student (which then samples with
    /// guidance 1); class-conditioned teachers only (default: 2 for those, 1 otherwise).
    #[arg(long)]
    guidance: Option<f64>,
    /// Batch size.
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    batch: usize,
    /// Learning rate (AdamW, constant after a short warm-up).
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// EMA decay of the student saved as model.safetensors.
    #[arg(long, default_value_t = TrainConfig::default().ema_decay)]
    ema_decay: f64,
    /// Label dropout: those items learn the unguided teacher, keeping the null class.
    #[arg(long, default_value_t = TrainConfig::default().label_dropout)]
    label_dropout: f64,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    /// Save a sample grid every N steps and at the end (0: never).
    #[arg(long, default_value_t = 250)]
    sample_every: usize,
}

/// Training steps of a distillation run that gives none.
pub const DEFAULT_TRAIN_STEPS: usize = 1000;

pub fn run(a: DistillArgs) -> Result<()> {
    let _lock = train::claim_run_folder(&a.out)?;
    let idev = inference_device();
    let mut teacher = None;
    let (cfg, resume) = start_or_resume(&a.out, a.resume, a.train_steps, &a.data, || {
        let (cfg, t) = fresh_run(&a)?;
        teacher = Some(t);
        Ok(cfg)
    })?;
    let Some(d) = &cfg.distill else {
        bail!(
            "{} is a training run, not a distillation: continue it with `diffuse train --resume --out {}`",
            a.out.display(),
            a.out.display()
        );
    };
    let teacher = match (teacher, &resume) {
        (Some(t), _) => t,
        (None, Some(ck)) => {
            if let Some(t) = &a.teacher
                && t != &d.teacher
            {
                eprintln!(
                    "note: the run distils {}, whose weights are in its checkpoint; --teacher {t} is not read",
                    d.teacher
                );
            }
            let what = RunPaths::new(&a.out).checkpoint().display().to_string();
            let t = UNet::new(&cfg.model.unet, &idev)?;
            crate::weights::apply(t, &ck.tensors, distill::TEACHER_PREFIX)
                .with_context(|| format!("{what}: the teacher's weights"))?
        }
        (None, None) => unreachable!("a fresh run builds its teacher"),
    };
    let ds = load_data(
        &cfg.data,
        cfg.model.output_shape(),
        cfg.model.unet.num_classes,
    )?;
    let with = train::With {
        vae: None,
        teacher: Some(&teacher),
        minutes: a.minutes,
        devices: None,
    };
    let start = resume.as_ref().map(|c| c.step).unwrap_or(0);
    train_with_bar(&cfg.train, ds, &a.out, start, None, |ds, on_step| {
        train::train(&cfg, ds, &a.out, resume, with, on_step)
    })
}

/// The run of a fresh distillation and its teacher, from the options.
fn fresh_run(a: &DistillArgs) -> Result<(RunConfig, UNet)> {
    let Some(spec) = &a.teacher else {
        bail!("--teacher is needed: the flow-matching model to distil");
    };
    let m = load_generator(Some(spec), &inference_device())?
        .into_diffusion("diffuse distill (as a teacher)")?;
    if let Some(why) = distill::unsupported_teacher(&m.config) {
        bail!("--teacher {spec} cannot be distilled: {why}");
    }
    let t = m.config.schedule.timesteps;
    if !(1..=t.min(MAX_GRID)).contains(&a.grid) {
        bail!(
            "--grid must be between 1 and {}, the teacher's training steps (got {})",
            t.min(MAX_GRID),
            a.grid
        );
    }
    if !(1..=a.grid).contains(&a.steps) {
        bail!(
            "--steps must be between 1 and --grid {} (got {})",
            a.grid,
            a.steps
        );
    }
    if !a.grid.is_multiple_of(a.steps) {
        bail!(
            "--grid {} must be a multiple of --steps {}, so that the student's sampling times are on the grid it learned",
            a.grid,
            a.steps
        );
    }
    let conditioned = m.config.unet.num_classes.is_some();
    let guidance = a.guidance.unwrap_or(if conditioned { 2.0 } else { 1.0 });
    if !conditioned && guidance != 1.0 {
        bail!(
            "--guidance needs a class-conditioned teacher; {spec} is unconditioned (leave out --guidance)"
        );
    }
    let mut model = m.config.clone();
    model.sampling = Some(SamplingConfig {
        sampler: SamplerKind::Euler,
        steps: a.steps,
        max_steps: a.grid,
        guidance: 1.0,
    });
    let cfg = RunConfig {
        model,
        train: TrainConfig {
            steps: a.train_steps.unwrap_or(DEFAULT_TRAIN_STEPS),
            batch_size: a.batch,
            lr: a.lr,
            warmup_steps: 50,
            lr_schedule: LrSchedule::Constant,
            weight_decay: 0.0,
            grad_clip: 1.0,
            ema_decay: a.ema_decay,
            label_dropout: a.label_dropout,
            hflip: false,
            loss_weighting: LossWeighting::Uniform,
            seed: a.seed,
            checkpoint_every: a.checkpoint_every,
            sample_every: a.sample_every,
            precision: precision_arg().unwrap_or_else(kernels::matmul_mode),
            flow_time: Default::default(),
        },
        data: a.data.clone(),
        distill: Some(DistillConfig {
            teacher: spec.clone(),
            grid: a.grid,
            guidance,
            segments: a.segments.unwrap_or(a.steps),
            solver: a.teacher_solver,
        }),
    };
    Ok((cfg, m.unet))
}
