//! Building blocks of the denoiser: timestep embedding, residual block, self-attention,
//! down- and upsampling. Each pairs with a small constructor, as burn's own layers do.

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

/// GroupNorm with `eps = 1e-5` and affine parameters.
pub fn group_norm(groups: usize, channels: usize, dev: &Device) -> GroupNorm {
    GroupNormConfig::new(groups, channels).init(dev)
}

/// Sinusoidal timestep embedding (Vaswani et al. 2017, section 3.5, as used by DDPM):
/// `emb(t) = [sin(t f_0) .. sin(t f_{h-1}), cos(t f_0) .. cos(t f_{h-1})]`,
/// `f_i = exp(-ln(10000) i / h)`, `h = dim / 2`. Computed on the host in f64.
pub fn sinusoidal_embedding(t: &[f64], dim: usize, dev: &Device) -> Tensor<2> {
    let half = dim / 2;
    let mut out = Vec::with_capacity(t.len() * dim);
    for &ti in t {
        let freqs = (0..half).map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp());
        let args: Vec<f64> = freqs.map(|f| ti * f).collect();
        out.extend(args.iter().map(|a| a.sin() as f32));
        out.extend(args.iter().map(|a| a.cos() as f32));
        out.extend(std::iter::repeat_n(0.0f32, dim - 2 * half));
    }
    Tensor::from_data(TensorData::new(out, [t.len(), dim]), dev)
}

/// MLP on the sinusoidal embedding: `Linear(d, e) -> SiLU -> Linear(e, e)`.
#[derive(Module, Debug)]
pub struct TimeEmbedding {
    pub sin_dim: usize,
    pub fc1: Linear,
    pub fc2: Linear,
}

impl TimeEmbedding {
    pub fn new(sin_dim: usize, embed_dim: usize, dev: &Device) -> Self {
        Self {
            sin_dim,
            fc1: LinearConfig::new(sin_dim, embed_dim).init(dev),
            fc2: LinearConfig::new(embed_dim, embed_dim).init(dev),
        }
    }

    /// `[B]` timesteps to `[B, embed_dim]`.
    pub fn forward(&self, t: &[f64], dev: &Device) -> Tensor<2> {
        let s = sinusoidal_embedding(t, self.sin_dim, dev);
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
        groups: usize,
        dropout: f64,
        zero_last: bool,
        dev: &Device,
    ) -> Self {
        Self {
            norm1: group_norm(groups, cin, dev),
            conv1: conv(cin, cout, 3, 1, false, dev),
            time_proj: LinearConfig::new(temb_dim, cout).init(dev),
            norm2: group_norm(groups, cout, dev),
            dropout: DropoutConfig::new(dropout).init(),
            conv2: conv(cout, cout, 3, 1, zero_last, dev),
            skip: (cin != cout).then(|| conv(cin, cout, 1, 1, false, dev)),
        }
    }

    pub fn forward(&self, x: Tensor<4>, temb_act: Tensor<2>) -> Tensor<4> {
        let h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        let t: Tensor<4> = self.time_proj.forward(temb_act).unsqueeze_dims(&[2, 3]);
        let h = h + t;
        let h = silu(self.norm2.forward(h));
        let h = if self.dropout.prob > 0.0 {
            self.dropout.forward(h)
        } else {
            h
        };
        let h = self.conv2.forward(h);
        let s = match &self.skip {
            Some(c) => c.forward(x),
            None => x,
        };
        h + s
    }
}

/// Single-head self-attention over the pixels of a feature map (DDPM, appendix B):
/// `h = GN(x)`, `q, k, v = 1x1 convs of h`, `A = softmax(q^T k / sqrt(C))` over keys,
/// `out = x + proj(v A^T)`.
#[derive(Module, Debug)]
pub struct Attention {
    pub norm: GroupNorm,
    pub q: Conv2d,
    pub k: Conv2d,
    pub v: Conv2d,
    pub proj: Conv2d,
}

impl Attention {
    pub fn new(channels: usize, groups: usize, zero_proj: bool, dev: &Device) -> Self {
        Self {
            norm: group_norm(groups, channels, dev),
            q: conv(channels, channels, 1, 1, false, dev),
            k: conv(channels, channels, 1, 1, false, dev),
            v: conv(channels, channels, 1, 1, false, dev),
            proj: conv(channels, channels, 1, 1, zero_proj, dev),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, hh, ww] = x.dims();
        let h = self.norm.forward(x.clone());
        let q: Tensor<3> = self
            .q
            .forward(h.clone())
            .reshape([b, c, hh * ww])
            .swap_dims(1, 2);
        let k: Tensor<3> = self.k.forward(h.clone()).reshape([b, c, hh * ww]);
        let v: Tensor<3> = self.v.forward(h).reshape([b, c, hh * ww]);
        let scores = q.matmul(k).div_scalar((c as f32).sqrt());
        let attn = softmax(scores, 2);
        let out: Tensor<4> = v.matmul(attn.swap_dims(1, 2)).reshape([b, c, hh, ww]);
        x + self.proj.forward(out)
    }
}

/// Halves the resolution with a stride-2 3x3 convolution (`ceil(s/2)` for odd sizes).
#[derive(Module, Debug)]
pub struct Downsample {
    pub conv: Conv2d,
}

impl Downsample {
    pub fn new(channels: usize, dev: &Device) -> Self {
        Self {
            conv: conv(channels, channels, 3, 2, false, dev),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.conv.forward(x)
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
        self.conv.forward(up)
    }
}
