//! Training: the denoising objective (DDPM, Algorithm 1) with AdamW, warm-up, clipping, EMA,
//! label dropout for classifier-free guidance, atomic checkpoints and exact resumption.

pub mod adamw;
pub mod checkpoint;
pub mod distill;
pub mod ema;
pub mod gan;
mod metrics;
pub mod objective;
pub mod pixelcnn;
mod preview;
pub mod replicas;
mod run;
pub mod single;

use crate::files::RunLock;
use preview::{Preview, preview, preview_lowres};
pub mod vae;
pub mod vae_generator;

use crate::conditioning::text::CaptionBank;
use crate::data::{Dataset, HostBatch};
use crate::device::{inference_device, training_device};
use crate::model::ModelConfig;
use crate::schedule::NoiseSchedule;
use crate::unet::UNet;
use adamw::AdamW;
use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
pub use metrics::{MetricLine, read_metrics};
use objective::{Latents, Objective};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// How the per-timestep losses are weighted.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossWeighting {
    /// Plain MSE on the objective ("L_simple", DDPM eq. 14).
    Uniform,
    /// Min-SNR-gamma (Hang et al. 2023, eq. 7): the x0-space weight `min(SNR, gamma)`,
    /// divided by `SNR` for epsilon and by `SNR + 1` for v prediction.
    MinSnr { gamma: f64 },
}

impl LossWeighting {
    /// Min-SNR's `gamma`; 0 for uniform weighting (as `--min-snr` takes it).
    pub fn gamma(self) -> f64 {
        match self {
            Self::Uniform => 0.0,
            Self::MinSnr { gamma } => gamma,
        }
    }
}

/// Optimisation hyperparameters, saved in every run folder and checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Maximum global gradient norm (0 disables clipping).
    pub grad_clip: f64,
    /// Largest EMA decay (reached after the warm-up of [`ema::decay_at`]).
    pub ema_decay: f64,
    /// Probability of replacing a label with the null class (classifier-free guidance).
    pub label_dropout: f64,
    /// Random horizontal flips.
    pub hflip: bool,
    pub loss_weighting: LossWeighting,
    pub seed: u64,
    pub checkpoint_every: usize,
    /// Save a sample grid every N steps and at the end (0: never).
    pub sample_every: usize,
    /// Arithmetic of the convolutions' matrix products: f32, or bf16 products summed in f32
    /// on Intel AMX (`kernels::MatmulMode`). Older runs, which lack it, trained in f32.
    #[serde(default)]
    pub precision: crate::kernels::MatmulMode,
    /// Flow-matching runs: how training times are drawn (runs from before it: the default).
    #[serde(default)]
    pub flow_time: crate::schedule::FlowTime,
    /// How the learning rate moves after the warm-up (runs from before it: constant).
    #[serde(default)]
    pub lr_schedule: LrSchedule,
}

impl Default for TrainConfig {
    /// A recipe for small models on a CPU: it trained the embedded Fashion-MNIST model.
    fn default() -> Self {
        Self {
            steps: 3000,
            batch_size: 32,
            lr: 4e-4,
            warmup_steps: 200,
            weight_decay: 0.0,
            grad_clip: 1.0,
            ema_decay: 0.995,
            label_dropout: 0.1,
            hflip: false,
            loss_weighting: LossWeighting::MinSnr { gamma: 5.0 },
            seed: 0,
            checkpoint_every: 250,
            sample_every: 500,
            precision: crate::kernels::MatmulMode::F32,
            flow_time: crate::schedule::FlowTime::default(),
            lr_schedule: LrSchedule::Constant,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            bail!("--steps must be at least 1");
        }
        if !(1..=4096).contains(&self.batch_size) {
            bail!(
                "--batch must be between 1 and 4096 (got {})",
                self.batch_size
            );
        }
        if self.steps > 100_000_000 {
            bail!("--steps must be at most 100000000");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("--lr must be a positive number (got {})", self.lr);
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            bail!("--ema-decay must be in [0, 1) (got {})", self.ema_decay);
        }
        if !(0.0..=1.0).contains(&self.label_dropout) {
            bail!(
                "--label-dropout must be in [0, 1] (got {})",
                self.label_dropout
            );
        }
        if self.checkpoint_every == 0 {
            bail!("--checkpoint-every must be at least 1");
        }
        if self.grad_clip < 0.0 {
            bail!("--grad-clip must be 0 (off) or positive");
        }
        self.flow_time.validate()?;
        Ok(())
    }

    /// Learning rate at `step` ([`scheduled_lr`] of `lr`).
    pub fn lr_at(&self, step: usize) -> f64 {
        self.rate_at(self.lr, step)
    }

    /// A rate with another peak (a GAN's discriminator's) on this run's warm-up and schedule.
    pub fn rate_at(&self, peak: f64, step: usize) -> f64 {
        scheduled_lr(peak, self.warmup_steps, self.lr_schedule, self.steps, step)
    }
}

/// How the learning rate moves after the linear warm-up, to the end of the run (`steps`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// The peak rate to the end (DDPM, appendix B; diffusers' `constant_with_warmup`).
    #[default]
    Constant,
    /// Half a cosine from the peak down to 0 at the run's end (Loshchilov & Hutter 2017,
    /// "SGDR", eq. 5 with one period and no restart; diffusers' `cosine`).
    Cosine,
    /// A straight line from the peak down to 0 at the run's end (diffusers' `linear`).
    Linear,
}

/// Learning rate at `step` (0-based) of a run of `steps` steps with peak `lr`.
///
/// Warm-up: `lr (step + 1) / warmup` while `step < warmup` (DDPM, appendix B). After it, with
/// the progress `p = (step - warmup) / max(1, steps - warmup)` (0 at the first step after the
/// warm-up, 1 at `steps`; clamped to [0, 1]):
/// constant `lr`; cosine `lr (1 + cos(pi p)) / 2` (Loshchilov & Hutter 2017, eq. 5); linear
/// `lr (1 - p)`. The formulas of diffusers' `get_cosine_schedule_with_warmup` and
/// `get_linear_schedule_with_warmup` (`optimization.py`) after the warm-up.
pub fn scheduled_lr(
    lr: f64,
    warmup: usize,
    schedule: LrSchedule,
    steps: usize,
    step: usize,
) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let p = ((step - warmup) as f64 / steps.saturating_sub(warmup).max(1) as f64).min(1.0);
    match schedule {
        LrSchedule::Constant => lr,
        LrSchedule::Cosine => lr * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        LrSchedule::Linear => lr * (1.0 - p),
    }
}

/// Everything that defines a run: the model, the optimisation and the data it reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub train: TrainConfig,
    /// The `--data` argument the run was started with.
    pub data: String,
    /// A distillation run (`diffuse distill`): its teacher and method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<distill::DistillConfig>,
}

impl RunConfig {
    /// Checks the whole run (optimisation, network, schedule) before anything is built.
    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        self.model.unet.validate()?;
        NoiseSchedule::new(&self.model.schedule)?;
        let u = &self.model.unet;
        if self.model.superres.is_some() && (u.num_classes.is_some() || u.text_dim.is_some()) {
            bail!("--task superres trains unconditioned models: leave out --cond");
        }
        if self.model.prediction.is_flow() && self.train.loss_weighting != LossWeighting::Uniform {
            bail!(
                "--min-snr weights diffusion timesteps; with --objective flow the time density (--flow-time) weights the loss: leave out --min-snr"
            );
        }
        if let Some(d) = &self.distill {
            d.validate()?;
            if let Some(why) = distill::unsupported_teacher(&crate::model::ModelConfig {
                sampling: None,
                ..self.model.clone()
            }) {
                bail!("the teacher {} cannot be distilled: {why}", d.teacher);
            }
        }
        Ok(())
    }
}

/// A run config of some family, as checkpoints and `--resume` handle it.
pub trait RunSpec: Clone + Serialize + serde::de::DeserializeOwned {
    /// The family of the model it trains.
    const FAMILY: crate::model::Family;
    fn train(&self) -> &TrainConfig;
    fn train_mut(&mut self) -> &mut TrainConfig;
    /// The `--data` argument.
    fn data_mut(&mut self) -> &mut String;
    /// Checks the whole run before anything is built.
    fn validate(&self) -> Result<()>;
}

/// [`RunSpec`]'s accessors for a run config with `train` and `data` fields.
macro_rules! run_spec_parts {
    () => {
        fn train(&self) -> &TrainConfig {
            &self.train
        }
        fn train_mut(&mut self) -> &mut TrainConfig {
            &mut self.train
        }
        fn data_mut(&mut self) -> &mut String {
            &mut self.data
        }
    };
}
pub(crate) use run_spec_parts;

/// The checks of a run of a family other than diffusion: its training options, its model
/// (`model`, the model config's own check) and no loss weighting, which only diffusion's
/// timesteps have.
pub(crate) fn check_family_run(
    train: &TrainConfig,
    model: Result<()>,
    family: crate::model::Family,
) -> Result<()> {
    train.validate()?;
    model?;
    if train.loss_weighting != LossWeighting::Uniform {
        bail!(
            "{} has no timesteps to weight its loss by: leave out --min-snr",
            family.article_name()
        );
    }
    Ok(())
}

impl RunSpec for RunConfig {
    const FAMILY: crate::model::Family = crate::model::Family::Diffusion;
    run_spec_parts!();
    fn validate(&self) -> Result<()> {
        RunConfig::validate(self)
    }
}

/// The model, its EMA copy and the optimiser at the first step of a run: fresh from the seed,
/// or as a checkpoint left them.
struct State {
    model: UNet,
    ema_model: UNet,
    opt: AdamW,
    /// The step training continues from.
    start: usize,
}

impl State {
    fn init(
        cfg: &RunConfig,
        resume: Option<checkpoint::Checkpoint>,
        teacher: Option<&UNet>,
        dev: &burn::tensor::Device,
    ) -> Result<Self> {
        dev.seed(cfg.train.seed);
        let mut model = UNet::new(&cfg.model.unet, dev)?;
        if let (Some(t), None) = (teacher, &resume) {
            // A fresh student is the teacher.
            let mut w = crate::weights::NamedTensors::new();
            crate::weights::collect(t, "", &mut w);
            model = crate::weights::apply(model, &w, "")?;
        }
        let opt = AdamW::new(0.9, 0.999, 1e-8, cfg.train.weight_decay);
        let ema_model = model.valid();
        let mut s = Self {
            model,
            ema_model,
            opt,
            start: 0,
        };
        if let Some(ck) = resume {
            s.model = crate::weights::apply(s.model, &ck.tensors, "model.")?;
            s.ema_model = crate::weights::apply(s.ema_model, &ck.tensors, "ema.")?;
            s.opt.import("opt.", ck.adam_t, &ck.tensors)?;
            s.start = ck.step;
        }
        Ok(s)
    }
}

/// Progress of one step, for progress bars.
#[derive(Clone, Debug)]
pub struct StepReport {
    pub step: usize,
    pub total: usize,
    pub loss: f64,
    pub lr: f64,
    pub elapsed: f64,
}

/// The files of a run folder.
pub struct RunPaths {
    pub dir: PathBuf,
}

impl RunPaths {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
    pub fn model(&self) -> PathBuf {
        crate::model::model_file_in(&self.dir)
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    pub fn samples(&self) -> PathBuf {
        self.dir.join("samples")
    }
    pub fn loss_plot(&self) -> PathBuf {
        self.dir.join("loss.png")
    }
}

/// Takes a run folder for this process ([`RunLock`]: a second writer fails at once, naming
/// this one) and removes the temporaries a killed writer left in it.
pub fn claim_run_folder(out: &Path) -> Result<RunLock> {
    let lock = RunLock::acquire(out)?;
    let removed = crate::files::remove_stale_temps(out);
    if removed > 0 {
        eprintln!(
            "note: removed {removed} temporary file(s) an interrupted write left in {}",
            out.display()
        );
    }
    Ok(lock)
}

/// Checks the step a resumed run continues from against its target: past it is an error
/// (`--steps` is the total to train to, not a number of steps to add).
pub fn check_resume_target(step: usize, target: usize, out: &Path) -> Result<()> {
    if step > target {
        bail!(
            "{} is already at step {step}, past --steps {target}: --steps is the total to train to; give more than {step} to continue the run",
            out.display()
        );
    }
    Ok(())
}

/// Refuses a `--minutes` budget that is not a positive number.
pub fn check_minutes(minutes: Option<f64>) -> Result<()> {
    if let Some(m) = minutes
        && !(m.is_finite() && m > 0.0)
    {
        bail!("--minutes must be a positive number (got {m})");
    }
    Ok(())
}

/// What a run trains with besides its config and data.
#[derive(Clone, Copy, Default)]
pub struct With<'a> {
    /// A latent model's autoencoder.
    pub vae: Option<&'a crate::vae::LoadedVae>,
    /// A distillation run's teacher (on the inference device); a fresh student starts from
    /// its weights.
    pub teacher: Option<&'a UNet>,
    /// Stop after the first step that ends past this many minutes of this invocation (with a
    /// checkpoint; `--resume` continues).
    pub minutes: Option<f64>,
    /// The devices to train on, one replica each (data parallelism); `None`: the training
    /// device.
    pub devices: Option<&'a [(String, burn::tensor::Device)]>,
}

/// Trains a run to `cfg.train.steps`, starting fresh or from `resume` (a loaded checkpoint).
/// `on_step` sees every step (for a progress bar); an error from it stops the run, with the
/// checkpoint of the step just done written, and is returned. Returns the final step count (less than
/// the target when `with.minutes` ran out first).
pub fn train(
    cfg: &RunConfig,
    ds: Dataset,
    out: &Path,
    resume: Option<checkpoint::Checkpoint>,
    with: With,
    on_step: &mut dyn FnMut(&StepReport) -> Result<()>,
) -> Result<usize> {
    cfg.validate()?;
    crate::device::check_training_backend()?;
    let vae = with.vae;
    if cfg.model.latent.is_some() != vae.is_some() {
        bail!("a latent model trains with its VAE, and only a latent model does");
    }
    if cfg.distill.is_some() != with.teacher.is_some() {
        bail!("a distillation run trains with its teacher, and only a distillation run does");
    }
    check_minutes(with.minutes)?;
    let tc = &cfg.train;
    let replicas = match with.devices {
        Some(d) if d.len() > 1 => {
            if cfg.distill.is_some() {
                bail!("--devices: distillation trains on one device");
            }
            let r = replicas::Replicas::new(d.to_vec())?;
            r.check_batch(tc.batch_size)?;
            Some(r)
        }
        _ => None,
    };
    crate::kernels::set_matmul_mode(tc.precision)
        .with_context(|| format!("{}: the run's precision", out.display()))?;
    let paths = RunPaths::new(out);
    let _lock = claim_run_folder(out)?;
    if let Some(ck) = &resume {
        check_resume_target(ck.step, tc.steps, out)?;
    }
    crate::files::write_atomic(
        &paths.config(),
        serde_json::to_string_pretty(cfg)?.as_bytes(),
    )?;

    let dev = match (&replicas, with.devices) {
        (Some(r), _) => r.main().clone(),
        (None, Some([(_, d)])) => d.clone(),
        _ => training_device(),
    };
    let idev = inference_device();
    let sched = NoiseSchedule::new(&cfg.model.schedule)?;

    let State {
        model,
        ema_model,
        opt,
        start,
    } = State::init(cfg, resume, with.teacher, &dev)?;
    let metrics = metrics::restore(&paths, start)?;
    if start >= tc.steps {
        return Ok(start);
    }

    let (bank, preview_text) = encode_captions(cfg, &ds, &idev)?;
    // Latent models: every image encoded once to its posterior (means, then standard
    // deviations); each step draws fresh latents from it.
    let latents = match vae {
        Some(v) => {
            let t0 = Instant::now();
            let l = encode_dataset(v, &ds, &idev)?;
            eprintln!(
                "encoded {} images to latents in {:.1} s",
                ds.len(),
                t0.elapsed().as_secs_f64()
            );
            Some(l)
        }
        None => None,
    };
    let extra = vae_tensors(vae);
    // A distillation checkpoint also holds its teacher, so a resumed run needs nothing else.
    let mut private = crate::weights::NamedTensors::new();
    if let Some(t) = with.teacher {
        crate::weights::collect(t, distill::TEACHER_PREFIX, &mut private);
    }
    let consistency = match (&cfg.distill, with.teacher) {
        (Some(d), Some(teacher)) => Some(distill::Consistency {
            cfg,
            distill: d,
            teacher,
        }),
        _ => None,
    };
    let objective = Objective {
        cfg,
        schedule: &sched,
        latents: latents.as_ref(),
        captions: bank.as_ref(),
    };
    let preview_cond = preview_lowres(cfg, &ds);
    let mut learner = DiffusionLearner {
        cfg,
        objective,
        consistency,
        replicas,
        model: Some(model),
        ema_model: Some(ema_model),
        opt,
        dev,
        extra,
        private,
        preview: Preview {
            text: preview_text,
            lowres: preview_cond,
            vae,
        },
    };
    run::run_loop(
        tc,
        Arc::new(ds),
        &paths,
        run::Span {
            start,
            metrics,
            minutes: with.minutes,
        },
        &mut learner,
        on_step,
    )
}

/// A diffusion (or distillation) run's state and step.
struct DiffusionLearner<'a> {
    cfg: &'a RunConfig,
    objective: Objective<'a>,
    consistency: Option<distill::Consistency<'a>>,
    /// Data-parallel replicas (more than one device), or `None`: one device.
    replicas: Option<replicas::Replicas>,
    /// Always `Some` between steps (taken and put back by each update).
    model: Option<UNet>,
    ema_model: Option<UNet>,
    opt: AdamW,
    dev: burn::tensor::Device,
    /// Tensors into the checkpoint and the model file (a latent model's VAE).
    extra: crate::weights::NamedTensors,
    /// Tensors into the checkpoint only (a distillation run's teacher).
    private: crate::weights::NamedTensors,
    preview: Preview<'a>,
}

impl run::Learner for DiffusionLearner<'_> {
    fn step(&mut self, batch: HostBatch, step: usize) -> Result<run::StepOutcome> {
        let tc = &self.cfg.train;
        let dev = &self.dev;
        let model = self.model.take().expect("the model between steps");
        let (loss_v, grads) = match &self.replicas {
            // (A distillation run has no replicas: `train` refuses them.)
            Some(r) => {
                let ex = self.objective.example(batch, step, dev);
                let b = ex.t_model.len();
                let shares = r.shares(b);
                let objective = &self.objective;
                r.gradients(&model, tc.seed, step, &|i, m, d| {
                    let shard = ex.shard(shares[i].clone(), d);
                    denoiser_loss(objective, m, &shard, d)
                        .mul_scalar(shares[i].len() as f64 / b as f64)
                })?
            }
            None => {
                let loss = match &self.consistency {
                    Some(c) => c.loss(&model, batch, step, dev),
                    None => {
                        let ex = self.objective.example(batch, step, dev);
                        denoiser_loss(&self.objective, &model, &ex, dev)
                    }
                };
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                (loss.into_scalar::<f32>() as f64, grads)
            }
        };
        run::check_diverged("training", &[("loss", loss_v)], step, "try a lower --lr")?;
        let gnorm = adamw::grad_norm(&model, &grads);
        let scale = adamw::clip_scale(gnorm, tc.grad_clip);
        let lr = tc.lr_at(step);
        let model = self.opt.step(model, &grads, lr, scale);
        let ema = self.ema_model.take().expect("the EMA between steps");
        self.ema_model = Some(ema::update(
            ema,
            &model,
            ema::decay_at(tc.ema_decay, step as u64),
        ));
        self.model = Some(model);
        Ok(run::StepOutcome {
            loss: loss_v,
            lr,
            grad_norm: gnorm,
            extra: Vec::new(),
        })
    }

    fn save(&self, paths: &RunPaths, step: usize) -> Result<()> {
        let files = checkpoint::Files {
            both: &self.extra,
            checkpoint_only: &self.private,
        };
        let model = self.model.as_ref().expect("the model between steps");
        let ema = self.ema_model.as_ref().expect("the EMA between steps");
        checkpoint::save(paths, self.cfg, model, ema, &self.opt, step, files)
    }

    fn preview(&self, paths: &RunPaths, step: usize) -> Result<()> {
        let p = Preview {
            text: self.preview.text.clone(),
            lowres: self.preview.lowres.clone(),
            vae: self.preview.vae,
        };
        let ema = self.ema_model.as_ref().expect("the EMA between steps");
        preview(self.cfg, ema, paths, step, p)
    }
}

/// The denoiser's loss on an example: its output from the example's input, time and
/// conditioning against the objective's target.
fn denoiser_loss(
    objective: &Objective,
    model: &UNet,
    ex: &objective::Example,
    dev: &burn::tensor::Device,
) -> Tensor<1> {
    let out = match &ex.text {
        Some(tc) => model.forward_cond(ex.x_t.clone(), &ex.t_model, crate::unet::Cond::Text(tc)),
        None => model.forward(ex.x_t.clone(), &ex.t_model, ex.labels.as_deref()),
    };
    objective.loss(out, ex, dev)
}

/// The VAE's tensors under [`crate::model::VAE_PREFIX`], for model files and checkpoints.
fn vae_tensors(vae: Option<&crate::vae::LoadedVae>) -> crate::weights::NamedTensors {
    vae.map(|v| {
        v.tensors()
            .into_iter()
            .map(|(k, t)| (format!("{}{k}", crate::model::VAE_PREFIX), t))
            .collect()
    })
    .unwrap_or_default()
}

/// Text models: every caption encoded once, before the first step, and the preview grids'
/// prompts (16 dataset captions). `(None, None)` for other models.
fn encode_captions(
    cfg: &RunConfig,
    ds: &Dataset,
    idev: &burn::tensor::Device,
) -> Result<(Option<CaptionBank>, Option<crate::unet::TextCond>)> {
    Ok(match (cfg.model.unet.text_dim, &ds.captions) {
        (None, _) => (None, None),
        (Some(_), None) => bail!(
            "a text-conditioned model needs captions: {} has neither captions.jsonl nor .txt files beside its images",
            ds.source
        ),
        (Some(d), Some(caps)) => {
            let enc = crate::conditioning::text::TextEncoder::load_default(idev)?;
            if enc.config.hidden_size != d {
                bail!(
                    "the model's text width is {d} but the text encoder's is {}",
                    enc.config.hidden_size
                );
            }
            let t0 = Instant::now();
            let bank = CaptionBank::build(&enc, caps, &mut |_, _| {})?;
            eprintln!(
                "encoded {} distinct captions in {:.1} s",
                bank.len(),
                t0.elapsed().as_secs_f64()
            );
            let step = (caps.len() / 16).max(1);
            let prompts: Vec<&str> = caps
                .iter()
                .step_by(step)
                .take(16)
                .map(|a| a[0].as_str())
                .collect();
            (Some(bank), Some(enc.cond(&prompts)?))
        }
    })
}

/// Encodes every image of `ds` once (batches of 64 on the inference device).
fn encode_dataset(
    v: &crate::vae::LoadedVae,
    ds: &Dataset,
    dev: &burn::tensor::Device,
) -> Result<Latents> {
    let shape = v.config.latent_shape(ds.size);
    let (mut mean, mut std) = (Vec::new(), Vec::new());
    let host =
        |t: Tensor<4>| -> Vec<f32> { t.into_data().convert::<f32>().try_into_vec().expect("f32") };
    crate::vae::encode_images(&v.vae, ds, ds.len(), dev, &mut |post| {
        mean.extend(host(post.mean));
        std.extend(host(post.logvar.mul_scalar(0.5).exp()));
    });
    Ok(Latents {
        shape,
        mean,
        std,
        scale: v.config.scaling_factor as f32,
        shift: v.config.shift_factor.unwrap_or(0.0) as f32,
    })
}
