//! Few-step distillation of a flow-matching teacher: consistency distillation (Song et al.
//! 2023, "Consistency Models", Algorithm 2) in flow time, with the pseudo-Huber metric and
//! the stop-gradient target of improved consistency training (Song & Dhariwal 2023, sections
//! 3.2 and 3.3), and classifier-free guidance distilled into the student (as latent
//! consistency models do, Luo et al. 2023, eq. 9).
//!
//! The student is a flow model `v_s` whose consistency function is its one-step image
//! estimate `f(x, t) = x - t v_s(x, t)` (exact at `t = 0`, so the boundary condition holds by
//! construction). Each training item draws `k ~ U{1..N}` on the grid `t_k = k / N`, an image
//! `x0` and noise `eps`, and forms `x_t = (1 - t) x0 + t eps` at `t = t_k`. The teacher takes
//! one guided Euler step to `t' = t_{k-1}`:
//!
//! `x' = x_t + (t' - t) v_w(x_t, t)`, `v_w = v_u + w (v_c - v_u)`
//!
//! and the loss is `d(f(x_t, t), sg[f(x', t')])` with `d(a, b) = sqrt(|a - b|^2 + c^2) - c`,
//! `c = 0.00054 sqrt(dim)` (iCT, section 3.3). Items whose label was dropped (the null class,
//! as in training) learn the unguided teacher, so the student keeps its null class.
//!
//! Sampling the student with Euler in flow time over `K` steps is consistency multistep
//! sampling with the predicted noise re-used (`x_{t'} = (1 - t') f + t' eps_hat`, since an
//! Euler step from `t` to `t'` with velocity `v` is exactly that), on the grid when `N` is a
//! multiple of `K`.
//!
//! **Segments** (multistep consistency models, Heek et al. 2024, "Multistep Consistency
//! Models", section 3): with `S` segments the times split into `S` equal pieces and the
//! student is consistent only within each, mapping `x_t` to the state at the bottom of its
//! piece, `s(t) = (ceil(t S) - 1) / S` (so a piece's top belongs to it):
//! `f(x, t) = x + (s - t) v_s(x, t)`, exact at `t = s`. One segment is the plain consistency
//! model above (`s = 0`). A student with `S` segments samples in `S` Euler steps exactly as it
//! learned (each step goes from the top of a piece to its bottom), and each piece spans a
//! shorter stretch of the teacher's path, which is easier to learn than the whole of it.
//!
//! **The teacher's step** is Euler, or Heun (the second-order step the consistency models
//! paper uses for its teacher, Song et al. 2023 section 6): `x_e = x_t + (t' - t) v(x_t, t)`,
//! `x' = x_t + (t' - t) (v(x_t, t) + v(x_e, t')) / 2`, one more teacher evaluation for a
//! target on the teacher's path to second order in `1 / N`.

use super::RunConfig;
use crate::data::HostBatch;
use crate::rng::{Stream, normal_vec, rng_for};
use crate::schedule::flow::model_time;
use crate::unet::UNet;
use anyhow::{Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

/// How a student is distilled, saved with its run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// The teacher as `--teacher` named it (its weights travel in the run's checkpoints).
    pub teacher: String,
    /// `N`: the student learns consistency between neighbours of `t_k = k / N`.
    pub grid: usize,
    /// The guidance weight of the teacher's steps, distilled into the student (1: none).
    pub guidance: f64,
    /// `S`: the pieces of time the student is consistent within (1: a plain consistency
    /// model, what runs made before segments existed learned).
    #[serde(default = "one")]
    pub segments: usize,
    /// How the teacher steps from `t_k` to `t_{k-1}` (runs made before this was a choice
    /// used Euler).
    #[serde(default)]
    pub solver: TeacherSolver,
}

fn one() -> usize {
    1
}

/// The teacher's ODE step between neighbouring grid times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TeacherSolver {
    /// One evaluation, first order.
    #[default]
    Euler,
    /// Two evaluations, second order.
    Heun,
}

/// The bottom of the segment holding grid time `t_k = k / n` when `[0, 1]` is cut into
/// `segments` equal pieces, as a grid index: `floor((k - 1) / m) m` with `m = n / segments`
/// (`segments` divides `n`; `k >= 1`), so that a piece's top `k = (j + 1) m` belongs to it.
pub fn segment_floor(k: usize, n: usize, segments: usize) -> usize {
    let m = n / segments;
    (k - 1) / m * m
}

/// The prefix of the teacher's weights in a distillation checkpoint.
pub const TEACHER_PREFIX: &str = "teacher.";

/// The largest grid accepted.
pub const MAX_GRID: usize = 1000;

impl DistillConfig {
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_GRID).contains(&self.grid) {
            bail!(
                "--grid must be between 1 and {MAX_GRID} (got {})",
                self.grid
            );
        }
        if self.segments == 0 || !self.grid.is_multiple_of(self.segments) {
            bail!(
                "--segments must divide --grid {} (got {})",
                self.grid,
                self.segments
            );
        }
        crate::pipeline::check_guidance(self.guidance as f32)
            .map_err(|e| anyhow::anyhow!("--guidance: {e}"))?;
        Ok(())
    }
}

/// Why a model cannot be distilled here, if it cannot: only pixel-space flow-matching models
/// that generate from noise (unconditioned or class-conditioned) are supported yet.
pub fn unsupported_teacher(cfg: &crate::model::ModelConfig) -> Option<String> {
    if !cfg.prediction.is_flow() {
        return Some(format!(
            "it is a diffusion model ({:?} prediction); distill takes flow-matching teachers (train one with --objective flow)",
            cfg.prediction
        ));
    }
    if cfg.latent.is_some() {
        return Some(
            "it is a latent model; distilling latent teachers is not supported yet".into(),
        );
    }
    if cfg.superres.is_some() {
        return Some(
            "it is a super-resolution model; distilling those is not supported yet".into(),
        );
    }
    if cfg.unet.text_dim.is_some() {
        return Some(
            "it is text-conditioned; distilling text teachers is not supported yet".into(),
        );
    }
    if cfg.sampling.is_some() {
        return Some("it is itself a distilled student".into());
    }
    None
}

/// The pseudo-Huber constant of iCT for images of `dim` values: `0.00054 sqrt(dim)`.
pub fn huber_c(dim: usize) -> f64 {
    0.00054 * (dim as f64).sqrt()
}

/// The consistency-distillation objective of a run.
pub struct Consistency<'a> {
    pub cfg: &'a RunConfig,
    pub distill: &'a DistillConfig,
    /// The teacher, on the inference device.
    pub teacher: &'a UNet,
}

impl Consistency<'_> {
    /// The loss of training step `step` on its batch: the mean over items of the pseudo-Huber
    /// distance between the student's estimate at `t_k` and its own (stop-gradient) estimate
    /// after the teacher's step to `t_{k-1}`. Draws from `rng_for(seed, TrainStep, step)`.
    pub fn loss(&self, student: &UNet, batch: HostBatch, step: usize, dev: &Device) -> Tensor<1> {
        let tc = &self.cfg.train;
        let steps = self.cfg.model.schedule.timesteps;
        let n = self.distill.grid;
        let b = batch.shape[0];
        let dim: usize = batch.shape[1..].iter().product();
        let mut rng = rng_for(tc.seed, Stream::TrainStep, step as u64);
        let k: Vec<usize> = (0..b).map(|_| rng.gen_range(1..=n)).collect();
        let noise = normal_vec(&mut rng, batch.images.len());
        let labels: Option<Vec<usize>> =
            self.cfg
                .model
                .unet
                .num_classes
                .map(|nk| match &batch.labels {
                    Some(l) => l
                        .iter()
                        .map(|&c| {
                            if rng.gen_bool(tc.label_dropout) {
                                nk
                            } else {
                                c
                            }
                        })
                        .collect(),
                    None => vec![nk; b],
                });
        dev.seed(rng.next_u64());

        let idev = dev.clone().inner();
        let t: Vec<f64> = k.iter().map(|&k| k as f64 / n as f64).collect();
        let t_prev: Vec<f64> = k.iter().map(|&k| (k - 1) as f64 / n as f64).collect();
        let floor: Vec<f64> = k
            .iter()
            .map(|&k| segment_floor(k, n, self.distill.segments) as f64 / n as f64)
            .collect();
        let to_floor =
            |from: &[f64]| -> Vec<f64> { floor.iter().zip(from).map(|(s, t)| s - t).collect() };
        let per_item = |v: &[f64], d: &Device| {
            let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            Tensor::<4>::from_data(TensorData::new(v, [b, 1, 1, 1]), d)
        };
        let x0 = Tensor::<4>::from_data(TensorData::new(batch.images, batch.shape), &idev);
        let eps = Tensor::<4>::from_data(TensorData::new(noise, batch.shape), &idev);
        let ti = per_item(&t, &idev);
        let x_t = x0 * (ti.clone().neg() + 1.0) + eps * ti;

        // The teacher's guided step, then the student's own estimate there, no gradient.
        let times = |v: &[f64]| -> Vec<f64> { v.iter().map(|&t| model_time(t, steps)).collect() };
        let v_teacher = self.guided_velocity(x_t.clone(), &times(&t), labels.as_deref());
        let dt: Vec<f64> = t.iter().zip(&t_prev).map(|(a, b)| b - a).collect();
        let dt = per_item(&dt, &idev);
        let euler = x_t.clone() + v_teacher.clone() * dt.clone();
        let x_prev = match self.distill.solver {
            TeacherSolver::Euler => euler,
            TeacherSolver::Heun => {
                let v_end = self.guided_velocity(euler, &times(&t_prev), labels.as_deref());
                x_t.clone() + (v_teacher + v_end) * dt * 0.5
            }
        };
        let target_net = student.valid();
        let v_prev = target_net.forward(x_prev.clone(), &times(&t_prev), labels.as_deref());
        let target = x_prev + v_prev * per_item(&to_floor(&t_prev), &idev);

        // The student's estimate at t, with gradient.
        let x_t = Tensor::<4>::from_inner(x_t);
        let v = student.forward(x_t.clone(), &times(&t), labels.as_deref());
        let f = x_t + v * per_item(&to_floor(&t), dev);
        let diff = (f - Tensor::<4>::from_inner(target)).reshape([b, dim]);
        let c = huber_c(dim) as f32;
        let sq = diff.square().sum_dim(1);
        (sq + c * c).sqrt().sub_scalar(c).mean()
    }

    /// `v_u + w (v_c - v_u)` of the teacher, in one batch of both halves; the plain velocity
    /// for unconditioned teachers or `w = 1`.
    fn guided_velocity(&self, x: Tensor<4>, t: &[f64], labels: Option<&[usize]>) -> Tensor<4> {
        let w = self.distill.guidance;
        let (Some(labels), Some(k)) = (labels, self.cfg.model.unet.num_classes) else {
            return self.teacher.forward(x, t, None);
        };
        if w == 1.0 {
            return self.teacher.forward(x, t, Some(labels));
        }
        let b = labels.len();
        let both = Tensor::cat(vec![x.clone(), x], 0);
        let mut l = labels.to_vec();
        l.extend(std::iter::repeat_n(k, b));
        let tt: Vec<f64> = t.iter().chain(t).copied().collect();
        let out = self.teacher.forward(both, &tt, Some(&l));
        let v_c = out.clone().narrow(0, 0, b);
        let v_u = out.narrow(0, b, b);
        v_u.clone() + (v_c - v_u) * (w as f32)
    }
}
