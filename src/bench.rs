//! `diffuse bench`: the reference U-Net of the project's benchmark spec (5,068,547 parameters,
//! 2.33 GFLOP per 32x32 forward; wiring identical to the PyTorch twin), built from this
//! crate's own blocks, timed for training steps (forward, backward, AdamW) at B=16 and B=64
//! and for no-grad forward passes at B=64. Medians after warm-up.

use crate::device::{inference_device, training_device};
use crate::kernels;
use crate::rng::{Stream, normal_tensor, rng_for};
use crate::train::adamw::AdamW;
use crate::unet::blocks::{
    Attention, Downsample, Norm, ResBlock, SinusoidSpec, TimeEmbedding, Upsample, conv, group_norm,
};
use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::optim::GradientsParams;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};
use serde::Serialize;
use std::time::Instant;

/// The benchmark U-Net: 3 levels (64, 128, 128 channels at 32, 16, 8 pixels), two residual
/// blocks per level each way, attention only in the middle, skips from every encoder block.
#[derive(Module, Debug)]
pub struct ReferenceUNet {
    time: TimeEmbedding,
    stem: Conv2d,
    down: Vec<ResBlock>,
    ds1: Downsample,
    ds2: Downsample,
    mid1: ResBlock,
    attn: Attention,
    mid2: ResBlock,
    up: Vec<ResBlock>,
    us1: Upsample,
    us2: Upsample,
    out_norm: GroupNorm,
    out_conv: Conv2d,
}

impl ReferenceUNet {
    pub fn new(dev: &Device) -> Self {
        let g = Norm {
            groups: 32,
            eps: 1e-5,
        };
        let rb = |a, b| ResBlock::new(a, b, 256, g, 0.0, false, dev);
        let down = [
            (64, 64),
            (64, 64),
            (64, 128),
            (128, 128),
            (128, 128),
            (128, 128),
        ];
        let up = [
            (256, 128),
            (256, 128),
            (256, 128),
            (256, 128),
            (192, 64),
            (128, 64),
        ];
        Self {
            time: TimeEmbedding::new(
                64,
                256,
                SinusoidSpec {
                    flip: false,
                    shift: 0.0,
                },
                dev,
            ),
            stem: conv(3, 64, 3, 1, false, dev),
            down: down.iter().map(|&(a, b)| rb(a, b)).collect(),
            ds1: Downsample::new(64, 1, dev),
            ds2: Downsample::new(128, 1, dev),
            mid1: rb(128, 128),
            attn: Attention::new(128, 1, g, false, dev),
            mid2: rb(128, 128),
            up: up.iter().map(|&(a, b)| rb(a, b)).collect(),
            us1: Upsample::new(128, dev),
            us2: Upsample::new(128, dev),
            out_norm: group_norm(g, 64, dev),
            out_conv: conv(64, 3, 3, 1, false, dev),
        }
    }

    pub fn forward(&self, x: Tensor<4>, t: &[f64]) -> Tensor<4> {
        let ta = silu(self.time.forward(t, &x.device()));
        let mut h = kernels::conv2d(&self.stem, x);
        let mut skips = Vec::new();
        for (i, b) in self.down.iter().enumerate() {
            h = b.forward(h, ta.clone());
            skips.push(h.clone());
            if i == 1 {
                h = self.ds1.forward(h);
            } else if i == 3 {
                h = self.ds2.forward(h);
            }
        }
        h = self.mid2.forward(
            self.attn.forward(self.mid1.forward(h, ta.clone())),
            ta.clone(),
        );
        for (i, b) in self.up.iter().enumerate() {
            let s = skips.pop().expect("one skip per decoder block");
            h = b.forward(Tensor::cat(vec![h, s], 1), ta.clone());
            let [_, _, hh, ww] = h.dims();
            if i == 1 {
                h = self.us1.forward(h, [2 * hh, 2 * ww]);
            } else if i == 3 {
                h = self.us2.forward(h, [2 * hh, 2 * ww]);
            }
        }
        kernels::conv2d(&self.out_conv, kernels::group_norm(&self.out_norm, h, true))
    }
}

/// Results of one benchmark run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub backend: String,
    /// The convolutions' matrix products: "f32", or "bf16" with its engine, e.g. "bf16 (amx)".
    pub precision: String,
    pub params: usize,
    pub train_b16_img_per_s: f64,
    pub train_b64_img_per_s: f64,
    pub infer_b64_img_per_s: f64,
    pub peak_rss_bytes: u64,
}

/// The median of `v` (the mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Peak resident memory of this process (VmHWM), 0 where /proc is not available.
pub fn peak_rss_bytes() -> u64 {
    proc_status_kb("VmHWM:")
}

/// Resident memory of this process now (VmRSS), 0 where /proc is not available.
pub fn current_rss_bytes() -> u64 {
    proc_status_kb("VmRSS:")
}

fn proc_status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Timesteps of the benchmark batch: `t_i = (7919 i + 13) mod 1000`.
fn bench_t(b: usize) -> Vec<f64> {
    (0..b).map(|i| ((i * 7919 + 13) % 1000) as f64).collect()
}

/// The benchmark's training batch of `b` images: inputs, targets (both N(0, 1) from the
/// sampling stream of seed 0) and timesteps.
pub fn train_batch(b: usize, dev: &Device) -> (Tensor<4>, Tensor<4>, Vec<f64>) {
    let mut rng = rng_for(0, Stream::Sample, b as u64);
    let x = normal_tensor(&mut rng, [b, 3, 32, 32], dev);
    let target = normal_tensor(&mut rng, [b, 3, 32, 32], dev);
    (x, target, bench_t(b))
}

/// The benchmark's forward-pass batch: 64 N(0, 1) inputs (sampling stream of seed 0, 99) and
/// their timesteps.
pub fn forward_batch(dev: &Device) -> (Tensor<4>, Vec<f64>) {
    let mut rng = rng_for(0, Stream::Sample, 99);
    (normal_tensor(&mut rng, [64, 3, 32, 32], dev), bench_t(64))
}

/// The benchmark's AdamW: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
pub fn optimizer() -> AdamW {
    AdamW::new(0.9, 0.999, 1e-8, 0.01)
}

/// One training step: forward, the mean squared error against `target`, backward and an
/// AdamW step at learning rate 2e-4. Returns the updated model and the loss.
pub fn train_step(
    model: ReferenceUNet,
    opt: &mut AdamW,
    (x, target, t): &(Tensor<4>, Tensor<4>, Vec<f64>),
) -> (ReferenceUNet, f32) {
    let loss = (model.forward(x.clone(), t) - target.clone())
        .square()
        .mean();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let model = opt.step(model, &grads, 2e-4, 1.0);
    (model, loss.into_scalar())
}

/// Runs the benchmark: `warmup` untimed and `iters` timed steps for each measurement.
pub fn run(warmup: usize, iters: usize, log: &mut dyn FnMut(&str)) -> BenchReport {
    let dev = training_device();
    dev.seed(0);
    let mut model = ReferenceUNet::new(&dev);
    let params = model.num_params();
    let mut opt = optimizer();
    let mut train_rate = |b: usize, model: ReferenceUNet| -> (ReferenceUNet, f64) {
        let batch = train_batch(b, &dev);
        let mut model = model;
        let mut times = Vec::new();
        for step in 0..warmup + iters {
            let t0 = Instant::now();
            let (m, l) = train_step(model, &mut opt, &batch);
            model = m;
            let dt = t0.elapsed().as_secs_f64();
            log(&format!("train B={b} step {step} loss {l:.5} {dt:.3}s"));
            if step >= warmup {
                times.push(dt);
            }
        }
        (model, b as f64 / median(times))
    };
    let (m, train16) = train_rate(16, model);
    let (m, train64) = train_rate(64, m);
    model = m;
    let idev = inference_device();
    let imodel = model.valid();
    let (x, t) = forward_batch(&idev);
    let mut times = Vec::new();
    for step in 0..2 + iters {
        let t0 = Instant::now();
        let _: f32 = imodel.forward(x.clone(), &t).sum().into_scalar();
        let dt = t0.elapsed().as_secs_f64();
        log(&format!("infer B=64 step {step} {dt:.3}s"));
        if step >= 2 {
            times.push(dt);
        }
    }
    BenchReport {
        backend: crate::device::backend_name().to_string(),
        precision: match (kernels::matmul_mode(), kernels::bf16::engine()) {
            (kernels::MatmulMode::Bf16, Some(e)) => format!("bf16 ({})", e.name()),
            (mode, _) => mode.name().to_string(),
        },
        params,
        train_b16_img_per_s: train16,
        train_b64_img_per_s: train64,
        infer_b64_img_per_s: 64.0 / median(times),
        peak_rss_bytes: peak_rss_bytes(),
    }
}
