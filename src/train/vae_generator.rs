//! Training a VAE as a generator ([`crate::vae::generator`]) as a one-network family
//! ([`super::single`]): per step, the negative ELBO of the batch with the KL weighted by
//! `beta(step) = min(1, (step + 1) / kl_anneal)`. The loss is in nats per sub-pixel;
//! `metrics.jsonl` also has the unweighted negative ELBO in bits per dimension (`elbo_bpd`),
//! its reconstruction part (`recon_bpd`), the KL per image in nats (`kl`) and `beta`. The
//! draws of a step are the label dropout's, then the reparameterisation's noise.

use super::single::{Loss, SingleNet};
use super::{RunSpec, TrainConfig};
use crate::data::HostBatch;
use crate::model::{Family, FamilyConfig};
use crate::pipeline::Generator;
use crate::pixelcnn::bits_per_dim;
use crate::rng::normal_vec;
use crate::vae::generator::{LoadedVaeGen, VaeGenConfig, VaeGenerator};
use anyhow::Result;
use burn::tensor::{Device, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

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
    super::run_spec_parts!();
    fn validate(&self) -> Result<()> {
        super::check_family_run(&self.train, self.model.validate(), Self::FAMILY)
    }
}

impl SingleNet for VaeGenRun {
    type Net = VaeGenerator;

    fn network(&self, dev: &Device) -> Result<VaeGenerator> {
        VaeGenerator::new(&self.model, dev)
    }

    fn loss(
        &self,
        net: &VaeGenerator,
        batch: HostBatch,
        labels: Option<&[usize]>,
        step: usize,
        rng: &mut ChaCha8Rng,
        dev: &Device,
    ) -> Loss {
        let b = batch.shape[0];
        let dims: usize = batch.shape[1..].iter().product();
        let [l, h, w] = self.model.latent_shape();
        let eps = Tensor::<4>::from_data(
            TensorData::new(normal_vec(rng, b * l * h * w), [b, l, h, w]),
            dev,
        );
        let x = Tensor::<4>::from_data(TensorData::new(batch.images, batch.shape), dev);
        let elbo = net.elbo(x, labels, eps);
        let beta = self.beta(step);
        let (recon, kl) = (elbo.recon.mean(), elbo.kl.mean());
        let (recon_v, kl_v) = (
            recon.clone().into_scalar::<f32>() as f64,
            kl.clone().into_scalar::<f32>() as f64,
        );
        Loss {
            loss: (recon + kl.mul_scalar(beta)).div_scalar(dims as f64),
            extra: vec![
                ("elbo_bpd", bits_per_dim(recon_v + kl_v, dims)),
                ("recon_bpd", bits_per_dim(recon_v, dims)),
                ("kl", kl_v),
                ("beta", beta),
            ],
        }
    }

    fn family_config(&self) -> FamilyConfig {
        FamilyConfig::Vae(self.model.clone())
    }

    fn generator(&self, ema: VaeGenerator, device: Device) -> Generator {
        Generator::Vae {
            model: LoadedVaeGen {
                config: self.model.clone(),
                net: ema,
                source: "the training run".into(),
            },
            device,
        }
    }

    fn num_classes(&self) -> Option<usize> {
        self.model.num_classes
    }
}
