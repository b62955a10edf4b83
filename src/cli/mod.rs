//! The `diffuse` commands, one file each, over the library: each parses its options, calls the
//! library ([`crate::pipeline`] for generation, [`crate::train`] for training) and writes
//! files. What is shared by several commands lives here: the sampler options, the progress
//! bar, list parsing, where images are written.

pub mod bench;
pub mod convert;
pub mod distill;
pub mod edit;
pub mod eval;
pub mod export;
pub mod fetch;
pub mod noise;
pub mod sample;
pub mod serve;
pub mod train;
pub mod upscale;
pub mod vae;

use crate::imageio::save_image;
use crate::kernels::MatmulMode;
use crate::pipeline::{Request, SamplerDefaults};
use crate::sampler::{SamplerChoice, SamplerKind, VarianceType};
use crate::schedule::TimestepSpacing;
use crate::weights::StoreDtype;
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use image::DynamicImage;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

/// The whole command line: one command and the global options.
#[derive(Parser)]
#[command(
    name = "diffuse",
    version,
    about = "Denoising diffusion models: train on images, generate new ones"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
    /// Arithmetic of the convolutions' matrix products: f32, or bf16 (products of bf16-rounded
    /// operands summed in f32, on Intel AMX or AVX-512 BF16 (AMD Zen 4 and later, Intel Xeon
    /// from Cooper Lake): faster, slightly different results). Default: bf16 where the
    /// processor has either, else f32; a resumed run keeps its own.
    #[arg(long, global = true, value_enum)]
    pub precision: Option<MatmulMode>,
}

/// The commands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Generate images from a model (the embedded Fashion-MNIST model by default).
    Sample(Box<sample::SampleArgs>),
    /// Train a model on an image folder, IDX files or a fetched dataset.
    Train(Box<train::TrainArgs>),
    /// Distil a flow-matching model into a student that samples in a few steps (consistency
    /// distillation).
    Distill(Box<distill::DistillArgs>),
    /// Draw the forward-diffusion strip of one image: x_t at several timesteps.
    Noise(noise::NoiseArgs),
    /// Fetch a named dataset into the cache: fashion-mnist, mnist, digits, emoji; or the inception
    /// (FID) or text-encoder (MiniLM) weights.
    Fetch {
        /// fashion-mnist, mnist, digits, emoji, inception or text-encoder.
        #[arg(value_parser = fetch::parse_name)]
        name: crate::assets::Named,
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
    TrainClassifier(eval::TrainClassifierArgs),
    /// FID, KID, precision and recall between two image sets.
    Fid(eval::FidArgs),
    /// Sample from a model and measure FID, KID, precision/recall and class accuracy.
    Eval(eval::EvalArgs),
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
    Edit(Box<edit::EditArgs>),
    /// Enlarge an image with a super-resolution model, or compare one with bicubic upscaling.
    Upscale(Box<upscale::UpscaleArgs>),
    /// Train a variational autoencoder (diffusers AutoencoderKL layout) for latent diffusion.
    TrainVae(Box<vae::TrainVaeArgs>),
    /// Encode images to latents or decode latents to images with a VAE.
    Vae {
        #[command(subcommand)]
        cmd: vae::VaeCmd,
    },
    /// Serve an HTTP API and a web page for generating images (loopback by default).
    Serve(serve::ServeArgs),
    /// Load-test a running `diffuse serve` on loopback: good and bad requests, hang-ups.
    Loadtest(serve::LoadTestArgs),
    /// Rewrite a model file, e.g. in half precision for shipping.
    Convert {
        /// Run folder or model file.
        #[arg(long)]
        model: String,
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Storage precision.
        #[arg(long, value_enum, default_value_t = StoreDtype::F16)]
        dtype: StoreDtype,
        /// A distilled student: the sampling steps it runs when none are asked for.
        #[arg(long)]
        default_steps: Option<usize>,
    },
}

/// The clap command of [`Cli`], as [`parse`] reads it.
pub fn command() -> clap::Command {
    // `--lr -1` and `--seed -1` reach the option's own check ("must be positive") instead of
    // reading as an unknown option `-1`.
    <Cli as clap::CommandFactory>::command()
        .allow_negative_numbers(true)
        .mut_subcommands(|c| c.allow_negative_numbers(true))
}

/// Parses a command line (`args[0]` is the program's name) and records which options it gave
/// (see [`given`]) for the command that [`run`] then runs on this thread.
pub fn parse<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    command().try_get_matches_from(args).and_then(|m| {
        record_given(&m);
        <Cli as clap::FromArgMatches>::from_arg_matches(&m)
    })
}

pub fn main() {
    crate::device::keep_freed_memory();
    let cli = match parse(std::env::args_os()) {
        Ok(c) => c,
        // Help and version go to stdout with status 0; a bad option is one error line, status 1.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            std::process::exit(1);
        }
    };
    // A closed pipe (`diffuse eval | head -3`) ends the process quietly, as it does other Unix
    // tools, instead of a panic in `println!` (Rust ignores SIGPIPE by default). Not for
    // `serve`, whose sockets must report a vanished client as an error, not end the server.
    #[cfg(unix)]
    if !matches!(cli.cmd, Cmd::Serve(_)) {
        // SAFETY: restoring a signal's default disposition touches no memory of this process.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// An error as its one line: the causes joined by ": ", newlines as spaces.
pub fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    set_precision(cli.precision)?;
    match cli.cmd {
        Cmd::Sample(a) => sample::run(*a),
        Cmd::Train(a) => train::run(*a),
        Cmd::Distill(a) => distill::run(*a),
        Cmd::Noise(a) => noise::run(a),
        Cmd::Fetch { name } => fetch::run(name),
        Cmd::Convert {
            model,
            out,
            dtype,
            default_steps,
        } => convert::run(&model, &out, dtype, default_steps),
        Cmd::TrainClassifier(a) => eval::train_classifier(a),
        Cmd::Fid(a) => eval::fid(a).map(drop),
        Cmd::Eval(a) => eval::eval_cmd(a).map(drop),
        Cmd::Export { model, diffusers } => export::run(model.as_deref(), &diffusers),
        Cmd::Edit(a) => edit::edit_cmd(*a),
        Cmd::Upscale(a) => upscale::upscale_cmd(*a),
        Cmd::TrainVae(a) => vae::train_vae_cmd(*a),
        Cmd::Vae { cmd } => vae::vae_cmd(cmd),
        Cmd::Serve(a) => serve::serve_cmd(a),
        Cmd::Loadtest(a) => serve::loadtest_cmd(a),
        Cmd::Bench {
            warmup,
            iters,
            json,
        } => bench::run(warmup, iters, json.as_deref()),
    }
}

/// The sampler options every generating command takes.
#[derive(Args, Clone, Debug)]
pub struct SamplerArgs {
    /// Sampler: ddpm, ddim, dpmpp-2m, euler, euler-a or heun (default: ddpm for sample;
    /// euler-a for edit and upscale; dpmpp-2m for eval; euler for a flow model; a distilled
    /// student's own).
    #[arg(long, value_parser = crate::sampler::config::parse_sampler)]
    pub sampler: Option<SamplerKind>,
    /// Sampling steps (default: all T for ddpm and 50 for the others in sample; 50 in edit and
    /// upscale, where an edit runs the last `strength` of them; 20 in eval; a distilled
    /// student's own).
    #[arg(long)]
    pub steps: Option<usize>,
    /// DDIM noise weight: 0 deterministic, 1 DDPM-like.
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Timestep spacing (default: the model's scheduler config; trailing for diffuse models).
    #[arg(long, value_enum)]
    pub spacing: Option<TimestepSpacing>,
    /// DDPM reverse-process variance (default: the model's).
    #[arg(long, value_enum)]
    pub variance: Option<VarianceType>,
    /// Karras noise levels (EDM, eq. 5) for dpmpp-2m, euler and heun.
    #[arg(long)]
    pub karras: bool,
    /// ddpm and ddim: clip the x0 estimate to [-1, 1] at each step, true or false (default:
    /// the model's scheduler config; true for diffuse models).
    #[arg(long, value_name = "BOOL")]
    pub clip_sample: Option<bool>,
    /// Images denoised at once (default: what fits about 1 GiB for the model). More images
    /// run in chunks of this many, so memory does not grow with --n; the images are the same.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Apply guidance only at noise levels sigma in LO,HI (e.g. 0.3,5 or 1,inf; sigma =
    /// sqrt((1 - alpha_bar) / alpha_bar), t / (1 - t) for a flow model); elsewhere one
    /// conditional evaluation per image (Kynkaanniemi et al. 2024).
    #[arg(long, value_name = "LO,HI", value_parser = parse_interval)]
    pub guidance_interval: Option<(f64, f64)>,
}

/// `LO,HI` of `--guidance-interval`: two numbers (`inf` allowed for HI), `0 <= LO < HI`.
fn parse_interval(s: &str) -> Result<(f64, f64), String> {
    let (lo, hi) = s
        .split_once(',')
        .ok_or_else(|| format!("expected LO,HI (two noise levels), got '{s}'"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<f64>()
            .map_err(|_| format!("'{}' is not a number", v.trim()))
    };
    let (lo, hi) = (num(lo)?, num(hi)?);
    crate::sampler::check_guidance_interval(lo, hi).map_err(|e| e.to_string())?;
    Ok((lo, hi))
}

impl SamplerArgs {
    /// A request for `n` images with these options over a command's defaults.
    pub fn request(&self, n: usize, defaults: SamplerDefaults) -> Request {
        let mut r = Request::new(n, self.sampler.unwrap_or(defaults.sampler));
        r.steps = self.steps.or(defaults.steps);
        r.options = SamplerChoice {
            steps: 0,
            eta: self.eta,
            spacing: self.spacing,
            variance: self.variance,
            karras: self.karras.then_some(true),
            clip_sample: self.clip_sample,
        };
        r.batch = self.batch;
        r.guidance_interval = self.guidance_interval;
        r
    }
}

/// A progress bar of `len` items drawn with `template` (indicatif's syntax).
pub fn bar(len: u64, template: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

/// The progress bar of a sampling run, one tick per step.
pub fn steps_bar() -> ProgressBar {
    bar(0, "{bar:40} {pos}/{len} steps  {per_sec}  ETA {eta}")
}

/// A comma-separated list of non-negative integers; `what` names the option in errors.
pub fn parse_list(s: &str, what: &str) -> Result<Vec<usize>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .with_context(|| format!("{what}: '{p}' is not a non-negative integer"))
        })
        .collect()
}

/// Checks a file a command is about to write: its extension must be `ext` (so that a slip
/// such as `--json model.safetensors` cannot replace a file of another kind), it must not be
/// one of the command's `inputs`, and it must not be a run folder's checkpoint (next to a
/// `config.json`), which `--resume` needs.
pub fn check_output(flag: &str, out: &Path, ext: &str, inputs: &[&Path]) -> Result<()> {
    let has_ext = out
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case(ext));
    if !has_ext {
        bail!("{flag} {}: the file written is .{ext}", out.display());
    }
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if inputs.iter().any(|i| same(out, i)) {
        bail!(
            "{flag} {}: that is the input; write to another file",
            out.display()
        );
    }
    let in_run = out.parent().map(|d| {
        let d = if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        };
        d.join("config.json").is_file()
    });
    if out
        .file_name()
        .is_some_and(|n| n == "checkpoint.safetensors")
        && in_run == Some(true)
    {
        bail!(
            "{flag} {}: that is a run's checkpoint, which --resume needs; write elsewhere",
            out.display()
        );
    }
    Ok(())
}

/// A folder that images are written to one at a time, as `00000.png`, `00001.png`, ...
pub struct ImageDir {
    dir: PathBuf,
    written: usize,
}

impl ImageDir {
    /// Creates the folder (and removes temporaries a killed writer left in it).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        crate::files::remove_stale_temps(dir);
        Ok(Self {
            dir: dir.to_path_buf(),
            written: 0,
        })
    }

    /// Writes the next image.
    pub fn write(&mut self, img: &DynamicImage) -> Result<()> {
        save_image(
            &img.to_rgb8(),
            &self.dir.join(format!("{:05}.png", self.written)),
        )?;
        self.written += 1;
        Ok(())
    }

    /// Says what was written.
    pub fn finish(self) {
        println!("wrote {} images to {}", self.written, self.dir.display());
    }
}

/// Writes each image to `dir` as `00000.png`, `00001.png`, ... and says so.
pub fn write_image_dir(dir: &Path, images: &[DynamicImage]) -> Result<()> {
    let mut d = ImageDir::create(dir)?;
    for img in images {
        d.write(img)?;
    }
    d.finish();
    Ok(())
}

thread_local! {
    /// The ids of the subcommand's options given on the command line (not defaults), as the
    /// last [`parse`] on this thread found them.
    static GIVEN: std::cell::RefCell<std::collections::BTreeSet<String>> =
        const { std::cell::RefCell::new(std::collections::BTreeSet::new()) };
    /// `--precision` as the last [`run`] on this thread was given it.
    static PRECISION: std::cell::Cell<Option<MatmulMode>> = const { std::cell::Cell::new(None) };
}

fn record_given(m: &clap::ArgMatches) {
    let mut ids = std::collections::BTreeSet::new();
    if let Some((_, sub)) = m.subcommand() {
        for id in sub.ids() {
            if sub.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine) {
                ids.insert(id.as_str().to_string());
            }
        }
    }
    GIVEN.set(ids);
}

/// Whether the option with field name `id` (`min_snr` for `--min-snr`) was given on the
/// command line, as opposed to taking its default.
pub fn given(id: &str) -> bool {
    GIVEN.with_borrow(|g| g.contains(id))
}

/// The options given on the command line (as `--flag`s) whose field names are not in `read`.
pub fn given_except(read: &[&str]) -> Vec<String> {
    GIVEN.with_borrow(|g| {
        g.iter()
            // Skips clap's group ids (a flattened struct's name, `TrainArgs`).
            .filter(|id| id.starts_with(|c: char| c.is_ascii_lowercase()))
            .filter(|id| !read.contains(&id.as_str()))
            .map(|id| format!("--{}", id.replace('_', "-")))
            .collect()
    })
}

/// Refuses, with one line, the options in `ids` (field names: options of `owner`'s models)
/// that were given on the command line for `what`, a model or run of `family`.
pub fn refuse_given(
    ids: &[&str],
    owner: crate::model::Family,
    family: crate::model::Family,
    what: &str,
) -> Result<()> {
    let flags: Vec<String> = ids
        .iter()
        .filter(|id| given(id))
        .map(|id| format!("--{}", id.replace('_', "-")))
        .collect();
    if !flags.is_empty() {
        bail!(
            "{} {} of {}; {what} is {}",
            flags.join(", "),
            if flags.len() == 1 {
                "is an option"
            } else {
                "are options"
            },
            owner.plural(),
            family.article_name()
        );
    }
    Ok(())
}

/// [`refuse_given`] for options of `owner`'s models when `family` is another.
pub fn refuse_unless(
    ids: &[&str],
    owner: crate::model::Family,
    family: crate::model::Family,
    what: &str,
) -> Result<()> {
    if owner == family {
        return Ok(());
    }
    refuse_given(ids, owner, family, what)
}

/// Sets the process's matrix-product mode from `--precision` (default:
/// [`MatmulMode::fastest`]; `DIFFUSE_MATMUL` when set) and remembers what was given.
pub fn set_precision(given: Option<MatmulMode>) -> Result<()> {
    match given {
        None if std::env::var_os("DIFFUSE_MATMUL").is_some() => {}
        None => crate::kernels::set_matmul_mode(MatmulMode::fastest())?,
        Some(mode) => crate::kernels::set_matmul_mode(mode)
            .map_err(|e| anyhow::anyhow!("--precision: {e}"))?,
    }
    PRECISION.set(given);
    Ok(())
}

/// `--precision` as given on the command line.
pub fn precision_arg() -> Option<MatmulMode> {
    PRECISION.get()
}
