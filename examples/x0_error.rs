//! How far each model's clean-image estimate is from the truth at each noise level: the
//! evidence in docs/steps-quality.md for why the embedded epsilon model's ODE samplers stall.
//!
//!     cargo run --release --example x0_error -- [MODEL ...]
//!
//! For 256 Fashion-MNIST training images (every 234th, their own labels) and fixed noise, at
//! noise levels sigma (the sigma-space state is `x0 + sigma eps`), prints the RMS error of
//! `x0_hat` per pixel and the mean of `|x0_hat - clip(x0_hat, -1, 1)|` (what `clip_sample`
//! cuts). An epsilon model's `x0_hat = (x_t - sqrt(1 - ab) eps_hat) / sqrt(ab)` multiplies the
//! error of `eps_hat` by sigma, a flow model's `x0_hat = x_t - t v_hat` by `t`. Models: the
//! embedded one (always) and any given (run folders or files). Needs `diffuse fetch fashion-mnist`.

use anyhow::Result;
use burn::tensor::{Tensor, TensorData};
use diffuse::data::{self, Shape};
use diffuse::device::inference_device;
use diffuse::eval::classifier::dataset_pixels;
use diffuse::pipeline::load_model;
use diffuse::rng::{Stream, normal_tensor, rng_for};
use diffuse::schedule::flow::{model_time, time_of_sigma};

const SIGMAS: [f64; 9] = [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 60.0, 100.0, 150.0];
const N: usize = 256;

fn main() -> Result<()> {
    let dev = inference_device();
    let shape = Shape {
        size: 28,
        channels: 1,
    };
    let ds = data::load("fashion-mnist", shape, true)?;
    let idx: Vec<usize> = (0..N).map(|i| i * (ds.len() / N)).collect();
    let labels: Vec<usize> = idx
        .iter()
        .map(|&i| ds.labels.as_ref().unwrap()[i])
        .collect();
    let x0 = Tensor::<4>::from_data(
        TensorData::new(dataset_pixels(&ds, &idx), [N, 1, 28, 28]),
        &dev,
    );
    let eps = normal_tensor(&mut rng_for(0, Stream::Sample, 0), [N, 1, 28, 28], &dev);
    let specs: Vec<Option<String>> = std::iter::once(None)
        .chain(std::env::args().skip(1).map(Some))
        .collect();
    println!("| model | prediction | sigma | RMS error of x0_hat | mean amount clip_sample cuts |");
    println!("|---|---|---|---|---|");
    for spec in specs {
        let m = load_model(spec.as_deref(), &dev)?;
        let p = m.config.prediction;
        let sched = &m.scheduler.schedule;
        let t_len = sched.len();
        for sigma in SIGMAS {
            // The state at this sigma, the model's own time, and its x0_hat.
            let (sigma_used, x0_hat) = if p.is_flow() {
                let t = time_of_sigma(sigma);
                let x_t = x0.clone() * ((1.0 - t) as f32) + eps.clone() * (t as f32);
                let time = model_time(t, t_len);
                let v = m.unet.forward(x_t.clone(), &vec![time; N], Some(&labels));
                let x0_hat = x_t - v * (t as f32);
                (sigma, x0_hat)
            } else {
                // The training timestep whose sigma is nearest (in log).
                let sig = |k: usize| {
                    let ab = sched.alphas_cumprod[k];
                    ((1.0 - ab) / ab).sqrt()
                };
                let k = (0..t_len)
                    .min_by(|&a, &b| {
                        (sig(a).ln() - sigma.ln())
                            .abs()
                            .total_cmp(&(sig(b).ln() - sigma.ln()).abs())
                    })
                    .unwrap();
                let ab = sched.alphas_cumprod[k];
                let (a, s) = (ab.sqrt() as f32, (1.0 - ab).sqrt() as f32);
                let x_t = x0.clone() * a + eps.clone() * s;
                let out = m
                    .unet
                    .forward(x_t.clone(), &vec![k as f64; N], Some(&labels));
                let x0_hat = (x_t - out * s) / a;
                (sig(k), x0_hat)
            };
            let err: f32 = (x0_hat.clone() - x0.clone())
                .powi_scalar(2)
                .mean()
                .into_scalar::<f32>();
            let cut: f32 = (x0_hat.clone() - x0_hat.clamp(-1.0, 1.0))
                .abs()
                .mean()
                .into_scalar::<f32>();
            println!(
                "| {} | {:?} | {:.3} | {:.4} | {:.4} |",
                m.source,
                p,
                sigma_used,
                err.sqrt(),
                cut
            );
        }
    }
    Ok(())
}
