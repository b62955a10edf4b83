//! The training objective: one training example per step (DDPM, Algorithm 1: a timestep
//! `t ~ U{0..T-1}` and noise `eps ~ N(0, I)` per image, `x_t = sqrt(ab_t) x0 +
//! sqrt(1 - ab_t) eps`), with label or caption dropout for classifier-free guidance, the
//! low-resolution input of a super-resolution model, fresh latents of a latent model, the
//! target of the model's prediction type, and the per-item loss weights. A flow-matching model
//! draws a flow time `t` per image from its density instead, with `x_t = (1 - t) x0 + t eps`
//! and the velocity `eps - x0` as target ([`crate::schedule::flow`]).
//!
//! Every random draw of step `s` comes from `rng_for(seed, TrainStep, s)` in a fixed order, so
//! a resumed run draws exactly what an uninterrupted one would.

use super::{LossWeighting, RunConfig};
use crate::conditioning::text::CaptionBank;
use crate::data::HostBatch;
use crate::rng::{Stream, normal_vec, rng_for};
use crate::schedule::{NoiseSchedule, Prediction, flow, prediction};
use crate::unet::TextCond;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, RngCore};

/// What one training step shows the denoiser and compares its output with.
pub struct Example {
    /// The model input: `x_t`, with the conditioning image's channels for super-resolution.
    pub x_t: Tensor<4>,
    /// The diffusion timestep of each image (empty for a flow-matching model).
    pub t: Vec<usize>,
    /// The flow time in `(0, 1)` of each image (empty for a diffusion model).
    pub flow_t: Vec<f64>,
    /// The time of each image as the model reads it: the timestep, or the flow time times `T`.
    pub t_model: Vec<f64>,
    /// Class per image (the null class `K` where dropped) for class-conditioned models.
    pub labels: Option<Vec<usize>>,
    /// Captions (or the null text where dropped) for text models.
    pub text: Option<TextCond>,
    /// What the output should be: `eps`, `x0` or `v`.
    pub target: Tensor<4>,
}

impl Example {
    /// Images `r` of the example, on `dev`: the share of one data-parallel replica
    /// ([`super::replicas`]).
    pub fn shard(&self, r: std::ops::Range<usize>, dev: &Device) -> Example {
        let (start, len) = (r.start, r.len());
        let rows4 = |t: &Tensor<4>| t.clone().narrow(0, start, len).to_device(dev);
        let part = |v: &[f64]| v.get(r.clone()).map(<[f64]>::to_vec).unwrap_or_default();
        Example {
            x_t: rows4(&self.x_t),
            t: self
                .t
                .get(r.clone())
                .map(<[usize]>::to_vec)
                .unwrap_or_default(),
            flow_t: part(&self.flow_t),
            t_model: part(&self.t_model),
            labels: self.labels.as_ref().map(|l| l[r.clone()].to_vec()),
            text: self.text.as_ref().map(|c| TextCond {
                tokens: c.tokens.clone().narrow(0, start, len).to_device(dev),
                mask: c.mask.clone().narrow(0, start, len).to_device(dev),
                pooled: c.pooled.clone().narrow(0, start, len).to_device(dev),
                null: c.null[r.clone()].to_vec(),
            }),
            target: rows4(&self.target),
        }
    }
}

/// The parts of a run an example is built from.
pub struct Objective<'a> {
    pub cfg: &'a RunConfig,
    pub schedule: &'a NoiseSchedule,
    /// Latent models: the dataset's encoded posteriors.
    pub latents: Option<&'a Latents>,
    /// Text models: the dataset's encoded captions.
    pub captions: Option<&'a CaptionBank>,
}

impl Objective<'_> {
    /// The example of training step `step` from its batch; seeds `dev` for the step's dropout.
    pub fn example(&self, batch: HostBatch, step: usize, dev: &Device) -> Example {
        let tc = &self.cfg.train;
        let num_classes = self.cfg.model.unet.num_classes;
        let mut rng = rng_for(tc.seed, Stream::TrainStep, step as u64);
        let b = tc.batch_size;
        let flow = self.cfg.model.prediction.is_flow();
        let (t, flow_t): (Vec<usize>, Vec<f64>) = if flow {
            (
                Vec::new(),
                (0..b).map(|_| tc.flow_time.draw(&mut rng)).collect(),
            )
        } else {
            let t = (0..b)
                .map(|_| rng.gen_range(0..self.schedule.len()))
                .collect();
            (t, Vec::new())
        };
        // Pixel noise here; a latent model draws its latents' noise below.
        let noise_v = if self.latents.is_none() {
            normal_vec(&mut rng, batch.images.len())
        } else {
            Vec::new()
        };
        let labels: Option<Vec<usize>> = match (num_classes, &batch.labels) {
            (Some(k), Some(l)) => Some(
                l.iter()
                    .map(|&c| if rng.gen_bool(tc.label_dropout) { k } else { c })
                    .collect(),
            ),
            (Some(k), None) => Some(vec![k; b]),
            _ => None,
        };
        // Text: one of each image's captions, or the null text with the dropout probability.
        let text = self.captions.map(|bank| {
            let picks: Vec<(usize, usize)> = batch
                .indices
                .iter()
                .map(|&i| (i, rng.gen_range(0..bank.alternatives(i))))
                .collect();
            let null: Vec<bool> = (0..b).map(|_| rng.gen_bool(tc.label_dropout)).collect();
            bank.batch(&picks, null, dev)
        });
        dev.seed(rng.next_u64());

        let shape = match self.latents {
            Some(l) => [b, l.shape[0], l.shape[1], l.shape[2]],
            None => batch.shape,
        };
        let lowres = self.cfg.model.superres.as_ref().map(|sr| {
            let [_, c, s, _] = batch.shape;
            let v =
                crate::conditioning::lowres::condition_from_high(&batch.images, b, c, s, sr.scale);
            Tensor::<4>::from_data(TensorData::new(v, batch.shape), dev)
        });
        let x0 = match self.latents {
            Some(l) => {
                let eps = normal_vec(&mut rng, b * l.per());
                Tensor::<4>::from_data(TensorData::new(l.draw(&batch.indices, &eps), shape), dev)
            }
            None => Tensor::<4>::from_data(TensorData::new(batch.images, batch.shape), dev),
        };
        let noise_v = if self.latents.is_some() {
            normal_vec(&mut rng, b * shape[1] * shape[2] * shape[3])
        } else {
            noise_v
        };
        let noise = Tensor::<4>::from_data(TensorData::new(noise_v, shape), dev);
        let (x_t, target) = if flow {
            let per_item = |f: fn(f64) -> f64| {
                let v: Vec<f32> = flow_t.iter().map(|&t| f(t) as f32).collect();
                Tensor::<4>::from_data(TensorData::new(v, [b, 1, 1, 1]), dev)
            };
            let (a, s) = (per_item(|t| 1.0 - t), per_item(|t| t));
            let x_t = x0.clone() * a.clone() + noise.clone() * s.clone();
            (x_t, prediction::target(Prediction::Flow, x0, noise, a, s))
        } else {
            let x_t = self.schedule.q_sample(x0.clone(), noise.clone(), &t);
            let target = self
                .schedule
                .target(self.cfg.model.prediction, x0, noise, &t);
            (x_t, target)
        };
        let x_t = match lowres {
            Some(c) => Tensor::cat(vec![x_t, c], 1),
            None => x_t,
        };
        let t_model: Vec<f64> = if flow {
            let steps = self.schedule.len();
            flow_t.iter().map(|&t| flow::model_time(t, steps)).collect()
        } else {
            t.iter().map(|&v| v as f64).collect()
        };
        Example {
            x_t,
            t,
            flow_t,
            t_model,
            labels,
            text,
            target,
        }
    }

    /// The loss of a model output on an example: the mean squared error to the target,
    /// weighted per item ([`loss_weights`]).
    pub fn loss(&self, out: Tensor<4>, ex: &Example, dev: &Device) -> Tensor<1> {
        let sq = (out - ex.target.clone()).square();
        let b = ex.t_model.len();
        if ex.t.is_empty() {
            // Flow matching: the time density weights the loss (checked by RunConfig::validate).
            return sq.mean();
        }
        match loss_weights(
            self.cfg.train.loss_weighting,
            self.cfg.model.prediction,
            self.schedule,
            &ex.t,
        ) {
            None => sq.mean(),
            Some(w) => {
                let w = Tensor::<4>::from_data(TensorData::new(w, [b, 1, 1, 1]), dev);
                (sq * w).mean()
            }
        }
    }
}

/// Per-item loss weights for the batch's timesteps.
pub fn loss_weights(
    w: LossWeighting,
    p: Prediction,
    sched: &NoiseSchedule,
    t: &[usize],
) -> Option<Vec<f32>> {
    match w {
        LossWeighting::Uniform => None,
        LossWeighting::MinSnr { gamma } => Some(
            t.iter()
                .map(|&ti| {
                    let snr = sched.snr(ti);
                    let x0w = snr.min(gamma);
                    (match p {
                        Prediction::Epsilon => x0w / snr,
                        Prediction::V => x0w / (snr + 1.0),
                        Prediction::X0 => x0w,
                        // x0 = x_t - t v at SNR ((1 - t) / t)^2, so the x0 error is t times
                        // the velocity's: t^2 = 1 / (1 + sqrt(SNR))^2.
                        Prediction::Flow => x0w / (1.0 + snr.sqrt()).powi(2),
                    }) as f32
                })
                .collect(),
        ),
    }
}

/// A dataset's latent posteriors: per image, `per` means then `per` standard deviations.
pub struct Latents {
    pub(super) shape: [usize; 3],
    pub(super) mean: Vec<f32>,
    pub(super) std: Vec<f32>,
    pub(super) scale: f32,
    pub(super) shift: f32,
}

impl Latents {
    /// Values per latent.
    pub fn per(&self) -> usize {
        self.shape.iter().product()
    }

    /// Scaled posterior samples `(mean + std * eps - shift) * scale` (Kingma & Welling 2014,
    /// eq. 10) for the images `idx`, with `per` values of `eps ~ N(0, I)` per image.
    pub fn draw(&self, idx: &[usize], eps: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(idx.len() * self.per());
        for (k, &i) in idx.iter().enumerate() {
            let m = &self.mean[i * self.per()..(i + 1) * self.per()];
            let s = &self.std[i * self.per()..(i + 1) * self.per()];
            let e = &eps[k * self.per()..(k + 1) * self.per()];
            for j in 0..self.per() {
                out.push((m[j] + s[j] * e[j] - self.shift) * self.scale);
            }
        }
        out
    }
}
