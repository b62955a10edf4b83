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
pub mod load;

pub use conditioning::{CondFlags, FlagNames, Resolved};
pub use load::load_model;

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
    /// Sampling steps (`None`: [`SamplerKind::default_steps`] over the model's `T`).
    pub steps: Option<usize>,
    /// DDIM noise weight, timestep spacing, DDPM variance, Karras sigmas.
    pub options: SamplerChoice,
    /// Classifier-free guidance weight `w` (1 = none; see [`GenerateOptions::guidance`]).
    pub guidance: f32,
    pub seeds: Seeds,
    pub start: Start,
    /// Super-resolution models: the low-resolution images `[n, C, s, s]` in `[-1, 1]`.
    pub low_res: Option<Tensor<4>>,
    /// Keep the first image at about ten points of the reverse process (as images).
    pub trajectory: bool,
    /// Checked before every step: once set, the run stops and returns the sample as it is.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Request {
    /// The guidance weight of a request that does not set one (diffusers' pipelines use 7.5
    /// for Stable Diffusion; 2 suits the small models trained here).
    pub const DEFAULT_GUIDANCE: f32 = 2.0;

    /// `n` images from noise with the sampler's default steps, guidance 2, seed 0.
    pub fn new(n: usize, sampler: SamplerKind) -> Self {
        Self {
            n,
            conditioning: Conditioning::None,
            sampler,
            steps: None,
            options: SamplerChoice::default(),
            guidance: Self::DEFAULT_GUIDANCE,
            seeds: Seeds::One(0),
            start: Start::Noise,
            low_res: None,
            trajectory: false,
            cancel: None,
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

/// Checks a classifier-free guidance weight: finite and not negative.
pub fn check_guidance(w: f32) -> Result<()> {
    if !(w.is_finite() && w >= 0.0) {
        bail!("--guidance must be a non-negative number (got {w})");
    }
    Ok(())
}

/// A request's conditioning as the denoising loop takes it, with the prompts' truncation
/// flags.
#[derive(Default)]
struct Inputs {
    classes: Option<Vec<usize>>,
    text: Option<TextCond>,
    negative: Option<TextCond>,
    prompt_truncated: Vec<bool>,
    negative_truncated: bool,
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
}

/// One step of a run, as progress callbacks see it.
pub struct Step<'a> {
    /// Position in the sampler's timesteps, from 0.
    pub index: usize,
    /// Positions in the run.
    pub total: usize,
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

    /// Steps a request without `steps` runs ([`SamplerKind::default_steps`] over `T`).
    pub fn default_steps(&self, kind: SamplerKind) -> usize {
        kind.default_steps(self.model.scheduler.len())
    }

    /// The steps a request runs: its own, else the sampler's default.
    pub fn steps(&self, req: &Request) -> usize {
        req.steps.unwrap_or_else(|| self.default_steps(req.sampler))
    }

    /// The sampler a request runs, built from the model's own schedule and settings.
    pub fn sampler(&self, req: &Request) -> Result<Box<dyn crate::sampler::Sampler>> {
        let choice = SamplerChoice {
            steps: self.steps(req),
            ..req.options.clone()
        };
        self.model.sampler(req.sampler, &choice)
    }

    /// Runs a request; `on_step` sees every step.
    pub fn run(&self, req: &Request, on_step: &mut dyn FnMut(&Step)) -> Result<Generated> {
        let m = &self.model;
        let cfg = &m.config;
        match (&cfg.superres, &req.low_res) {
            (Some(_), None) => generates_from_noise(m)?,
            (None, Some(_)) => bail!("{} is not a super-resolution model", m.source),
            _ => {}
        }
        check_guidance(req.guidance)?;
        let n = req.n;
        let given = match &req.start {
            Start::Noise => None,
            Start::GivenNoise(x) => Some(x.dims()),
            Start::Edit { images, .. } => Some(images.dims()),
        };
        if let Some(d) = given.filter(|d| d[0] != n) {
            bail!("the request is for {n} images but {} were given", d[0]);
        }
        let mut sampler = self.sampler(req)?;
        let Inputs {
            classes,
            text,
            negative,
            prompt_truncated,
            negative_truncated,
        } = self.conditioning(&req.conditioning, n)?;
        let image_cond = match (&cfg.superres, &req.low_res) {
            (Some(sr), Some(low)) => Some(self.upsampled(low, sr.scale, n)?),
            _ => None,
        };
        let opts = GenerateOptions {
            n,
            classes,
            guidance: req.guidance,
            // Unused: every draw comes from `noise` below.
            seed: 0,
            cancel: req.cancel.clone(),
            text,
            negative,
            image_cond,
        };
        let mut noise = match &req.seeds {
            Seeds::One(s) => SeededNoise::new(&[(n, *s)]),
            Seeds::Parts(p) => SeededNoise::new(p),
        };
        if noise.len() != n {
            bail!("the seeds cover {} images, the request {n}", noise.len());
        }
        let total = sampler.timesteps().len();
        let keep_every = (total / 10).max(1);
        let mut trajectory = Vec::new();
        let mut step = |i: usize, x: &Tensor<4>| {
            if req.trajectory && (i.is_multiple_of(keep_every) || i + 1 == total) {
                trajectory.push(m.to_images(x.clone().narrow(0, 0, 1)));
            }
            on_step(&Step {
                index: i,
                total,
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
                let x = x.clone() * (sampler.init_noise_sigma() as f32);
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
                m.from_images(images.clone()),
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
        Ok(Generated {
            sample,
            images,
            trajectory,
            prompt_truncated,
            negative_truncated,
        })
    }

    /// Classes, text and negative text for `n` images, with the prompts' truncation flags.
    fn conditioning(&self, c: &Conditioning, n: usize) -> Result<Inputs> {
        let cfg = &self.model.config;
        let text_model = cfg.unet.text_dim.is_some();
        let encoder = || -> Result<&TextEncoder> {
            self.text_encoder.as_ref().ok_or_else(|| {
                anyhow::anyhow!("the text encoder is not loaded (run `diffuse fetch text-encoder`)")
            })
        };
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
                Ok(Inputs {
                    classes: Some(v.clone()),
                    ..Inputs::default()
                })
            }
            // A text model without text runs on its learned null text (no encoder needed).
            Conditioning::None => Ok(Inputs::default()),
            Conditioning::Prompts { prompts, negative } => {
                let enc = encoder()?;
                let images: usize = prompts.iter().map(|p| p.1).sum();
                if images != n {
                    bail!("the prompts cover {images} images, the request {n}");
                }
                let (neg, neg_cut) = match negative {
                    Some(np) => {
                        let (t, cut) = enc.cond_repeated(&[(np.as_str(), n)])?;
                        (Some(t), cut[0])
                    }
                    None => (None, false),
                };
                let parts: Vec<(&str, usize)> =
                    prompts.iter().map(|(p, k)| (p.as_str(), *k)).collect();
                let (t, cut) = enc.cond_repeated(&parts)?;
                Ok(Inputs {
                    text: Some(t),
                    negative: neg,
                    prompt_truncated: cut,
                    negative_truncated: neg_cut,
                    ..Inputs::default()
                })
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
                Ok(Inputs {
                    text: Some(text.clone()),
                    negative: negative.clone(),
                    ..Inputs::default()
                })
            }
        }
    }

    /// A super-resolution model's input: the low-resolution images upsampled bicubically
    /// (SR3, Saharia et al. 2021), checked against the model's sizes.
    fn upsampled(&self, low: &Tensor<4>, scale: usize, n: usize) -> Result<Tensor<4>> {
        let m = &self.model;
        let [ln, c, s, w] = low.dims();
        let [mc, big, _] = m.config.output_shape();
        if c != mc || s != w || s * scale != big {
            bail!(
                "the low-resolution input is {c}x{s}x{w}; {} takes {mc}x{1}x{1}",
                m.source,
                big / scale
            );
        }
        if ln != n {
            bail!("the request is for {n} images but {ln} low-resolution inputs were given");
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
