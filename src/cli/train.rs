//! `diffuse train`: the run's configuration from the options (or the checkpoint, to resume),
//! checks of the data against it, and the training loop with a progress bar.

use super::{given, parse_list, precision_arg, refuse_given};
use crate::data::{self, Shape};
use crate::device::inference_device;
use crate::gan::GanConfig;
use crate::kernels;
use crate::model::{self, Family, ModelConfig};
use crate::pixelcnn::PixelCnnConfig;
use crate::schedule::{BetaSchedule, FlowTime, Prediction, ScheduleConfig};
use crate::train::gan::{GanRun, GanTrainConfig};
use crate::train::pixelcnn::PixelCnnRun;
use crate::train::vae_generator::VaeGenRun;
use crate::train::{
    self, LossWeighting, LrSchedule, RunConfig, RunPaths, RunSpec, StepReport, TrainConfig,
    checkpoint,
};
use crate::unet::UNetConfig;
use crate::vae::generator::VaeGenConfig;
use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// What the denoiser is conditioned on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CondKind {
    None,
    Class,
    Text,
}

/// What the model learns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Task {
    /// Generate images.
    Denoise,
    /// Enlarge images (SR3).
    Superres,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Image folder (class = first-level subfolder), IDX file/folder, digits CSV, or a fetched dataset name.
    #[arg(long)]
    data: String,
    /// Run folder for config, checkpoints, metrics and sample grids.
    #[arg(long)]
    out: PathBuf,
    /// Continue the checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Model family: diffusion (denoising diffusion or flow matching), gan (a generator
    /// against a spectrally normalised discriminator) or autoregressive (a gated PixelCNN,
    /// pixel by pixel) or vae (a variational autoencoder sampled from its prior);
    /// docs/FAMILIES.md.
    #[arg(long, value_enum, default_value_t = Family::Diffusion)]
    family: Family,
    /// GAN: width of the noise z [default: 64].
    #[arg(long)]
    z_dim: Option<usize>,
    /// GAN: the generator's channels at full resolution (2x and 4x below) [default: 32].
    #[arg(long)]
    g_channels: Option<usize>,
    /// GAN: the discriminator's channels at full resolution [default: 32].
    #[arg(long)]
    d_channels: Option<usize>,
    /// GAN: the discriminator's learning rate (--lr is the generator's; a GAN's defaults are
    /// --lr 1e-4, --batch 64, --warmup 0, --grad-clip 0, --ema-decay 0.999) [default: 4e-4].
    #[arg(long)]
    lr_d: Option<f64>,
    /// GAN: Adam's beta1 and beta2 for both networks [default: 0,0.9 (SNGAN)].
    #[arg(long, value_name = "B1,B2", value_parser = parse_betas)]
    adam_betas: Option<(f64, f64)>,
    /// GAN: weight of the mode-seeking term (MSGAN, Mao et al. 2019): the generator is also
    /// rewarded for making different images from different noise of one class, against mode
    /// collapse; 0 is off [default: 1].
    #[arg(long, value_name = "WEIGHT")]
    mode_seeking: Option<f64>,
    /// Autoregressive: feature channels of the PixelCNN's stacks [default: 48].
    #[arg(long)]
    features: Option<usize>,
    /// Autoregressive: gated layers (a 7x7 first, then 3x3) [default: 8].
    #[arg(long)]
    layers: Option<usize>,
    /// VAE: channels of the autoencoder's levels, each after the first at half the
    /// resolution [default: 32,64,64].
    #[arg(long)]
    vae_widths: Option<String>,
    /// VAE: channels of the latent [default: 4].
    #[arg(long)]
    latent_channels: Option<usize>,
    /// VAE: steps over which the KL weight rises from 0 to 1 (0: 1 throughout) [default: 500].
    #[arg(long)]
    kl_anneal: Option<usize>,
    /// Image side length (default: the data's own for IDX/digits, 32 for folders).
    #[arg(long)]
    image_size: Option<usize>,
    /// 1 (grey) or 3 (RGB) (default: the data's own; 3 for folders).
    #[arg(long)]
    channels: Option<usize>,
    /// Conditioning: none, class (class subfolders) or text (captions.jsonl or .txt files;
    /// needs `diffuse fetch text-encoder`).
    #[arg(long, value_enum, default_value_t = CondKind::None)]
    cond: CondKind,
    /// Text models: feature-map sizes with cross-attention to the prompt (default: the two
    /// lowest-resolution levels).
    #[arg(long)]
    cross_attention: Option<String>,
    /// What the model learns: denoise (generate images) or superres (enlarge images by
    /// --scale; --image-size is the high resolution; pairs are made from the data).
    #[arg(long, value_enum, default_value_t = Task::Denoise)]
    task: Task,
    /// Super-resolution factor: 2 or 4.
    #[arg(long)]
    scale: Option<usize>,
    /// Latent diffusion: a VAE folder (diffuse train-vae output or a diffusers AutoencoderKL);
    /// the denoiser learns its scaled latents and the VAE travels in the model file.
    #[arg(long)]
    latent: Option<PathBuf>,
    /// Training steps (with --resume: a new total to train to).
    #[arg(long)]
    steps: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    batch: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = TrainConfig::default().warmup_steps)]
    warmup: usize,
    /// The learning rate after the warm-up: constant, or down to 0 at the end of --steps by a
    /// half cosine or a straight line (diffusers' `--lr_scheduler`). A --resume to a new
    /// --steps total stretches the decay to it.
    #[arg(long, value_enum, default_value_t = TrainConfig::default().lr_schedule)]
    lr_schedule: LrSchedule,
    /// AdamW weight decay.
    #[arg(long, default_value_t = TrainConfig::default().weight_decay)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0: off).
    #[arg(long, default_value_t = TrainConfig::default().grad_clip)]
    grad_clip: f64,
    /// EMA decay (0.995 suits runs of a few thousand steps; 0.9999 long ones).
    #[arg(long, default_value_t = TrainConfig::default().ema_decay)]
    ema_decay: f64,
    /// Label dropout probability for classifier-free guidance.
    #[arg(long, default_value_t = TrainConfig::default().label_dropout)]
    label_dropout: f64,
    /// Random horizontal flips.
    #[arg(long)]
    hflip: bool,
    /// Diffusion objectives: Min-SNR-gamma loss weighting (Hang et al. 2023); 0 for plain MSE
    /// [default: 5; not with --objective flow].
    #[arg(long)]
    min_snr: Option<f64>,
    /// Objective: flow for flow matching (rectified flow: x_t = (1 - t) x0 + t eps, velocity
    /// target; sampled by euler or heun; the default, the best per training minute measured in
    /// docs/fast-generation.md), or a diffusion model's output (epsilon, v, x0; the DDPM-style
    /// samplers and diffusers' DDPMScheduler).
    #[arg(long, value_enum, default_value_t = Prediction::Flow)]
    objective: Prediction,
    /// Flow matching: how training times are drawn [default: logit-normal].
    #[arg(long, value_enum)]
    flow_time: Option<FlowTimeArg>,
    /// Flow matching, logit-normal times: location m of t = sigmoid(m + s z) [default: 0].
    #[arg(long)]
    flow_loc: Option<f64>,
    /// Flow matching, logit-normal times: scale s [default: 1].
    #[arg(long)]
    flow_scale: Option<f64>,
    /// Beta schedule.
    #[arg(long, value_enum, default_value_t = ScheduleConfig::default().beta_schedule)]
    schedule: BetaSchedule,
    /// Diffusion steps T.
    #[arg(long, default_value_t = ScheduleConfig::default().timesteps)]
    timesteps: usize,
    /// U-Net base channels. The default network (with one residual block a level) is the best
    /// measured for short CPU runs; past about 13,000 steps `--base-channels 32 --res-blocks 2`
    /// does better (docs/fast-generation.md).
    #[arg(long, default_value_t = UNetConfig::recipe(32).base_channels)]
    base_channels: usize,
    /// Channel multipliers per level, comma-separated (default by image size).
    #[arg(long)]
    channel_mult: Option<String>,
    /// Residual blocks per level.
    #[arg(long, default_value_t = UNetConfig::recipe(32).num_res_blocks)]
    res_blocks: usize,
    /// Feature-map sizes with self-attention, comma-separated (default: the lowest level).
    #[arg(long)]
    attention: Option<String>,
    /// Dropout in residual blocks (worth 0.1 on small datasets trained for long).
    #[arg(long, default_value_t = UNetConfig::recipe(32).dropout)]
    dropout: f64,
    /// GroupNorm groups.
    #[arg(long, default_value_t = UNetConfig::recipe(32).norm_groups)]
    norm_groups: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = TrainConfig::default().checkpoint_every)]
    checkpoint_every: usize,
    /// Save a sample grid every N steps and at the end (0: never).
    #[arg(long, default_value_t = TrainConfig::default().sample_every)]
    sample_every: usize,
    /// Stop after this many minutes (with a checkpoint; --resume continues).
    #[arg(long)]
    minutes: Option<f64>,
    /// Data-parallel training: one replica per device, each on its share of the batch, with
    /// the gradients summed before one optimiser step (the same update as one device). A
    /// count (`2`: two replicas on this build's device) or a list: `cpu:0,cpu:1`, `cuda:0..7`,
    /// `vulkan:0,vulkan:1`. Diffusion runs; read again on --resume.
    #[arg(long)]
    devices: Option<String>,
}

/// Options of `train` that only diffusion runs take (field names).
const DIFFUSION_ONLY: &[&str] = &[
    "devices",
    "cross_attention",
    "task",
    "scale",
    "latent",
    "min_snr",
    "objective",
    "flow_time",
    "flow_loc",
    "flow_scale",
    "schedule",
    "timesteps",
    "base_channels",
    "channel_mult",
    "res_blocks",
    "attention",
    "dropout",
    "norm_groups",
];

/// Options of `train` that only GAN runs take.
const GAN_ONLY: &[&str] = &[
    "z_dim",
    "g_channels",
    "d_channels",
    "lr_d",
    "adam_betas",
    "mode_seeking",
];

/// Options of `train` that only autoregressive runs take.
const AUTOREGRESSIVE_ONLY: &[&str] = &["features", "layers"];

/// Options of `train` that only VAE runs take.
const VAE_ONLY: &[&str] = &["vae_widths", "latent_channels", "kl_anneal"];

/// Refuses, with one line, options of another family's runs than `family`'s.
fn refuse_other_families(family: Family) -> Result<()> {
    for (ids, owner) in [
        (GAN_ONLY, Family::Gan),
        (AUTOREGRESSIVE_ONLY, Family::Autoregressive),
        (VAE_ONLY, Family::Vae),
    ] {
        if owner == family {
            continue;
        }
        let extra: Vec<String> = ids
            .iter()
            .filter(|id| given(id))
            .map(|id| format!("--{}", id.replace('_', "-")))
            .collect();
        if !extra.is_empty() {
            let verb = if extra.len() == 1 {
                "is an option"
            } else {
                "are options"
            };
            bail!("{} {verb} of --family {}", extra.join(", "), owner.name());
        }
    }
    if family != Family::Diffusion {
        refuse_given(DIFFUSION_ONLY, Family::Diffusion, family, "this run")?;
    }
    Ok(())
}

/// `B1,B2` of `--adam-betas` (checked with the run config).
fn parse_betas(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("expected B1,B2 (two numbers), got '{s}'"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<f64>()
            .map_err(|_| format!("'{}' is not a number", v.trim()))
    };
    Ok((num(a)?, num(b)?))
}

pub fn run(a: TrainArgs) -> Result<()> {
    run_with(a, None)
}

/// `diffuse train` with its steps reported to `progress` instead of a progress bar (the
/// Python package's callback); an error from `progress` stops the run with the checkpoint of
/// the step just done written (see [`train::train`]).
pub fn run_with(a: TrainArgs, progress: Option<&mut StepCallback>) -> Result<()> {
    train::check_minutes(a.minutes)?;
    // One writer per run folder, from before anything is read (train::train holds it too).
    let _lock = train::claim_run_folder(&a.out)?;
    let ckpt = RunPaths::new(&a.out).checkpoint();
    let family = if a.resume && ckpt.exists() {
        let f = checkpoint::family(&ckpt)?;
        if given("family") && f != a.family {
            bail!(
                "--family {}: {} holds {} run",
                a.family.name(),
                a.out.display(),
                f.article_name()
            );
        }
        f
    } else {
        a.family
    };
    refuse_other_families(family)?;
    if family != Family::Diffusion && a.cond == CondKind::Text {
        bail!(
            "--cond text is for diffusion models; {} takes --cond class or none",
            family.article_name()
        );
    }
    match family {
        Family::Diffusion => {}
        Family::Gan => return run_gan(&a, progress),
        Family::Autoregressive => return run_autoregressive(&a, progress),
        Family::Vae => return run_vae(&a, progress),
    }
    let (cfg, resume) =
        start_or_resume(&a.out, a.resume, a.steps, &a.data, || build_run_config(&a))?;
    if cfg.distill.is_some() {
        bail!(
            "{} is a distillation run: continue it with `diffuse distill --resume --out {}`",
            a.out.display(),
            a.out.display()
        );
    }
    let ckpt_path = RunPaths::new(&a.out).checkpoint();
    let u = &cfg.model.unet;
    let ds = load_data(&cfg.data, cfg.model.output_shape(), u.num_classes)?;
    // A latent model's VAE: from --latent for a new run, from the checkpoint when resuming.
    let vae = match (&cfg.model.latent, &resume, &a.latent) {
        (None, _, _) => None,
        (Some(l), Some(ck), _) => Some(crate::vae::build(
            l.vae.clone(),
            &ck.tensors,
            model::VAE_PREFIX,
            &ckpt_path.display().to_string(),
            &inference_device(),
        )?),
        (Some(_), None, Some(v)) => Some(crate::vae::load(v, &inference_device())?),
        (Some(_), None, None) => unreachable!("a latent config comes from --latent"),
    };
    if u.text_dim.is_some() {
        if ds.captions.is_none() {
            bail!(
                "--cond text: {} has neither captions.jsonl nor .txt files beside its images",
                cfg.data
            );
        }
        let enc = crate::conditioning::text::default_dir()?;
        if !enc.join("model.safetensors").exists() {
            bail!("--cond text needs the text encoder: run `diffuse fetch text-encoder`");
        }
    }
    let devices = match &a.devices {
        Some(spec) => {
            let d = crate::device::parse_devices(spec)?;
            train::replicas::Replicas::new(d.clone())?.check_batch(cfg.train.batch_size)?;
            Some(d)
        }
        None => None,
    };
    let with = train::With {
        vae: vae.as_ref(),
        teacher: None,
        minutes: a.minutes,
        devices: devices.as_deref(),
    };
    let start = resume.as_ref().map(|c| c.step).unwrap_or(0);
    train_with_bar(&cfg.train, ds, &a.out, start, progress, |ds, on_step| {
        train::train(&cfg, ds, &a.out, resume, with, on_step)
    })
}

/// `diffuse train --family gan`: a new GAN run from the options, or the checkpoint's.
fn run_gan(a: &TrainArgs, progress: Option<&mut StepCallback>) -> Result<()> {
    let (cfg, resume) =
        start_or_resume::<GanRun>(&a.out, a.resume, a.steps, &a.data, || gan_run_config(a))?;
    let m = &cfg.model;
    let ds = load_data(&cfg.data, m.output_shape(), m.num_classes)?;
    let start = resume.as_ref().map(|c| c.step).unwrap_or(0);
    train_with_bar(&cfg.train, ds, &a.out, start, progress, |ds, on_step| {
        train::gan::train(&cfg, ds, &a.out, resume, a.minutes, on_step)
    })
}

/// `diffuse train --family autoregressive`: a new PixelCNN run from the options, or the
/// checkpoint's.
fn run_autoregressive(a: &TrainArgs, progress: Option<&mut StepCallback>) -> Result<()> {
    let (cfg, resume) =
        start_or_resume::<PixelCnnRun>(&a.out, a.resume, a.steps, &a.data, || ar_run_config(a))?;
    let m = &cfg.model;
    let ds = load_data(&cfg.data, m.output_shape(), m.num_classes)?;
    let start = resume.as_ref().map(|c| c.step).unwrap_or(0);
    train_with_bar(&cfg.train, ds, &a.out, start, progress, |ds, on_step| {
        train::single::train(&cfg, ds, &a.out, resume, a.minutes, on_step)
    })
}

/// `diffuse train --family vae`: a new VAE run from the options, or the checkpoint's.
fn run_vae(a: &TrainArgs, progress: Option<&mut StepCallback>) -> Result<()> {
    let (cfg, resume) =
        start_or_resume::<VaeGenRun>(&a.out, a.resume, a.steps, &a.data, || vae_run_config(a))?;
    let m = &cfg.model;
    let ds = load_data(&cfg.data, m.output_shape(), m.num_classes)?;
    let start = resume.as_ref().map(|c| c.step).unwrap_or(0);
    train_with_bar(&cfg.train, ds, &a.out, start, progress, |ds, on_step| {
        train::single::train(&cfg, ds, &a.out, resume, a.minutes, on_step)
    })
}

/// A new VAE run from the options: the data's shape and classes, the VAE's own defaults where
/// an option shared with diffusion was not given.
fn vae_run_config(a: &TrainArgs) -> Result<VaeGenRun> {
    let shape = family_data_shape(a)?;
    let widths = match &a.vae_widths {
        Some(s) => parse_list(s, "--vae-widths")?,
        None => vec![32, 64, 64],
    };
    if widths.is_empty() || widths.contains(&0) {
        bail!(
            "--vae-widths must be positive channel counts, one per level (got '{}')",
            a.vae_widths.as_deref().unwrap_or("")
        );
    }
    let model = VaeGenConfig {
        num_classes: shape.class_names.as_ref().map(|c| c.len()),
        class_names: shape.class_names.unwrap_or_default(),
        ..VaeGenConfig::recipe(
            shape.size,
            shape.channels,
            &widths,
            a.latent_channels.unwrap_or(4),
        )
    };
    let train = family_train_config(
        a,
        SharedDefaults {
            batch: 64,
            lr: 5e-4,
            warmup: 100,
            grad_clip: 1.0,
            ema_decay: 0.999,
        },
    );
    Ok(VaeGenRun {
        model,
        train,
        data: a.data.clone(),
        kl_anneal: a.kl_anneal.unwrap_or(500),
    })
}

/// What a run of another family than diffusion reads from the data: side, channels and (with
/// `--cond class`) the class names.
struct DataShape {
    size: usize,
    channels: usize,
    class_names: Option<Vec<String>>,
}

fn family_data_shape(a: &TrainArgs) -> Result<DataShape> {
    let path = data::resolve(&a.data)?;
    let native = data::idx::is_digits_csv(&path) || data::idx::is_idx(&path)?;
    let with_classes = a.cond == CondKind::Class;
    let (size, channels, class_names) = data_shape(a, &path, native, with_classes)?;
    if with_classes && class_names.is_empty() {
        bail!("--cond class: {} has no class labels", a.data);
    }
    Ok(DataShape {
        size,
        channels,
        class_names: with_classes.then_some(class_names),
    })
}

/// A family's defaults for the options it shares with diffusion.
struct SharedDefaults {
    batch: usize,
    lr: f64,
    warmup: usize,
    grad_clip: f64,
    ema_decay: f64,
}

/// The training options of a run of another family: given options, else the family's
/// defaults.
fn family_train_config(a: &TrainArgs, d: SharedDefaults) -> TrainConfig {
    let pick = |id: &str, v: f64, family: f64| if given(id) { v } else { family };
    TrainConfig {
        steps: a.steps.unwrap_or(TrainConfig::default().steps),
        batch_size: if given("batch") { a.batch } else { d.batch },
        lr: pick("lr", a.lr, d.lr),
        warmup_steps: if given("warmup") { a.warmup } else { d.warmup },
        lr_schedule: a.lr_schedule,
        weight_decay: a.weight_decay,
        grad_clip: pick("grad_clip", a.grad_clip, d.grad_clip),
        ema_decay: pick("ema_decay", a.ema_decay, d.ema_decay),
        label_dropout: a.label_dropout,
        hflip: a.hflip,
        loss_weighting: LossWeighting::Uniform,
        seed: a.seed,
        checkpoint_every: a.checkpoint_every,
        sample_every: a.sample_every,
        precision: precision_arg().unwrap_or_else(kernels::matmul_mode),
        flow_time: FlowTime::default(),
    }
}

/// A new GAN run from the options: the data's shape and classes, the GAN's own defaults where
/// an option shared with diffusion was not given.
fn gan_run_config(a: &TrainArgs) -> Result<GanRun> {
    let shape = family_data_shape(a)?;
    let recipe = GanConfig::recipe(shape.size, shape.channels);
    let model = GanConfig {
        z_dim: a.z_dim.unwrap_or(recipe.z_dim),
        g_channels: a.g_channels.unwrap_or(recipe.g_channels),
        d_channels: a.d_channels.unwrap_or(recipe.d_channels),
        num_classes: shape.class_names.as_ref().map(|c| c.len()),
        class_names: shape.class_names.unwrap_or_default(),
        ..recipe
    };
    let train = family_train_config(
        a,
        SharedDefaults {
            batch: 64,
            lr: 1e-4,
            warmup: 0,
            grad_clip: 0.0,
            ema_decay: 0.999,
        },
    );
    let d = GanTrainConfig::default();
    let (beta1, beta2) = a.adam_betas.unwrap_or((d.beta1, d.beta2));
    Ok(GanRun {
        model,
        train,
        data: a.data.clone(),
        gan: GanTrainConfig {
            lr_d: a.lr_d.unwrap_or(d.lr_d),
            beta1,
            beta2,
            mode_seeking: a.mode_seeking.unwrap_or(d.mode_seeking),
        },
    })
}

/// A new autoregressive run from the options: the data's shape and classes, the PixelCNN's
/// own defaults where an option shared with diffusion was not given.
fn ar_run_config(a: &TrainArgs) -> Result<PixelCnnRun> {
    let shape = family_data_shape(a)?;
    let recipe = PixelCnnConfig::recipe(shape.size, shape.channels);
    let model = PixelCnnConfig {
        features: a.features.unwrap_or(recipe.features),
        layers: a.layers.unwrap_or(recipe.layers),
        num_classes: shape.class_names.as_ref().map(|c| c.len()),
        class_names: shape.class_names.unwrap_or_default(),
        ..recipe
    };
    let train = family_train_config(
        a,
        SharedDefaults {
            batch: 32,
            lr: 1e-3,
            warmup: 100,
            grad_clip: 1.0,
            ema_decay: 0.999,
        },
    );
    Ok(PixelCnnRun {
        model,
        train,
        data: a.data.clone(),
    })
}

/// The run's configuration and checkpoint: from the checkpoint in `out` with `resume` (a new
/// `steps` target, `--data` and `--precision` read from the command line), else `fresh()`
/// for a folder without one. The caller holds the folder's lock.
pub(super) fn start_or_resume<R: RunSpec>(
    out: &std::path::Path,
    resume: bool,
    steps: Option<usize>,
    data: &str,
    fresh: impl FnOnce() -> Result<R>,
) -> Result<(R, Option<checkpoint::Checkpoint<R>>)> {
    let ckpt_path = RunPaths::new(out).checkpoint();
    if !resume {
        if ckpt_path.exists() {
            bail!(
                "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
                out.display()
            );
        }
        let cfg = fresh()?;
        cfg.validate()?;
        return Ok((cfg, None));
    }
    if !ckpt_path.exists() {
        bail!(
            "--resume: {} has no checkpoint.safetensors to continue",
            out.display()
        );
    }
    let ck = checkpoint::load_run::<R>(&ckpt_path)?;
    let unread = super::given_except(&[
        "data",
        "out",
        "resume",
        "steps",
        "train_steps",
        "minutes",
        "precision",
        "family",
        "devices",
    ]);
    if !unread.is_empty() {
        eprintln!(
            "note: --resume continues with the settings saved in the checkpoint; {} not read (only the step target, --data, --minutes, --precision and --devices are)",
            unread.join(", ")
        );
    }
    let mut cfg = ck.run.clone();
    if let Some(s) = steps {
        cfg.train_mut().steps = s;
    }
    train::check_resume_target(ck.step, cfg.train().steps, out)?;
    if let Some(p) = precision_arg() {
        cfg.train_mut().precision = p;
    }
    if cfg.data_mut() != data {
        eprintln!(
            "note: the run was started with --data {}; continuing with {data}",
            cfg.data_mut()
        );
        *cfg.data_mut() = data.to_string();
    }
    // The one check of the whole configuration, before the data is read.
    cfg.validate()?;
    Ok((cfg, Some(ck)))
}

/// A run's data (`spec`), read at its model's output shape, with its classes checked
/// against the model's.
pub(super) fn load_data(
    spec: &str,
    [channels, size, _]: [usize; 3],
    num_classes: Option<usize>,
) -> Result<data::Dataset> {
    let ds = data::load(spec, Shape { size, channels }, num_classes.is_some())?;
    if let Some(k) = num_classes
        && ds.num_classes() != k
    {
        bail!(
            "{spec} has {} classes, the run was configured for {k}",
            ds.num_classes()
        );
    }
    Ok(ds)
}

/// A caller's report of each training step; an error from it stops the run.
pub type StepCallback<'a> = dyn FnMut(&StepReport) -> Result<()> + 'a;

/// Runs a training loop (`train`, given the data and a step callback) from step `start` with
/// a progress bar, or reporting to `progress` when given, and reports where the model is.
pub(super) fn train_with_bar(
    tc: &TrainConfig,
    ds: data::Dataset,
    out: &std::path::Path,
    start: usize,
    progress: Option<&mut StepCallback>,
    train: impl FnOnce(data::Dataset, &mut StepCallback) -> Result<usize>,
) -> Result<()> {
    eprintln!(
        "training on {} images ({}x{}x{}) from {}, steps {}..{}, run folder {}",
        ds.len(),
        ds.channels,
        ds.size,
        ds.size,
        ds.source,
        start,
        tc.steps,
        out.display()
    );
    let done = match progress {
        Some(f) => train(ds, f)?,
        None => {
            let pb = super::bar(
                tc.steps as u64,
                "{bar:40} {pos}/{len}  loss {msg}  {per_sec}  ETA {eta}",
            );
            pb.set_position(start as u64);
            pb.reset_eta();
            let done = train(ds, &mut |r| {
                pb.set_position(r.step as u64);
                pb.set_message(format!("{:.4}", r.loss));
                Ok(())
            })?;
            pb.finish_and_clear();
            done
        }
    };
    let model = RunPaths::new(out).model();
    if done < tc.steps {
        println!(
            "stopped at step {done} of {} (--minutes); model in {}; --resume continues",
            tc.steps,
            model.display()
        );
    } else {
        println!("trained to step {done}; model in {}", model.display());
    }
    Ok(())
}

fn build_run_config(a: &TrainArgs) -> Result<RunConfig> {
    // Probe the data once for its native size, channels and classes.
    let path = data::resolve(&a.data)?;
    let native = data::idx::is_digits_csv(&path) || data::idx::is_idx(&path)?;
    let (with_classes, with_text) = (a.cond == CondKind::Class, a.cond == CondKind::Text);
    if a.cross_attention.is_some() && !with_text {
        bail!("--cross-attention is for text models (--cond text)");
    }
    let (size, channels, class_names) = data_shape(a, &path, native, with_classes)?;
    if size == 0 {
        bail!("--image-size must be positive");
    }
    if channels != 1 && channels != 3 {
        bail!("--channels must be 1 or 3 (got {channels})");
    }
    let superres = superres_config(a, size)?;
    let latent = latent_config(a, size, channels, superres.is_some())?;
    // The denoiser's own image: latents for a latent model.
    let (size, channels) = match &latent {
        Some(l) => {
            let [c, h, _] = l.vae.latent_shape(size);
            (h, c)
        }
        None => (size, channels),
    };
    let channel_mult = match &a.channel_mult {
        Some(s) => parse_list(s, "--channel-mult")?,
        None => UNetConfig::default_channel_mult(size),
    };
    let tmp = UNetConfig {
        image_size: size,
        channel_mult: channel_mult.clone(),
        ..UNetConfig::default()
    };
    let attention_resolutions = match &a.attention {
        Some(s) => parse_list(s, "--attention")?,
        None => tmp.level_sizes().last().copied().into_iter().collect(),
    };
    if with_classes && class_names.is_empty() {
        bail!("--cond class: {} has no class labels", a.data);
    }
    let cross_attention_resolutions = match (&a.cross_attention, with_text) {
        (Some(s), _) => parse_list(s, "--cross-attention")?,
        (None, true) => {
            let sizes = tmp.level_sizes();
            sizes[sizes.len().saturating_sub(2)..].to_vec()
        }
        (None, false) => Vec::new(),
    };
    let unet = UNetConfig {
        image_size: size,
        in_channels: channels,
        out_channels: channels,
        base_channels: a.base_channels,
        channel_mult,
        num_res_blocks: a.res_blocks,
        attention_resolutions,
        dropout: a.dropout,
        norm_groups: a.norm_groups,
        num_classes: with_classes.then_some(class_names.len()),
        text_dim: with_text.then_some(crate::conditioning::text::MINILM_DIM),
        cross_attention_resolutions,
        cond_channels: if superres.is_some() { channels } else { 0 },
        ..UNetConfig::default()
    };
    let schedule = ScheduleConfig {
        beta_schedule: a.schedule,
        timesteps: a.timesteps,
        ..ScheduleConfig::default()
    };
    let train = TrainConfig {
        steps: a.steps.unwrap_or(TrainConfig::default().steps),
        batch_size: a.batch,
        lr: a.lr,
        warmup_steps: a.warmup,
        lr_schedule: a.lr_schedule,
        weight_decay: a.weight_decay,
        grad_clip: a.grad_clip,
        ema_decay: a.ema_decay,
        label_dropout: a.label_dropout,
        hflip: a.hflip,
        loss_weighting: match a.min_snr {
            None if a.objective.is_flow() => LossWeighting::Uniform,
            None => TrainConfig::default().loss_weighting,
            Some(g) if g > 0.0 && g.is_finite() => LossWeighting::MinSnr { gamma: g },
            Some(0.0) => LossWeighting::Uniform,
            Some(g) => bail!("--min-snr must be 0 (off) or positive (got {g})"),
        },
        flow_time: flow_time(a)?,
        seed: a.seed,
        checkpoint_every: a.checkpoint_every,
        sample_every: a.sample_every,
        precision: precision_arg().unwrap_or_else(kernels::matmul_mode),
    };
    Ok(RunConfig {
        model: ModelConfig {
            unet,
            schedule,
            prediction: a.objective,
            class_names: if with_classes {
                class_names
            } else {
                Vec::new()
            },
            superres,
            latent,
            sampling: None,
        },
        train,
        data: a.data.clone(),
        distill: None,
    })
}

/// How training times are drawn, from `--flow-time`, `--flow-loc` and `--flow-scale`; those
/// are refused for a diffusion objective, and the location and scale for uniform times.
fn flow_time(a: &TrainArgs) -> Result<FlowTime> {
    let given = a.flow_time.is_some() || a.flow_loc.is_some() || a.flow_scale.is_some();
    if given && !a.objective.is_flow() {
        bail!("--flow-time, --flow-loc and --flow-scale are options of --objective flow");
    }
    let (loc, scale) = match FlowTime::default() {
        FlowTime::LogitNormal { loc, scale } => (loc, scale),
        FlowTime::Uniform => (0.0, 1.0),
    };
    Ok(match a.flow_time.unwrap_or(FlowTimeArg::LogitNormal) {
        FlowTimeArg::Uniform if a.flow_loc.is_some() || a.flow_scale.is_some() => {
            bail!("--flow-loc and --flow-scale shape logit-normal times, not --flow-time uniform")
        }
        FlowTimeArg::Uniform => FlowTime::Uniform,
        FlowTimeArg::LogitNormal => FlowTime::LogitNormal {
            loc: a.flow_loc.unwrap_or(loc),
            scale: a.flow_scale.unwrap_or(scale),
        },
    })
}

/// `--flow-time`: the training-time densities of [`FlowTime`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum FlowTimeArg {
    /// t ~ U(0, 1).
    Uniform,
    /// t = sigmoid(m + s z), z ~ N(0, 1) (SD3).
    LogitNormal,
}

/// Side, channels and class names the data is read with: its own for IDX files and the
/// digits CSV, 32x32 RGB (or as given) for image folders.
fn data_shape(
    a: &TrainArgs,
    path: &std::path::Path,
    native: bool,
    with_classes: bool,
) -> Result<(usize, usize, Vec<String>)> {
    Ok(if native {
        let probe = if data::idx::is_digits_csv(path) {
            data::idx::load_digits_csv(path)?
        } else {
            data::idx::load_idx(path)?
        };
        (
            a.image_size.unwrap_or(probe.size),
            a.channels.unwrap_or(1),
            probe.class_names,
        )
    } else {
        let size = a.image_size.unwrap_or(32);
        let channels = a.channels.unwrap_or(3);
        let names = if with_classes {
            data::folder::class_names(path)?
        } else {
            Vec::new()
        };
        (size, channels, names)
    })
}

/// `--task superres --scale k`: the SR3 configuration, checked against the image size.
fn superres_config(a: &TrainArgs, size: usize) -> Result<Option<model::SuperResConfig>> {
    Ok(match (a.task, a.scale) {
        (Task::Denoise, None) => None,
        (Task::Denoise, Some(_)) => bail!("--scale is for --task superres"),
        (Task::Superres, Some(k)) if k == 2 || k == 4 => {
            if !size.is_multiple_of(k) || size / k < 2 {
                bail!(
                    "--task superres: --image-size {size} must be a multiple of --scale {k} (and at least {})",
                    2 * k
                );
            }
            Some(model::SuperResConfig { scale: k })
        }
        (Task::Superres, Some(k)) => bail!("--scale must be 2 or 4 (got {k})"),
        (Task::Superres, None) => bail!("--task superres needs --scale 2 or 4"),
    })
}

/// `--latent VAE`: the latent configuration, checked against the data's channels and size.
fn latent_config(
    a: &TrainArgs,
    size: usize,
    channels: usize,
    superres: bool,
) -> Result<Option<model::LatentConfig>> {
    Ok(match &a.latent {
        None => None,
        Some(_) if superres => {
            bail!("--latent and --task superres do not combine (super-resolution works on pixels)")
        }
        Some(_) if a.hflip => {
            bail!("--hflip is not available with --latent (latents are encoded once)")
        }
        Some(v) => {
            let (_, config) = crate::vae::read_config(v)?;
            if config.in_channels != channels {
                bail!(
                    "--latent {}: the VAE takes {} channels but the data is read with {channels}",
                    v.display(),
                    config.in_channels
                );
            }
            if !size.is_multiple_of(config.downscale()) {
                bail!(
                    "--latent {}: --image-size {size} is not a multiple of the VAE's downscale {}",
                    v.display(),
                    config.downscale()
                );
            }
            Some(model::LatentConfig {
                vae: config,
                image_size: size,
            })
        }
    })
}
