//! The denoiser: a DDPM-style U-Net (Ho et al. 2020, appendix B; Ronneberger et al. 2015)
//! with an optional learned class embedding for class-conditioned generation and
//! classifier-free guidance (Ho & Salimans 2022), or text conditioning as in Imagen (Saharia
//! et al. 2022): cross-attention to the frozen encoder's token states, the pooled sentence
//! embedding added to the timestep embedding, and a learned null text for guidance.

pub mod blocks;
pub mod config;

pub use config::UNetConfig;

use crate::kernels;
use anyhow::Result;
use blocks::{
    Attention, CrossAttention, Downsample, Norm, ResBlock, SinusoidSpec, TextContext,
    TimeEmbedding, Upsample, conv, group_norm,
};
use burn::module::{Module, Param};
use burn::nn::conv::Conv2d;
use burn::nn::{Embedding, EmbeddingConfig, GroupNorm, Linear, LinearConfig};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Int, Tensor, TensorData};

/// One resolution level of the encoder.
#[derive(Module, Debug)]
pub struct DownLevel {
    pub blocks: Vec<ResBlock>,
    pub attn: Vec<Option<Attention>>,
    pub cross: Vec<Option<CrossAttention>>,
    pub downsample: Option<Downsample>,
}

/// One resolution level of the decoder.
#[derive(Module, Debug)]
pub struct UpLevel {
    pub blocks: Vec<ResBlock>,
    pub attn: Vec<Option<Attention>>,
    pub cross: Vec<Option<CrossAttention>>,
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
    pub mid_cross: Option<CrossAttention>,
    pub mid2: ResBlock,
    pub up: Vec<UpLevel>,
    pub out_norm: GroupNorm,
    pub out_conv: Conv2d,
    /// Text models: the pooled sentence embedding into the timestep embedding.
    pub text_pool: Option<Linear>,
    /// Text models: the learned null text, one token `[1, D]` and its pooled vector `[1, D]`,
    /// which stands for the empty prompt (classifier-free guidance).
    pub null_tokens: Option<Param<Tensor<2>>>,
    pub null_pooled: Option<Param<Tensor<2>>>,
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
        let cross_at = |s: usize| {
            cfg.text_dim
                .filter(|_| cfg.cross_attention_resolutions.contains(&s))
        };
        let cross = |c: usize, d: usize| CrossAttention::new(c, d, cfg.heads(c), g, dev);

        let mut skip_ch = vec![cfg.base_channels];
        let mut ch = cfg.base_channels;
        let mut down = Vec::new();
        for (lvl, &c) in chans.iter().enumerate() {
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            let mut crosses = Vec::new();
            for _ in 0..cfg.num_res_blocks {
                blocks.push(rb(ch, c));
                attns.push(attn_at(sizes[lvl]).then(|| attn(c)));
                crosses.push(cross_at(sizes[lvl]).map(|d| cross(c, d)));
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
                cross: crosses,
                downsample,
            });
        }
        let mid1 = rb(ch, ch);
        let mid_attn = cfg.mid_attention.then(|| attn(ch));
        let mid_cross = cross_at(sizes[sizes.len() - 1])
            .filter(|_| cfg.mid_attention)
            .map(|d| cross(ch, d));
        let mid2 = rb(ch, ch);
        let mut up = Vec::new();
        for (lvl, &c) in chans.iter().enumerate().rev() {
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            let mut crosses = Vec::new();
            for _ in 0..=cfg.num_res_blocks {
                let s = skip_ch.pop().expect("one skip per decoder block");
                blocks.push(rb(ch + s, c));
                attns.push(attn_at(sizes[lvl]).then(|| attn(c)));
                crosses.push(cross_at(sizes[lvl]).map(|d| cross(c, d)));
                ch = c;
            }
            let upsample = (lvl > 0).then(|| Upsample::new(ch, dev));
            up.push(UpLevel {
                blocks,
                attn: attns,
                cross: crosses,
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
            stem: conv(
                cfg.in_channels + cfg.cond_channels,
                cfg.base_channels,
                3,
                1,
                false,
                dev,
            ),
            down,
            mid1,
            mid_attn,
            mid_cross,
            mid2,
            up,
            out_norm: group_norm(g, ch, dev),
            out_conv: conv(ch, cfg.out_channels, 3, 1, true, dev),
            text_pool: cfg.text_dim.map(|d| LinearConfig::new(d, temb).init(dev)),
            null_tokens: cfg
                .text_dim
                .map(|d| Param::from_tensor(Tensor::zeros([1, d], dev))),
            null_pooled: cfg
                .text_dim
                .map(|d| Param::from_tensor(Tensor::zeros([1, d], dev))),
        })
    }

    /// Predicts the model output for noisy images `x` `[B,C,H,W]` at timesteps `t` (one per
    /// item). `class` holds one label per item for a conditioned model, where the label equal
    /// to `num_classes` is the learned null class used for classifier-free guidance.
    pub fn forward(&self, x: Tensor<4>, t: &[f64], class: Option<&[usize]>) -> Tensor<4> {
        self.forward_cond(x, t, class.map_or(Cond::None, Cond::Class))
    }

    /// The text conditioning of a batch with the learned null text put in where `null` says
    /// (or everywhere, for `None`): token states, mask, pooled vectors. Null items get the null
    /// token at position 0 (mask 1) and padding after it.
    fn text_inputs(
        &self,
        text: Option<&TextCond>,
        b: usize,
        dev: &Device,
    ) -> Option<(Tensor<3>, Tensor<2>, Tensor<2>)> {
        let (nt, np) = (
            self.null_tokens.as_ref()?.val(),
            self.null_pooled.as_ref()?.val(),
        );
        let d = nt.dims()[1];
        let Some(tc) = text else {
            let tokens = nt.unsqueeze::<3>().repeat_dim(0, b);
            return Some((tokens, Tensor::ones([b, 1], dev), np.repeat_dim(0, b)));
        };
        let [_, l, _] = tc.tokens.dims();
        let keep: Vec<f32> = tc.null.iter().map(|&n| if n { 0.0 } else { 1.0 }).collect();
        let keep = Tensor::<1>::from_data(TensorData::new(keep, [b]), dev);
        let drop = keep.clone().neg() + 1.0;
        let null_seq = if l > 1 {
            Tensor::cat(vec![nt, Tensor::zeros([l - 1, d], dev)], 0)
        } else {
            nt
        };
        let mut null_mask = vec![0f32; l];
        null_mask[0] = 1.0;
        let null_mask = Tensor::<2>::from_data(TensorData::new(null_mask, [1, l]), dev);
        let k3 = keep.clone().reshape([b, 1, 1]);
        let d3 = drop.clone().reshape([b, 1, 1]);
        let k2 = keep.reshape([b, 1]);
        let d2 = drop.reshape([b, 1]);
        let tokens = tc.tokens.clone() * k3 + null_seq.unsqueeze::<3>() * d3;
        let mask = tc.mask.clone() * k2.clone() + null_mask * d2.clone();
        let pooled = tc.pooled.clone() * k2 + np * d2;
        Some((tokens, mask, pooled))
    }

    /// [`UNet::forward`] with any conditioning.
    pub fn forward_cond(&self, x: Tensor<4>, t: &[f64], cond: Cond) -> Tensor<4> {
        let dev = x.device();
        let b = x.dims()[0];
        let mut temb = self.time.forward(t, &dev);
        if let (Some(emb), Cond::Class(labels)) = (&self.class_embed, &cond) {
            let ids: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [labels.len(), 1]), &dev);
            let e: Tensor<3> = emb.forward(ids);
            let [b, _, d] = e.dims();
            temb = temb + e.reshape([b, d]);
        }
        let text = match &cond {
            Cond::Text(tc) => Some(*tc),
            _ => None,
        };
        let ctx = self
            .text_inputs(text, b, &dev)
            .map(|(tokens, mask, pooled)| {
                if let Some(p) = &self.text_pool {
                    temb = temb.clone() + p.forward(pooled);
                }
                let l = mask.dims()[1];
                TextContext {
                    tokens,
                    bias: (mask - 1.0).mul_scalar(1e9).reshape([b, 1, 1, l]),
                }
            });
        let cross = |c: &Option<CrossAttention>, h: Tensor<4>| match (c, &ctx) {
            (Some(c), Some(ctx)) => c.forward(h, ctx),
            _ => h,
        };
        let ta = silu(temb);

        let mut h = kernels::conv2d(&self.stem, x);
        let mut skips = vec![h.clone()];
        for level in &self.down {
            for ((block, attn), cr) in level.blocks.iter().zip(&level.attn).zip(&level.cross) {
                h = block.forward(h, ta.clone());
                if let Some(a) = attn {
                    h = a.forward(h);
                }
                h = cross(cr, h);
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
        h = cross(&self.mid_cross, h);
        h = self.mid2.forward(h, ta.clone());
        for level in &self.up {
            for ((block, attn), cr) in level.blocks.iter().zip(&level.attn).zip(&level.cross) {
                let s = skips.pop().expect("one skip per decoder block");
                h = block.forward(Tensor::cat(vec![h, s], 1), ta.clone());
                if let Some(a) = attn {
                    h = a.forward(h);
                }
                h = cross(cr, h);
            }
            if let Some(u) = &level.upsample {
                let [_, _, sh, sw] = skips.last().expect("skip for next level").dims();
                h = u.forward(h, [sh, sw]);
            }
        }
        kernels::conv2d(&self.out_conv, kernels::group_norm(&self.out_norm, h, true))
    }
}

/// Encoded prompts for a batch (from [`crate::conditioning::text::TextEncoder::encode`]) and
/// which items use the null text instead (empty prompts, prompt dropout, the unconditional
/// half of guidance).
#[derive(Clone, Debug)]
pub struct TextCond {
    /// `[B, L, D]`.
    pub tokens: Tensor<3>,
    /// `[B, L]`, 1 for real tokens.
    pub mask: Tensor<2>,
    /// `[B, D]`.
    pub pooled: Tensor<2>,
    /// Per item: use the learned null text.
    pub null: Vec<bool>,
}

impl TextCond {
    /// `a` then `b` as one batch, the shorter token sequences padded (mask 0).
    pub fn cat(a: &TextCond, b: &TextCond) -> TextCond {
        let pad = |t: &TextCond, l: usize| -> (Tensor<3>, Tensor<2>) {
            let [n, lt, d] = t.tokens.dims();
            if lt == l {
                return (t.tokens.clone(), t.mask.clone());
            }
            let dev = t.tokens.device();
            (
                Tensor::cat(
                    vec![t.tokens.clone(), Tensor::zeros([n, l - lt, d], &dev)],
                    1,
                ),
                Tensor::cat(vec![t.mask.clone(), Tensor::zeros([n, l - lt], &dev)], 1),
            )
        };
        let l = a.tokens.dims()[1].max(b.tokens.dims()[1]);
        let ((ta, ma), (tb, mb)) = (pad(a, l), pad(b, l));
        TextCond {
            tokens: Tensor::cat(vec![ta, tb], 0),
            mask: Tensor::cat(vec![ma, mb], 0),
            pooled: Tensor::cat(vec![a.pooled.clone(), b.pooled.clone()], 0),
            null: a.null.iter().chain(&b.null).copied().collect(),
        }
    }

    /// The same batch on `device`.
    pub fn to_device(&self, device: &Device) -> TextCond {
        let mv3 = |t: &Tensor<3>| Tensor::<3>::from_data(t.to_data(), device);
        let mv2 = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), device);
        TextCond {
            tokens: mv3(&self.tokens),
            mask: mv2(&self.mask),
            pooled: mv2(&self.pooled),
            null: self.null.clone(),
        }
    }

    /// Items `lo..lo + len`.
    pub fn rows(&self, lo: usize, len: usize) -> TextCond {
        if lo == 0 && len == self.null.len() {
            return self.clone();
        }
        TextCond {
            tokens: self.tokens.clone().narrow(0, lo, len),
            mask: self.mask.clone().narrow(0, lo, len),
            pooled: self.pooled.clone().narrow(0, lo, len),
            null: self.null[lo..lo + len].to_vec(),
        }
    }

    /// Every item marked null (the unconditional half of guidance).
    pub fn as_null(&self) -> TextCond {
        TextCond {
            null: vec![true; self.null.len()],
            ..self.clone()
        }
    }
}

/// What a forward pass is conditioned on.
#[derive(Clone, Copy, Debug)]
pub enum Cond<'a> {
    /// Nothing (a text model then sees the null text; a class model no class embedding).
    None,
    /// One label per item (`num_classes` = the null class).
    Class(&'a [usize]),
    /// Prompts.
    Text(&'a TextCond),
}
