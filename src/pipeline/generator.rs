//! A model of any family ready to generate: a diffusion [`Pipeline`], a GAN's generator, an
//! autoregressive model, or a VAE's decoder.
//! Every family takes the same [`Request`] (how many images, which classes, the seeds, the
//! batch) and hands its images over chunk by chunk as the pipeline does, with the same rule
//! for the noise: image `i` draws what a single run of all `n` would draw, so the images do
//! not depend on the batch. Options only diffusion has (a sampler, steps, guidance, given noise,
//! edits, trajectories) are the front ends' to refuse, by name; the library refuses what it
//! can see (a start other than noise, low-resolution inputs, a trajectory).

use super::{
    Conditioning, Generated, Pipeline, Request, RunSummary, Start, Step, check_request, gather,
};
use crate::gan::LoadedGan;
use crate::model::{CondSpec, Family, Loaded};
use crate::pixelcnn::LoadedPixelCnn;
use crate::sampler::{NoiseSource, SeededNoise};
use crate::vae::generator::LoadedVaeGen;
use anyhow::{Result, bail};
use burn::tensor::{Device, Tensor};

/// A model of any family with what it generates with.
// One or two per process: the size of the diffusion variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Generator {
    Diffusion(Pipeline),
    Gan {
        model: LoadedGan,
        device: Device,
    },
    Autoregressive {
        model: LoadedPixelCnn,
        device: Device,
    },
    Vae {
        model: LoadedVaeGen,
        device: Device,
    },
}

/// Images a GAN or a VAE generates at once when a request does not say (one forward pass
/// each).
const GAN_BATCH: usize = 256;

/// Images an autoregressive model draws at once when a request does not say: its cost is a
/// few small operations per sub-pixel, so wide batches pay.
const AUTOREGRESSIVE_BATCH: usize = 500;

/// The temperatures [`Request::temperature`] may take.
pub const TEMPERATURES: std::ops::RangeInclusive<f32> = 0.01..=10.0;

impl Generator {
    /// Loads `--model` of any family ([`super::load_generator`]) and, for a text-conditioned
    /// diffusion model, the fetched text encoder.
    pub fn load(spec: Option<&str>, device: &Device) -> Result<Self> {
        Self::from_loaded(super::load_generator(spec, device)?, device, true)
    }

    /// A loaded model, with the text encoder a text-conditioned diffusion model needs when
    /// `text` is set.
    pub fn from_loaded(m: Loaded, device: &Device, text: bool) -> Result<Self> {
        Ok(match m {
            Loaded::Diffusion(m) if text => {
                Self::Diffusion(Pipeline::with_text_encoder(m, device)?)
            }
            Loaded::Diffusion(m) => Self::Diffusion(Pipeline::new(m, None, device.clone())),
            Loaded::Gan(model) => Self::Gan {
                model,
                device: device.clone(),
            },
            Loaded::Autoregressive(model) => Self::Autoregressive {
                model,
                device: device.clone(),
            },
            Loaded::Vae(model) => Self::Vae {
                model,
                device: device.clone(),
            },
        })
    }

    pub fn family(&self) -> Family {
        match self {
            Self::Diffusion(_) => Family::Diffusion,
            Self::Gan { .. } => Family::Gan,
            Self::Autoregressive { .. } => Family::Autoregressive,
            Self::Vae { .. } => Family::Vae,
        }
    }

    /// The diffusion pipeline, for what only diffusion does.
    pub fn as_diffusion(&self) -> Option<&Pipeline> {
        match self {
            Self::Diffusion(p) => Some(p),
            _ => None,
        }
    }

    /// Where the model runs.
    pub fn device(&self) -> &Device {
        match self {
            Self::Diffusion(p) => &p.device,
            Self::Gan { device, .. }
            | Self::Autoregressive { device, .. }
            | Self::Vae { device, .. } => device,
        }
    }

    /// The model's config (the one saved with it) as JSON.
    pub fn config_json(&self) -> Result<serde_json::Value> {
        Ok(match self {
            Self::Diffusion(p) => serde_json::to_value(&p.model.config)?,
            Self::Gan { model, .. } => serde_json::to_value(&model.config)?,
            Self::Autoregressive { model, .. } => serde_json::to_value(&model.config)?,
            Self::Vae { model, .. } => serde_json::to_value(&model.config)?,
        })
    }

    /// Where the model came from, for messages.
    pub fn source(&self) -> &str {
        match self {
            Self::Diffusion(p) => p.source(),
            Self::Gan { model, .. } => &model.source,
            Self::Autoregressive { model, .. } => &model.source,
            Self::Vae { model, .. } => &model.source,
        }
    }

    /// `[channels, height, width]` of the images.
    pub fn output_shape(&self) -> [usize; 3] {
        match self {
            Self::Diffusion(p) => p.model.config.output_shape(),
            Self::Gan { model, .. } => model.config.output_shape(),
            Self::Autoregressive { model, .. } => model.config.output_shape(),
            Self::Vae { model, .. } => model.config.output_shape(),
        }
    }

    /// What the model is conditioned on.
    pub fn cond(&self) -> CondSpec<'_> {
        match self {
            Self::Diffusion(p) => p.model.config.cond(),
            Self::Gan { model, .. } => CondSpec {
                num_classes: model.config.num_classes,
                text: false,
                class_names: &model.config.class_names,
            },
            Self::Autoregressive { model, .. } => CondSpec {
                num_classes: model.config.num_classes,
                text: false,
                class_names: &model.config.class_names,
            },
            Self::Vae { model, .. } => CondSpec {
                num_classes: model.config.num_classes,
                text: false,
                class_names: &model.config.class_names,
            },
        }
    }

    /// The chunk size a request runs with.
    pub fn batch(&self, req: &Request) -> usize {
        match self {
            Self::Diffusion(p) => p.batch(req),
            Self::Gan { .. } | Self::Vae { .. } => req.batch.unwrap_or(GAN_BATCH).max(1),
            Self::Autoregressive { .. } => req.batch.unwrap_or(AUTOREGRESSIVE_BATCH).max(1),
        }
    }

    /// Runs a request in chunks, as [`Pipeline::run_chunks`].
    pub fn run_chunks(
        &self,
        req: &Request,
        on_step: &mut dyn FnMut(&Step),
        on_chunk: &mut dyn FnMut(usize, Generated) -> Result<()>,
    ) -> Result<RunSummary> {
        let what = self.family().article_name();
        match (self, req.temperature) {
            (Self::Autoregressive { .. }, Some(t)) if !TEMPERATURES.contains(&t) => bail!(
                "the temperature must be between {} and {} (got {t})",
                TEMPERATURES.start(),
                TEMPERATURES.end()
            ),
            (Self::Autoregressive { .. }, _) | (_, None) => {}
            (_, Some(_)) => bail!(
                "{} is {what}: the temperature is an option of autoregressive models",
                self.source()
            ),
        }
        if let Self::Diffusion(p) = self {
            return p.run_chunks(req, on_step, on_chunk);
        }
        if !matches!(req.start, Start::Noise) {
            bail!(
                "{} is {what}: it generates from its own noise only (no given noise, no editing)",
                self.source()
            );
        }
        if req.low_res.is_some() || req.trajectory {
            bail!(
                "{} is {what}: it has no low-resolution input and no denoising trajectory",
                self.source()
            );
        }
        let seed_parts = check_request(req)?;
        let n = req.n;
        let num_classes = self.cond().num_classes;
        let classes = match &req.conditioning {
            Conditioning::None => None,
            Conditioning::Classes(_) if num_classes.is_none() => {
                bail!("{} is not class-conditioned", self.source())
            }
            Conditioning::Classes(c) => {
                let k = num_classes.unwrap_or(0);
                if c.len() != n {
                    bail!(
                        "the request is for {n} images but {} classes were given",
                        c.len()
                    );
                }
                if let Some(bad) = c.iter().find(|&&c| c >= k) {
                    bail!(
                        "class {bad} is out of range: this model has classes 0..{}",
                        k - 1
                    );
                }
                Some(c.clone())
            }
            Conditioning::Prompts { .. } | Conditioning::Encoded { .. } => {
                bail!("{} is {what} without text conditioning", self.source())
            }
        };
        // A class-conditioned model without a class asked for samples its null class.
        let classes = classes.or_else(|| num_classes.map(|k| vec![k; n]));
        let batch = self.batch(req);
        let chunks = n.div_ceil(batch);
        let cancelled = || {
            req.cancel
                .as_ref()
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        };
        let mut summary = RunSummary::default();
        for chunk in 0..chunks {
            let (lo, hi) = (chunk * batch, ((chunk + 1) * batch).min(n));
            let mut noise = SeededNoise::window(&seed_parts, lo..hi);
            let labels = classes.as_ref().map(|c| &c[lo..hi]);
            let images = match self {
                // One pass from Gaussian noise: the GAN's z, the VAE's latent.
                Self::Gan { model, device } => {
                    let z_dim = model.config.z_dim;
                    let z = noise.normal([hi - lo, z_dim, 1, 1], device);
                    model.generate(z.reshape([hi - lo, z_dim]), labels)
                }
                Self::Vae { model, device } => {
                    let [l, h, w] = model.config.latent_shape();
                    model.generate(noise.normal([hi - lo, l, h, w], device), labels)
                }
                Self::Autoregressive { model, .. } => {
                    // One uniform number per sub-pixel, in the images' layout.
                    let per: usize = model.config.output_shape().iter().product();
                    let u = noise.uniform(per);
                    let rows = model.config.image_size;
                    let t = req.temperature.unwrap_or(1.0);
                    let mut on_row = |row: usize, x: &Tensor<4>| {
                        on_step(&Step {
                            index: row - 1,
                            total: rows,
                            chunk,
                            chunks,
                            sample: x,
                        })
                    };
                    model
                        .sample(&u, hi - lo, labels, t, &cancelled, &mut on_row)
                        .0
                }
                Self::Diffusion(_) => unreachable!("diffusion ran above"),
            };
            if !matches!(self, Self::Autoregressive { .. }) {
                on_step(&Step {
                    index: 0,
                    total: 1,
                    chunk,
                    chunks,
                    sample: &images,
                });
            }
            summary.chunks += 1;
            on_chunk(
                lo,
                Generated {
                    sample: images.clone(),
                    images,
                    trajectory: Vec::new(),
                    prompt_truncated: Vec::new(),
                    negative_truncated: false,
                },
            )?;
            if cancelled() {
                break;
            }
        }
        Ok(summary)
    }

    /// Runs a request and joins its chunks.
    pub fn run(&self, req: &Request, on_step: &mut dyn FnMut(&Step)) -> Result<Generated> {
        gather(|on_chunk| self.run_chunks(req, on_step, on_chunk))
    }
}
