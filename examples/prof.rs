use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Distribution, Tensor};
use diffuse::train::{adamw, ema};
use diffuse::unet::{UNet, UNetConfig};
use std::time::Instant;

fn main() {
    let b: usize = std::env::var("B")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let base: usize = std::env::var("BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let groups: usize = std::env::var("G")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let cfg = UNetConfig {
        image_size: 28,
        in_channels: 1,
        out_channels: 1,
        base_channels: base,
        channel_mult: vec![1, 2, 2],
        num_res_blocks: 2,
        attention_resolutions: vec![7],
        dropout: 0.1,
        norm_groups: groups,
        num_classes: Some(10),
    };
    let dev = diffuse::device::training_device();
    let mut model = UNet::new(&cfg, &dev).unwrap();
    println!("params {}", model.num_params());
    let mut opt = adamw::AdamW::new(0.9, 0.999, 1e-8, 0.0);
    let mut emam = model.valid();
    let t: Vec<f64> = (0..b).map(|i| ((i * 7919 + 13) % 1000) as f64).collect();
    let labels: Vec<usize> = (0..b).map(|i| i % 11).collect();
    for it in 0..4 {
        let x = Tensor::<4>::random([b, 1, 28, 28], Distribution::Normal(0.0, 1.0), &dev);
        let tg = Tensor::<4>::random([b, 1, 28, 28], Distribution::Normal(0.0, 1.0), &dev);
        let t0 = Instant::now();
        let out = model.forward(x, &t, Some(&labels));
        let loss = (out - tg).square().mean();
        let l: f32 = loss.clone().into_scalar();
        let t1 = Instant::now();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let t2 = Instant::now();
        let gn = adamw::grad_norm(&model, &grads);
        let t3 = Instant::now();
        model = opt.step(model, &grads, 1e-4, 1.0);
        let t4 = Instant::now();
        emam = ema::update(emam, &model, 0.99);
        let _: f32 = emam.out_conv.weight.val().sum().into_scalar();
        let t5 = Instant::now();
        println!(
            "it {it} loss {l:.4} fwd {:.3} bwd {:.3} gnorm {:.3} ({gn:.2}) opt {:.3} ema {:.3}",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            (t4 - t3).as_secs_f64(),
            (t5 - t4).as_secs_f64()
        );
    }
    let m = model.valid();
    let idev = diffuse::device::inference_device();
    for _ in 0..3 {
        let x = Tensor::<4>::random([b, 1, 28, 28], Distribution::Normal(0.0, 1.0), &idev);
        let t0 = Instant::now();
        let out = m.forward(x, &t, Some(&labels));
        let _: f32 = out.sum().into_scalar();
        println!("infer {:.3}", t0.elapsed().as_secs_f64());
    }
}
