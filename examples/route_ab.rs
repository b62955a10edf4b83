//! Times the benchmark U-Net (`diffuse bench`) under two settings of the bf16 routes
//! (`conv2d::Bf16Routes`), step by step in one process: training steps at batches 16 and 64
//! and forward passes at batch 64, each pair of steps run A B, the next B A, so that a machine
//! whose speed drifts (as shared cloud machines do, by up to 1.8x within minutes) slows both
//! alike. The settings are named as `DIFFUSE_BF16_WINOGRAD` names them: `measured` (the
//! default), `direct`, `f23`, `f43`.
//!
//!   cargo run --release --example route_ab [-- A B [PAIRS]]
//!
//! A and B default to `direct` and `measured`, PAIRS to 12 (after 2 warm-up pairs). Prints per
//! measure the median seconds of A and of B and the median, lowest and highest of the
//! per-pair ratios A/B (above 1: B faster). Needs the AVX-512 BF16 engine (elsewhere every
//! setting is the direct product).
use burn::module::Module;
use diffuse::bench::{self, ReferenceUNet};
use diffuse::device::{inference_device, training_device};
use diffuse::kernels::conv2d::{Bf16Routes, set_bf16_routes};
use diffuse::kernels::{self, MatmulMode, bf16};
use std::time::Instant;

/// Runs `step` under the two settings for `warmup + pairs` pairs, alternating which goes
/// first, and prints the comparison.
fn compare(
    name: &str,
    settings: [Bf16Routes; 2],
    warmup: usize,
    pairs: usize,
    mut step: impl FnMut(),
) {
    let (mut a, mut b, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for p in 0..warmup + pairs {
        let mut t = [0.0; 2];
        let order = if p % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            set_bf16_routes(settings[i]);
            let t0 = Instant::now();
            step();
            t[i] = t0.elapsed().as_secs_f64();
        }
        if p >= warmup {
            a.push(t[0]);
            b.push(t[1]);
            ratio.push(t[0] / t[1]);
        }
    }
    let (lo, hi) = ratio.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &r| {
        (lo.min(r), hi.max(r))
    });
    let (ma, mb, mr) = (bench::median(a), bench::median(b), bench::median(ratio));
    println!("{name:10} A {ma:7.3} s   B {mb:7.3} s   A/B {mr:.3} (pairs {lo:.3} to {hi:.3})");
}

fn main() {
    if bf16::engine() != Some(bf16::Engine::Avx512) {
        eprintln!("skipped: the routes differ only on the AVX-512 BF16 engine");
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let setting = |i: usize, default: &str| {
        let name = args.get(i).map_or(default, String::as_str);
        Bf16Routes::parse(name).unwrap_or_else(|| {
            eprintln!("unknown routes {name:?}: expected measured, direct, f23 or f43");
            std::process::exit(2)
        })
    };
    let settings = [setting(0, "direct"), setting(1, "measured")];
    let pairs: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(12);
    println!(
        "A = {:?}, B = {:?}, {pairs} pairs",
        settings[0], settings[1]
    );
    kernels::set_matmul_mode(MatmulMode::Bf16).expect("bf16 engine");
    let dev = training_device();
    dev.seed(0);
    let mut model = Some(ReferenceUNet::new(&dev));
    let mut opt = bench::optimizer();
    for b in [16, 64] {
        let batch = bench::train_batch(b, &dev);
        compare(&format!("train B={b}"), settings, 2, pairs, || {
            let (m, _) = bench::train_step(model.take().expect("model"), &mut opt, &batch);
            model = Some(m);
        });
    }
    let idev = inference_device();
    let imodel = model.expect("model").valid();
    let (x, t) = bench::forward_batch(&idev);
    compare("infer B=64", settings, 2, pairs, || {
        let _: f32 = imodel.forward(x.clone(), &t).sum().into_scalar();
    });
}
