//! Training an autoregressive model ([`crate::pixelcnn`]) as a one-network family
//! ([`super::single`]): per step, the exact negative log-likelihood of the batch (every
//! sub-pixel's 256-way softmax at once: the masks make one pass a teacher-forced pass over all
//! positions). The loss is in nats per sub-pixel; `metrics.jsonl` also has it in bits per
//! dimension (`bits_per_dim`), the figure this family is judged by. The draws of a step are
//! the label dropout's only.

use super::single::{Loss, SingleNet};
use super::{RunSpec, TrainConfig};
use crate::data::HostBatch;
use crate::model::{Family, FamilyConfig};
use crate::pipeline::Generator;
use crate::pixelcnn::{LoadedPixelCnn, PixelCnn, PixelCnnConfig, levels, nll_per_image};
use anyhow::Result;
use burn::tensor::{Device, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Everything that defines an autoregressive run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PixelCnnRun {
    /// The network, stored with `"family": "autoregressive"`.
    #[serde(with = "crate::model::tagged")]
    pub model: PixelCnnConfig,
    pub train: TrainConfig,
    /// The `--data` argument the run was started with.
    pub data: String,
}

impl RunSpec for PixelCnnRun {
    const FAMILY: Family = Family::Autoregressive;
    super::run_spec_parts!();
    fn validate(&self) -> Result<()> {
        super::check_family_run(&self.train, self.model.validate(), Self::FAMILY)
    }
}

impl SingleNet for PixelCnnRun {
    type Net = PixelCnn;

    fn network(&self, dev: &Device) -> Result<PixelCnn> {
        PixelCnn::new(&self.model, dev)
    }

    fn loss(
        &self,
        net: &PixelCnn,
        batch: HostBatch,
        labels: Option<&[usize]>,
        _step: usize,
        _rng: &mut ChaCha8Rng,
        dev: &Device,
    ) -> Loss {
        let values = levels(&batch.images);
        let dims: usize = batch.shape[1..].iter().product();
        let x = Tensor::<4>::from_data(TensorData::new(batch.images, batch.shape), dev);
        let loss = nll_per_image(net.forward(x, labels), &values)
            .mean()
            .div_scalar(dims as f64);
        let nats = loss.clone().into_scalar::<f32>() as f64;
        Loss {
            loss,
            extra: vec![("bits_per_dim", nats / std::f64::consts::LN_2)],
        }
    }

    fn family_config(&self) -> FamilyConfig {
        FamilyConfig::Autoregressive(self.model.clone())
    }

    fn generator(&self, ema: PixelCnn, device: Device) -> Generator {
        Generator::Autoregressive {
            model: LoadedPixelCnn {
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
