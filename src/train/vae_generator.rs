//! Training a VAE as a generator ([`crate::vae::generator`]) in the shared loop
//! ([`super::run`]): per step, the negative ELBO of the batch with the KL weighted by
//! `beta(step) = min(1, (step + 1) / kl_anneal)`, AdamW, then the EMA (the model file's
//! weights). The loss is in nats per sub-pixel; `metrics.jsonl` also has the unweighted
//! negative ELBO in bits per dimension (`elbo_bpd`), its reconstruction part (`recon_bpd`),
//! the KL per image in nats (`kl`) and `beta`.
//!
//! The draws of step `s` (label dropout, then the reparameterisation's noise) come from
//! `rng_for(seed, TrainStep, s)` and the checkpoint holds the network, the EMA and the
//! optimiser's moments, so a resumed run makes the same bits as an uninterrupted one.

use super::adamw::{self, AdamW};
use super::checkpoint::{self, Checkpoint, Parts};
use super::preview::{class_layout, save_grid};
use super::run::{self, Learner, StepOutcome};
use super::{RunPaths, RunSpec, StepReport, TrainConfig, ema, metrics};
use crate::data::{Dataset, HostBatch};
use crate::model::{Family, FamilyConfig};
use crate::pipeline::{Request, Seeds};
use crate::rng::{Stream, normal_vec, rng_for};
use crate::sampler::SamplerKind;
use crate::vae::generator::{LoadedVaeGen, VaeGenConfig, VaeGenerator};
use crate::weights::{self, NamedTensors, StoreDtype};
use anyhow::{Result, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// Everything that defines a VAE run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeGenRun {
    /// The network, stored with `"family": "vae"`.
    #[serde(with = "crate::model::tagged")]
    pub model: VaeGenConfig,
    pub train: TrainConfig,
    /// The `--data` argument the run was started with.
    pub data: String,
    /// Steps over which the KL weight rises from 0 to 1 (0: 1 from the start).
    pub kl_anneal: usize,
}

impl VaeGenRun {
    /// The KL weight of step `step` (from 0).
    pub fn beta(&self, step: usize) -> f64 {
        if self.kl_anneal == 0 {
            1.0
        } else {
            ((step + 1) as f64 / self.kl_anneal as f64).min(1.0)
        }
    }
}

impl RunSpec for VaeGenRun {
    const FAMILY: Family = Family::Vae;
    fn train(&self) -> &TrainConfig {
        &self.train
    }
    fn train_mut(&mut self) -> &mut TrainConfig {
        &mut self.train
    }
    fn data_mut(&mut self) -> &mut String {
        &mut self.data
    }
    fn validate(&self) -> Result<()> {
        self.train.validate()?;
        self.model.validate()?;
        if self.train.loss_weighting != super::LossWeighting::Uniform {
            bail!("an autoregressive model's loss has no timesteps to weight: leave out --min-snr");
        }
        Ok(())
    }
}

/// Trains a VAE run to `cfg.train.steps`, fresh or from `resume`, as
/// [`super::train`] does a diffusion run. Returns the final step (less than the target when
/// `minutes` ran out).
pub fn train(
    cfg: &VaeGenRun,
    ds: Dataset,
    out: &Path,
    resume: Option<Checkpoint<VaeGenRun>>,
    minutes: Option<f64>,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<usize> {
    let tc = &cfg.train;
    let (paths, _lock) = run::open_run(cfg, out, resume.as_ref().map(|c| c.step), minutes)?;
    let dev = crate::device::training_device();
    dev.seed(tc.seed);
    let mut net = VaeGenerator::new(&cfg.model, &dev)?;
    let mut net_ema = net.valid();
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, tc.weight_decay);
    let mut start = 0;
    if let Some(ck) = resume {
        net = weights::apply(net, &ck.tensors, "model.")?;
        net_ema = weights::apply(net_ema, &ck.tensors, "ema.")?;
        opt.import_for("opt.", "model.", ck.adam_t, &ck.tensors)?;
        start = ck.step;
    }
    let metrics = metrics::restore(&paths, start)?;
    if start >= tc.steps {
        return Ok(start);
    }
    let mut learner = VaeGenLearner {
        cfg,
        net: Some(net),
        ema: Some(net_ema),
        opt,
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

/// A VAE run's state.
struct VaeGenLearner<'a> {
    cfg: &'a VaeGenRun,
    /// Always `Some` between steps (taken and put back by each update).
    net: Option<VaeGenerator>,
    ema: Option<VaeGenerator>,
    opt: AdamW,
    dev: Device,
}

impl Learner for VaeGenLearner<'_> {
    fn step(&mut self, batch: HostBatch, step: usize) -> Result<StepOutcome> {
        let (cfg, tc) = (self.cfg, &self.cfg.train);
        let mut rng = rng_for(tc.seed, Stream::TrainStep, step as u64);
        let labels = run::dropped_labels(
            cfg.model.num_classes,
            &batch.labels,
            tc.label_dropout,
            &mut rng,
        );
        let b = batch.shape[0];
        let dims: usize = batch.shape[1..].iter().product();
        let [l, h, w] = cfg.model.latent_shape();
        let eps = Tensor::<4>::from_data(
            TensorData::new(normal_vec(&mut rng, b * l * h * w), [b, l, h, w]),
            &self.dev,
        );
        let x = Tensor::<4>::from_data(TensorData::new(batch.images, batch.shape), &self.dev);
        let net = self.net.take().expect("the network between steps");
        let elbo = net.elbo(x, labels.as_deref(), eps);
        let beta = cfg.beta(step);
        let (recon, kl) = (elbo.recon.mean(), elbo.kl.mean());
        let loss = (recon.clone() + kl.clone().mul_scalar(beta)).div_scalar(dims as f64);
        let (recon_v, kl_v) = (
            recon.into_scalar::<f32>() as f64,
            kl.into_scalar::<f32>() as f64,
        );
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        let loss_v = loss.into_scalar::<f32>() as f64;
        if !loss_v.is_finite() {
            bail!(
                "the loss became {loss_v} at step {}: try a lower --lr",
                step + 1
            );
        }
        let gn = adamw::grad_norm(&net, &grads);
        let lr = tc.lr_at(step);
        let net = self
            .opt
            .step(net, &grads, lr, adamw::clip_scale(gn, tc.grad_clip));
        let e = self.ema.take().expect("EMA between steps");
        self.ema = Some(ema::update(
            e,
            &net,
            ema::decay_at(tc.ema_decay, step as u64),
        ));
        self.net = Some(net);
        Ok(StepOutcome {
            loss: loss_v,
            lr,
            grad_norm: gn,
            extra: vec![
                (
                    "elbo_bpd",
                    crate::pixelcnn::bits_per_dim(recon_v + kl_v, dims),
                ),
                ("recon_bpd", crate::pixelcnn::bits_per_dim(recon_v, dims)),
                ("kl", kl_v),
                ("beta", beta),
            ],
        })
    }

    fn save(&self, paths: &RunPaths, step: usize) -> Result<()> {
        let (net, e) = (
            self.net.as_ref().expect("network"),
            self.ema.as_ref().expect("EMA"),
        );
        let mut t = NamedTensors::new();
        weights::collect(net, "model.", &mut t);
        weights::collect(e, "ema.", &mut t);
        self.opt.export("opt.", &mut t);
        let config = FamilyConfig::Vae(self.cfg.model.clone());
        let mut m = NamedTensors::new();
        weights::collect(e, "", &mut m);
        let model_file = crate::model::family_model_bytes(&config, &m, StoreDtype::F32)?;
        let parts = Parts {
            run_json: serde_json::to_string(self.cfg)?,
            config_json: serde_json::to_string(&config)?,
            step,
            adam_t: self.opt.t,
        };
        checkpoint::write(paths, &parts, &t, &model_file)
    }

    fn preview(&self, paths: &RunPaths, step: usize) -> Result<()> {
        let generator = crate::pipeline::Generator::Vae {
            model: LoadedVaeGen {
                config: self.cfg.model.clone(),
                net: self.ema.as_ref().expect("EMA").clone(),
                source: "the training run".into(),
            },
            device: crate::device::inference_device(),
        };
        let (n, conditioning, cols) = class_layout(self.cfg.model.num_classes);
        let mut req = Request::new(n, SamplerKind::Ddpm);
        req.conditioning = conditioning;
        req.seeds = Seeds::One(self.cfg.train.seed);
        let x = generator.run(&req, &mut |_| {})?.images;
        save_grid(x, cols, paths, step)
    }
}
