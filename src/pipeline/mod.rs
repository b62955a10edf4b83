//! Generation as one call. A [`Pipeline`] owns a model's components (the denoiser, its noise
//! schedule and sampler settings, the VAE of a latent model, the class names) and, for a
//! text-conditioned model, the text encoder; [`Pipeline::run`] takes a [`Request`] (what to
//! condition on, how many, which sampler, guidance, seeds or given noise, an image to edit or
//! to enlarge) and returns the samples in model space and as images.
//!
//! `diffuse sample`, `edit`, `upscale`, `serve`, `eval` and the training preview all generate
//! through it, so each rule (default steps, how class and prompt flags are read, where the
//! noise comes from) is written once. Same components, request and build: the same bits out.

pub mod conditioning;
pub mod generator;
pub mod load;

pub use conditioning::{CondFlags, FlagNames, Resolved};
pub use generator::{Generator, TEMPERATURES};
pub use load::{load_generator, load_model};

use crate::conditioning::lowres;
use crate::conditioning::text::TextEncoder;
use crate::imageio::ImageBatch;
use crate::model::LoadedModel;
use crate::sampler::edit::{EditOptions, edit_with};
use crate::sampler::{
    GenerateOptions, SamplerChoice, SamplerKind, SeededNoise, denoise_from, generate_with,
};
use crate::unet::TextCond;
use anyhow::{Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// A model ready to generate, with the text encoder a text-conditioned model needs.
pub struct Pipeline {
    pub model: LoadedModel,
    /// Loaded for text-conditioned models ([`Pipeline::load`]); `None` otherwise.
    pub text_encoder: Option<TextEncoder>,
    /// Where the denoiser runs.
    pub device: Device,
}

/// What the denoiser is conditioned on.
#[derive(Clone, Debug, Default)]
// One per request: the size of the encoded variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Conditioning {
    /// Nothing: the null class of a class-conditioned model, the null text of a text model.
    #[default]
    None,
    /// A class per image (class-conditioned models).
    Classes(Vec<usize>),
    /// `(prompt, images)` in batch order, and what guidance steers away from (text models;
    /// `None`: the null text).
    Prompts {
        prompts: Vec<(String, usize)>,
        negative: Option<String>,
    },
    /// Prompts already encoded, one row per image (diffusers' `prompt_embeds`).
    Encoded {
        text: TextCond,
        negative: Option<TextCond>,
    },
}

/// Where the seeds of a run's random draws come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Seeds {
    /// One seed for the whole batch.
    One(u64),
    /// `(images, seed)` per part of the batch, in order: each part draws the noise it would
    /// draw alone (several server requests batched together).
    Parts(Vec<(usize, u64)>),
}

/// What the reverse process starts from.
#[derive(Clone, Debug, Default)]
// One per request: the size of the tensor variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Start {
    /// Pure Gaussian noise drawn from the seeds.
    #[default]
    Noise,
    /// Given `x_T` (`[n, C, H, W]` of unit variance; scaled by the sampler's initial sigma).
    GivenNoise(Tensor<4>),
    /// An edit of given images `[n, C, H, W]` in `[-1, 1]` (SDEdit, or inpainting with a mask).
    Edit {
        images: Tensor<4>,
        options: EditOptions,
    },
}

/// One generation call.
#[derive(Clone, Debug)]
pub struct Request {
    /// Number of images (must agree with given noise, images to edit and low-resolution
    /// inputs).
    pub n: usize,
    pub conditioning: Conditioning,
    pub sampler: SamplerKind,
    /// Sampling steps (`None`: [`Pipeline::default_steps`]: a student's own, else the sampler's).
    pub steps: Option<usize>,
    /// DDIM noise weight, timestep spacing, DDPM variance, Karras sigmas.
    pub options: SamplerChoice,
    /// Classifier-free guidance weight `w` (1 = none; see [`GenerateOptions::guidance`]).
    pub guidance: f32,
    /// Guidance only at noise levels `sigma` in `[lo, hi]` (see
    /// [`GenerateOptions::guidance_interval`]); `None`: at every step.
    pub guidance_interval: Option<(f64, f64)>,
    pub seeds: Seeds,
    pub start: Start,
    /// Super-resolution models: the low-resolution images `[n, C, s, s]` in `[-1, 1]`.
    pub low_res: Option<Tensor<4>>,
    /// Keep the first image at about ten points of the reverse process (as images).
    pub trajectory: bool,
    /// Checked before every step: once set, the run stops and returns the sample as it is.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Images denoised at once (`None`: [`Pipeline::default_batch`]). A larger request runs in
    /// chunks of this many, so memory is bounded by the batch, not by `n`; the images are the
    /// same bits whatever the batch.
    pub batch: Option<usize>,
    /// Autoregressive models: the sampling temperature `T` (logits divided by it; `None`: 1).
    pub temperature: Option<f32>,
}

impl Request {
    /// The guidance weight of a request that does not set one (diffusers' pipelines use 7.5
    /// for Stable Diffusion; 2 suits the small models trained here).
    pub const DEFAULT_GUIDANCE: f32 = 2.0;

    /// The guidance weight for a model when none is asked for: its own (a student with
    /// guidance distilled into it runs at 1), else [`Self::DEFAULT_GUIDANCE`].
    pub fn default_guidance(cfg: &crate::model::ModelConfig) -> f32 {
        cfg.sampling
            .as_ref()
            .map_or(Self::DEFAULT_GUIDANCE, |s| s.guidance)
    }

    /// `n` images from noise with the sampler's default steps, guidance 2, seed 0.
    pub fn new(n: usize, sampler: SamplerKind) -> Self {
        Self {
            n,
            conditioning: Conditioning::None,
            sampler,
            steps: None,
            options: SamplerChoice::default(),
            guidance: Self::DEFAULT_GUIDANCE,
            guidance_interval: None,
            seeds: Seeds::One(0),
            start: Start::Noise,
            low_res: None,
            trajectory: false,
            cancel: None,
            batch: None,
            temperature: None,
        }
    }
}

/// Refuses a super-resolution model where images are generated from noise alone.
pub fn generates_from_noise(m: &LoadedModel) -> Result<()> {
    if let Some(sr) = &m.config.superres {
        bail!(
            "{} is a {}x super-resolution model: it enlarges a given image; use `diffuse upscale --model ... --image small.png`",
            m.source,
            sr.scale
        );
    }
    Ok(())
}

/// The largest classifier-free guidance weight accepted (far beyond any useful one), by the
/// library, the CLI and the HTTP API alike.
pub const MAX_GUIDANCE: f64 = 100.0;

/// Checks a classifier-free guidance weight: finite, between 0 and [`MAX_GUIDANCE`].
pub fn check_guidance(w: f32) -> Result<()> {
    if !(w.is_finite() && (0.0..=MAX_GUIDANCE).contains(&(w as f64))) {
        bail!(
            "the guidance weight must be between 0 and {MAX_GUIDANCE} (got {})",
            shown(w as f64)
        );
    }
    Ok(())
}

/// A number as messages echo it: plainly when it is of a usual size, else in scientific
/// notation (a hostile `1e308` is not written out as 309 digits).
pub fn shown(x: f64) -> String {
    let a = x.abs();
    if x == 0.0 || !x.is_finite() || (1e-4..1e6).contains(&a) {
        format!("{x}")
    } else {
        format!("{x:e}")
    }
}

/// A chunk's conditioning as the denoising loop takes it.
#[derive(Default)]
struct Inputs {
    classes: Option<Vec<usize>>,
    text: Option<TextCond>,
    negative: Option<TextCond>,
}

/// Which prompts encoded for a chunk were cut at the encoder's length: `(prompt index, cut)`.
#[derive(Default)]
struct Truncation {
    prompts: Vec<(usize, bool)>,
    negative: bool,
}

/// The sampler and steps a front end runs when none are asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerDefaults {
    pub sampler: SamplerKind,
    /// `None`: [`SamplerKind::default_steps`].
    pub steps: Option<usize>,
}

impl SamplerDefaults {
    /// Generation (`diffuse sample`), as diffusers' DDPMPipeline: ancestral DDPM over all T.
    pub const GENERATE: Self = Self {
        sampler: SamplerKind::Ddpm,
        steps: None,
    };
    /// Editing and super-resolution: Euler ancestral, 50 steps over the whole range.
    pub const EDIT: Self = Self {
        sampler: SamplerKind::EulerAncestral,
        steps: Some(50),
    };
    /// The HTTP API: Euler ancestral, at 50 steps the closest to 1000-step DDPM on the
    /// embedded model (docs/steps-quality.md).
    pub const SERVE: Self = Self {
        sampler: SamplerKind::EulerAncestral,
        steps: None,
    };
    /// `diffuse eval`: DPM-Solver++(2M) at 20 steps.
    pub const EVAL: Self = Self {
        sampler: SamplerKind::DpmPp2m,
        steps: Some(20),
    };
    /// The training run's preview grids: Euler ancestral at 30 steps (at most T), robust
    /// early in training, when DPM-Solver++'s multistep update can amplify a poor first
    /// prediction (seen as pure-noise tiles in early grids).
    pub const PREVIEW: Self = Self {
        sampler: SamplerKind::EulerAncestral,
        steps: Some(30),
    };

    /// These defaults for a model with `cfg`: a model with its own sampling defaults (a
    /// distilled student, [`crate::model::SamplingConfig`]) runs those; a flow-matching model
    /// runs Euler in flow time where they name a sampler of the diffusion process (the flow
    /// samplers are Euler and Heun), at the same steps.
    pub fn for_model(self, cfg: &crate::model::ModelConfig) -> Self {
        if let Some(s) = &cfg.sampling {
            return Self {
                sampler: s.sampler,
                steps: Some(s.steps),
            };
        }
        match self.sampler {
            SamplerKind::Euler | SamplerKind::Heun => self,
            _ if cfg.prediction.is_flow() => Self {
                sampler: SamplerKind::Euler,
                ..self
            },
            _ => self,
        }
    }
}

/// One step of a run, as progress callbacks see it.
pub struct Step<'a> {
    /// Position in the sampler's timesteps, from 0.
    pub index: usize,
    /// Positions in the run (of one chunk).
    pub total: usize,
    /// Which chunk of the request this step belongs to, from 0, and how many there are.
    pub chunk: usize,
    pub chunks: usize,
    /// The state after the update, in model space.
    pub sample: &'a Tensor<4>,
}

/// What a run made.
pub struct Generated {
    /// The final sample in model space (latents for a latent model), before clamping.
    pub sample: Tensor<4>,
    /// The images in `[-1, 1]` (decoded by the VAE for a latent model), not clamped.
    pub images: Tensor<4>,
    /// The first image's trajectory, `x_T` to `x_0`, when asked for.
    pub trajectory: Vec<Tensor<4>>,
    /// Per prompt of [`Conditioning::Prompts`]: cut at the encoder's length.
    pub prompt_truncated: Vec<bool>,
    /// The negative prompt was cut at the encoder's length.
    pub negative_truncated: bool,
}

impl Generated {
    /// The images as 8-bit pixels (clamped to `[-1, 1]`, then rounded).
    pub fn pixels(&self) -> ImageBatch {
        ImageBatch::from_tensor(self.images.clone())
    }
}

/// What a chunked run says besides its chunks ([`Pipeline::run_chunks`]).
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    /// Per prompt of [`Conditioning::Prompts`]: cut at the encoder's length.
    pub prompt_truncated: Vec<bool>,
    /// The negative prompt was cut at the encoder's length.
    pub negative_truncated: bool,
    /// How many chunks ran.
    pub chunks: usize,
}

/// The largest batch a request may ask for.
pub const MAX_BATCH: usize = 4096;

/// The memory [`Pipeline::default_batch`] sizes a chunk's activations to.
pub const BATCH_MEMORY_BYTES: usize = 1 << 30;

/// The checks every family makes of a request before any work (a count of images, a batch
/// in range, given inputs and seeds that cover the images); returns the seeds per part.
pub(crate) fn check_request(req: &Request) -> Result<Vec<(usize, u64)>> {
    let n = req.n;
    if n == 0 {
        bail!("the request is for no images");
    }
    if let Some(b) = req.batch.filter(|b| !(1..=MAX_BATCH).contains(b)) {
        bail!("the batch must be between 1 and {MAX_BATCH} images (got {b})");
    }
    let given = match &req.start {
        Start::Noise => None,
        Start::GivenNoise(x) => Some(x.dims()),
        Start::Edit { images, .. } => Some(images.dims()),
    };
    if let Some(d) = given.filter(|d| d[0] != n) {
        bail!("the request is for {n} images but {} were given", d[0]);
    }
    let seed_parts = match &req.seeds {
        Seeds::One(s) => vec![(n, *s)],
        Seeds::Parts(p) => p.clone(),
    };
    let covered: usize = seed_parts.iter().map(|p| p.0).sum();
    if covered != n {
        bail!("the seeds cover {covered} images, the request {n}");
    }
    Ok(seed_parts)
}

/// Runs `run_chunks` and joins its chunks into one [`Generated`].
pub(crate) fn gather(
    run_chunks: impl FnOnce(&mut dyn FnMut(usize, Generated) -> Result<()>) -> Result<RunSummary>,
) -> Result<Generated> {
    let mut parts: Vec<Generated> = Vec::new();
    let summary = run_chunks(&mut |_, g| {
        parts.push(g);
        Ok(())
    })?;
    let mut first = parts.remove(0);
    if !parts.is_empty() {
        let mut samples = vec![first.sample];
        let mut images = vec![first.images];
        for g in parts {
            samples.push(g.sample);
            images.push(g.images);
        }
        first.sample = Tensor::cat(samples, 0);
        first.images = Tensor::cat(images, 0);
    }
    first.prompt_truncated = summary.prompt_truncated;
    first.negative_truncated = summary.negative_truncated;
    Ok(first)
}

impl Pipeline {
    /// Components as they are; the text encoder is loaded by [`Pipeline::load`] or given here.
    pub fn new(model: LoadedModel, text_encoder: Option<TextEncoder>, device: Device) -> Self {
        Self {
            model,
            text_encoder,
            device,
        }
    }

    /// Loads `--model` ([`load_model`]) and, for a text-conditioned model, the fetched text
    /// encoder.
    pub fn load(spec: Option<&str>, device: &Device) -> Result<Self> {
        Self::with_text_encoder(load_model(spec, device)?, device)
    }

    /// A loaded model with the fetched text encoder if it is text-conditioned.
    pub fn with_text_encoder(model: LoadedModel, device: &Device) -> Result<Self> {
        let text_encoder = match model.config.unet.text_dim {
            Some(_) => Some(TextEncoder::load_default(device)?),
            None => None,
        };
        Ok(Self::new(model, text_encoder, device.clone()))
    }

    /// Where the model came from, for messages.
    pub fn source(&self) -> &str {
        &self.model.source
    }

    /// Steps a request without `steps` runs: a distilled student's own, else
    /// [`SamplerKind::default_steps`] over `T`.
    pub fn default_steps(&self, kind: SamplerKind) -> usize {
        match &self.model.config.sampling {
            Some(s) => s.steps,
            None => kind.default_steps(self.model.scheduler.len()),
        }
    }

    /// The steps a request runs: its own, else the sampler's default.
    pub fn steps(&self, req: &Request) -> usize {
        req.steps.unwrap_or_else(|| self.default_steps(req.sampler))
    }

    /// The sampler a request runs, built from the model's own schedule and settings.
    pub fn sampler(&self, req: &Request) -> Result<Box<dyn crate::sampler::Sampler>> {
        let steps = self.steps(req);
        if let Some(s) = &self.model.config.sampling
            && steps > s.max_steps
        {
            bail!(
                "{} was distilled to sample in at most {} steps (asked for {steps}); give --steps {} or fewer",
                self.model.source,
                s.max_steps,
                s.max_steps
            );
        }
        let choice = SamplerChoice {
            steps,
            ..req.options.clone()
        };
        self.model.sampler(req.sampler, &choice)
    }

    /// Images a request without `batch` denoises at once: as many as fit
    /// [`BATCH_MEMORY_BYTES`] by an estimate of one image's activations (about eight feature
    /// maps alive per level, and the attention matrices; doubled for guidance), between 1
    /// and 256.
    pub fn default_batch(&self) -> usize {
        let u = &self.model.config.unet;
        let mut floats = 0usize;
        for (s, c) in u.level_sizes().iter().zip(u.level_channels()) {
            floats = floats.saturating_add(8usize.saturating_mul(s * s).saturating_mul(c));
            if u.attention_resolutions.contains(s) {
                floats = floats.saturating_add((s * s).saturating_mul(s * s));
            }
        }
        let [c, h, w] = self.model.config.output_shape();
        floats = floats.saturating_add(8 * c * h * w);
        let per_image = floats.saturating_mul(4).saturating_mul(2).max(1);
        (BATCH_MEMORY_BYTES / per_image).clamp(1, 256)
    }

    /// The chunk size a request runs with: its own `batch`, else [`Pipeline::default_batch`].
    pub fn batch(&self, req: &Request) -> usize {
        req.batch.unwrap_or_else(|| self.default_batch()).max(1)
    }

    /// Runs a request; `on_step` sees every step. The whole result is held at once: for many
    /// images, [`Pipeline::run_chunks`] hands each chunk over as it is done.
    pub fn run(&self, req: &Request, on_step: &mut dyn FnMut(&Step)) -> Result<Generated> {
        gather(|on_chunk| self.run_chunks(req, on_step, on_chunk))
    }

    /// Runs a request in chunks of [`Pipeline::batch`] images, giving each to
    /// `on_chunk(offset, chunk)` as soon as it is done (its `trajectory` only in the first).
    /// Every random draw of image `i` is the one a single run of all `n` would make (the noise
    /// streams are read in the same order, the rows of other chunks skipped), so the images
    /// do not depend on the batch. A cancelled run stops after the chunk in progress.
    pub fn run_chunks(
        &self,
        req: &Request,
        on_step: &mut dyn FnMut(&Step),
        on_chunk: &mut dyn FnMut(usize, Generated) -> Result<()>,
    ) -> Result<RunSummary> {
        let m = &self.model;
        let cfg = &m.config;
        match (&cfg.superres, &req.low_res) {
            (Some(_), None) => generates_from_noise(m)?,
            (None, Some(_)) => bail!("{} is not a super-resolution model", m.source),
            _ => {}
        }
        check_guidance(req.guidance)?;
        if let Some((lo, hi)) = req.guidance_interval {
            crate::sampler::check_guidance_interval(lo, hi)?;
        }
        let seed_parts = check_request(req)?;
        let n = req.n;
        if let Some(low) = &req.low_res
            && low.dims()[0] != n
        {
            bail!(
                "the request is for {n} images but {} low-resolution inputs were given",
                low.dims()[0]
            );
        }
        self.check_conditioning(&req.conditioning, n)?;
        let batch = self.batch(req);
        let chunks = n.div_ceil(batch);
        let mut summary = RunSummary {
            prompt_truncated: match &req.conditioning {
                Conditioning::Prompts { prompts, .. } => vec![false; prompts.len()],
                _ => Vec::new(),
            },
            ..RunSummary::default()
        };
        for chunk in 0..chunks {
            let lo = chunk * batch;
            let hi = (lo + batch).min(n);
            let (g, cut) = self.run_chunk(req, &seed_parts, lo..hi, (chunk, chunks), on_step)?;
            for (i, c) in cut.prompts {
                summary.prompt_truncated[i] |= c;
            }
            summary.negative_truncated |= cut.negative;
            summary.chunks += 1;
            on_chunk(lo, g)?;
            if req
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            {
                break;
            }
        }
        Ok(summary)
    }

    /// Images `range` of a request.
    fn run_chunk(
        &self,
        req: &Request,
        seed_parts: &[(usize, u64)],
        range: std::ops::Range<usize>,
        (chunk, chunks): (usize, usize),
        on_step: &mut dyn FnMut(&Step),
    ) -> Result<(Generated, Truncation)> {
        let m = &self.model;
        let cfg = &m.config;
        let (lo, len) = (range.start, range.len());
        let rows = |x: &Tensor<4>| {
            if len == x.dims()[0] {
                x.clone()
            } else {
                x.clone().narrow(0, lo, len)
            }
        };
        let mut sampler = self.sampler(req)?;
        let (
            Inputs {
                classes,
                text,
                negative,
            },
            cut,
        ) = self.conditioning(&req.conditioning, range.clone())?;
        let image_cond = match (&cfg.superres, &req.low_res) {
            (Some(sr), Some(low)) => Some(self.upsampled(&rows(low), sr.scale)?),
            _ => None,
        };
        let opts = GenerateOptions {
            n: len,
            classes,
            guidance: req.guidance,
            // Unused: every draw comes from `noise` below.
            seed: 0,
            cancel: req.cancel.clone(),
            text,
            negative,
            image_cond,
            guidance_interval: req.guidance_interval,
        };
        let mut noise = SeededNoise::window(seed_parts, range.clone());
        let total = sampler.timesteps().len();
        let keep_every = (total / 10).max(1);
        let mut trajectory = Vec::new();
        let want_trajectory = req.trajectory && lo == 0;
        let mut step = |i: usize, x: &Tensor<4>| {
            if want_trajectory && (i.is_multiple_of(keep_every) || i + 1 == total) {
                trajectory.push(m.to_images(x.clone().narrow(0, 0, 1)));
            }
            on_step(&Step {
                index: i,
                total,
                chunk,
                chunks,
                sample: x,
            });
        };
        let k = cfg.unet.num_classes;
        let sample = match &req.start {
            Start::Noise => generate_with(
                &m.unet,
                k,
                cfg.image_shape(),
                sampler.as_mut(),
                &opts,
                &mut noise,
                &self.device,
                &mut step,
            ),
            Start::GivenNoise(x) => {
                let x = rows(x) * (sampler.init_noise_sigma() as f32);
                denoise_from(
                    &m.unet,
                    k,
                    x,
                    sampler.as_mut(),
                    &opts,
                    &mut noise,
                    &mut step,
                )
            }
            Start::Edit { images, options } => edit_with(
                &m.unet,
                k,
                m.from_images(rows(images)),
                sampler.as_mut(),
                &opts,
                options,
                &mut noise,
                &mut step,
            ),
        };
        let images = if cfg.superres.is_some() {
            sample.clone()
        } else {
            m.to_images(sample.clone())
        };
        let g = Generated {
            sample,
            images,
            trajectory,
            prompt_truncated: Vec::new(),
            negative_truncated: false,
        };
        Ok((g, cut))
    }

    /// Checks a request's conditioning against the model and `n` images, before any work.
    fn check_conditioning(&self, c: &Conditioning, n: usize) -> Result<()> {
        let cfg = &self.model.config;
        let text_model = cfg.unet.text_dim.is_some();
        let (classes_given, text_given) = (
            matches!(c, Conditioning::Classes(_)),
            matches!(
                c,
                Conditioning::Prompts { .. } | Conditioning::Encoded { .. }
            ),
        );
        if classes_given && cfg.unet.num_classes.is_none() {
            bail!("{} is not class-conditioned", self.model.source);
        }
        if text_given && !text_model {
            bail!(
                "{} is not text-conditioned: it takes no prompt",
                self.model.source
            );
        }
        match c {
            Conditioning::Classes(v) => {
                let k = cfg.unet.num_classes.unwrap_or(0);
                if v.len() != n {
                    bail!("{} classes given for {n} images", v.len());
                }
                if let Some(bad) = v.iter().find(|&&c| c >= k) {
                    bail!(
                        "class {bad} is out of range: {} has {k} classes",
                        self.model.source
                    );
                }
            }
            Conditioning::None => {}
            Conditioning::Prompts { prompts, .. } => {
                if self.text_encoder.is_none() {
                    bail!("the text encoder is not loaded (run `diffuse fetch text-encoder`)");
                }
                let images: usize = prompts.iter().map(|p| p.1).sum();
                if images != n {
                    bail!("the prompts cover {images} images, the request {n}");
                }
            }
            Conditioning::Encoded { text, negative } => {
                if text.null.len() != n {
                    bail!("{} encoded prompts given for {n} images", text.null.len());
                }
                if let Some(neg) = negative.as_ref().filter(|t| t.null.len() != n) {
                    bail!(
                        "{} encoded negative prompts given for {n} images",
                        neg.null.len()
                    );
                }
            }
        }
        Ok(())
    }

    /// Classes, text and negative text for images `range` of a checked request, with the
    /// truncation flags of the prompts encoded for them.
    fn conditioning(
        &self,
        c: &Conditioning,
        range: std::ops::Range<usize>,
    ) -> Result<(Inputs, Truncation)> {
        let (lo, len) = (range.start, range.len());
        let text_rows = |t: &TextCond| t.rows(lo, len);
        Ok(match c {
            Conditioning::Classes(v) => (
                Inputs {
                    classes: Some(v[range].to_vec()),
                    ..Inputs::default()
                },
                Truncation::default(),
            ),
            // A text model without text runs on its learned null text (no encoder needed).
            Conditioning::None => (Inputs::default(), Truncation::default()),
            Conditioning::Prompts { prompts, negative } => {
                let enc = self.text_encoder.as_ref().ok_or_else(|| {
                    anyhow::anyhow!(
                        "the text encoder is not loaded (run `diffuse fetch text-encoder`)"
                    )
                })?;
                // The prompts' parts that fall in the chunk, with their index.
                let mut parts: Vec<(&str, usize)> = Vec::new();
                let mut index = Vec::new();
                let mut at = 0;
                for (i, (p, k)) in prompts.iter().enumerate() {
                    let (a, b) = (at.max(range.start), (at + k).min(range.end));
                    if a < b {
                        parts.push((p.as_str(), b - a));
                        index.push(i);
                    }
                    at += k;
                }
                let (neg, neg_cut) = match negative {
                    Some(np) => {
                        let (t, cut) = enc.cond_repeated(&[(np.as_str(), len)])?;
                        (Some(t), cut[0])
                    }
                    None => (None, false),
                };
                let (t, cut) = enc.cond_repeated(&parts)?;
                (
                    Inputs {
                        text: Some(t),
                        negative: neg,
                        ..Inputs::default()
                    },
                    Truncation {
                        prompts: index.into_iter().zip(cut).collect(),
                        negative: neg_cut,
                    },
                )
            }
            Conditioning::Encoded { text, negative } => (
                Inputs {
                    text: Some(text_rows(text)),
                    negative: negative.as_ref().map(text_rows),
                    ..Inputs::default()
                },
                Truncation::default(),
            ),
        })
    }

    /// A super-resolution model's input: the low-resolution images upsampled bicubically
    /// (SR3, Saharia et al. 2021), checked against the model's sizes.
    fn upsampled(&self, low: &Tensor<4>, scale: usize) -> Result<Tensor<4>> {
        let m = &self.model;
        let [n, c, s, w] = low.dims();
        let [mc, big, _] = m.config.output_shape();
        if c != mc || s != w || s * scale != big {
            bail!(
                "the low-resolution input is {c}x{s}x{w}; {} takes {mc}x{1}x{1}",
                m.source,
                big / scale
            );
        }
        let dev = low.device();
        let v: Vec<f32> = low
            .clone()
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .expect("f32");
        let up = lowres::condition(&v, n, c, s, scale);
        Ok(Tensor::<4>::from_data(
            TensorData::new(up, [n, c, big, big]),
            &dev,
        ))
    }
}
