//! `diffuse sample`: images from a model, as a grid, one file each, a trajectory strip and
//! the model-space tensor.

use super::{ImageDir, SamplerArgs, steps_bar};
use crate::device::inference_device;
use crate::imageio::{ImageBatch, display_factor, grid, output_format, save_image, upscale};
use crate::pipeline::{
    CondFlags, Conditioning, FlagNames, Generator, Request, Resolved, SamplerDefaults, Seeds,
    Start, check_guidance, generates_from_noise, load_generator,
};
use crate::weights::{self, NamedTensors, StoreDtype};
use anyhow::{Result, bail};
use burn::tensor::{Tensor, TensorData};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct SampleArgs {
    /// Run folder, model .safetensors file, diffusers pipeline folder, or a shipped model by
    /// name: fashion-mnist (the default), fashion-mnist-fast (4 steps), emoji, or one model of
    /// each other family: fashion-mnist-gan, fashion-mnist-autoregressive, fashion-mnist-vae.
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
    /// Autoregressive models: the sampling temperature (logits divided by it; below 1 sharper,
    /// above 1 more varied) [default: 1].
    #[arg(long)]
    temperature: Option<f32>,
    /// Classifier-free guidance weight (1 = none) [default: 2; a distilled student: its own].
    #[arg(long)]
    guidance: Option<f32>,
    #[command(flatten)]
    sampler: SamplerArgs,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Grid image to write, PNG, JPEG, WebP or BMP by its extension (default samples.png
    /// when --out-dir is not given).
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

/// Options of `sample` that only diffusion models take (field names).
const DIFFUSION_ONLY: &[&str] = &[
    "sampler",
    "steps",
    "eta",
    "spacing",
    "variance",
    "karras",
    "clip_sample",
    "guidance_interval",
    "guidance",
    "trajectory",
    "init_noise",
    "save_tensor",
];

/// The largest grid `sample` holds, in bytes of 8-bit pixels (before display scaling).
const MAX_GRID_BYTES: usize = 512 << 20;

/// Reads `--init-noise`: the tensor "noise" of a safetensors file.
fn read_init_noise(path: &Path) -> Result<weights::HostTensor> {
    let (mut t, _) = weights::read_safetensors(path)?;
    t.remove("noise")
        .ok_or_else(|| anyhow::anyhow!("{} has no tensor named 'noise'", path.display()))
}

/// Checks given initial noise (`what` names it in errors) for images `[C, H, W]`: shape
/// `[N, C, H, W]` with `1 <= N <= 10000`, finite values.
fn check_init_noise(noise: &weights::HostTensor, image: [usize; 3], what: &str) -> Result<()> {
    let s = &noise.shape;
    if s.len() != 4 || s[1..] != image || s[0] == 0 || s[0] > 10_000 {
        bail!(
            "{what} has shape {:?}, this model needs [N, {}, {}, {}] with 1 <= N <= 10000",
            s,
            image[0],
            image[1],
            image[2]
        );
    }
    if noise.data.iter().any(|v| !v.is_finite()) {
        bail!("{what} holds NaN or infinite values");
    }
    Ok(())
}

/// What `sample`'s options ask of a loaded model: the request (conditioning, sampler, guidance,
/// seed, and the given initial noise `init` with the words that name it in errors) and the
/// grid's columns. The Python package's `Pipeline.generate` builds its request here too, so the
/// two make the same images.
pub fn request(
    a: &SampleArgs,
    generator: &Generator,
    init: Option<(weights::HostTensor, &str)>,
) -> Result<(Request, usize)> {
    let dev = generator.device();
    let (guidance, defaults, image_shape) = match generator.as_diffusion() {
        Some(p) => {
            let m = &p.model;
            generates_from_noise(m)?;
            let g = a.guidance.unwrap_or(Request::default_guidance(&m.config));
            check_guidance(g)?;
            let defaults = SamplerDefaults::GENERATE.for_model(&m.config);
            (g, defaults, m.config.image_shape())
        }
        None => {
            super::refuse_given(
                DIFFUSION_ONLY,
                crate::model::Family::Diffusion,
                generator.family(),
                generator.source(),
            )?;
            (1.0, SamplerDefaults::GENERATE, [0; 3])
        }
    };
    super::refuse_unless(
        &["temperature"],
        crate::model::Family::Autoregressive,
        generator.family(),
        generator.source(),
    )?;
    if let Some((t, what)) = &init {
        check_init_noise(t, image_shape, what)?;
    }
    let n = match &init {
        Some((t, what)) if a.n.is_some_and(|n| n != t.shape[0]) => bail!(
            "--n {} disagrees with the {} images of {what}",
            a.n.unwrap_or(0),
            t.shape[0]
        ),
        Some((t, _)) => Some(t.shape[0]),
        None => a.n,
    };
    if n.is_some_and(|n| n == 0 || n > 10_000) {
        bail!("--n must be between 1 and 10000 (got {})", n.unwrap_or(0));
    }
    if a.cols == Some(0) {
        bail!("--cols must be at least 1");
    }
    let flags = CondFlags {
        class: a.class.as_deref(),
        prompt: a.prompt.as_deref(),
        negative: a.negative_prompt.as_deref(),
    };
    // A class, rows of every class, or one prompt for all images.
    let cond = generator.cond();
    let (n, conditioning, cols) = match (flags.resolve(cond, FlagNames::CLI)?, cond.num_classes) {
        (Resolved::Class(c), _) => {
            let n = n.unwrap_or(16);
            (
                n,
                Conditioning::Classes(vec![c; n]),
                a.cols.unwrap_or(4.min(n)),
            )
        }
        (Resolved::Nothing, Some(k)) => {
            let n = n.unwrap_or(4 * k);
            let classes: Vec<usize> = (0..n).map(|i| i * k / n.max(1)).collect();
            let cols = a.cols.unwrap_or(if n % k == 0 { n / k } else { 8 });
            (n, Conditioning::Classes(classes), cols)
        }
        (resolved, _) => {
            let n = n.unwrap_or(16);
            let cols = a.cols.unwrap_or((n as f64).sqrt().ceil() as usize);
            let c = match resolved {
                Resolved::Prompt { prompt, negative } => {
                    if prompt.trim().is_empty() {
                        eprintln!(
                            "note: no --prompt: sampling the model's unconditional distribution"
                        );
                    }
                    Conditioning::Prompts {
                        prompts: vec![(prompt, n)],
                        negative,
                    }
                }
                _ => Conditioning::None,
            };
            (n, c, cols)
        }
    };
    let mut req = a.sampler.request(n, defaults);
    req.conditioning = conditioning;
    req.guidance = guidance;
    req.seeds = Seeds::One(a.seed);
    req.trajectory = a.trajectory.is_some();
    req.temperature = a.temperature;
    if let Some((noise, _)) = init {
        let shape: [usize; 4] = noise.shape.clone().try_into().expect("checked 4-d");
        req.start = Start::GivenNoise(Tensor::<4>::from_data(
            TensorData::new(noise.data, shape),
            dev,
        ));
    }
    Ok((req, cols))
}

pub fn run(a: SampleArgs) -> Result<()> {
    let dev = inference_device();
    let loaded = load_generator(a.model.as_deref(), &dev)?;
    let init = match &a.init_noise {
        Some(p) => Some(read_init_noise(p)?),
        None => None,
    };
    let generator = Generator::from_loaded(loaded, &dev, true)?;
    let what = a
        .init_noise
        .as_ref()
        .map(|p| format!("--init-noise {}: tensor 'noise'", p.display()))
        .unwrap_or_default();
    let (req, cols) = request(&a, &generator, init.map(|t| (t, what.as_str())))?;
    let n = req.n;
    let image_shape = generator
        .as_diffusion()
        .map_or([0; 3], |p| p.model.config.image_shape());
    let grid_out = match (&a.out, &a.out_dir) {
        (None, None) => Some(PathBuf::from("samples.png")),
        (o, _) => o.clone(),
    };
    // Output paths are checked before any work.
    for p in grid_out.iter().chain(&a.trajectory) {
        output_format(p)?;
    }
    // The grid is held whole: bound it (one file per image has no such limit).
    let [oc, oh, ow] = generator.output_shape();
    let grid_bytes = n * oc.max(3) * oh * ow;
    if grid_out.is_some() && grid_bytes > MAX_GRID_BYTES {
        bail!(
            "a grid of {n} images of {oh}x{ow} would need {} MB; write them one file each with --out-dir (and no --out)",
            grid_bytes >> 20
        );
    }
    if let Some(d) = a.out_dir.as_ref().filter(|d| d.exists() && !d.is_dir()) {
        bail!("--out-dir {} is a file, not a folder", d.display());
    }
    if a.save_tensor.as_ref().is_some_and(|p| p.is_dir()) {
        bail!(
            "--save-tensor {} is a folder: give a .safetensors file name",
            a.save_tensor
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
    }
    let pb = steps_bar();
    // Each chunk's images are written (--out-dir) or kept as 8-bit pixels (the grid) as soon
    // as it is done: memory is bounded by --batch, not by --n.
    let mut dir = a.out_dir.as_deref().map(ImageDir::create).transpose()?;
    let mut imgs = Vec::new();
    let mut tensor: Vec<f32> = Vec::new();
    let mut trajectory = Vec::new();
    let keep_grid = grid_out.is_some();
    let summary = generator.run_chunks(
        &req,
        &mut |s| {
            if s.index == 0 && s.chunk == 0 {
                pb.set_length((s.total * s.chunks) as u64);
            }
            pb.inc(1);
        },
        &mut |_, g| {
            if a.save_tensor.is_some() {
                tensor.extend(
                    g.sample
                        .clone()
                        .into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .expect("f32"),
                );
            }
            if trajectory.is_empty() {
                trajectory = g.trajectory.clone();
            }
            let batch = g.pixels();
            for i in 0..batch.len() {
                let img = batch.image(i);
                if let Some(d) = dir.as_mut() {
                    d.write(&img)?;
                }
                if keep_grid {
                    imgs.push(img);
                }
            }
            Ok(())
        },
    )?;
    pb.finish_and_clear();
    if let Some(enc) = generator
        .as_diffusion()
        .and_then(|p| p.text_encoder.as_ref())
    {
        let max = enc.max_len;
        for (cut, what) in [
            (summary.negative_truncated, "--negative-prompt"),
            (summary.prompt_truncated.first() == Some(&true), "--prompt"),
        ] {
            if cut {
                eprintln!(
                    "note: {what} is longer than the encoder's {max} tokens; the rest is ignored"
                );
            }
        }
    }
    if let Some(path) = &a.save_tensor {
        let [c, h, w] = image_shape;
        let mut t = NamedTensors::new();
        t.insert(
            "sample".into(),
            weights::HostTensor {
                shape: vec![tensor.len() / (c * h * w), c, h, w],
                data: tensor,
            },
        );
        let bytes = weights::to_safetensors(&t, &Default::default(), StoreDtype::F32)?;
        crate::files::write_atomic(path, &bytes)?;
        println!("wrote {}", path.display());
    }
    let f = display_factor(oh);
    if let Some(path) = &grid_out {
        save_image(&upscale(&grid(&imgs, cols), f), path)?;
        println!(
            "wrote {} ({n} image{} from {})",
            path.display(),
            if n == 1 { "" } else { "s" },
            generator.source()
        );
    }
    if let Some(d) = dir {
        d.finish();
    }
    if let Some(path) = &a.trajectory {
        let frames: Vec<_> = trajectory
            .iter()
            .map(|x| ImageBatch::from_tensor(x.clone()).image(0))
            .collect();
        save_image(&upscale(&grid(&frames, frames.len()), f), path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
