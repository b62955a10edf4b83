//! The variational autoencoder as a generator (Kingma & Welling 2014): the KL autoencoder of
//! [`super`] trained on the evidence lower bound with a decoder that is a likelihood, so that
//! its prior `N(0, I)` can be sampled.
//!
//! - **Encoder** `q(z | x) = N(mean, exp(logvar))`, the autoencoder's, with `z` of shape
//!   `[L, S/d, S/d]`.
//! - **Decoder** `p(x | z, y)`: the autoencoder's decoder on `z + e_y` (`e_y` a learned latent
//!   map per class; `K + 1` of them, the last the null class that label dropout trains), giving
//!   for every sub-pixel the location `mu` and log-scale `log s` of a discretised logistic
//!   (Salimans et al. 2017, "PixelCNN++", eq. 2): the probability of the 8-bit value `x` is the
//!   logistic's mass on its bin `[x - 1/255, x + 1/255]`, the edge bins extended to infinity.
//! - **ELBO** per image: `log p(x | z, y) - KL(q(z | x) || N(0, I))` with one reparameterised
//!   draw of `z` (eq. 10 and appendix B); `-ELBO / (C H W ln 2)` bounds the negative
//!   log-likelihood in bits per dimension from above. Training weighs the KL by `beta`,
//!   raised linearly from 0 to 1 over the first `kl_anneal` steps (Bowman et al. 2016), so the
//!   code is used before the prior pulls it in; the reported ELBO always has weight 1.
//! - **Sampling**: `z ~ N(0, I)`, decoded; the image is the decoder's location `mu` (the mode
//!   of each sub-pixel's distribution), not a draw from it, as is usual for VAE samples.

use super::{Vae, VaeConfig};
use anyhow::{Result, bail};
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::activation::{log_sigmoid, sigmoid, softplus};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// A VAE generator's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeGenConfig {
    /// Side of the images.
    pub image_size: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// The autoencoder (its decoder has `2 C` outputs: location and log-scale).
    pub vae: VaeConfig,
    /// Classes of a class-conditioned model.
    pub num_classes: Option<usize>,
    /// Class names by index (empty for an unconditioned model).
    #[serde(default)]
    pub class_names: Vec<String>,
}

impl VaeGenConfig {
    /// The CPU recipe: levels of `widths` channels, `latent` latent channels.
    pub fn recipe(size: usize, channels: usize, widths: &[usize], latent: usize) -> Self {
        let mut vae = VaeConfig::small(channels, size, widths, latent);
        vae.out_channels = 2 * channels;
        Self {
            image_size: size,
            channels,
            vae,
            num_classes: None,
            class_names: Vec::new(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.vae.validate()?;
        let (s, c) = (self.image_size, self.channels);
        if c != 1 && c != 3 {
            bail!("a VAE's images have 1 or 3 channels (got {c})");
        }
        if self.vae.in_channels != c || self.vae.out_channels != 2 * c {
            bail!(
                "the autoencoder must take {c} channels and give {} (got {} and {})",
                2 * c,
                self.vae.in_channels,
                self.vae.out_channels
            );
        }
        let d = self.vae.downscale();
        if !(4..=256).contains(&s) || !s.is_multiple_of(d) {
            bail!(
                "a VAE's image size must be between 4 and 256 and a multiple of its downscale {d} (got {s})"
            );
        }
        crate::model::check_classes(self.num_classes, &self.class_names)
    }

    /// `[channels, size, size]` of the images.
    pub fn output_shape(&self) -> [usize; 3] {
        [self.channels, self.image_size, self.image_size]
    }

    /// `[L, h, w]` of the latent.
    pub fn latent_shape(&self) -> [usize; 3] {
        self.vae.latent_shape(self.image_size)
    }
}

/// The autoencoder and its class maps.
#[derive(Module, Debug)]
pub struct VaeGenerator {
    pub vae: Vae,
    /// `K + 1` latent maps, flattened (`L h w` each).
    pub class_embed: Option<Embedding>,
}

/// What one ELBO evaluation gives, per image `[n]`, in nats.
pub struct Elbo {
    /// `-log p(x | z, y)` of the draw of `z`.
    pub recon: Tensor<1>,
    /// `KL(q(z | x) || N(0, I))`.
    pub kl: Tensor<1>,
}

impl VaeGenerator {
    pub fn new(cfg: &VaeGenConfig, dev: &Device) -> Result<Self> {
        cfg.validate()?;
        let [l, h, w] = cfg.latent_shape();
        Ok(Self {
            vae: Vae::new(&cfg.vae, dev)?,
            class_embed: cfg
                .num_classes
                .map(|k| EmbeddingConfig::new(k + 1, l * h * w).init(dev)),
        })
    }

    /// `z + e_y` for latents `[n, L, h, w]` (the null class for none).
    fn with_class(&self, z: Tensor<4>, labels: Option<&[usize]>) -> Tensor<4> {
        let Some(e) = &self.class_embed else {
            return z;
        };
        let [n, l, h, w] = z.dims();
        let null = vec![e.weight.dims()[0] - 1; n];
        let ids: Vec<i64> = labels.unwrap_or(&null).iter().map(|&c| c as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [n, 1]), &z.device());
        let m: Tensor<3> = e.forward(ids);
        z + m.reshape([n, l, h, w])
    }

    /// The decoder's location and log-scale `[n, C, H, W]` each for latents `z`.
    pub fn decode(&self, z: Tensor<4>, labels: Option<&[usize]>) -> (Tensor<4>, Tensor<4>) {
        let out = self.vae.decode(self.with_class(z, labels));
        let c = out.dims()[1] / 2;
        (out.clone().narrow(1, 0, c), out.narrow(1, c, c))
    }

    /// The ELBO's two terms for images `x` `[n, C, H, W]` in `[-1, 1]` (8-bit values) and the
    /// standard normal draws `eps` `[n, L, h, w]` of the reparameterisation.
    pub fn elbo(&self, x: Tensor<4>, labels: Option<&[usize]>, eps: Tensor<4>) -> Elbo {
        let q = self.vae.encode(x.clone());
        let z = q.sample(eps);
        let (mu, log_s) = self.decode(z, labels);
        Elbo {
            recon: discretized_logistic_nll(x, mu, log_s),
            kl: q.kl(),
        }
    }
}

/// The smallest log-scale the decoder may give (PixelCNN++'s clamp).
const MIN_LOG_SCALE: f64 = -7.0;

/// `-log P(x)` per image `[n]`, summed over its sub-pixels, of 8-bit images `x` in `[-1, 1]`
/// under discretised logistics with locations `mu` and log-scales `log_s` (clamped at -7)
/// (Salimans et al. 2017, eq. 2): with `sigma` the logistic sigmoid and `s = exp(log_s)`,
///
/// `P(x) = sigma((x + 1/255 - mu) / s) - sigma((x - 1/255 - mu) / s)`,
///
/// the first term replaced by 1 at `x = 1` and the second by 0 at `x = -1`. Where the
/// difference is below 1e-5 it is taken as the density at `x` times the bin width `2/255`
/// (PixelCNN++'s guard against cancellation).
pub fn discretized_logistic_nll(x: Tensor<4>, mu: Tensor<4>, log_s: Tensor<4>) -> Tensor<1> {
    let n = x.dims()[0];
    let log_s = log_s.clamp_min(MIN_LOG_SCALE);
    let inv = log_s.clone().neg().exp();
    let centred = x.clone() - mu;
    let half = 1.0 / 255.0;
    let plus = (centred.clone().add_scalar(half)) * inv.clone();
    let minus = (centred.clone().sub_scalar(half)) * inv.clone();
    // log sigma(plus) at the bottom edge; log (1 - sigma(minus)) at the top edge.
    let low_edge = log_sigmoid(plus.clone());
    let high_edge = log_sigmoid(minus.clone().neg());
    let delta = sigmoid(plus) - sigmoid(minus);
    let mid = centred * inv;
    let log_pdf_mid = mid.clone() - log_s - softplus(mid, 1.0).mul_scalar(2.0);
    let inner = delta.clone().clamp_min(1e-12).log().mask_where(
        delta.lower_elem(1e-5),
        log_pdf_mid.sub_scalar(127.5f64.ln()),
    );
    let lp = inner
        .mask_where(x.clone().lower_elem(-0.999), low_edge)
        .mask_where(x.greater_elem(0.999), high_edge);
    lp.reshape([n as i32, -1]).sum_dim(1).reshape([n]).neg()
}

/// A VAE generator ready to sample and score.
#[derive(Debug)]
pub struct LoadedVaeGen {
    pub config: VaeGenConfig,
    pub net: VaeGenerator,
    /// Where it came from, for messages.
    pub source: String,
}

impl LoadedVaeGen {
    /// Images `[n, C, H, W]` in `[-1, 1]` (clamped) decoded from latents `z` `[n, L, h, w]`.
    pub fn generate(&self, z: Tensor<4>, labels: Option<&[usize]>) -> Tensor<4> {
        self.net.decode(z, labels).0.clamp(-1.0, 1.0)
    }

    /// `-ELBO` per image in nats (`recon + KL`), untracked.
    pub fn neg_elbo(&self, x: Tensor<4>, labels: Option<&[usize]>, eps: Tensor<4>) -> Vec<f64> {
        let e = self.net.elbo(x, labels, eps);
        (e.recon + e.kl)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap_or_default()
            .into_iter()
            .map(f64::from)
            .collect()
    }
}

/// Builds a VAE generator from its config and the file's tensors.
pub fn build(
    config: VaeGenConfig,
    tensors: &crate::weights::NamedTensors,
    what: &str,
    dev: &Device,
) -> Result<LoadedVaeGen> {
    // A lower bound of what the config asks for: the encoder's and decoder's outer convolutions.
    let w0 = config.vae.block_out_channels.first().copied().unwrap_or(0);
    let least = 9 * (config.channels * w0 + w0 * 2 * config.channels);
    let net = crate::model::build_network(config.validate(), least, tensors, what, || {
        VaeGenerator::new(&config, dev)
    })?;
    Ok(LoadedVaeGen {
        config,
        net,
        source: what.to_string(),
    })
}
