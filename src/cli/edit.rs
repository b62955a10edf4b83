//! `diffuse edit`: SDEdit and inpainting from the command line.

use super::{SamplerArgs, write_image_dir};
use crate::device::inference_device;
use crate::imageio::{ImageBatch, display_factor, grid, load_image, save_image, upscale};
use crate::pipeline::{
    CondFlags, Conditioning, FlagNames, Generated, Pipeline, Request, Resolved, SamplerDefaults,
    Seeds, Start, Step, check_guidance, load_generator,
};
use crate::sampler::edit::{EditOptions, start_position};
use anyhow::{Context, Result, bail};
use burn::tensor::Tensor;
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

#[derive(Args)]
pub struct EditArgs {
    /// Run folder or model file (default: the embedded Fashion-MNIST model).
    #[arg(long)]
    model: Option<String>,
    /// The image to edit (PNG, JPEG, WebP or BMP); resized and centre-cropped to the model's
    /// size.
    #[arg(long)]
    image: PathBuf,
    /// Inpainting mask: white (>= 128) where the image is regenerated, black where it is kept;
    /// resized like the image.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// How far the image is noised first: 0 keeps it, 1 regenerates it from noise
    /// (default 0.6, or 1 with --mask).
    #[arg(long)]
    strength: Option<f64>,
    /// Class index or name to steer towards (class-conditioned models).
    #[arg(long)]
    class: Option<String>,
    /// The prompt, for text-conditioned models; for a class-conditioned model, a class name.
    #[arg(long)]
    prompt: Option<String>,
    /// Classifier-free guidance weight (1 = none) [default: 2; a distilled student: its own].
    #[arg(long)]
    guidance: Option<f32>,
    #[command(flatten)]
    sampler: SamplerArgs,
    /// Edited versions to make (different noise each).
    #[arg(long, default_value_t = 1)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output: a row of the input, the mask (if any), then the edits.
    #[arg(long, default_value = "edit.png")]
    out: PathBuf,
    /// Also write each edit at the model's size here (00000.png, ...).
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

fn note_resize(path: &Path, size: usize, what: &str) -> Result<()> {
    let (w, h) = image::image_dimensions(path)
        .with_context(|| format!("{} is not a readable image", path.display()))?;
    if (w as usize, h as usize) != (size, size) {
        eprintln!(
            "note: {what} {} is {w}x{h}; resized and centre-cropped to the model's {size}x{size}",
            path.display()
        );
    }
    Ok(())
}

/// The edits `edit`'s options ask of a loaded pipeline, and the input image as the model
/// sees it (resized, in `[-1, 1]`); the Python package's `Pipeline.edit` runs this too, with
/// its progress function as `on_step` and its Ctrl-C as `cancel` (see [`Request::cancel`]).
pub fn edit(
    a: &EditArgs,
    pipe: &Pipeline,
    on_step: &mut dyn FnMut(&Step),
    cancel: Option<Arc<AtomicBool>>,
) -> Result<(Generated, Tensor<4>)> {
    let dev = pipe.device.clone();
    let cfg = pipe.model.config.clone();
    if cfg.superres.is_some() {
        bail!(
            "{} is a super-resolution model; use `diffuse upscale`",
            pipe.source()
        );
    }
    let strength = a
        .strength
        .unwrap_or_else(|| EditOptions::default_strength(a.mask.is_some()));
    if !(0.0..=1.0).contains(&strength) {
        bail!("--strength must be between 0 and 1 (got {strength})");
    }
    if a.n == 0 || a.n > 1000 {
        bail!("--n must be between 1 and 1000 (got {})", a.n);
    }
    let guidance = a.guidance.unwrap_or(Request::default_guidance(&cfg));
    check_guidance(guidance)?;
    let mut req = a
        .sampler
        .request(a.n, SamplerDefaults::EDIT.for_model(&cfg));
    let flags = CondFlags {
        class: a.class.as_deref(),
        prompt: a.prompt.as_deref(),
        negative: None,
    };
    req.conditioning = match flags.resolve(cfg.cond(), FlagNames::CLI)? {
        Resolved::Class(c) => Conditioning::Classes(vec![c; a.n]),
        Resolved::Prompt { prompt, .. } => Conditioning::Prompts {
            prompts: vec![(prompt, a.n)],
            negative: None,
        },
        Resolved::Nothing => Conditioning::None,
    };
    req.guidance = guidance;
    req.seeds = Seeds::One(a.seed);
    // Option errors (steps, sampler settings) before the images are read.
    let sampler = pipe.sampler(&req)?;
    // A latent model edits the image's latents (the mask is reduced to the latent size).
    let [c, size, _] = cfg.output_shape();
    let latent_size = cfg.image_shape()[1];
    note_resize(&a.image, size, "--image")?;
    let x0 = load_image(&a.image, size, c, &dev)?;
    let mask = match &a.mask {
        None => None,
        Some(p) => {
            note_resize(p, size, "--mask")?;
            let m = load_image(p, latent_size, 1, &dev)?;
            // Model space [-1, 1]: white (>= 128) -> 1 (regenerate), black -> 0 (keep).
            let m = m.greater_equal_elem(0.0).float();
            let regen: f32 = m.clone().sum().into_scalar::<f32>();
            if regen == 0.0 {
                eprintln!(
                    "note: --mask {} is all black: nothing is regenerated",
                    p.display()
                );
            }
            Some(m)
        }
    };
    let x0 = x0.repeat_dim(0, a.n);
    let start = start_position(sampler.as_ref(), strength);
    let runs = sampler.timesteps().len() - start;
    if runs == 0 && strength > 0.0 {
        eprintln!(
            "note: --strength {strength} of {} steps runs none, so the output is the input; give more --steps or a higher --strength",
            sampler.timesteps().len()
        );
    }
    eprintln!(
        "{} of {} positions from timestep {}",
        runs,
        sampler.timesteps().len(),
        sampler
            .timesteps()
            .get(start)
            .map_or("-".into(), |t| format!("{t}"))
    );
    req.start = Start::Edit {
        images: x0.clone(),
        options: EditOptions {
            strength,
            mask: mask.clone(),
        },
    };
    req.cancel = cancel;
    let out = pipe.run(&req, on_step)?;
    if out.prompt_truncated.first() == Some(&true)
        && let Some(enc) = &pipe.text_encoder
    {
        eprintln!(
            "note: --prompt is longer than the encoder's {} tokens; the rest is ignored",
            enc.max_len
        );
    }
    Ok((out, x0))
}

pub fn edit_cmd(a: EditArgs) -> Result<()> {
    // The output path is checked before any work.
    crate::imageio::output_format(&a.out)?;
    let dev = inference_device();
    let m = load_generator(a.model.as_deref(), &dev)?.into_diffusion("diffuse edit")?;
    let pipe = Pipeline::with_text_encoder(m, &dev)?;
    let (out, x0) = edit(&a, &pipe, &mut |_| {}, None)?;
    let [c, size, _] = pipe.model.config.output_shape();
    let mut shown = vec![ImageBatch::from_tensor(x0.narrow(0, 0, 1)).image(0)];
    if let Some(p) = &a.mask {
        let t: Tensor<4> = load_image(p, size, 1, &dev)?
            .greater_equal_elem(0.0)
            .float()
            * 2.0
            - 1.0;
        let t = if c == 1 { t } else { t.repeat_dim(1, c) };
        shown.push(ImageBatch::from_tensor(t).image(0));
    }
    let batch = out.pixels();
    let edits: Vec<_> = (0..batch.len()).map(|i| batch.image(i)).collect();
    shown.extend(edits.iter().cloned());
    let cols = shown.len();
    save_image(&upscale(&grid(&shown, cols), display_factor(size)), &a.out)?;
    println!(
        "wrote {} (input, {}{} edit(s))",
        a.out.display(),
        if a.mask.is_some() { "mask, " } else { "" },
        a.n
    );
    if let Some(dir) = &a.out_dir {
        write_image_dir(dir, &edits)?;
    }
    Ok(())
}
