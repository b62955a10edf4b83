//! A generative adversarial network (Goodfellow et al. 2014): a generator `G(z, y)` that maps
//! Gaussian noise `z` (and a class `y`) to an image, trained against a discriminator `D(x, y)`
//! that scores real images high and generated ones low.
//!
//! The choices, made to train stably on a 2-core CPU in minutes (docs/FAMILIES.md):
//! - **G**: DCGAN's shape (Radford et al. 2016): a linear map of `[z; embed(y)]` to a
//!   `4g x S/4 x S/4` map, two stages of nearest 2x upsampling and two 3x3 convolutions (the
//!   upsample-then-convolve form avoids transposed convolutions' checkerboard artefacts, Odena
//!   et al. 2016), and a 3x3 convolution to `tanh` pixels. GroupNorm in place of BatchNorm:
//!   each image is generated independently of the others in its batch, so the same seed gives
//!   the same image at any batch size.
//! - **D**: five convolutions (3x3, 4x4 stride 2, 3x3, 4x4 stride 2, 3x3) with leaky ReLU,
//!   the last also reading the minibatch standard deviation (Karras et al. 2018; without it
//!   G made one image per class: recall 0.03 at 20 minutes, docs/FAMILIES.md), summed over
//!   space to features `phi(x)`, then `w^T phi(x) + embed(y)^T phi(x)`: the
//!   projection discriminator (Miyato & Koyama 2018, eq. 3). Every weight of D is spectrally
//!   normalised ([`spectral`]).
//! - **Loss**: the hinge loss (Lim & Ye 2017; SNGAN, BigGAN):
//!   `L_D = E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))]`, `L_G = -E[D(G(z))]`.
//!   R1 (Mescheder et al. 2018) would need the gradient of a gradient, which burn's autodiff
//!   does not give; spectral normalisation needs none.
//! - Classes have `K + 1` embeddings in both networks: the last is the null class, which label
//!   dropout trains, so a class-conditioned GAN also samples without a class.
//!
//! The model file holds G's EMA weights only ([`GanConfig`] under `diffuse.config`, tagged
//! `"family": "gan"`).

pub mod spectral;

use crate::kernels;
use crate::unet::blocks::{Norm, conv, group_norm};
use anyhow::{Result, bail};
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::interpolate::{Interpolate2dConfig, InterpolateMode};
use burn::nn::{Embedding, EmbeddingConfig, GroupNorm, Linear, LinearConfig};
use burn::tensor::activation::{leaky_relu, relu};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use spectral::{SnConv, SnLinear};

/// The networks of a GAN.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GanConfig {
    /// Side of the images (a multiple of 4).
    pub image_size: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Width of the noise `z`.
    pub z_dim: usize,
    /// G's channels at full resolution (`2g` at half, `4g` at a quarter).
    pub g_channels: usize,
    /// D's channels at full resolution (`2d` at half, `4d` at a quarter).
    pub d_channels: usize,
    /// Classes of a class-conditioned model.
    pub num_classes: Option<usize>,
    /// Class names by index (empty for an unconditioned model).
    #[serde(default)]
    pub class_names: Vec<String>,
    /// GroupNorm groups in G.
    pub norm_groups: usize,
}

impl GanConfig {
    /// A small GAN for images of side `size` with `channels`.
    pub fn recipe(size: usize, channels: usize) -> Self {
        Self {
            image_size: size,
            channels,
            z_dim: 64,
            g_channels: 32,
            d_channels: 32,
            num_classes: None,
            class_names: Vec::new(),
            norm_groups: 8,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let s = self.image_size;
        if !(8..=256).contains(&s) || !s.is_multiple_of(4) {
            bail!("a GAN's image size must be a multiple of 4 between 8 and 256 (got {s})");
        }
        if self.channels != 1 && self.channels != 3 {
            bail!(
                "a GAN's images have 1 or 3 channels (got {})",
                self.channels
            );
        }
        if !(1..=1024).contains(&self.z_dim) {
            bail!("--z-dim must be between 1 and 1024 (got {})", self.z_dim);
        }
        for (w, flag) in [
            (self.g_channels, "--g-channels"),
            (self.d_channels, "--d-channels"),
        ] {
            if !(4..=1024).contains(&w) {
                bail!("{flag} must be between 4 and 1024 (got {w})");
            }
        }
        if self.norm_groups == 0 || !self.g_channels.is_multiple_of(self.norm_groups) {
            bail!(
                "--g-channels {} must be a multiple of the {} GroupNorm groups",
                self.g_channels,
                self.norm_groups
            );
        }
        crate::model::check_classes(self.num_classes, &self.class_names)
    }

    /// `[channels, size, size]` of the images.
    pub fn output_shape(&self) -> [usize; 3] {
        [self.channels, self.image_size, self.image_size]
    }

    /// Weights G has at least (its input map and convolutions), to refuse a config that asks
    /// for far more than a file holds before allocating it.
    pub fn min_generator_parameters(&self) -> usize {
        let (g, s0) = (self.g_channels, self.image_size / 4);
        let z_in = self.z_dim * if self.num_classes.is_some() { 2 } else { 1 };
        // The input map; the stages' convolutions 4g->2g, 2g->2g, 2g->g, g->g; the output's.
        z_in * 4 * g * s0 * s0 + 9 * (15 * g * g + g * self.channels)
    }
}

/// Index of the null class (`K`) in the class embeddings.
fn class_ids(labels: &[usize], dev: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    Tensor::<2, Int>::from_data(TensorData::new(ids, [labels.len(), 1]), dev)
}

/// One upsampling stage of G: nearest 2x, then two 3x3 convolutions with GroupNorm and ReLU.
#[derive(Module, Debug)]
pub struct GenStage {
    pub conv1: Conv2d,
    pub norm1: GroupNorm,
    pub conv2: Conv2d,
    pub norm2: GroupNorm,
}

impl GenStage {
    fn new(cin: usize, cout: usize, norm: Norm, dev: &Device) -> Self {
        Self {
            conv1: conv(cin, cout, 3, 1, false, dev),
            norm1: group_norm(norm, cout, dev),
            conv2: conv(cout, cout, 3, 1, false, dev),
            norm2: group_norm(norm, cout, dev),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let up = Interpolate2dConfig::new()
            .with_output_size(Some([2 * h, 2 * w]))
            .with_mode(InterpolateMode::Nearest)
            .init()
            .forward(x);
        let h = relu(kernels::group_norm(
            &self.norm1,
            kernels::conv2d(&self.conv1, up),
            false,
        ));
        relu(kernels::group_norm(
            &self.norm2,
            kernels::conv2d(&self.conv2, h),
            false,
        ))
    }
}

/// The generator `G(z, y)`.
#[derive(Module, Debug)]
pub struct Generator {
    /// `K + 1` rows of `z_dim` (the last: no class).
    pub class_embed: Option<Embedding>,
    pub input: Linear,
    pub norm0: GroupNorm,
    pub stages: Vec<GenStage>,
    pub out: Conv2d,
    pub base: usize,
}

impl Generator {
    pub fn new(cfg: &GanConfig, dev: &Device) -> Result<Self> {
        cfg.validate()?;
        let (g, s0) = (cfg.g_channels, cfg.image_size / 4);
        let norm = Norm {
            groups: cfg.norm_groups,
            eps: 1e-5,
        };
        let z_in = cfg.z_dim * if cfg.num_classes.is_some() { 2 } else { 1 };
        Ok(Self {
            class_embed: cfg
                .num_classes
                .map(|k| EmbeddingConfig::new(k + 1, cfg.z_dim).init(dev)),
            input: LinearConfig::new(z_in, 4 * g * s0 * s0).init(dev),
            norm0: group_norm(norm, 4 * g, dev),
            stages: vec![
                GenStage::new(4 * g, 2 * g, norm, dev),
                GenStage::new(2 * g, g, norm, dev),
            ],
            out: conv(g, cfg.channels, 3, 1, false, dev),
            base: s0,
        })
    }

    /// Images in `[-1, 1]` `[n, C, S, S]` from noise `z` `[n, z_dim]` and, for a
    /// class-conditioned model, a class per image (`K`: none).
    pub fn forward(&self, z: Tensor<2>, labels: Option<&[usize]>) -> Tensor<4> {
        let n = z.dims()[0];
        let dev = z.device();
        let h = match &self.class_embed {
            Some(e) => {
                // No classes given: the null class (the last embedding) for every image.
                let null = vec![e.weight.dims()[0] - 1; n];
                let emb: Tensor<3> = e.forward(class_ids(labels.unwrap_or(&null), &dev));
                let [b, _, d] = emb.dims();
                Tensor::cat(vec![z, emb.reshape([b, d])], 1)
            }
            None => z,
        };
        let h = self.input.forward(h);
        let c = h.dims()[1] / (self.base * self.base);
        let mut h = relu(kernels::group_norm(
            &self.norm0,
            h.reshape([n, c, self.base, self.base]),
            false,
        ));
        for s in &self.stages {
            h = s.forward(h);
        }
        kernels::conv2d(&self.out, h).tanh()
    }
}

/// The discriminator `D(x, y)`, spectrally normalised, with a projection head for classes.
#[derive(Module, Debug)]
pub struct Discriminator {
    pub convs: Vec<SnConv>,
    pub head: SnLinear,
    /// `K + 1` rows of `4d` (the projection's class vectors; the last: no class).
    pub class_embed: Option<Embedding>,
}

/// The negative slope of D's leaky ReLUs (SNGAN's CNN discriminator).
const LEAK: f64 = 0.1;

impl Discriminator {
    pub fn new(cfg: &GanConfig, dev: &Device) -> Result<Self> {
        cfg.validate()?;
        let (c, d) = (cfg.channels, cfg.d_channels);
        Ok(Self {
            convs: vec![
                SnConv::new(c, d, 3, 1, 1, dev),
                SnConv::new(d, 2 * d, 4, 2, 1, dev),
                SnConv::new(2 * d, 2 * d, 3, 1, 1, dev),
                SnConv::new(2 * d, 4 * d, 4, 2, 1, dev),
                // One more input channel: the minibatch standard deviation.
                SnConv::new(4 * d + 1, 4 * d, 3, 1, 1, dev),
            ],
            head: SnLinear::new(4 * d, 1, dev),
            class_embed: cfg
                .num_classes
                .map(|k| EmbeddingConfig::new(k + 1, 4 * d).init(dev)),
        })
    }

    /// Scores `[n]` for images `[n, C, S, S]` (and a class per image), with the minibatch
    /// standard deviation taken over consecutive groups of `group` images (which must divide
    /// `n`; [`mbstd_group`]), so a batch of real images followed by one of generated images
    /// is scored as the two would be apart.
    pub fn forward(&self, x: Tensor<4>, labels: Option<&[usize]>, group: usize) -> Tensor<1> {
        let dev = x.device();
        let mut h = x;
        let last = self.convs.len() - 1;
        for (i, c) in self.convs.iter().enumerate() {
            if i == last {
                h = minibatch_std(h, group);
            }
            h = leaky_relu(c.forward(h), LEAK);
        }
        let [n, ch, _, _] = h.dims();
        let phi: Tensor<2> = h.sum_dim(3).sum_dim(2).reshape([n, ch]);
        let mut out = self.head.forward(phi.clone());
        if let (Some(e), Some(l)) = (&self.class_embed, labels) {
            let emb: Tensor<3> = e.forward(class_ids(l, &dev));
            let proj = (emb.reshape([n, ch]) * phi).sum_dim(1);
            out = out + proj;
        }
        out.reshape([n])
    }

    /// One power iteration in every spectrally normalised layer (once per D step).
    pub fn power_iterate(mut self) -> Self {
        self.convs = self.convs.into_iter().map(SnConv::power_iterate).collect();
        self.head = self.head.power_iterate();
        self
    }
}

/// The minibatch group of a batch of `n` (4, 2 or 1, whichever divides `n` first).
pub fn mbstd_group(n: usize) -> usize {
    [4, 2, 1]
        .into_iter()
        .find(|g| n.is_multiple_of(*g))
        .unwrap_or(1)
}

/// Appends the minibatch standard deviation as a channel (Karras et al. 2018, "Progressive
/// Growing of GANs", section 3): over each group of `g` consecutive images, the standard
/// deviation of every feature at every position, averaged to one number, given to each image
/// of the group. A generator that makes the same image for every noise shows D a deviation
/// of 0 where real images show more, so D can punish the collapse.
fn minibatch_std(h: Tensor<4>, g: usize) -> Tensor<4> {
    let [n, c, hh, ww] = h.dims();
    let g = if g == 0 || !n.is_multiple_of(g) { 1 } else { g };
    let x: Tensor<5> = h.clone().reshape([n / g, g, c, hh, ww]);
    let centred = x.clone() - x.mean_dim(1);
    let std = centred.powi_scalar(2).mean_dim(1).add_scalar(1e-8).sqrt();
    let s: Tensor<2> = std.reshape([n / g, c * hh * ww]).mean_dim(1);
    let s: Tensor<4> = s
        .reshape([n / g, 1, 1, 1])
        .repeat_dim(1, g)
        .reshape([n, 1, 1, 1])
        .repeat_dim(2, hh)
        .repeat_dim(3, ww);
    Tensor::cat(vec![h, s], 1)
}

/// A GAN's generator ready to sample.
#[derive(Debug)]
pub struct LoadedGan {
    pub config: GanConfig,
    pub generator: Generator,
    /// Where it came from, for messages.
    pub source: String,
}

impl LoadedGan {
    /// Images for noise `z` `[n, z_dim]` and classes (untracked).
    pub fn generate(&self, z: Tensor<2>, labels: Option<&[usize]>) -> Tensor<4> {
        self.generator.forward(z, labels)
    }
}

/// Builds a GAN's generator from its config and the file's tensors.
pub fn build(
    config: GanConfig,
    tensors: &crate::weights::NamedTensors,
    what: &str,
    dev: &Device,
) -> Result<LoadedGan> {
    let least = config.min_generator_parameters();
    let generator = crate::model::build_network(config.validate(), least, tensors, what, || {
        Generator::new(&config, dev)
    })?;
    Ok(LoadedGan {
        config,
        generator,
        source: what.to_string(),
    })
}
