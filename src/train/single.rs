//! Training a family that is one network with an EMA and AdamW (betas 0.9, 0.999), in the
//! shared loop ([`super::run`]): what differs between such families (the network, its loss,
//! the config its model file carries, how it generates its preview) is theirs, behind
//! [`SingleNet`]; the state, checkpoints (`model.*`, `ema.*`, `opt.*`) and resume are here.
//!
//! Every draw of step `s` comes from `rng_for(seed, TrainStep, s)` (the family's loss is given
//! that generator) and the checkpoint holds the network, the EMA and the optimiser's moments,
//! so a resumed run makes the same bits as an uninterrupted one.

use super::adamw::AdamW;
use super::checkpoint::{self, Checkpoint, Parts};
use super::preview::{class_layout, save_grid};
use super::run::{self, Learner, StepOutcome};
use super::{RunPaths, RunSpec, StepReport, metrics};
use crate::data::{Dataset, HostBatch};
use crate::model::FamilyConfig;
use crate::pipeline::{Generator, Request, Seeds};
use crate::rng::{Stream, rng_for};
use crate::sampler::SamplerKind;
use crate::weights::{self, NamedTensors, StoreDtype};
use anyhow::Result;
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::sync::Arc;

/// What a step's loss gives: the loss to minimise (nats per sub-pixel) and the figures that
/// go into `metrics.jsonl` beside it.
pub struct Loss {
    pub loss: Tensor<1>,
    pub extra: Vec<(&'static str, f64)>,
}

/// A run of a one-network family.
pub trait SingleNet: RunSpec {
    type Net: Module + Clone;
    /// The network of the run's config, freshly initialised on `dev`.
    fn network(&self, dev: &Device) -> Result<Self::Net>;
    /// The loss of step `step` on `batch`, its classes already dropped out as `labels`; `rng`
    /// is the step's generator, after the label dropout's draws.
    fn loss(
        &self,
        net: &Self::Net,
        batch: HostBatch,
        labels: Option<&[usize]>,
        step: usize,
        rng: &mut ChaCha8Rng,
        dev: &Device,
    ) -> Loss;
    /// The config the model file carries.
    fn family_config(&self) -> FamilyConfig;
    /// A generator of the run's EMA weights, for previews.
    fn generator(&self, ema: Self::Net, dev: Device) -> Generator;
    fn num_classes(&self) -> Option<usize>;
}

/// Trains `cfg` to its steps, fresh or from `resume`, as [`super::train`] does a diffusion
/// run. Returns the final step (less than the target when `minutes` ran out).
pub fn train<R: SingleNet>(
    cfg: &R,
    ds: Dataset,
    out: &Path,
    resume: Option<Checkpoint<R>>,
    minutes: Option<f64>,
    on_step: &mut dyn FnMut(&StepReport) -> Result<()>,
) -> Result<usize> {
    let tc = cfg.train();
    let (paths, _lock) = run::open_run(cfg, out, resume.as_ref().map(|c| c.step), minutes)?;
    let dev = crate::device::training_device();
    dev.seed(tc.seed);
    let mut net = cfg.network(&dev)?;
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
    let mut learner = SingleNetLearner {
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

/// A one-network run's state.
struct SingleNetLearner<'a, R: SingleNet> {
    cfg: &'a R,
    /// Always `Some` between steps (taken and put back by each update).
    net: Option<R::Net>,
    ema: Option<R::Net>,
    opt: AdamW,
    dev: Device,
}

impl<R: SingleNet> Learner for SingleNetLearner<'_, R> {
    fn step(&mut self, batch: HostBatch, step: usize) -> Result<StepOutcome> {
        let (cfg, tc) = (self.cfg, self.cfg.train());
        let mut rng = rng_for(tc.seed, Stream::TrainStep, step as u64);
        let labels =
            run::dropped_labels(cfg.num_classes(), &batch.labels, tc.label_dropout, &mut rng);
        let net = self.net.take().expect("the network between steps");
        let Loss { loss, extra } =
            cfg.loss(&net, batch, labels.as_deref(), step, &mut rng, &self.dev);
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        let loss_v = loss.into_scalar::<f32>() as f64;
        run::check_diverged("training", &[("loss", loss_v)], step, "try a lower --lr")?;
        let e = self.ema.take().expect("EMA between steps");
        let (net, e, lr, gn) = run::update_with_ema(&mut self.opt, net, e, &grads, tc, step);
        self.ema = Some(e);
        self.net = Some(net);
        Ok(StepOutcome {
            loss: loss_v,
            lr,
            grad_norm: gn,
            extra,
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
        let config = self.cfg.family_config();
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
        let ema = self.ema.as_ref().expect("EMA").clone();
        let generator = self.cfg.generator(ema, crate::device::inference_device());
        let (n, conditioning, cols) = class_layout(self.cfg.num_classes());
        let mut req = Request::new(n, SamplerKind::Ddpm);
        req.conditioning = conditioning;
        req.seeds = Seeds::One(self.cfg.train().seed);
        let x = generator.run(&req, &mut |_| {})?.images;
        save_grid(x, cols, paths, step)
    }
}
