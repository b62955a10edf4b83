//! Training a GAN ([`crate::gan`]) in the shared loop ([`super::run`]): per step one
//! discriminator update on the hinge loss, then one generator update, then the EMA of the
//! generator (the model file's weights).
//!
//! Every draw of step `s` (label dropout, then the noise of the D update, then that of the G
//! update) comes from `rng_for(seed, TrainStep, s)`, and the checkpoint holds both networks,
//! the EMA, both optimisers' moments and the spectral-norm vectors, so a resumed run makes the
//! same bits as an uninterrupted one. Both optimisers update once a step, so both counts equal
//! the step (saved once, as `diffuse.adam_t`).

use super::adamw::{self, AdamW};
use super::checkpoint::{self, Checkpoint, Parts};
use super::preview::{class_layout, save_grid};
use super::run::{self, Learner, StepOutcome};
use super::{RunPaths, RunSpec, StepReport, TrainConfig, metrics};
use crate::data::{Dataset, HostBatch};
use crate::gan::{Discriminator, GanConfig, Generator, LoadedGan};
use crate::model::{Family, FamilyConfig};
use crate::pipeline::{Request, Seeds};
use crate::rng::{Stream, normal_vec, rng_for};
use crate::sampler::SamplerKind;
use crate::weights::{self, NamedTensors, StoreDtype};
use anyhow::{Result, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// The adversarial game's own hyperparameters (the generator's learning rate is
/// `train.lr`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GanTrainConfig {
    /// The discriminator's learning rate.
    pub lr_d: f64,
    /// Adam's `beta1` and `beta2` for both networks (SNGAN: 0 and 0.9).
    pub beta1: f64,
    pub beta2: f64,
    /// Weight of the mode-seeking term ([`mode_seeking_term`]); 0 is off. New runs take 1
    /// (docs/FAMILIES.md: recall 0.07 to 0.49 at 20 minutes); runs saved before the option
    /// read as 0, the recipe they were trained with.
    #[serde(default)]
    pub mode_seeking: f64,
}

impl Default for GanTrainConfig {
    fn default() -> Self {
        Self {
            lr_d: 4e-4,
            beta1: 0.0,
            beta2: 0.9,
            mode_seeking: 1.0,
        }
    }
}

/// Keeps the image-to-noise distance ratio of the mode-seeking term away from 0.
const MODE_SEEKING_EPS: f64 = 1e-5;

/// The mode-seeking term of MSGAN (Mao et al. 2019, "Mode Seeking Generative Adversarial
/// Networks for Diverse Image Synthesis", eq. 3 as their code minimises it): for generated
/// images `fake` `[2h, C, H, W]` whose halves share their classes and noise `z` `[2h, Z]`,
/// `1 / (mean|G(z1) - G(z2)| / mean|z1 - z2| + eps)`. Small when different noise gives
/// different images; large for a generator that ignores its noise (mode collapse).
pub fn mode_seeking_term(fake: Tensor<4>, z: Tensor<2>) -> Tensor<1> {
    let h = fake.dims()[0] / 2;
    let images = (fake.clone().narrow(0, 0, h) - fake.narrow(0, h, h))
        .abs()
        .mean();
    let noise = (z.clone().narrow(0, 0, h) - z.narrow(0, h, h)).abs().mean();
    (images / noise).add_scalar(MODE_SEEKING_EPS).recip()
}

/// Everything that defines a GAN run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GanRun {
    /// The networks, stored with `"family": "gan"`.
    #[serde(with = "crate::model::tagged")]
    pub model: GanConfig,
    pub train: TrainConfig,
    /// The `--data` argument the run was started with.
    pub data: String,
    pub gan: GanTrainConfig,
}

impl GanTrainConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.lr_d > 0.0 && self.lr_d.is_finite()) {
            bail!("--lr-d must be a positive number (got {})", self.lr_d);
        }
        for (b, flag) in [(self.beta1, "beta1"), (self.beta2, "beta2")] {
            if !(0.0..1.0).contains(&b) {
                bail!("Adam's {flag} must be in [0, 1) (got {b})");
            }
        }
        if !(self.mode_seeking.is_finite() && (0.0..=100.0).contains(&self.mode_seeking)) {
            bail!(
                "--mode-seeking must be between 0 (off) and 100 (got {})",
                self.mode_seeking
            );
        }
        Ok(())
    }
}

impl RunSpec for GanRun {
    const FAMILY: Family = Family::Gan;
    super::run_spec_parts!();
    fn validate(&self) -> Result<()> {
        self.gan.validate()?;
        super::check_family_run(&self.train, self.model.validate(), Self::FAMILY)
    }
}

/// Trains a GAN run to `cfg.train.steps`, fresh or from `resume`, as [`super::train`] does a
/// diffusion run. Returns the final step (less than the target when `minutes` ran out).
pub fn train(
    cfg: &GanRun,
    ds: Dataset,
    out: &Path,
    resume: Option<Checkpoint<GanRun>>,
    minutes: Option<f64>,
    on_step: &mut dyn FnMut(&StepReport) -> Result<()>,
) -> Result<usize> {
    let tc = &cfg.train;
    let (paths, _lock) = run::open_run(cfg, out, resume.as_ref().map(|c| c.step), minutes)?;
    let dev = crate::device::training_device();
    dev.seed(tc.seed);
    let mut g = Generator::new(&cfg.model, &dev)?;
    let mut d = Discriminator::new(&cfg.model, &dev)?;
    let mut g_ema = g.valid();
    let adam = || AdamW::new(cfg.gan.beta1, cfg.gan.beta2, 1e-8, tc.weight_decay);
    let (mut opt_g, mut opt_d) = (adam(), adam());
    let mut start = 0;
    if let Some(ck) = resume {
        g = weights::apply(g, &ck.tensors, "model.")?;
        g_ema = weights::apply(g_ema, &ck.tensors, "ema.")?;
        d = weights::apply(d, &ck.tensors, "disc.")?;
        opt_g.import_for("opt.", "model.", ck.adam_t, &ck.tensors)?;
        opt_d.import_for("opt_d.", "disc.", ck.adam_t, &ck.tensors)?;
        start = ck.step;
    }
    let metrics = metrics::restore(&paths, start)?;
    if start >= tc.steps {
        return Ok(start);
    }
    let mut learner = GanLearner {
        cfg,
        g: Some(g),
        d: Some(d),
        g_ema: Some(g_ema),
        opt_g,
        opt_d,
        dev,
    };
    run::run_loop(
        tc,
        Arc::new(ds),
        &paths,
        run::Span {
            start,
            metrics,
            minutes,
        },
        &mut learner,
        on_step,
    )
}

/// A GAN run's state.
struct GanLearner<'a> {
    cfg: &'a GanRun,
    /// Always `Some` between steps (taken and put back by each update).
    g: Option<Generator>,
    d: Option<Discriminator>,
    g_ema: Option<Generator>,
    opt_g: AdamW,
    opt_d: AdamW,
    dev: Device,
}

/// The hinge losses and scores of one step, as numbers.
fn scalar(t: Tensor<1>) -> f64 {
    t.into_scalar::<f32>() as f64
}

impl Learner for GanLearner<'_> {
    fn step(&mut self, batch: HostBatch, step: usize) -> Result<StepOutcome> {
        let (cfg, tc) = (self.cfg, &self.cfg.train);
        let dev = &self.dev;
        let b = batch.shape[0];
        let z_dim = cfg.model.z_dim;
        let mut rng = rng_for(tc.seed, Stream::TrainStep, step as u64);
        let labels = run::dropped_labels(
            cfg.model.num_classes,
            &batch.labels,
            tc.label_dropout,
            &mut rng,
        );
        let noise = |rng: &mut rand_chacha::ChaCha8Rng| {
            Tensor::<2>::from_data(TensorData::new(normal_vec(rng, b * z_dim), [b, z_dim]), dev)
        };
        let (z_d, z_g) = (noise(&mut rng), noise(&mut rng));
        let real = Tensor::<4>::from_data(TensorData::new(batch.images, batch.shape), dev);
        let l = labels.as_deref();

        // Discriminator: hinge loss on real and generated images, one forward for both.
        let g = self.g.take().expect("G between steps");
        let d = self.d.take().expect("D between steps").power_iterate();
        let fake = g.forward(z_d, l).detach();
        let both: Option<Vec<usize>> = labels.as_ref().map(|l| [l.as_slice(), l].concat());
        let group = crate::gan::mbstd_group(b);
        let scores = d.forward(Tensor::cat(vec![real, fake], 0), both.as_deref(), group);
        let (s_real, s_fake) = (scores.clone().narrow(0, 0, b), scores.narrow(0, b, b));
        let (d_real, d_fake) = (scalar(s_real.clone().mean()), scalar(s_fake.clone().mean()));
        let loss_d =
            relu(s_real.neg().add_scalar(1.0)).mean() + relu(s_fake.add_scalar(1.0)).mean();
        let grads_d = GradientsParams::from_grads(loss_d.backward(), &d);
        let d_loss = scalar(loss_d);
        let gn_d = adamw::grad_norm(&d, &grads_d);
        let lr_d = tc.rate_at(cfg.gan.lr_d, step);
        let d = self
            .opt_d
            .step(d, &grads_d, lr_d, adamw::clip_scale(gn_d, tc.grad_clip));

        // Generator: raise D's score of fresh samples. With the mode-seeking term the
        // batch's second half repeats the first half's classes, so that each pair (i, i + b/2)
        // is one class from two noises.
        let ms = cfg.gan.mode_seeking;
        // The pairs' half: items `2h..` (one, at an odd batch) stay unpaired.
        let h = b / 2;
        let seeking = ms > 0.0 && h > 0;
        let paired: Option<Vec<usize>> = match &labels {
            Some(l) if seeking => Some([&l[..h], &l[..h], &l[2 * h..]].concat()),
            _ => labels.clone(),
        };
        let l_g = paired.as_deref();
        let fake = g.forward(z_g.clone(), l_g);
        let mut loss_g = d.forward(fake.clone(), l_g, group).mean().neg();
        let mut extra = Vec::new();
        if seeking {
            let term = mode_seeking_term(fake.narrow(0, 0, 2 * h), z_g.narrow(0, 0, 2 * h));
            extra.push(("mode_seeking_term", scalar(term.clone())));
            loss_g = loss_g + term.mul_scalar(ms);
        }
        let grads_g = GradientsParams::from_grads(loss_g.backward(), &g);
        let g_loss = scalar(loss_g);
        run::check_diverged(
            "GAN training",
            &[("d_loss", d_loss), ("g_loss", g_loss)],
            step,
            "try a lower --lr and --lr-d",
        )?;
        let ema = self.g_ema.take().expect("EMA between steps");
        let (g, ema, lr, gn_g) = run::update_with_ema(&mut self.opt_g, g, ema, &grads_g, tc, step);
        self.g_ema = Some(ema);
        self.g = Some(g);
        self.d = Some(d);
        Ok(StepOutcome {
            loss: d_loss,
            lr,
            grad_norm: gn_g,
            extra: [
                ("g_loss", g_loss),
                ("d_real", d_real),
                ("d_fake", d_fake),
                ("grad_norm_d", gn_d),
            ]
            .into_iter()
            .chain(extra)
            .collect(),
        })
    }

    fn save(&self, paths: &RunPaths, step: usize) -> Result<()> {
        let (g, d) = (self.g.as_ref().expect("G"), self.d.as_ref().expect("D"));
        let ema = self.g_ema.as_ref().expect("EMA");
        let mut t = NamedTensors::new();
        weights::collect(g, "model.", &mut t);
        weights::collect(ema, "ema.", &mut t);
        weights::collect(d, "disc.", &mut t);
        self.opt_g.export("opt.", &mut t);
        self.opt_d.export("opt_d.", &mut t);
        let config = FamilyConfig::Gan(self.cfg.model.clone());
        let mut e = NamedTensors::new();
        weights::collect(ema, "", &mut e);
        let model_file = crate::model::family_model_bytes(&config, &e, StoreDtype::F32)?;
        let parts = Parts {
            run_json: serde_json::to_string(self.cfg)?,
            config_json: serde_json::to_string(&config)?,
            step,
            adam_t: self.opt_g.t,
        };
        checkpoint::write(paths, &parts, &t, &model_file)
    }

    fn preview(&self, paths: &RunPaths, step: usize) -> Result<()> {
        let idev = crate::device::inference_device();
        let ema = self.g_ema.as_ref().expect("EMA").clone();
        let generator = crate::pipeline::Generator::Gan {
            model: LoadedGan {
                config: self.cfg.model.clone(),
                generator: ema,
                source: "the training run".into(),
            },
            device: idev,
        };
        let (n, conditioning, cols) = class_layout(self.cfg.model.num_classes);
        let mut req = Request::new(n, SamplerKind::Ddpm);
        req.conditioning = conditioning;
        req.seeds = Seeds::One(self.cfg.train.seed);
        let x = generator.run(&req, &mut |_| {})?.images;
        save_grid(x, cols, paths, step)
    }
}
