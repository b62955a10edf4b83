//! The denoiser: a DDPM-style U-Net (Ho et al. 2020, appendix B; Ronneberger et al. 2015)
//! with an optional learned class embedding for class-conditioned generation and
//! classifier-free guidance (Ho & Salimans 2022).

pub mod blocks;
pub mod config;

pub use config::UNetConfig;

use crate::kernels;
use anyhow::Result;
use blocks::{
    Attention, Downsample, Norm, ResBlock, SinusoidSpec, TimeEmbedding, Upsample, conv, group_norm,
};
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{Embedding, EmbeddingConfig, GroupNorm};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Int, Tensor, TensorData};

/// One resolution level of the encoder.
#[derive(Module, Debug)]
pub struct DownLevel {
    pub blocks: Vec<ResBlock>,
    pub attn: Vec<Option<Attention>>,
    pub downsample: Option<Downsample>,
}

/// One resolution level of the decoder.
#[derive(Module, Debug)]
pub struct UpLevel {
    pub blocks: Vec<ResBlock>,
    pub attn: Vec<Option<Attention>>,
    pub upsample: Option<Upsample>,
}

/// The noise-predicting U-Net.
#[derive(Module, Debug)]
pub struct UNet {
    pub time: TimeEmbedding,
    pub class_embed: Option<Embedding>,
    pub stem: Conv2d,
    pub down: Vec<DownLevel>,
    pub mid1: ResBlock,
    pub mid_attn: Option<Attention>,
    pub mid2: ResBlock,
    pub up: Vec<UpLevel>,
    pub out_norm: GroupNorm,
    pub out_conv: Conv2d,
}

impl UNet {
    /// Builds the network for a validated configuration. Weights are initialised from the
    /// device's generator (seed it with `Device::seed` first for reproducible weights).
    pub fn new(cfg: &UNetConfig, dev: &Device) -> Result<Self> {
        cfg.validate()?;
        let g = Norm {
            groups: cfg.norm_groups,
            eps: cfg.norm_eps,
        };
        let temb = cfg.time_embed_dim();
        let sizes = cfg.level_sizes();
        let chans = cfg.level_channels();
        let rb = |a, b| ResBlock::new(a, b, temb, g, cfg.dropout, true, dev);
        let attn_at = |s: usize| cfg.attention_resolutions.contains(&s);
        let attn = |c: usize| Attention::new(c, cfg.heads(c), g, true, dev);

        let mut skip_ch = vec![cfg.base_channels];
        let mut ch = cfg.base_channels;
        let mut down = Vec::new();
        for (lvl, &c) in chans.iter().enumerate() {
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for _ in 0..cfg.num_res_blocks {
                blocks.push(rb(ch, c));
                attns.push(attn_at(sizes[lvl]).then(|| attn(c)));
                ch = c;
                skip_ch.push(ch);
            }
            let downsample =
                (lvl + 1 < chans.len()).then(|| Downsample::new(ch, cfg.downsample_padding, dev));
            if downsample.is_some() {
                skip_ch.push(ch);
            }
            down.push(DownLevel {
                blocks,
                attn: attns,
                downsample,
            });
        }
        let mid1 = rb(ch, ch);
        let mid_attn = cfg.mid_attention.then(|| attn(ch));
        let mid2 = rb(ch, ch);
        let mut up = Vec::new();
        for (lvl, &c) in chans.iter().enumerate().rev() {
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for _ in 0..=cfg.num_res_blocks {
                let s = skip_ch.pop().expect("one skip per decoder block");
                blocks.push(rb(ch + s, c));
                attns.push(attn_at(sizes[lvl]).then(|| attn(c)));
                ch = c;
            }
            let upsample = (lvl > 0).then(|| Upsample::new(ch, dev));
            up.push(UpLevel {
                blocks,
                attn: attns,
                upsample,
            });
        }
        Ok(Self {
            time: TimeEmbedding::new(
                cfg.base_channels,
                temb,
                SinusoidSpec {
                    flip: cfg.flip_sin_to_cos,
                    shift: cfg.freq_shift,
                },
                dev,
            ),
            class_embed: cfg
                .num_classes
                .map(|n| EmbeddingConfig::new(n + 1, temb).init(dev)),
            stem: conv(cfg.in_channels, cfg.base_channels, 3, 1, false, dev),
            down,
            mid1,
            mid_attn,
            mid2,
            up,
            out_norm: group_norm(g, ch, dev),
            out_conv: conv(ch, cfg.out_channels, 3, 1, true, dev),
        })
    }

    /// Predicts the model output for noisy images `x` `[B,C,H,W]` at timesteps `t` (one per
    /// item). `class` holds one label per item for a conditioned model, where the label equal
    /// to `num_classes` is the learned null class used for classifier-free guidance.
    pub fn forward(&self, x: Tensor<4>, t: &[f64], class: Option<&[usize]>) -> Tensor<4> {
        let dev = x.device();
        let mut temb = self.time.forward(t, &dev);
        if let (Some(emb), Some(labels)) = (&self.class_embed, class) {
            let ids: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [labels.len(), 1]), &dev);
            let e: Tensor<3> = emb.forward(ids);
            let [b, _, d] = e.dims();
            temb = temb + e.reshape([b, d]);
        }
        let ta = silu(temb);

        let mut h = kernels::conv2d(&self.stem, x);
        let mut skips = vec![h.clone()];
        for level in &self.down {
            for (block, attn) in level.blocks.iter().zip(&level.attn) {
                h = block.forward(h, ta.clone());
                if let Some(a) = attn {
                    h = a.forward(h);
                }
                skips.push(h.clone());
            }
            if let Some(d) = &level.downsample {
                h = d.forward(h);
                skips.push(h.clone());
            }
        }
        h = self.mid1.forward(h, ta.clone());
        if let Some(a) = &self.mid_attn {
            h = a.forward(h);
        }
        h = self.mid2.forward(h, ta.clone());
        for level in &self.up {
            for (block, attn) in level.blocks.iter().zip(&level.attn) {
                let s = skips.pop().expect("one skip per decoder block");
                h = block.forward(Tensor::cat(vec![h, s], 1), ta.clone());
                if let Some(a) = attn {
                    h = a.forward(h);
                }
            }
            if let Some(u) = &level.upsample {
                let [_, _, sh, sw] = skips.last().expect("skip for next level").dims();
                h = u.forward(h, [sh, sw]);
            }
        }
        kernels::conv2d(&self.out_conv, kernels::group_norm(&self.out_norm, h, true))
    }
}
