//! An autoregressive image model: a gated PixelCNN (van den Oord et al. 2016, "Conditional
//! Image Generation with PixelCNN Decoders"), which writes an image's likelihood as a product
//! over its sub-pixels in raster order (rows top to bottom, pixels left to right, and within a
//! pixel its channels R, G, B):
//!
//! `p(x | y) = prod_i p(x_i | x_<i, y)`, each factor a 256-way softmax over the sub-pixel's
//! value, so `-log p(x)` is an exact negative log-likelihood, reported in bits per dimension
//! (`NLL / (C H W ln 2)`, [`bits_per_dim`]).
//!
//! The network, chosen to train and sample on a 2-core CPU:
//! - **Two stacks** with no blind spot (section 2.2): a *vertical* stack whose feature at
//!   `(i, j)` sees only rows above `i` (a `k x k` convolution masked to the rows above the
//!   centre in the first layer, to the rows up to the centre after it), and a *horizontal*
//!   stack whose feature at `(i, j)` sees row `i` left of `j` (a `1 x k` convolution masked to
//!   the columns left of the centre in the first layer, "mask A", up to it after, "mask B"),
//!   plus the vertical feature at `(i, j)` through a 1x1 convolution.
//! - **Gates** `tanh(W_f * x + V_f y) * sigmoid(W_g * x + V_g y)` (eq. 4-5): `y` a learned
//!   embedding of the class (`K + 1` rows, the last the null class that label dropout trains).
//! - **Channels** (RGB): features are split into `C` consecutive groups, group `c` predicting
//!   sub-pixel `c`; at the centre tap, and in every 1x1 convolution of the horizontal stack, a
//!   group reads only earlier groups (mask A) or groups up to its own (mask B), as in the
//!   original PixelCNN (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", 3.4).
//! - **Output**: ReLU, 1x1, ReLU, 1x1 to `256 C` logits.
//!
//! Masks multiply the weights inside every forward pass, so masked weights get no gradient and
//! a sub-pixel's logits never depend on a later sub-pixel (tests/all/autoregressive.rs checks
//! this by gradients).
//!
//! **Sampling** ([`LoadedPixelCnn::sample`]) draws one sub-pixel at a time by inverting the CDF
//! of `softmax(logits / T)` at a given uniform number. Running the whole network for each of
//! `C H W` sub-pixels would cost `C H W` full passes; instead every layer's features are kept
//! as they are computed (the caching of Ramachandran et al. 2017, "Fast Generation for
//! Convolutional Autoregressive Models"): a row's vertical features are computed once, from
//! the rows above, when the row starts, and each pixel runs the horizontal stack at its own
//! position only, from the columns to its left. The whole image then costs about one full
//! pass. The cached features are the full network's, so the log-probability the sampler
//! reports for what it drew equals the full network's likelihood of the finished image (to
//! rounding; tested).

use crate::kernels::conv2d_weighted;
use anyhow::{Result, bail};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, PaddingConfig2d};
use burn::tensor::activation::{log_softmax, relu, sigmoid};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// Values a sub-pixel takes (8 bits).
pub const LEVELS: usize = 256;

/// The network of an autoregressive model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PixelCnnConfig {
    /// Side of the images it was trained on (it models exactly this size).
    pub image_size: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Feature channels `F` of both stacks (a multiple of `channels`).
    pub features: usize,
    /// Gated layers.
    pub layers: usize,
    /// Kernel size of the first layer (odd).
    pub first_kernel: usize,
    /// Kernel size of the later layers (odd).
    pub kernel: usize,
    /// Classes of a class-conditioned model.
    pub num_classes: Option<usize>,
    /// Class names by index (empty for an unconditioned model).
    #[serde(default)]
    pub class_names: Vec<String>,
}

impl PixelCnnConfig {
    /// The CPU recipe for images of side `size` with `channels`.
    pub fn recipe(size: usize, channels: usize) -> Self {
        Self {
            image_size: size,
            channels,
            features: 48,
            layers: 8,
            first_kernel: 7,
            kernel: 3,
            num_classes: None,
            class_names: Vec::new(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let s = self.image_size;
        if !(2..=256).contains(&s) {
            bail!("an autoregressive model's image size must be between 2 and 256 (got {s})");
        }
        if self.channels != 1 && self.channels != 3 {
            bail!(
                "an autoregressive model's images have 1 or 3 channels (got {})",
                self.channels
            );
        }
        if !(1..=1024).contains(&self.features) || !self.features.is_multiple_of(self.channels) {
            bail!(
                "--features must be between 1 and 1024 and a multiple of the {} channel(s) (got {})",
                self.channels,
                self.features
            );
        }
        if !(1..=64).contains(&self.layers) {
            bail!("--layers must be between 1 and 64 (got {})", self.layers);
        }
        for (k, what) in [(self.first_kernel, "first kernel"), (self.kernel, "kernel")] {
            if !(3..=15).contains(&k) || k.is_multiple_of(2) {
                bail!("the {what} size must be odd, between 3 and 15 (got {k})");
            }
        }
        crate::model::check_classes(self.num_classes, &self.class_names)
    }

    /// `[channels, size, size]` of the images.
    pub fn output_shape(&self) -> [usize; 3] {
        [self.channels, self.image_size, self.image_size]
    }

    /// The number of weights the network has (its convolutions' and embeddings').
    pub fn parameters(&self) -> usize {
        let (f, c, k0, k) = (self.features, self.channels, self.first_kernel, self.kernel);
        let emb = self.num_classes.map_or(0, |n| 2 * (n + 1) * 2 * f);
        let layer = |cin: usize, kk: usize| {
            (cin * kk * kk + 1) * 2 * f
                + (cin * kk + 1) * 2 * f
                + (2 * f + 1) * 2 * f
                + (f + 1) * f
                + emb
        };
        layer(c, k0) + (self.layers - 1) * layer(f, k) + (f + 1) * f + (f + 1) * c * LEVELS
    }
}

/// How the channels of a tensor are split into the sub-pixel groups of the masks.
#[derive(Clone, Copy)]
enum Groups {
    /// The image itself: channel `c` is sub-pixel `c`.
    Image,
    /// `F` features in `C` consecutive groups.
    Features(usize, usize),
    /// `2F` gate inputs: both halves grouped as [`Groups::Features`].
    Gates(usize, usize),
    /// `256 C` logits: 256 per sub-pixel.
    Logits,
}

impl Groups {
    fn of(self, ch: usize) -> usize {
        match self {
            Self::Image => ch,
            Self::Features(f, c) => ch * c / f,
            Self::Gates(f, c) => (ch % f) * c / f,
            Self::Logits => ch / LEVELS,
        }
    }
}

/// The causal masks of the two stacks.
#[derive(Clone, Copy)]
enum Mask {
    /// Vertical stack: kernel rows above the centre only (`strict`), or up to it.
    Rows { strict: bool },
    /// Horizontal stack (a `1 x k` kernel): the columns left of the centre, and at the centre
    /// the channel groups before the output's (`strict`, mask A) or up to it (mask B).
    Causal {
        strict: bool,
        gin: Groups,
        gout: Groups,
    },
}

/// The mask `[out, in, kh, kw]` (ones where a weight may be non-zero).
fn mask(m: Mask, [o, i, kh, kw]: [usize; 4], dev: &Device) -> Tensor<4> {
    let mut v = vec![0f32; o * i * kh * kw];
    for a in 0..o {
        for b in 0..i {
            for r in 0..kh {
                for c in 0..kw {
                    let on = match m {
                        Mask::Rows { strict } => r < kh / 2 || (!strict && r == kh / 2),
                        Mask::Causal { strict, gin, gout } => {
                            let (gi, go) = (gin.of(b), gout.of(a));
                            c < kw / 2 || (c == kw / 2 && (gi < go || (!strict && gi == go)))
                        }
                    };
                    v[((a * i + b) * kh + r) * kw + c] = if on { 1.0 } else { 0.0 };
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(v, [o, i, kh, kw]), dev)
}

/// The 1x1 mask of the horizontal stack: a group reads groups up to its own.
fn pointwise_mask(gin: Groups, gout: Groups, o: usize, i: usize, dev: &Device) -> Tensor<4> {
    let v: Vec<f32> = (0..o)
        .flat_map(|a| (0..i).map(move |b| if gin.of(b) <= gout.of(a) { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_data(TensorData::new(v, [o, i, 1, 1]), dev)
}

fn conv(cin: usize, cout: usize, kh: usize, kw: usize, dev: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [kh, kw])
        .with_padding(PaddingConfig2d::Valid)
        .init(dev)
}

/// One gated layer of both stacks.
#[derive(Module, Debug)]
pub struct GatedLayer {
    /// Vertical stack, `k x k`, to `2F` gate inputs.
    pub v: Conv2d,
    /// Horizontal stack, `1 x k`, to `2F` gate inputs.
    pub h: Conv2d,
    /// The vertical stack's gate inputs into the horizontal stack's, 1x1.
    pub v2h: Conv2d,
    /// The horizontal stack's gated features back to `F`, 1x1 (residual after the first).
    pub h_out: Conv2d,
    /// Class biases of the two stacks' gate inputs (`K + 1` rows of `2F`).
    pub v_class: Option<Embedding>,
    pub h_class: Option<Embedding>,
}

/// The network: gated layers, then the output stack.
#[derive(Module, Debug)]
pub struct PixelCnn {
    pub layers: Vec<GatedLayer>,
    pub out1: Conv2d,
    pub out2: Conv2d,
    pub channels: usize,
    pub features: usize,
}

/// `tanh(a) * sigmoid(b)` of gate inputs `[a; b]` (`2F` channels).
fn gate(x: Tensor<4>) -> Tensor<4> {
    let f = x.dims()[1] / 2;
    x.clone().narrow(1, 0, f).tanh() * sigmoid(x.narrow(1, f, f))
}

/// Class indices `[n, 1]`.
fn class_ids(labels: &[usize], dev: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    Tensor::<2, Int>::from_data(TensorData::new(ids, [labels.len(), 1]), dev)
}

/// A class bias `[n, 2F, 1, 1]` (zero without an embedding or labels).
fn class_bias(e: &Option<Embedding>, ids: Option<&Tensor<2, Int>>) -> Option<Tensor<4>> {
    let (e, ids) = (e.as_ref()?, ids?);
    let t: Tensor<3> = e.forward(ids.clone());
    let [n, _, d] = t.dims();
    Some(t.reshape([n, d, 1, 1]))
}

fn add(x: Tensor<4>, b: &Option<Tensor<4>>) -> Tensor<4> {
    match b {
        Some(b) => x + b.clone(),
        None => x,
    }
}

/// A layer's weights with their masks applied, ready for the full pass or the cached one.
struct LayerWeights {
    v: (Tensor<4>, Tensor<1>),
    h: (Tensor<4>, Tensor<1>),
    v2h: (Tensor<4>, Tensor<1>),
    h_out: (Tensor<4>, Tensor<1>),
}

fn bias(c: &Conv2d) -> Tensor<1> {
    c.bias
        .as_ref()
        .expect("convolutions here have biases")
        .val()
}

impl PixelCnn {
    pub fn new(cfg: &PixelCnnConfig, dev: &Device) -> Result<Self> {
        cfg.validate()?;
        let (f, ch) = (cfg.features, cfg.channels);
        let emb = |dev: &Device| {
            cfg.num_classes
                .map(|k| EmbeddingConfig::new(k + 1, 2 * f).init(dev))
        };
        let layers = (0..cfg.layers)
            .map(|l| {
                let (cin, k) = if l == 0 {
                    (ch, cfg.first_kernel)
                } else {
                    (f, cfg.kernel)
                };
                GatedLayer {
                    v: conv(cin, 2 * f, k, k, dev),
                    h: conv(cin, 2 * f, 1, k, dev),
                    v2h: conv(2 * f, 2 * f, 1, 1, dev),
                    h_out: conv(f, f, 1, 1, dev),
                    v_class: emb(dev),
                    h_class: emb(dev),
                }
            })
            .collect();
        Ok(Self {
            layers,
            out1: conv(f, f, 1, 1, dev),
            out2: conv(f, ch * LEVELS, 1, 1, dev),
            channels: ch,
            features: f,
        })
    }

    /// The class of each of `n` images `[n, 1]` for a class-conditioned network: `labels`, or
    /// the null class `K` for none; `None` for an unconditioned network.
    fn class_ids(
        &self,
        labels: Option<&[usize]>,
        n: usize,
        dev: &Device,
    ) -> Option<Tensor<2, Int>> {
        let e = self.layers[0].v_class.as_ref()?;
        let null = vec![e.weight.dims()[0] - 1; n];
        Some(class_ids(labels.unwrap_or(&null), dev))
    }

    /// Layer `l`'s weights times their masks.
    fn layer_weights(&self, l: usize) -> LayerWeights {
        let layer = &self.layers[l];
        let (f, c) = (self.features, self.channels);
        let first = l == 0;
        let gin = if first {
            Groups::Image
        } else {
            Groups::Features(f, c)
        };
        let masked = |conv: &Conv2d, m: Option<Tensor<4>>| {
            let w = conv.weight.val();
            let w = match m {
                Some(m) => w * m,
                None => w,
            };
            (w, bias(conv))
        };
        let dev = layer.v.weight.device();
        let vm = mask(Mask::Rows { strict: first }, layer.v.weight.dims(), &dev);
        let hm = mask(
            Mask::Causal {
                strict: first,
                gin,
                gout: Groups::Gates(f, c),
            },
            layer.h.weight.dims(),
            &dev,
        );
        let g = Groups::Features(f, c);
        let om = pointwise_mask(g, g, f, f, &dev);
        let om = if c == 1 { None } else { Some(om) };
        LayerWeights {
            v: masked(&layer.v, Some(vm)),
            h: masked(&layer.h, Some(hm)),
            v2h: masked(&layer.v2h, None),
            h_out: masked(&layer.h_out, om),
        }
    }

    /// The output stack's weights times their masks.
    fn out_weights(&self) -> [(Tensor<4>, Tensor<1>); 2] {
        let (f, c) = (self.features, self.channels);
        let dev = self.out1.weight.device();
        let g = Groups::Features(f, c);
        let m1 = pointwise_mask(g, g, f, f, &dev);
        let m2 = pointwise_mask(g, Groups::Logits, c * LEVELS, f, &dev);
        [
            (self.out1.weight.val() * m1, bias(&self.out1)),
            (self.out2.weight.val() * m2, bias(&self.out2)),
        ]
    }

    /// Logits `[n, 256 C, H, W]` for images `[n, C, H, W]` in `[-1, 1]` (and a class per image;
    /// without, the null class `K` of a class-conditioned network): channel `256 c + v` is the logit of value `v` for
    /// sub-pixel `c`.
    pub fn forward(&self, x: Tensor<4>, labels: Option<&[usize]>) -> Tensor<4> {
        let dev = x.device();
        let ids = self.class_ids(labels, x.dims()[0], &dev);
        let (mut v, mut h) = (x.clone(), x);
        for (l, layer) in self.layers.iter().enumerate() {
            let w = self.layer_weights(l);
            let k = w.v.0.dims()[3];
            let v_pre = conv2d_weighted(v, w.v.0, Some(w.v.1), 1, [k / 2, k / 2]);
            let h_pre = conv2d_weighted(h.clone(), w.h.0, Some(w.h.1), 1, [0, k / 2])
                + conv2d_weighted(v_pre.clone(), w.v2h.0, Some(w.v2h.1), 1, [0, 0]);
            v = gate(add(v_pre, &class_bias(&layer.v_class, ids.as_ref())));
            let g = gate(add(h_pre, &class_bias(&layer.h_class, ids.as_ref())));
            let out = conv2d_weighted(g, w.h_out.0, Some(w.h_out.1), 1, [0, 0]);
            h = if l == 0 { out } else { h + out };
        }
        let [(w1, b1), (w2, b2)] = self.out_weights();
        let o = relu(conv2d_weighted(relu(h), w1, Some(b1), 1, [0, 0]));
        conv2d_weighted(o, w2, Some(b2), 1, [0, 0])
    }
}

/// The 8-bit value of each sub-pixel of images in `[-1, 1]` (`round((x + 1) 127.5)`, exact for
/// images read from 8-bit files), clamped to `0..=255`.
pub fn levels(x: &[f32]) -> Vec<i64> {
    x.iter()
        .map(|v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as i64)
        .collect()
}

/// The negative log-likelihood in nats of each image's sub-pixels `[n]`, summed over the image:
/// `-sum_i log softmax(logits_i)[x_i]`, with `logits` `[n, 256 C, H, W]` and `x` the images'
/// 8-bit values ([`levels`]) `[n, C, H, W]`.
pub fn nll_per_image(logits: Tensor<4>, values: &[i64]) -> Tensor<1> {
    let [n, lc, h, w] = logits.dims();
    let c = lc / LEVELS;
    let dev = logits.device();
    let lp = log_softmax(logits.reshape([n, c, LEVELS, h * w]), 2);
    let idx = Tensor::<4, Int>::from_data(TensorData::new(values.to_vec(), [n, c, 1, h * w]), &dev);
    lp.gather(2, idx)
        .reshape([n, c * h * w])
        .sum_dim(1)
        .reshape([n])
        .neg()
}

/// Bits per dimension of a negative log-likelihood of `nats` over `dims` sub-pixels:
/// `nats / (dims ln 2)`.
pub fn bits_per_dim(nats: f64, dims: usize) -> f64 {
    nats / (dims as f64 * std::f64::consts::LN_2)
}

/// An autoregressive model ready to sample and score.
#[derive(Debug)]
pub struct LoadedPixelCnn {
    pub config: PixelCnnConfig,
    pub net: PixelCnn,
    /// Where it came from, for messages.
    pub source: String,
}

/// Reports the progress of [`LoadedPixelCnn::sample`]: after each row, the row done (from 1)
/// and the images so far.
pub type OnRow<'a> = dyn FnMut(usize, &Tensor<4>) + 'a;

impl LoadedPixelCnn {
    /// Negative log-likelihood in nats of each of `images` `[n, C, H, W]` (in `[-1, 1]`) given
    /// their classes (untracked).
    pub fn nll(&self, images: Tensor<4>, labels: Option<&[usize]>) -> Vec<f64> {
        let values = levels(&images.to_data().try_to_vec::<f32>().unwrap_or_default());
        let nll = nll_per_image(self.net.forward(images, labels), &values);
        nll.into_data()
            .try_into_vec::<f32>()
            .unwrap_or_default()
            .into_iter()
            .map(f64::from)
            .collect()
    }

    /// Draws images `[n, C, H, W]` in `[-1, 1]`, sub-pixel by sub-pixel, from
    /// `softmax(logits / temperature)`: sub-pixel `i` of image `b` takes the first value whose
    /// cumulative probability exceeds `uniforms[b][i]` (one per sub-pixel, in `[0, 1)`, in the
    /// layout of the images). Returns the images and the log-probability (nats, at the given
    /// temperature) of what each image drew. Stops after the row at which `cancel` says so.
    pub fn sample(
        &self,
        uniforms: &[f32],
        n: usize,
        labels: Option<&[usize]>,
        temperature: f32,
        cancel: &dyn Fn() -> bool,
        on_row: &mut OnRow,
    ) -> (Tensor<4>, Vec<f64>) {
        let net = &self.net;
        let [c, size, _] = self.config.output_shape();
        let (hh, ww) = (size, size);
        let f = net.features;
        let dev = net.out1.weight.device();
        let ids = net.class_ids(labels, n, &dev);
        let weights: Vec<LayerWeights> = (0..net.layers.len())
            .map(|l| net.layer_weights(l))
            .collect();
        let vbias: Vec<Option<Tensor<4>>> = net
            .layers
            .iter()
            .map(|l| class_bias(&l.v_class, ids.as_ref()))
            .collect();
        let hbias: Vec<Option<Tensor<4>>> = net
            .layers
            .iter()
            .map(|l| class_bias(&l.h_class, ids.as_ref()))
            .collect();
        let [(w1, b1), (w2, b2)] = net.out_weights();
        let mut img = vec![0f32; n * c * hh * ww];
        let mut logp = vec![0f64; n];
        // Gated vertical features of every layer, row by row: `[n, F, 1, W]` each.
        let mut v_rows: Vec<Vec<Tensor<4>>> = vec![Vec::new(); weights.len()];
        let zeros_row = |ch: usize| Tensor::<4>::zeros([n, ch, 1, ww], &dev);
        let zeros_col = Tensor::<4>::zeros([n, f, 1, 1], &dev);
        let as_tensor = |img: &[f32]| {
            Tensor::<4>::from_data(TensorData::new(img.to_vec(), [n, c, hh, ww]), &dev)
        };
        for i in 0..hh {
            // The rows' vertical features and their part of the horizontal gate inputs.
            let image = as_tensor(&img);
            let mut hv: Vec<Tensor<4>> = Vec::with_capacity(weights.len());
            for (l, w) in weights.iter().enumerate() {
                let k = w.v.0.dims()[3];
                let r = k / 2;
                // Layer 0 reads the r image rows above; later layers their own row too.
                let (rows, band) = if l == 0 {
                    let lo = i as isize - r as isize;
                    let band: Vec<Tensor<4>> = (lo..i as isize)
                        .map(|y| {
                            if y < 0 {
                                zeros_row(c)
                            } else {
                                image.clone().narrow(2, y as usize, 1)
                            }
                        })
                        .collect();
                    (r, band)
                } else {
                    let lo = i as isize - r as isize;
                    let band: Vec<Tensor<4>> = (lo..=i as isize)
                        .map(|y| {
                            if y < 0 {
                                zeros_row(f)
                            } else {
                                v_rows[l - 1][y as usize].clone()
                            }
                        })
                        .collect();
                    (r + 1, band)
                };
                let wv = w.v.0.clone().narrow(2, 0, rows);
                let v_pre =
                    conv2d_weighted(Tensor::cat(band, 2), wv, Some(w.v.1.clone()), 1, [0, r]);
                hv.push(add(
                    conv2d_weighted(
                        v_pre.clone(),
                        w.v2h.0.clone(),
                        Some(w.v2h.1.clone()),
                        1,
                        [0, 0],
                    ),
                    &hbias[l],
                ));
                v_rows[l].push(gate(add(v_pre, &vbias[l])));
            }
            // Pixel by pixel, sub-pixel by sub-pixel: the horizontal stack at (i, j) only.
            let mut h_cols: Vec<Vec<Tensor<4>>> = vec![Vec::with_capacity(ww); weights.len()];
            for j in 0..ww {
                for s in 0..c {
                    let mut h_prev: Option<Tensor<4>> = None;
                    for (l, w) in weights.iter().enumerate() {
                        let k = w.h.0.dims()[3];
                        let r = k / 2;
                        let lo = j as isize - r as isize;
                        let window: Tensor<4> = if l == 0 {
                            let cols: Vec<f32> = (0..n)
                                .flat_map(|b| {
                                    let img = &img;
                                    (0..c).flat_map(move |ch| {
                                        (lo..=j as isize).map(move |x| {
                                            if x < 0 {
                                                0.0
                                            } else {
                                                img[((b * c + ch) * hh + i) * ww + x as usize]
                                            }
                                        })
                                    })
                                })
                                .collect();
                            Tensor::from_data(TensorData::new(cols, [n, c, 1, r + 1]), &dev)
                        } else {
                            let parts: Vec<Tensor<4>> = (lo..=j as isize)
                                .map(|x| {
                                    if x < 0 {
                                        zeros_col.clone()
                                    } else if x as usize == j {
                                        h_prev.clone().expect("the layer below")
                                    } else {
                                        h_cols[l - 1][x as usize].clone()
                                    }
                                })
                                .collect();
                            Tensor::cat(parts, 3)
                        };
                        let wh = w.h.0.clone().narrow(3, 0, r + 1);
                        let h_pre = conv2d_weighted(window, wh, Some(w.h.1.clone()), 1, [0, 0])
                            + hv[l].clone().narrow(3, j, 1);
                        let out = conv2d_weighted(
                            gate(h_pre),
                            w.h_out.0.clone(),
                            Some(w.h_out.1.clone()),
                            1,
                            [0, 0],
                        );
                        let h = match (l, &h_prev) {
                            (0, _) => out,
                            (_, Some(p)) => p.clone() + out,
                            _ => unreachable!("layers run in order"),
                        };
                        if h_cols[l].len() == j {
                            h_cols[l].push(h.clone());
                        } else {
                            h_cols[l][j] = h.clone();
                        }
                        h_prev = Some(h);
                    }
                    let h = h_prev.expect("at least one layer");
                    let o = relu(conv2d_weighted(
                        relu(h),
                        w1.clone(),
                        Some(b1.clone()),
                        1,
                        [0, 0],
                    ));
                    let logits = conv2d_weighted(o, w2.clone(), Some(b2.clone()), 1, [0, 0])
                        .narrow(1, s * LEVELS, LEVELS)
                        .reshape([n, LEVELS]);
                    let z: Vec<f32> = logits.into_data().try_into_vec::<f32>().unwrap_or_default();
                    for b in 0..n {
                        let pos = ((b * c + s) * hh + i) * ww + j;
                        let (v, lp) =
                            draw(&z[b * LEVELS..(b + 1) * LEVELS], temperature, uniforms[pos]);
                        img[pos] = v as f32 / 127.5 - 1.0;
                        logp[b] += lp;
                    }
                }
            }
            on_row(i + 1, &as_tensor(&img));
            if cancel() {
                break;
            }
        }
        (as_tensor(&img), logp)
    }
}

/// The value whose cumulative probability under `softmax(logits / t)` first exceeds `u`, and
/// its log-probability. Computed in f64 from the largest logit down, so the same logits and
/// `u` give the same value on every machine.
pub fn draw(logits: &[f32], t: f32, u: f32) -> (usize, f64) {
    let t = f64::from(t);
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &z| m.max(f64::from(z)));
    let e: Vec<f64> = logits
        .iter()
        .map(|&z| ((f64::from(z) - max) / t).exp())
        .collect();
    let total: f64 = e.iter().sum();
    let target = f64::from(u) * total;
    let mut acc = 0.0;
    let mut pick = logits.len() - 1;
    for (k, p) in e.iter().enumerate() {
        acc += p;
        if acc > target {
            pick = k;
            break;
        }
    }
    // Past rounding, the last value with any probability.
    while e[pick] == 0.0 && pick > 0 {
        pick -= 1;
    }
    (pick, (e[pick] / total).ln())
}

/// Builds an autoregressive model from its config and the file's tensors.
pub fn build(
    config: PixelCnnConfig,
    tensors: &crate::weights::NamedTensors,
    what: &str,
    dev: &Device,
) -> Result<LoadedPixelCnn> {
    let least = config.parameters();
    let net = crate::model::build_network(config.validate(), least, tensors, what, || {
        PixelCnn::new(&config, dev)
    })?;
    Ok(LoadedPixelCnn {
        config,
        net,
        source: what.to_string(),
    })
}
