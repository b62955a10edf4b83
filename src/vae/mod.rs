//! The variational autoencoder of latent diffusion (Kingma & Welling 2014; the KL-regularised
//! autoencoder of Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
//! Models", section 3 and appendix G): a convolutional encoder maps an image to a diagonal
//! Gaussian over a latent of `latent_channels` at `1 / 2^(levels-1)` of the resolution, a
//! decoder maps latents back to images.
//!
//! The layout is diffusers' `AutoencoderKL` (residual blocks, one self-attention block in the
//! middle, `quant_conv` / `post_quant_conv`), with the same configuration keys and tensor names,
//! so a diffusers `AutoencoderKL` folder (`config.json` + `diffusion_pytorch_model.safetensors`)
//! loads here and a folder written here loads in diffusers.

pub mod generator;

use crate::data::Dataset;
use crate::kernels;
use crate::unet::blocks::{Downsample, Norm, Upsample, conv, group_norm};
use crate::weights::{self, NamedTensors, StoreDtype};
use anyhow::{Context, Result, anyhow, bail};
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// GroupNorm `eps` of every normalisation in the autoencoder (diffusers' `Encoder`/`Decoder`).
pub const VAE_NORM_EPS: f64 = 1e-6;
/// Bounds on the log-variance (diffusers' `DiagonalGaussianDistribution`).
pub const LOGVAR_RANGE: (f32, f32) = (-30.0, 20.0);
/// The config file of a VAE folder.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file of a VAE folder.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

fn default_class() -> String {
    "AutoencoderKL".into()
}
fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}
fn groups() -> usize {
    32
}
fn sd_scale() -> f64 {
    0.18215
}

/// An `AutoencoderKL` configuration, with diffusers' keys and defaults (unknown keys in a
/// diffusers `config.json` are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(rename = "_class_name", default = "default_class")]
    pub class_name: String,
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    /// `DownEncoderBlock2D` per level.
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// `UpDecoderBlock2D` per level.
    #[serde(default)]
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: usize,
    /// Latents are scaled by this before diffusion (`z' = (z - shift) * scale`), so that they
    /// have about unit variance (Rombach et al. 2022, section 4.3.2 and appendix G).
    #[serde(default = "sd_scale")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    /// A small autoencoder for `channels` x `size` x `size` images: levels of `widths`
    /// channels (each after the first halves the resolution), `latent` latent channels.
    pub fn small(channels: usize, size: usize, widths: &[usize], latent: usize) -> Self {
        let n = widths.len();
        Self {
            class_name: default_class(),
            in_channels: channels,
            out_channels: channels,
            down_block_types: vec!["DownEncoderBlock2D".into(); n],
            up_block_types: vec!["UpDecoderBlock2D".into(); n],
            block_out_channels: widths.to_vec(),
            layers_per_block: 1,
            act_fn: silu(),
            latent_channels: latent,
            norm_num_groups: widths.iter().copied().fold(32, gcd).min(32),
            sample_size: size,
            scaling_factor: 1.0,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }

    /// How many times smaller each side of the latent is than the image.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    /// `[C, h, w]` of the latent of a `size` x `size` image.
    pub fn latent_shape(&self, size: usize) -> [usize; 3] {
        let s = size.div_ceil(self.downscale());
        [self.latent_channels, s, s]
    }

    pub fn validate(&self) -> Result<()> {
        if self.class_name != "AutoencoderKL" {
            bail!(
                "_class_name is '{}'; only AutoencoderKL is supported",
                self.class_name
            );
        }
        let n = self.block_out_channels.len();
        if !(1..=6).contains(&n) {
            bail!("block_out_channels must have 1 to 6 entries (got {n})");
        }
        for (key, types, want) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n {
                bail!(
                    "{key} has {} entries but block_out_channels has {n}",
                    types.len()
                );
            }
            if let Some(t) = types.iter().find(|t| *t != want) {
                bail!("{key} holds '{t}'; only {want} is supported");
            }
        }
        if self.act_fn != "silu" {
            bail!("act_fn '{}' is not supported (only silu)", self.act_fn);
        }
        if !(1..=16).contains(&self.in_channels) || !(1..=16).contains(&self.out_channels) {
            bail!("in_channels and out_channels must be between 1 and 16");
        }
        if !(1..=64).contains(&self.latent_channels) {
            bail!("latent_channels must be between 1 and 64");
        }
        if !(1..=8).contains(&self.layers_per_block) {
            bail!("layers_per_block must be between 1 and 8");
        }
        if self.norm_num_groups == 0 {
            bail!("norm_num_groups must be positive");
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || c > 2048 || c % self.norm_num_groups != 0)
        {
            bail!(
                "block_out_channels entry {c} is not a positive multiple of norm_num_groups {} (at most 2048)",
                self.norm_num_groups
            );
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            bail!("scaling_factor must be positive");
        }
        Ok(())
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// diffusers' `ResnetBlock2D` without a time embedding:
/// `out = skip(x) + conv2(SiLU(GN(conv1(SiLU(GN(x))))))`, `skip` a 1x1 convolution when the
/// channel count changes (He et al. 2016, with GroupNorm and SiLU as in DDPM).
#[derive(Module, Debug)]
pub struct Resnet {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl Resnet {
    fn new(cin: usize, cout: usize, groups: usize, dev: &Device) -> Self {
        let n = Norm {
            groups,
            eps: VAE_NORM_EPS,
        };
        Self {
            norm1: group_norm(n, cin, dev),
            conv1: conv(cin, cout, 3, 1, false, dev),
            norm2: group_norm(n, cout, dev),
            conv2: conv(cout, cout, 3, 1, false, dev),
            conv_shortcut: (cin != cout).then(|| conv(cin, cout, 1, 1, false, dev)),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = kernels::conv2d(
            &self.conv1,
            kernels::group_norm(&self.norm1, x.clone(), true),
        );
        let h = kernels::conv2d(&self.conv2, kernels::group_norm(&self.norm2, h, true));
        let s = match &self.conv_shortcut {
            Some(c) => kernels::conv2d(c, x),
            None => x,
        };
        s + h
    }
}

/// Single-head self-attention over pixels, diffusers' `Attention` as the autoencoder's middle
/// block uses it: `h = GN(x)` as `[B, HW, C]`, `out = x + W_o softmax(Q K^T / sqrt(C)) V`
/// with `Q, K, V` linear maps of `h` (Vaswani et al. 2017, eq. 1).
#[derive(Module, Debug)]
pub struct SelfAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Vec<Linear>,
}

impl SelfAttention {
    fn new(c: usize, groups: usize, dev: &Device) -> Self {
        let lin = || LinearConfig::new(c, c).init(dev);
        Self {
            group_norm: group_norm(
                Norm {
                    groups,
                    eps: VAE_NORM_EPS,
                },
                c,
                dev,
            ),
            to_q: lin(),
            to_k: lin(),
            to_v: lin(),
            to_out: vec![lin()],
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, hh, ww] = x.dims();
        let h: Tensor<3> = kernels::group_norm(&self.group_norm, x.clone(), false)
            .reshape([b, c, hh * ww])
            .swap_dims(1, 2);
        let q = self.to_q.forward(h.clone());
        let k = self.to_k.forward(h.clone());
        let v = self.to_v.forward(h);
        let scores = q.matmul(k.swap_dims(1, 2)).div_scalar((c as f32).sqrt());
        let out = self.to_out[0].forward(softmax(scores, 2).matmul(v));
        x + out.swap_dims(1, 2).reshape([b, c, hh, ww])
    }
}

/// diffusers' `UNetMidBlock2D` without a time embedding: resnet, attention, resnet.
#[derive(Module, Debug)]
pub struct MidBlock {
    pub resnets: Vec<Resnet>,
    pub attentions: Vec<SelfAttention>,
}

impl MidBlock {
    fn new(c: usize, groups: usize, attention: bool, dev: &Device) -> Self {
        Self {
            resnets: vec![
                Resnet::new(c, c, groups, dev),
                Resnet::new(c, c, groups, dev),
            ],
            attentions: if attention {
                vec![SelfAttention::new(c, groups, dev)]
            } else {
                vec![]
            },
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = self.resnets[0].forward(x);
        if let Some(a) = self.attentions.first() {
            h = a.forward(h);
        }
        self.resnets[1].forward(h)
    }
}

/// `DownEncoderBlock2D`: residual blocks, then (except at the last level) a stride-2
/// convolution padded on the bottom and right only.
#[derive(Module, Debug)]
pub struct DownBlock {
    pub resnets: Vec<Resnet>,
    pub downsamplers: Vec<Downsample>,
}

/// `UpDecoderBlock2D`: `layers_per_block + 1` residual blocks, then (except at the last level)
/// a nearest-neighbour 2x upsampling and a 3x3 convolution.
#[derive(Module, Debug)]
pub struct UpBlock {
    pub resnets: Vec<Resnet>,
    pub upsamplers: Vec<Upsample>,
}

/// Image to the parameters of the posterior: `[B, 2 L, h, w]` (means, then log-variances).
#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

/// Latent to image.
#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

/// The autoencoder.
#[derive(Module, Debug)]
pub struct Vae {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
}

/// A diagonal Gaussian posterior `q(z | x) = N(mean, exp(logvar))` (Kingma & Welling 2014,
/// section 2.4), `logvar` clamped to [`LOGVAR_RANGE`].
#[derive(Clone, Debug)]
pub struct Posterior {
    pub mean: Tensor<4>,
    pub logvar: Tensor<4>,
}

impl Posterior {
    /// `z = mean + exp(logvar / 2) * eps` (the reparameterisation trick, Kingma & Welling
    /// 2014, eq. 10), with `eps` given.
    pub fn sample(&self, eps: Tensor<4>) -> Tensor<4> {
        self.mean.clone() + self.logvar.clone().mul_scalar(0.5).exp() * eps
    }

    /// `KL(q || N(0, I))` per image: `0.5 sum(mean^2 + var - 1 - logvar)` (Kingma & Welling
    /// 2014, appendix B), as `[B]`.
    pub fn kl(&self) -> Tensor<1> {
        let b = self.mean.dims()[0];
        let per =
            self.mean.clone().square() + self.logvar.clone().exp() - self.logvar.clone() - 1.0;
        per.reshape([b as i32, -1])
            .sum_dim(1)
            .mul_scalar(0.5)
            .reshape([b])
    }
}

impl Vae {
    pub fn new(cfg: &VaeConfig, dev: &Device) -> Result<Self> {
        cfg.validate()?;
        let g = cfg.norm_num_groups;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let top = boc[n - 1];
        let mut down_blocks = Vec::new();
        let mut ch = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let resnets = (0..cfg.layers_per_block)
                .map(|j| Resnet::new(if j == 0 { ch } else { c }, c, g, dev))
                .collect();
            ch = c;
            let downsamplers = if i + 1 < n {
                vec![Downsample::new(c, 0, dev)]
            } else {
                vec![]
            };
            down_blocks.push(DownBlock {
                resnets,
                downsamplers,
            });
        }
        let norm = |c| {
            group_norm(
                Norm {
                    groups: g,
                    eps: VAE_NORM_EPS,
                },
                c,
                dev,
            )
        };
        let l = cfg.latent_channels;
        let encoder = Encoder {
            conv_in: conv(cfg.in_channels, boc[0], 3, 1, false, dev),
            down_blocks,
            mid_block: MidBlock::new(top, g, cfg.mid_block_add_attention, dev),
            conv_norm_out: norm(top),
            conv_out: conv(top, 2 * l, 3, 1, false, dev),
        };
        let mut up_blocks = Vec::new();
        let mut prev = top;
        for (i, &c) in boc.iter().rev().enumerate() {
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| Resnet::new(if j == 0 { prev } else { c }, c, g, dev))
                .collect();
            prev = c;
            let upsamplers = if i + 1 < n {
                vec![Upsample::new(c, dev)]
            } else {
                vec![]
            };
            up_blocks.push(UpBlock {
                resnets,
                upsamplers,
            });
        }
        let decoder = Decoder {
            conv_in: conv(l, top, 3, 1, false, dev),
            mid_block: MidBlock::new(top, g, cfg.mid_block_add_attention, dev),
            up_blocks,
            conv_norm_out: norm(boc[0]),
            conv_out: conv(boc[0], cfg.out_channels, 3, 1, false, dev),
        };
        Ok(Self {
            encoder,
            decoder,
            quant_conv: cfg
                .use_quant_conv
                .then(|| conv(2 * l, 2 * l, 1, 1, false, dev)),
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| conv(l, l, 1, 1, false, dev)),
        })
    }

    /// Images in `[-1, 1]`, `[B, C, H, W]`, to the posterior over latents.
    pub fn encode(&self, x: Tensor<4>) -> Posterior {
        let e = &self.encoder;
        let mut h = kernels::conv2d(&e.conv_in, x);
        for blk in &e.down_blocks {
            for r in &blk.resnets {
                h = r.forward(h);
            }
            for d in &blk.downsamplers {
                h = d.forward(h);
            }
        }
        h = e.mid_block.forward(h);
        h = kernels::conv2d(&e.conv_out, kernels::group_norm(&e.conv_norm_out, h, true));
        if let Some(q) = &self.quant_conv {
            h = kernels::conv2d(q, h);
        }
        let l = h.dims()[1] / 2;
        let mean = h.clone().narrow(1, 0, l);
        let logvar = h.narrow(1, l, l).clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1);
        Posterior { mean, logvar }
    }

    /// Latents `[B, L, h, w]` (unscaled) to images.
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        let d = &self.decoder;
        let mut h = match &self.post_quant_conv {
            Some(p) => kernels::conv2d(p, z),
            None => z,
        };
        h = kernels::conv2d(&d.conv_in, h);
        h = d.mid_block.forward(h);
        for blk in &d.up_blocks {
            for r in &blk.resnets {
                h = r.forward(h);
            }
            for u in &blk.upsamplers {
                let [_, _, hh, ww] = h.dims();
                h = u.forward(h, [2 * hh, 2 * ww]);
            }
        }
        kernels::conv2d(&d.conv_out, kernels::group_norm(&d.conv_norm_out, h, true))
    }
}

/// Our parameter names and layouts to diffusers' (PyTorch's): GroupNorm `gamma`/`beta` are
/// `weight`/`bias`, and linear weights are stored `[out, in]` (burn keeps `[in, out]`).
pub fn to_diffusers_names(ours: &NamedTensors) -> NamedTensors {
    ours.iter()
        .map(|(name, t)| {
            let name = diffusers_key(name);
            let t = if t.shape.len() == 2 {
                weights::transpose(t)
            } else {
                t.clone()
            };
            (name, t)
        })
        .collect()
}

/// The inverse of [`to_diffusers_names`], for the parameters `module` has.
pub fn from_diffusers_names<M: Module>(module: &M, theirs: &NamedTensors) -> Result<NamedTensors> {
    let mut ours = NamedTensors::new();
    weights::collect(module, "", &mut ours);
    let mut out = NamedTensors::new();
    for (name, t) in &ours {
        let key = diffusers_key(name);
        let Some(src) = theirs.get(&key) else {
            bail!("tensor '{key}' is missing");
        };
        let src = if t.shape.len() == 2 {
            weights::transpose(src)
        } else {
            src.clone()
        };
        out.insert(name.clone(), src);
    }
    Ok(out)
}

/// A parameter path in diffusers' (PyTorch's) naming: GroupNorm `gamma`/`beta` become
/// `weight`/`bias`.
fn diffusers_key(name: &str) -> String {
    rename_leaf(name, "gamma", "weight")
        .or_else(|| rename_leaf(name, "beta", "bias"))
        .unwrap_or_else(|| name.to_string())
}

fn rename_leaf(name: &str, from: &str, to: &str) -> Option<String> {
    name.strip_suffix(from)
        .filter(|p| p.ends_with('.'))
        .map(|p| format!("{p}{to}"))
}

/// An autoencoder with its configuration.
#[derive(Clone, Debug)]
pub struct LoadedVae {
    pub config: VaeConfig,
    pub vae: Vae,
    pub source: String,
}

impl LoadedVae {
    /// Images in `[-1, 1]` to scaled latents (`(mean - shift) * scale`; the posterior mean,
    /// deterministic).
    pub fn encode_scaled(&self, x: Tensor<4>) -> Tensor<4> {
        let mean = self.vae.encode(x).mean;
        self.scale(mean)
    }

    /// `(z - shift) * scale`.
    pub fn scale(&self, z: Tensor<4>) -> Tensor<4> {
        let shift = self.config.shift_factor.unwrap_or(0.0) as f32;
        (z - shift).mul_scalar(self.config.scaling_factor as f32)
    }

    /// Scaled latents back to images: `decode(z / scale + shift)`.
    pub fn decode_scaled(&self, z: Tensor<4>) -> Tensor<4> {
        let shift = self.config.shift_factor.unwrap_or(0.0) as f32;
        let z = z.div_scalar(self.config.scaling_factor as f32) + shift;
        self.vae.decode(z)
    }

    /// The weights in diffusers' names.
    pub fn tensors(&self) -> NamedTensors {
        let mut ours = NamedTensors::new();
        weights::collect(&self.vae, "", &mut ours);
        to_diffusers_names(&ours)
    }
}

/// Builds an autoencoder from its config and tensors in diffusers' names (`prefix` in front).
pub fn build(
    config: VaeConfig,
    theirs: &NamedTensors,
    prefix: &str,
    what: &str,
    dev: &Device,
) -> Result<LoadedVae> {
    let vae = Vae::new(&config, dev).with_context(|| format!("{what}: invalid VAE config"))?;
    let stripped: NamedTensors;
    let theirs = if prefix.is_empty() {
        theirs
    } else {
        stripped = theirs
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
            .collect();
        &stripped
    };
    let ours = from_diffusers_names(&vae, theirs)
        .map_err(|e| anyhow!("{what} does not match its config: {e}"))?;
    let vae = weights::apply(vae, &ours, "")
        .map_err(|e| anyhow!("{what} does not match its config: {e}"))?;
    Ok(LoadedVae {
        config,
        vae,
        source: what.to_string(),
    })
}

/// The folder a VAE spec names (a pipeline folder's `vae/` when given the pipeline) and its
/// validated `config.json`.
pub fn read_config(dir: &Path) -> Result<(PathBuf, VaeConfig)> {
    let dir: PathBuf =
        if dir.join("vae").join(CONFIG_FILE).exists() && !dir.join(CONFIG_FILE).exists() {
            dir.join("vae")
        } else {
            dir.to_path_buf()
        };
    let cfg_path = dir.join(CONFIG_FILE);
    if dir.is_file() {
        bail!(
            "{} is a file; a VAE is a folder (diffuse train-vae output or a diffusers AutoencoderKL); a model of the VAE family (diffuse train --family vae) is a generator, not an autoencoder for latent diffusion",
            dir.display()
        );
    }
    if !dir.is_dir() {
        bail!("VAE folder {} does not exist", dir.display());
    }
    let text = std::fs::read_to_string(&cfg_path).with_context(|| {
        format!(
            "{} has no {CONFIG_FILE} (a VAE folder: train one with `diffuse train-vae --out {}`)",
            dir.display(),
            dir.display()
        )
    })?;
    let config: VaeConfig = serde_json::from_str(&text).map_err(|e| {
        let run = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .is_some_and(|v| v.get("model").is_some() && v.get("train").is_some());
        if run {
            anyhow!(
                "{} is a diffuse train run, not an autoencoder: a VAE here is a diffuse train-vae folder or a diffusers AutoencoderKL (a --family vae run is a generator)",
                dir.display()
            )
        } else {
            anyhow!("{}: not an AutoencoderKL config ({e})", cfg_path.display())
        }
    })?;
    config
        .validate()
        .with_context(|| format!("{}", cfg_path.display()))?;
    Ok((dir, config))
}

/// Reads a VAE folder: `config.json` and `diffusion_pytorch_model.safetensors`, as diffusers'
/// `AutoencoderKL.save_pretrained` writes them (a pipeline folder's `vae/` also works).
pub fn load(dir: &Path, dev: &Device) -> Result<LoadedVae> {
    let (dir, config) = read_config(dir)?;
    let wpath = dir.join(WEIGHTS_FILE);
    let bytes =
        std::fs::read(&wpath).with_context(|| format!("cannot read {}", wpath.display()))?;
    let what = wpath.display().to_string();
    let (tensors, _) = weights::from_safetensors(&bytes, &what)?;
    build(config, &tensors, "", &what, dev)
}

/// Visits the posteriors of the first `n` images of `ds`, encoded in batches of 64 on `dev`.
pub fn encode_images(
    vae: &Vae,
    ds: &Dataset,
    n: usize,
    dev: &Device,
    f: &mut dyn FnMut(Posterior),
) {
    let n = n.min(ds.len());
    for start in (0..n).step_by(64) {
        let b = (n - start).min(64);
        let mut imgs = Vec::with_capacity(b * ds.image_len());
        for i in start..start + b {
            imgs.extend(ds.image(i).iter().map(|&p| p as f32 / 127.5 - 1.0));
        }
        let x = Tensor::<4>::from_data(
            TensorData::new(imgs, [b, ds.channels, ds.size, ds.size]),
            dev,
        );
        f(vae.encode(x));
    }
}

/// Writes a VAE folder (config and weights, each atomically).
pub fn save(v: &LoadedVae, dir: &Path, dtype: StoreDtype) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cfg = serde_json::to_value(&v.config)?;
    cfg["_diffusers_version"] = serde_json::Value::String("0.42.1".into());
    crate::files::write_atomic(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    let bytes = weights::to_safetensors(&v.tensors(), &HashMap::new(), dtype)?;
    crate::files::write_atomic(&dir.join(WEIGHTS_FILE), &bytes)
}
