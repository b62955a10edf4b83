//! Spectral normalisation (Miyato et al. 2018, "Spectral Normalization for Generative
//! Adversarial Networks", eq. 8 and Algorithm 1): a layer's weight matrix `W` is used as
//! `W / sigma(W)`, with `sigma(W)` its largest singular value, which bounds the layer's
//! Lipschitz constant by 1. `sigma` is estimated by power iteration from a vector `u` kept with
//! the layer: `v = W^T u / |W^T u|`, `sigma = u^T W v`; one iteration per discriminator step
//! (`u <- W v / |W v|`, [`SnConv::power_iterate`]) keeps it close as `W` moves.
//!
//! `u` is a float parameter of the module, so it is saved and restored with the weights (a
//! resumed run continues the same estimate), but it is only ever read detached: it gets no
//! gradient, and the optimiser leaves it alone. Gradients do flow through `sigma`, as in the
//! paper (and PyTorch's `spectral_norm`).

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Distribution, Tensor};

/// `x / (|x| + 1e-12)` for a vector.
fn normalize(x: Tensor<1>) -> Tensor<1> {
    let norm = x.clone().powi_scalar(2).sum().sqrt().add_scalar(1e-12);
    x.div(norm)
}

/// A unit vector of `n` normal draws from the device's seeded generator.
fn random_unit(n: usize, dev: &Device) -> Param<Tensor<1>> {
    Param::from_tensor(normalize(Tensor::random(
        [n],
        Distribution::Normal(0.0, 1.0),
        dev,
    )))
}

/// `v = W^T u / |W^T u|` for `W` `[r, c]` and `u` `[r]` (both untracked).
fn right_vector(w: Tensor<2>, u: Tensor<1>) -> Tensor<1> {
    let [r, c] = w.dims();
    normalize(u.reshape([1, r]).matmul(w).reshape([c]))
}

/// One power iteration: `u' = W v / |W v|` with `v` from [`right_vector`].
fn next_u(w: Tensor<2>, u: Tensor<1>) -> Tensor<1> {
    let [r, c] = w.dims();
    let v = right_vector(w.clone(), u);
    normalize(w.matmul(v.reshape([c, 1])).reshape([r]))
}

/// `sigma = u^T W v` (`[1]`), tracked through `W` only.
fn sigma(w: Tensor<2>, u: Tensor<1>) -> Tensor<1> {
    let [r, c] = w.dims();
    let u = u.detach();
    let v = right_vector(w.clone().detach(), u.clone());
    u.reshape([1, r])
        .matmul(w)
        .matmul(v.reshape([c, 1]))
        .reshape([1])
}

/// A spectrally normalised `k x k` convolution with stride and zero padding.
#[derive(Module, Debug)]
pub struct SnConv {
    pub conv: Conv2d,
    /// The power iteration's left singular vector estimate, `[c_out]`.
    pub u: Param<Tensor<1>>,
    pub stride: usize,
    pub pad: usize,
}

impl SnConv {
    pub fn new(cin: usize, cout: usize, k: usize, stride: usize, pad: usize, dev: &Device) -> Self {
        let conv = Conv2dConfig::new([cin, cout], [k, k])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .init(dev);
        Self {
            conv,
            u: random_unit(cout, dev),
            stride,
            pad,
        }
    }

    /// The weight as the matrix `[c_out, c_in k k]`.
    fn matrix(&self) -> Tensor<2> {
        let [o, i, kh, kw] = self.conv.weight.dims();
        self.conv.weight.val().reshape([o, i * kh * kw])
    }

    /// `W / sigma(W)`, `[c_out, c_in, k, k]`.
    pub fn normalized_weight(&self) -> Tensor<4> {
        let s = sigma(self.matrix(), self.u.val());
        self.conv.weight.val().div(s.reshape([1, 1, 1, 1]))
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b = self.conv.bias.as_ref().map(|b| b.val());
        crate::kernels::conv2d_weighted(
            x,
            self.normalized_weight(),
            b,
            self.stride,
            [self.pad, self.pad],
        )
    }

    /// One power iteration on `u` (untracked).
    pub fn power_iterate(mut self) -> Self {
        let w = self.matrix().detach();
        self.u = self.u.map(|u| {
            let grad = u.is_require_grad();
            // A fresh leaf: the new estimate has no history.
            let n = Tensor::from_inner(next_u(w, u.detach()).inner());
            if grad { n.require_grad() } else { n }
        });
        self
    }
}

/// A spectrally normalised linear layer (weight `[in, out]` as burn stores it; the transpose
/// has the same singular values).
#[derive(Module, Debug)]
pub struct SnLinear {
    pub linear: Linear,
    /// `[in]`.
    pub u: Param<Tensor<1>>,
}

impl SnLinear {
    pub fn new(din: usize, dout: usize, dev: &Device) -> Self {
        Self {
            linear: LinearConfig::new(din, dout).init(dev),
            u: random_unit(din, dev),
        }
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let w = self.linear.weight.val();
        let s = sigma(w.clone(), self.u.val());
        let y = x.matmul(w.div(s.reshape([1, 1])));
        match &self.linear.bias {
            Some(b) => y + b.val().unsqueeze::<2>(),
            None => y,
        }
    }

    /// One power iteration on `u` (untracked).
    pub fn power_iterate(mut self) -> Self {
        let w = self.linear.weight.val().detach();
        self.u = self.u.map(|u| {
            let grad = u.is_require_grad();
            // A fresh leaf: the new estimate has no history.
            let n = Tensor::from_inner(next_u(w, u.detach()).inner());
            if grad { n.require_grad() } else { n }
        });
        self
    }
}
