//! The `diffuse` command line: a thin layer over the library.

use anyhow::{Context, Result, bail};
use burn::tensor::{Tensor, TensorData};
use clap::{Args, Parser, Subcommand};
use diffuse::data::{self, Shape, fetch};
use diffuse::device::inference_device;
use diffuse::imageio::{ImageBatch, display_factor, grid, load_image, save_png, upscale};
use diffuse::kernels;
use diffuse::model::{self, ModelConfig};
use diffuse::rng::{Stream, normal_tensor, rng_for};
use diffuse::sampler::{GenerateOptions, SamplerChoice, SamplerKind, denoise_from, generate};
use diffuse::schedule::{BetaSchedule, NoiseSchedule, Prediction, ScheduleConfig};
use diffuse::train::{self, LossWeighting, RunConfig, RunPaths, TrainConfig, checkpoint};
use diffuse::unet::UNetConfig;
use diffuse::weights::{self, NamedTensors, StoreDtype};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

mod cli {
    pub mod edit;
    pub mod eval;
    pub mod serve;
    pub mod upscale;
    pub mod vae;
}

#[derive(Parser)]
#[command(
    name = "diffuse",
    version,
    about = "Denoising diffusion models: train on images, generate new ones"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Arithmetic of the convolutions' matrix products: f32, or bf16 (products of bf16-rounded
    /// operands summed in f32, on Intel AMX: faster, slightly different results). Default: bf16
    /// where the processor has AMX, else f32; a resumed run keeps its own.
    #[arg(long, global = true, value_name = "f32|bf16")]
    precision: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate images from a model (the embedded Fashion-MNIST model by default).
    Sample(SampleArgs),
    /// Train a model on an image folder, IDX files or a fetched dataset.
    Train(Box<TrainArgs>),
    /// Draw the forward-diffusion strip of one image: x_t at several timesteps.
    Noise(NoiseArgs),
    /// Fetch a named dataset into the cache: fashion-mnist, mnist, digits, emoji; or the inception
    /// (FID) or text-encoder (MiniLM) weights.
    Fetch {
        /// Dataset name.
        name: String,
    },
    /// Time the benchmark U-Net (shared/bench/MODEL.md) built from diffuse's blocks.
    Bench {
        /// Untimed warm-up steps per measurement.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed steps per measurement (the median is reported).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Train a small CNN classifier, the feature extractor for FID on small grey data.
    TrainClassifier(cli::eval::TrainClassifierArgs),
    /// FID, KID, precision and recall between two image sets.
    Fid(cli::eval::FidArgs),
    /// Sample from a model and measure FID, KID, precision/recall and class accuracy.
    Eval(cli::eval::EvalArgs),
    /// Write a model as a diffusers pipeline folder (DDPMPipeline with a UNet2DModel).
    Export {
        /// Run folder or model file (default: the embedded model).
        #[arg(long)]
        model: Option<String>,
        /// New folder for the pipeline.
        #[arg(long)]
        diffusers: PathBuf,
    },
    /// Edit an image: SDEdit (--strength) or inpainting (--mask), steered by class.
    Edit(Box<cli::edit::EditArgs>),
    /// Enlarge an image with a super-resolution model, or compare one with bicubic upscaling.
    Upscale(Box<cli::upscale::UpscaleArgs>),
    /// Train a variational autoencoder (diffusers AutoencoderKL layout) for latent diffusion.
    TrainVae(Box<cli::vae::TrainVaeArgs>),
    /// Encode images to latents or decode latents to images with a VAE.
    Vae {
        #[command(subcommand)]
        cmd: cli::vae::VaeCmd,
    },
    /// Serve an HTTP API and a web page for generating images (loopback by default).
    Serve(cli::serve::ServeArgs),
    /// Load-test a running `diffuse serve` on loopback: good and bad requests, hang-ups.
    Loadtest(cli::serve::LoadTestArgs),
    /// Rewrite a model file, e.g. in half precision for shipping.
    Convert {
        /// Run folder or model file.
        #[arg(long)]
        model: String,
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Storage precision: f32 or f16.
        #[arg(long, default_value = "f16")]
        dtype: String,
    },
}

#[derive(Args)]
struct SampleArgs {
    /// Run folder or model .safetensors file (default: the embedded Fashion-MNIST model).
    #[arg(long)]
    model: Option<String>,
    /// Number of images (default: 16, or 4 per class for a class-conditioned model without --class).
    #[arg(long)]
    n: Option<usize>,
    /// Class index or name, for class-conditioned models (default: rows of every class).
    #[arg(long)]
    class: Option<String>,
    /// The prompt, for text-conditioned models (empty: unconditional); for a class-conditioned
    /// model, a class name.
    #[arg(long)]
    prompt: Option<String>,
    /// Text models: what guidance steers away from (default: the null text).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Classifier-free guidance weight (1 = none).
    #[arg(long, default_value_t = 2.0)]
    guidance: f32,
    /// Sampling steps (default: all T for ddpm, 50 for the others).
    #[arg(long)]
    steps: Option<usize>,
    /// Sampler: ddpm (ancestral), ddim, dpmpp-2m, euler, euler-a or heun.
    #[arg(long, default_value = "ddpm")]
    sampler: String,
    /// DDIM noise weight: 0 deterministic, 1 DDPM-like.
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Timestep spacing: trailing, leading or linspace (default: the model's scheduler config;
    /// trailing for diffuse models).
    #[arg(long)]
    spacing: Option<String>,
    /// DDPM reverse-process variance: fixed-small or fixed-large (default: the model's).
    #[arg(long)]
    variance: Option<String>,
    /// Karras noise levels (EDM, eq. 5) for dpmpp-2m, euler and heun.
    #[arg(long)]
    karras: bool,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Grid PNG to write (default samples.png when --out-dir is not given).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Folder for one PNG per image at the model's resolution.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// PNG strip of the first image's reverse diffusion, x_T to x_0.
    #[arg(long)]
    trajectory: Option<PathBuf>,
    /// Images per grid row.
    #[arg(long)]
    cols: Option<usize>,
    /// Start from this x_T: the tensor "noise" [N,C,H,W] of a safetensors file (N images).
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// Also write the final sample in model space (before clamping to pixels) as the tensor
    /// "sample" of this safetensors file.
    #[arg(long)]
    save_tensor: Option<PathBuf>,
}

/// Reads `--init-noise`: the tensor "noise" of shape `[N, C, H, W]` for images `[C, H, W]`.
fn read_init_noise(path: &Path, image: [usize; 3]) -> Result<weights::HostTensor> {
    let (mut t, _) = weights::read_safetensors(path)?;
    let noise = t
        .remove("noise")
        .ok_or_else(|| anyhow::anyhow!("{} has no tensor named 'noise'", path.display()))?;
    let s = &noise.shape;
    if s.len() != 4 || s[1..] != image || s[0] == 0 || s[0] > 10_000 {
        bail!(
            "{}: tensor 'noise' has shape {:?}, this model needs [N, {}, {}, {}] with 1 <= N <= 10000",
            path.display(),
            s,
            image[0],
            image[1],
            image[2]
        );
    }
    if noise.data.iter().any(|v| !v.is_finite()) {
        bail!(
            "{}: tensor 'noise' holds NaN or infinite values",
            path.display()
        );
    }
    Ok(noise)
}

#[derive(Args)]
struct TrainArgs {
    /// Image folder (class = first-level subfolder), IDX file/folder, digits CSV, or a fetched dataset name.
    #[arg(long)]
    data: String,
    /// Run folder for config, checkpoints, metrics and sample grids.
    #[arg(long)]
    out: PathBuf,
    /// Continue the checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Image side length (default: the data's own for IDX/digits, 32 for folders).
    #[arg(long)]
    image_size: Option<usize>,
    /// 1 (grey) or 3 (RGB) (default: the data's own; 3 for folders).
    #[arg(long)]
    channels: Option<usize>,
    /// Conditioning: none, class (class subfolders) or text (captions.jsonl or .txt files;
    /// needs `diffuse fetch text-encoder`).
    #[arg(long, default_value = "none")]
    cond: String,
    /// Text models: feature-map sizes with cross-attention to the prompt (default: the two
    /// lowest-resolution levels).
    #[arg(long)]
    cross_attention: Option<String>,
    /// What the model learns: denoise (generate images) or superres (enlarge images by
    /// --scale; --image-size is the high resolution; pairs are made from the data).
    #[arg(long, default_value = "denoise")]
    task: String,
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
    /// Min-SNR-gamma loss weighting (Hang et al. 2023); 0 for plain MSE.
    #[arg(long, default_value_t = 5.0)]
    min_snr: f64,
    /// Objective: epsilon, v or x0.
    #[arg(long, default_value = "epsilon")]
    objective: String,
    /// Beta schedule: linear, cosine or sigmoid.
    #[arg(long, default_value = "linear")]
    schedule: String,
    /// Diffusion steps T.
    #[arg(long, default_value_t = 1000)]
    timesteps: usize,
    /// U-Net base channels.
    #[arg(long, default_value_t = 32)]
    base_channels: usize,
    /// Channel multipliers per level, comma-separated (default by image size).
    #[arg(long)]
    channel_mult: Option<String>,
    /// Residual blocks per level.
    #[arg(long, default_value_t = 2)]
    res_blocks: usize,
    /// Feature-map sizes with self-attention, comma-separated (default: the lowest level).
    #[arg(long)]
    attention: Option<String>,
    /// Dropout in residual blocks (worth 0.1 on small datasets trained for long).
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// GroupNorm groups.
    #[arg(long, default_value_t = 8)]
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
}

#[derive(Args)]
struct NoiseArgs {
    /// Input image.
    #[arg(long)]
    image: PathBuf,
    /// Output PNG strip.
    #[arg(long)]
    out: PathBuf,
    /// Timesteps to show, comma-separated.
    #[arg(long, default_value = "0,50,100,250,500,999")]
    timesteps: String,
    /// Beta schedule: linear, cosine or sigmoid.
    #[arg(long, default_value = "linear")]
    schedule: String,
    /// Diffusion steps T.
    #[arg(long, default_value_t = 1000)]
    total: usize,
    /// Side length the image is resized to.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Random seed of the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn parse_list(s: &str, what: &str) -> Result<Vec<usize>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .with_context(|| format!("{what}: '{p}' is not a non-negative integer"))
        })
        .collect()
}

fn main() {
    diffuse::device::keep_freed_memory();
    let cli = Cli::parse();
    let precision = match cli.precision.as_deref().map(kernels::MatmulMode::parse) {
        None if std::env::var_os("DIFFUSE_MATMUL").is_some() => Ok(None),
        // The default: bf16 products where the processor has AMX, f32 elsewhere.
        None => kernels::set_matmul_mode(kernels::MatmulMode::fastest()).map(|()| None),
        Some(Ok(mode)) => kernels::set_matmul_mode(mode).map(|()| Some(mode)),
        Some(Err(e)) => Err(anyhow::anyhow!("--precision: {e}")),
    };
    let precision = precision.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    });
    PRECISION.set(precision).ok();
    let result = match cli.cmd {
        Cmd::Sample(a) => sample(a),
        Cmd::Train(a) => train_cmd(*a),
        Cmd::Noise(a) => noise(a),
        Cmd::Fetch { name } => fetch_cmd(&name),
        Cmd::Convert { model, out, dtype } => convert(&model, &out, &dtype),
        Cmd::TrainClassifier(a) => cli::eval::train_classifier(a),
        Cmd::Fid(a) => cli::eval::fid(a),
        Cmd::Eval(a) => cli::eval::eval_cmd(a),
        Cmd::Export { model, diffusers } => export(model.as_deref(), &diffusers),
        Cmd::Edit(a) => cli::edit::edit_cmd(*a),
        Cmd::Upscale(a) => cli::upscale::upscale_cmd(*a),
        Cmd::TrainVae(a) => cli::vae::train_vae_cmd(*a),
        Cmd::Vae { cmd } => cli::vae::vae_cmd(cmd),
        Cmd::Serve(a) => cli::serve::serve_cmd(a),
        Cmd::Loadtest(a) => cli::serve::loadtest_cmd(a),
        Cmd::Bench {
            warmup,
            iters,
            json,
        } => bench(warmup, iters, json.as_deref()),
    };
    if let Err(e) = result {
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

/// `--precision` as given (None: not given; the process then runs in the default mode,
/// `kernels::matmul_mode()`).
static PRECISION: std::sync::OnceLock<Option<kernels::MatmulMode>> = std::sync::OnceLock::new();

fn precision_arg() -> Option<kernels::MatmulMode> {
    PRECISION.get().copied().flatten()
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

fn sample(a: SampleArgs) -> Result<()> {
    let dev = inference_device();
    let m = model::load(a.model.as_deref(), &dev)?;
    let cfg = &m.config;
    if let Some(sr) = &cfg.superres {
        bail!(
            "{} is a {}x super-resolution model: it enlarges a given image; use `diffuse upscale --model ... --image small.png`",
            m.source,
            sr.scale
        );
    }
    let kind: SamplerKind = a.sampler.parse().context("--sampler")?;
    // As diffusers' pipelines: DDPM over all T steps, the fast samplers 50.
    let steps = a.steps.unwrap_or(match kind {
        SamplerKind::Ddpm => m.schedule.len(),
        _ => m.schedule.len().min(50),
    });
    let choice = SamplerChoice {
        steps,
        eta: a.eta,
        spacing: a.spacing.as_deref().map(str::parse).transpose()?,
        variance: a.variance.as_deref().map(str::parse).transpose()?,
        karras: a.karras.then_some(true),
    };
    let mut sampler = m.scheduler.build(kind, &m.schedule, &choice)?;
    if !(a.guidance.is_finite() && a.guidance >= 0.0) {
        bail!(
            "--guidance must be a non-negative number (got {})",
            a.guidance
        );
    }
    let k = cfg.unet.num_classes;
    let init = match &a.init_noise {
        Some(p) => Some(read_init_noise(p, cfg.image_shape())?),
        None => None,
    };
    let a = match &init {
        Some(t) if a.n.is_some_and(|n| n != t.shape[0]) => bail!(
            "--n {} disagrees with the {} images of --init-noise",
            a.n.unwrap_or(0),
            t.shape[0]
        ),
        Some(t) => SampleArgs {
            n: Some(t.shape[0]),
            ..a
        },
        None => a,
    };
    if a.n.is_some_and(|n| n == 0 || n > 10_000) {
        bail!("--n must be between 1 and 10000 (got {})", a.n.unwrap_or(0));
    }
    if a.cols == Some(0) {
        bail!("--cols must be at least 1");
    }
    let text_model = cfg.unet.text_dim.is_some();
    if text_model && a.class.is_some() {
        bail!("--class was given, but this model is text-conditioned: use --prompt");
    }
    if a.negative_prompt.is_some() && !text_model {
        bail!("--negative-prompt is for text-conditioned models");
    }
    let a = match (&a.prompt, k) {
        (Some(_), _) if a.class.is_some() => bail!("give --class or --prompt, not both"),
        (Some(p), Some(_)) if !text_model => SampleArgs {
            class: Some(p.clone()),
            prompt: None,
            ..a
        },
        (Some(_), None) if !text_model => {
            bail!("--prompt was given, but this model is unconditioned")
        }
        _ => a,
    };
    let (n, classes, cols) = match (k, &a.class) {
        (_, Some(c)) => {
            let ci = cfg.class_index(c)?;
            let n = a.n.unwrap_or(16);
            (n, Some(vec![ci; n]), a.cols.unwrap_or(4.min(n)))
        }
        (Some(k), None) => {
            let n = a.n.unwrap_or(4 * k);
            let classes: Vec<usize> = (0..n).map(|i| i * k / n.max(1)).collect();
            let cols = a.cols.unwrap_or(if n % k == 0 { n / k } else { 8 });
            (n, Some(classes), cols)
        }
        (None, None) => {
            let n = a.n.unwrap_or(16);
            (n, None, a.cols.unwrap_or((n as f64).sqrt().ceil() as usize))
        }
    };
    let (text, negative) = if text_model {
        let enc = diffuse::conditioning::text::TextEncoder::load_default(&dev)?;
        let prompt = a.prompt.clone().unwrap_or_default();
        let encode = |p: &str, what: &str| -> Result<_> {
            let (cond, cut) = enc.cond_repeated(&[(p, n)])?;
            if cut[0] {
                eprintln!(
                    "note: {what} is longer than the encoder's {} tokens; the rest is ignored",
                    enc.max_len
                );
            }
            Ok(cond)
        };
        if prompt.trim().is_empty() {
            eprintln!("note: no --prompt: sampling the model's unconditional distribution");
        }
        let negative = match &a.negative_prompt {
            Some(np) => Some(encode(np, "--negative-prompt")?),
            None => None,
        };
        (Some(encode(&prompt, "--prompt")?), negative)
    } else {
        (None, None)
    };
    let opts = GenerateOptions {
        n,
        classes,
        guidance: a.guidance,
        seed: a.seed,
        cancel: None,
        text,
        negative,
        image_cond: None,
    };
    let total = sampler.timesteps().len();
    let pb = bar(
        total as u64,
        "{bar:40} {pos}/{len} steps  {per_sec}  ETA {eta}",
    );
    let keep_every = (total / 10).max(1);
    let mut traj: Vec<ImageBatch> = Vec::new();
    let want_traj = a.trajectory.is_some();
    let mut on_step = |i: usize, x: &Tensor<4>| {
        pb.inc(1);
        if want_traj && (i % keep_every == 0 || i + 1 == total) {
            traj.push(ImageBatch::from_tensor(
                m.to_images(x.clone().narrow(0, 0, 1)),
            ));
        }
    };
    let x = match init {
        Some(noise) => {
            let shape: [usize; 4] = noise.shape.clone().try_into().expect("checked 4-d");
            let x = Tensor::<4>::from_data(TensorData::new(noise.data, shape), &dev)
                * (sampler.init_noise_sigma() as f32);
            let mut rng = rng_for(opts.seed, Stream::Sample, 0);
            denoise_from(
                &m.unet,
                k,
                x,
                sampler.as_mut(),
                &opts,
                &mut rng,
                &mut on_step,
            )
        }
        None => generate(
            &m.unet,
            k,
            cfg.image_shape(),
            sampler.as_mut(),
            &opts,
            &dev,
            &mut on_step,
        ),
    };
    pb.finish_and_clear();
    if let Some(path) = &a.save_tensor {
        let mut t = NamedTensors::new();
        t.insert(
            "sample".into(),
            weights::HostTensor {
                shape: x.dims().to_vec(),
                data: x
                    .clone()
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec()
                    .expect("f32"),
            },
        );
        let bytes = weights::to_safetensors(&t, &Default::default(), StoreDtype::F32)?;
        weights::write_atomic(path, &bytes)?;
        println!("wrote {}", path.display());
    }
    let batch = ImageBatch::from_tensor(m.to_images(x));
    let imgs: Vec<_> = (0..batch.len()).map(|i| batch.image(i)).collect();
    let f = display_factor(cfg.output_shape()[1]);
    let out = match (&a.out, &a.out_dir) {
        (None, None) => Some(PathBuf::from("samples.png")),
        (o, _) => o.clone(),
    };
    if let Some(out) = &out {
        save_png(&upscale(&grid(&imgs, cols), f), out)?;
        println!("wrote {} ({} images from {})", out.display(), n, m.source);
    }
    if let Some(dir) = &a.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (i, img) in imgs.iter().enumerate() {
            save_png(&img.to_rgb8(), &dir.join(format!("{i:05}.png")))?;
        }
        println!("wrote {} images to {}", n, dir.display());
    }
    if let Some(path) = &a.trajectory {
        let frames: Vec<_> = traj.iter().map(|b| b.image(0)).collect();
        save_png(&upscale(&grid(&frames, frames.len()), f), path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn default_mult(size: usize) -> Vec<usize> {
    match size {
        0..=16 => vec![1, 2],
        17..=32 => vec![1, 2, 2],
        33..=64 => vec![1, 2, 2, 2],
        _ => vec![1, 1, 2, 2, 4],
    }
}

fn train_cmd(a: TrainArgs) -> Result<()> {
    let paths = RunPaths::new(&a.out);
    let ckpt_path = paths.checkpoint();
    let (cfg, resume) = if a.resume {
        if !ckpt_path.exists() {
            bail!(
                "--resume: {} has no checkpoint.safetensors to continue",
                a.out.display()
            );
        }
        let ck = checkpoint::load(&ckpt_path)?;
        eprintln!(
            "note: --resume continues with the settings saved in the checkpoint; only --steps, --data and --precision are read from the command line"
        );
        let mut cfg = ck.run.clone();
        if let Some(s) = a.steps {
            cfg.train.steps = s;
        }
        if let Some(p) = precision_arg() {
            cfg.train.precision = p;
        }
        if cfg.data != a.data {
            eprintln!(
                "note: the run was started with --data {}; continuing with {}",
                cfg.data, a.data
            );
            cfg.data = a.data.clone();
        }
        (cfg, Some(ck))
    } else {
        if ckpt_path.exists() {
            bail!(
                "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
                a.out.display()
            );
        }
        (build_run_config(&a)?, None)
    };
    cfg.train.validate()?;
    let u = &cfg.model.unet;
    let with_classes = u.num_classes.is_some();
    let [channels, size, _] = cfg.model.output_shape();
    let ds = data::load(&cfg.data, Shape { size, channels }, with_classes)?;
    // A latent model's VAE: from --latent for a new run, from the checkpoint when resuming.
    let vae = match (&cfg.model.latent, &resume, &a.latent) {
        (None, _, _) => None,
        (Some(l), Some(ck), _) => Some(diffuse::vae::build(
            l.vae.clone(),
            &ck.tensors,
            model::VAE_PREFIX,
            &ckpt_path.display().to_string(),
            &inference_device(),
        )?),
        (Some(_), None, Some(v)) => Some(diffuse::vae::load(v, &inference_device())?),
        (Some(_), None, None) => unreachable!("a latent config comes from --latent"),
    };
    if let (Some(k), true) = (u.num_classes, with_classes) {
        if ds.num_classes() != k {
            bail!(
                "{} has {} classes, the run was configured for {}",
                cfg.data,
                ds.num_classes(),
                k
            );
        }
    }
    if u.text_dim.is_some() {
        if ds.captions.is_none() {
            bail!(
                "--cond text: {} has neither captions.jsonl nor .txt files beside its images",
                cfg.data
            );
        }
        let enc = diffuse::conditioning::text::default_dir()?;
        if !enc.join("model.safetensors").exists() {
            bail!("--cond text needs the text encoder: run `diffuse fetch text-encoder`");
        }
    }
    let start = resume.as_ref().map(|c| c.step).unwrap_or(0);
    eprintln!(
        "training on {} images ({}x{}x{}) from {}, steps {}..{}, run folder {}",
        ds.len(),
        ds.channels,
        ds.size,
        ds.size,
        ds.source,
        start,
        cfg.train.steps,
        a.out.display()
    );
    let pb = bar(
        cfg.train.steps as u64,
        "{bar:40} {pos}/{len}  loss {msg}  {per_sec}  ETA {eta}",
    );
    pb.set_position(start as u64);
    pb.reset_eta();
    let done = train::train(&cfg, ds, &a.out, resume, vae.as_ref(), &mut |r| {
        pb.set_position(r.step as u64);
        pb.set_message(format!("{:.4}", r.loss));
    })?;
    pb.finish_and_clear();
    println!(
        "trained to step {done}; model in {}",
        paths.model().display()
    );
    Ok(())
}

fn build_run_config(a: &TrainArgs) -> Result<RunConfig> {
    // Probe the data once for its native size, channels and classes.
    let path = data::resolve(&a.data)?;
    let native = data::idx::is_digits_csv(&path) || data::idx::is_idx(&path)?;
    let (with_classes, with_text) = match a.cond.as_str() {
        "none" => (false, false),
        "class" => (true, false),
        "text" => (false, true),
        other => bail!("--cond must be none, class or text (got '{other}')"),
    };
    if a.cross_attention.is_some() && !with_text {
        bail!("--cross-attention is for text models (--cond text)");
    }
    let (size, channels, class_names) = if native {
        let probe = if data::idx::is_digits_csv(&path) {
            data::idx::load_digits_csv(&path)?
        } else {
            data::idx::load_idx(&path)?
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
            data::folder::class_names(&path)?
        } else {
            Vec::new()
        };
        (size, channels, names)
    };
    if size == 0 {
        bail!("--image-size must be positive");
    }
    if channels != 1 && channels != 3 {
        bail!("--channels must be 1 or 3 (got {channels})");
    }
    let superres = match (a.task.as_str(), a.scale) {
        ("denoise", None) => None,
        ("denoise", Some(_)) => bail!("--scale is for --task superres"),
        ("superres", Some(k)) if k == 2 || k == 4 => {
            if size % k != 0 || size / k < 2 {
                bail!(
                    "--task superres: --image-size {size} must be a multiple of --scale {k} (and at least {})",
                    2 * k
                );
            }
            Some(model::SuperResConfig { scale: k })
        }
        ("superres", Some(k)) => bail!("--scale must be 2 or 4 (got {k})"),
        ("superres", None) => bail!("--task superres needs --scale 2 or 4"),
        (t, _) => bail!("--task must be denoise or superres (got '{t}')"),
    };
    let latent = match &a.latent {
        None => None,
        Some(_) if superres.is_some() => {
            bail!("--latent and --task superres do not combine (super-resolution works on pixels)")
        }
        Some(_) if a.hflip => {
            bail!("--hflip is not available with --latent (latents are encoded once)")
        }
        Some(v) => {
            let (_, config) = diffuse::vae::read_config(v)?;
            if config.in_channels != channels {
                bail!(
                    "--latent {}: the VAE takes {} channels but the data is read with {channels}",
                    v.display(),
                    config.in_channels
                );
            }
            if size % config.downscale() != 0 {
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
    };
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
        None => default_mult(size),
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
        text_dim: with_text.then_some(diffuse::conditioning::text::MINILM_DIM),
        cross_attention_resolutions,
        cond_channels: if superres.is_some() { channels } else { 0 },
        ..UNetConfig::default()
    };
    unet.validate()?;
    let schedule = ScheduleConfig {
        beta_schedule: a.schedule.parse::<BetaSchedule>()?,
        timesteps: a.timesteps,
        ..ScheduleConfig::default()
    };
    NoiseSchedule::new(&schedule)?;
    let train = TrainConfig {
        steps: a.steps.unwrap_or(TrainConfig::default().steps),
        batch_size: a.batch,
        lr: a.lr,
        warmup_steps: a.warmup,
        weight_decay: a.weight_decay,
        grad_clip: a.grad_clip,
        ema_decay: a.ema_decay,
        label_dropout: a.label_dropout,
        hflip: a.hflip,
        loss_weighting: match a.min_snr {
            g if g > 0.0 && g.is_finite() => LossWeighting::MinSnr { gamma: g },
            g if g == 0.0 => LossWeighting::Uniform,
            g => bail!("--min-snr must be 0 (off) or positive (got {g})"),
        },
        seed: a.seed,
        checkpoint_every: a.checkpoint_every,
        sample_every: a.sample_every,
        precision: precision_arg().unwrap_or_else(kernels::matmul_mode),
    };
    train.validate()?;
    Ok(RunConfig {
        model: ModelConfig {
            unet,
            schedule,
            prediction: a.objective.parse::<Prediction>()?,
            class_names: if with_classes {
                class_names
            } else {
                Vec::new()
            },
            superres,
            latent,
        },
        train,
        data: a.data.clone(),
    })
}

fn noise(a: NoiseArgs) -> Result<()> {
    let dev = inference_device();
    let sched = NoiseSchedule::new(&ScheduleConfig {
        beta_schedule: a.schedule.parse()?,
        timesteps: a.total,
        ..ScheduleConfig::default()
    })?;
    if a.size == 0 || a.size > 2048 {
        bail!("--size must be between 1 and 2048 (got {})", a.size);
    }
    let ts = parse_list(&a.timesteps, "--timesteps")?;
    if ts.is_empty() {
        bail!("--timesteps is empty");
    }
    if let Some(bad) = ts.iter().find(|&&t| t >= sched.len()) {
        bail!(
            "--timesteps: {bad} is outside 0..{} (T = {})",
            sched.len() - 1,
            sched.len()
        );
    }
    let x0 = load_image(&a.image, a.size, 3, &dev)?;
    let mut rng = rng_for(a.seed, Stream::Sample, 0);
    let eps = normal_tensor(&mut rng, [1, 3, a.size, a.size], &dev);
    let frames: Vec<_> = ts
        .iter()
        .map(|&t| ImageBatch::from_tensor(sched.q_sample(x0.clone(), eps.clone(), &[t])).image(0))
        .collect();
    save_png(&grid(&frames, frames.len()), &a.out)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

fn fetch_cmd(name: &str) -> Result<()> {
    let Some(ds) = fetch::Named::from_name(name) else {
        bail!(
            "unknown dataset '{name}' (known: fashion-mnist, mnist, digits, emoji, inception, text-encoder)"
        );
    };
    let dir = fetch::fetch(ds)?;
    println!("{} is in {}", ds.name(), dir.display());
    Ok(())
}

fn convert(spec: &str, out: &Path, dtype: &str) -> Result<()> {
    let dtype = match dtype {
        "f32" => StoreDtype::F32,
        "f16" => StoreDtype::F16,
        other => bail!("--dtype must be f32 or f16 (got '{other}')"),
    };
    let dev = inference_device();
    let m = model::load(Some(spec), &dev)?;
    let mut t = NamedTensors::new();
    weights::collect(&m.unet, "", &mut t);
    let bytes = model::model_bytes(&m.config, &t, dtype)?;
    weights::write_atomic(out, &bytes)?;
    println!("wrote {} ({} bytes)", out.display(), bytes.len());
    Ok(())
}

fn export(spec: Option<&str>, out: &Path) -> Result<()> {
    let dev = inference_device();
    let m = model::load(spec, &dev)?;
    diffuse::interop::diffusers::export_pipeline(&m, out)?;
    println!(
        "wrote diffusers pipeline {} (from {})",
        out.display(),
        m.source
    );
    Ok(())
}

fn bench(warmup: usize, iters: usize, json: Option<&Path>) -> Result<()> {
    if iters == 0 {
        bail!("--iters must be at least 1");
    }
    let r = diffuse::bench::run(warmup, iters, &mut |l| eprintln!("{l}"));
    println!(
        "backend {} precision {} params {}",
        r.backend, r.precision, r.params
    );
    println!("RESULT train B=16 {:.2} img/s", r.train_b16_img_per_s);
    println!("RESULT train B=64 {:.2} img/s", r.train_b64_img_per_s);
    println!("RESULT infer B=64 {:.2} img/s", r.infer_b64_img_per_s);
    println!("peak RSS {:.2} GB", r.peak_rss_bytes as f64 / 1e9);
    if let Some(p) = json {
        weights::write_atomic(p, serde_json::to_string_pretty(&r)?.as_bytes())?;
    }
    Ok(())
}
