//! Building blocks of the denoiser: timestep embedding, residual block, self-attention,
//! cross-attention to text tokens, down- and upsampling. Each pairs with a small constructor, as burn's own layers do.

use crate::kernels;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::interpolate::{Interpolate2dConfig, InterpolateMode};
use burn::nn::{
    Dropout, DropoutConfig, GroupNorm, GroupNormConfig, Initializer, Linear, LinearConfig,
    PaddingConfig2d,
};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Device, Tensor, TensorData};

/// A `k x k` convolution with "same" padding and the given stride; `zero` initialises it to 0
/// (used for the last layer of residual branches, so each block starts as the identity).
pub fn conv(cin: usize, cout: usize, k: usize, stride: usize, zero: bool, dev: &Device) -> Conv2d {
    let p = k / 2;
    let mut c = Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p));
    if zero {
        c = c.with_initializer(Initializer::Zeros);
    }
    c.init(dev)
}

/// Group normalisation settings: groups and `eps`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Norm {
    pub groups: usize,
    pub eps: f64,
}

/// GroupNorm (Wu & He 2018) with affine parameters.
pub fn group_norm(norm: Norm, channels: usize, dev: &Device) -> GroupNorm {
    GroupNormConfig::new(norm.groups, channels)
        .with_epsilon(norm.eps)
        .init(dev)
}

/// How timesteps become sinusoids.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SinusoidSpec {
    /// Put the cosines first (diffusers' `flip_sin_to_cos`).
    pub flip: bool,
    /// `s` in the frequency denominator (diffusers' `freq_shift`; DDPM's code has 1).
    pub shift: f64,
}

/// Sinusoidal timestep embedding (Vaswani et al. 2017, section 3.5, as used by DDPM):
/// `emb(t) = [sin(t f_0) .. sin(t f_{h-1}), cos(t f_0) .. cos(t f_{h-1})]` (halves swapped
/// with `flip`), `f_i = exp(-ln(10000) i / (h - shift))`, `h = dim / 2`. Computed on the host,
/// with `t`, `f_i` and `t f_i` rounded to f32 as diffusers computes them (so that diffusers
/// models give diffusers' embedding to the last bit or so).
pub fn sinusoidal_embedding(t: &[f64], dim: usize, spec: SinusoidSpec, dev: &Device) -> Tensor<2> {
    let half = dim / 2;
    let mut out = Vec::with_capacity(t.len() * dim);
    let denom = (half as f64 - spec.shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-(10000f32.ln()) * i as f32) / denom).exp())
        .collect();
    for &ti in t {
        let args: Vec<f64> = freqs.iter().map(|f| (ti as f32 * f) as f64).collect();
        let sin = args.iter().map(|a| a.sin() as f32);
        let cos = args.iter().map(|a| a.cos() as f32);
        if spec.flip {
            out.extend(cos.chain(sin));
        } else {
            out.extend(sin.chain(cos));
        }
        out.extend(std::iter::repeat_n(0.0f32, dim - 2 * half));
    }
    Tensor::from_data(TensorData::new(out, [t.len(), dim]), dev)
}

/// MLP on the sinusoidal embedding: `Linear(d, e) -> SiLU -> Linear(e, e)`.
#[derive(Module, Debug)]
pub struct TimeEmbedding {
    pub sin_dim: usize,
    pub flip: bool,
    pub shift: f64,
    pub fc1: Linear,
    pub fc2: Linear,
}

impl TimeEmbedding {
    pub fn new(sin_dim: usize, embed_dim: usize, spec: SinusoidSpec, dev: &Device) -> Self {
        Self {
            sin_dim,
            flip: spec.flip,
            shift: spec.shift,
            fc1: LinearConfig::new(sin_dim, embed_dim).init(dev),
            fc2: LinearConfig::new(embed_dim, embed_dim).init(dev),
        }
    }

    /// `[B]` timesteps to `[B, embed_dim]`.
    pub fn forward(&self, t: &[f64], dev: &Device) -> Tensor<2> {
        let spec = SinusoidSpec {
            flip: self.flip,
            shift: self.shift,
        };
        let s = sinusoidal_embedding(t, self.sin_dim, spec, dev);
        self.fc2.forward(silu(self.fc1.forward(s)))
    }
}

/// Residual block (DDPM, appendix B, after Wide ResNet):
/// `h = conv(SiLU(GN(x)))`, `h += Linear(SiLU(temb))`, `h = conv(dropout(SiLU(GN(h))))`,
/// `out = h + skip(x)` with a 1x1 convolution as skip when the channel count changes.
/// The caller passes `SiLU(temb)`, computed once per forward pass.
#[derive(Module, Debug)]
pub struct ResBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_proj: Linear,
    pub norm2: GroupNorm,
    pub dropout: Dropout,
    pub conv2: Conv2d,
    pub skip: Option<Conv2d>,
}

impl ResBlock {
    pub fn new(
        cin: usize,
        cout: usize,
        temb_dim: usize,
        norm: Norm,
        dropout: f64,
        zero_last: bool,
        dev: &Device,
    ) -> Self {
        Self {
            norm1: group_norm(norm, cin, dev),
            conv1: conv(cin, cout, 3, 1, false, dev),
            time_proj: LinearConfig::new(temb_dim, cout).init(dev),
            norm2: group_norm(norm, cout, dev),
            dropout: DropoutConfig::new(dropout).init(),
            conv2: conv(cout, cout, 3, 1, zero_last, dev),
            skip: (cin != cout).then(|| conv(cin, cout, 1, 1, false, dev)),
        }
    }

    pub fn forward(&self, x: Tensor<4>, temb_act: Tensor<2>) -> Tensor<4> {
        let h = kernels::conv2d(
            &self.conv1,
            kernels::group_norm(&self.norm1, x.clone(), true),
        );
        let t: Tensor<4> = self.time_proj.forward(temb_act).unsqueeze_dims(&[2, 3]);
        let h = h + t;
        let h = kernels::group_norm(&self.norm2, h, true);
        let h = if self.dropout.prob > 0.0 {
            self.dropout.forward(h)
        } else {
            h
        };
        let h = kernels::conv2d(&self.conv2, h);
        let s = match &self.skip {
            Some(c) => kernels::conv2d(c, x),
            None => x,
        };
        h + s
    }
}

/// Multi-head self-attention over the pixels of a feature map (DDPM, appendix B, with heads as
/// in Vaswani et al. 2017): `h = GN(x)`, `q, k, v = 1x1 convs of h` split into `heads` groups of
/// `d = C / heads` channels, `A = softmax(q^T k / sqrt(d))` over keys per head,
/// `out = x + proj(v A^T)`.
#[derive(Module, Debug)]
pub struct Attention {
    pub heads: usize,
    pub norm: GroupNorm,
    pub q: Conv2d,
    pub k: Conv2d,
    pub v: Conv2d,
    pub proj: Conv2d,
}

impl Attention {
    pub fn new(channels: usize, heads: usize, norm: Norm, zero_proj: bool, dev: &Device) -> Self {
        Self {
            heads,
            norm: group_norm(norm, channels, dev),
            q: conv(channels, channels, 1, 1, false, dev),
            k: conv(channels, channels, 1, 1, false, dev),
            v: conv(channels, channels, 1, 1, false, dev),
            proj: conv(channels, channels, 1, 1, zero_proj, dev),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, hh, ww] = x.dims();
        let (nh, d, n) = (self.heads, c / self.heads, hh * ww);
        let h = kernels::group_norm(&self.norm, x.clone(), false);
        let q: Tensor<4> = kernels::conv2d(&self.q, h.clone())
            .reshape([b, nh, d, n])
            .swap_dims(2, 3);
        let k: Tensor<4> = kernels::conv2d(&self.k, h.clone()).reshape([b, nh, d, n]);
        let v: Tensor<4> = kernels::conv2d(&self.v, h).reshape([b, nh, d, n]);
        let scores = q.matmul(k).div_scalar((d as f32).sqrt());
        let attn = softmax(scores, 3);
        let out: Tensor<4> = v.matmul(attn.swap_dims(2, 3)).reshape([b, c, hh, ww]);
        x + kernels::conv2d(&self.proj, out)
    }
}

/// Text tokens as cross-attention reads them.
#[derive(Clone, Debug)]
pub struct TextContext {
    /// Token states `[B, L, D]`.
    pub tokens: Tensor<3>,
    /// Additive attention bias `[B, 1, 1, L]`: 0 for real tokens, -1e9 for padding.
    pub bias: Tensor<4>,
}

/// Cross-attention from image positions to text tokens (Rombach et al. 2022, "Latent
/// Diffusion", eq. 3; as in Imagen): `x + proj(softmax(Q K^T / sqrt(d) + bias) V)`, with
/// `Q` from the group-normalised image (1x1 convolution) and `K`, `V` from the token states
/// (linear maps from the text width to the channels). `proj` starts at zero, so a new block
/// is the identity.
#[derive(Module, Debug)]
pub struct CrossAttention {
    pub heads: usize,
    pub norm: GroupNorm,
    pub q: Conv2d,
    pub k: Linear,
    pub v: Linear,
    pub proj: Conv2d,
}

impl CrossAttention {
    pub fn new(channels: usize, text_dim: usize, heads: usize, norm: Norm, dev: &Device) -> Self {
        Self {
            heads,
            norm: group_norm(norm, channels, dev),
            q: conv(channels, channels, 1, 1, false, dev),
            k: LinearConfig::new(text_dim, channels).init(dev),
            v: LinearConfig::new(text_dim, channels).init(dev),
            proj: conv(channels, channels, 1, 1, true, dev),
        }
    }

    pub fn forward(&self, x: Tensor<4>, ctx: &TextContext) -> Tensor<4> {
        let [b, c, hh, ww] = x.dims();
        let l = ctx.tokens.dims()[1];
        let (nh, d, n) = (self.heads, c / self.heads, hh * ww);
        let h = kernels::group_norm(&self.norm, x.clone(), false);
        let q: Tensor<4> = kernels::conv2d(&self.q, h)
            .reshape([b, nh, d, n])
            .swap_dims(2, 3);
        let k: Tensor<4> = self
            .k
            .forward(ctx.tokens.clone())
            .reshape([b, l, nh, d])
            .permute([0, 2, 3, 1]);
        let v: Tensor<4> = self
            .v
            .forward(ctx.tokens.clone())
            .reshape([b, l, nh, d])
            .swap_dims(1, 2);
        let scores = q.matmul(k).div_scalar((d as f32).sqrt()) + ctx.bias.clone();
        let out: Tensor<4> = softmax(scores, 3)
            .matmul(v)
            .swap_dims(2, 3)
            .reshape([b, c, hh, ww]);
        x + kernels::conv2d(&self.proj, out)
    }
}

/// Halves the resolution with a stride-2 3x3 convolution: padded by 1 on every side
/// (`ceil(s/2)` for odd sizes), or with `padding = 0`, by 1 on the bottom and right only
/// (diffusers' `downsample_padding = 0`, the layout of the original DDPM checkpoints).
#[derive(Module, Debug)]
pub struct Downsample {
    pub conv: Conv2d,
}

impl Downsample {
    pub fn new(channels: usize, padding: usize, dev: &Device) -> Self {
        let pad = if padding == 0 {
            PaddingConfig2d::Explicit(0, 0, 1, 1)
        } else {
            PaddingConfig2d::Explicit(padding, padding, padding, padding)
        };
        Self {
            conv: Conv2dConfig::new([channels, channels], [3, 3])
                .with_stride([2, 2])
                .with_padding(pad)
                .init(dev),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        kernels::conv2d(&self.conv, x)
    }
}

/// Nearest-neighbour resize to a target size (2x, or the size of the matching skip for odd
/// sizes), then a 3x3 convolution.
#[derive(Module, Debug)]
pub struct Upsample {
    pub conv: Conv2d,
}

impl Upsample {
    pub fn new(channels: usize, dev: &Device) -> Self {
        Self {
            conv: conv(channels, channels, 3, 1, false, dev),
        }
    }

    pub fn forward(&self, x: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
        let up = Interpolate2dConfig::new()
            .with_output_size(Some(size))
            .with_mode(InterpolateMode::Nearest)
            .with_align_corners(false)
            .init()
            .forward(x);
        kernels::conv2d(&self.conv, up)
    }
}
