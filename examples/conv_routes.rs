//! Times one 3x3 stride-1 convolution in bf16 by each route that could run it, over the
//! shapes of the embedded Fashion-MNIST model and the benchmark U-Net: the measurement behind
//! `conv2d::bf16_winograd`'s and `conv2d::grad_reads_pairs`'s choices.
//!
//! - **inference** (the forward pass), at the batches sampling gives (one image with
//!   guidance: 2; 64 with guidance: 128) and at 64 (the benchmark's forward pass): direct
//!   against F(4x4, 3x3), weights prepared beforehand, as a loaded model keeps them;
//! - **training** (the forward pass), at batches 16, 32 (the embedded recipe) and 64 (the
//!   benchmark's): direct against F(2x2, 3x3), weights prepared in every call, as a training
//!   step does (its input gradient is a forward pass of the same kind, with the channel
//!   counts swapped);
//! - **weight gradients**, on AMX only, at the benchmark U-Net's shapes (batches 16 and 64)
//!   and the default Fashion-MNIST network's (24 channels, batch 32): the bf16 product read in
//!   place (`conv2d::backward_weight_pairs`) against F(4x4, 3x3) in f32, the bias gradient
//!   included in both.
//!
//!   cargo run --release --example conv_routes
//!
//! Prints one line per shape: milliseconds per call by each route (median of REPEATS, 9),
//! the first route's time over the second's, and the route taken by default. Needs a
//! processor with a bf16 engine.
use diffuse::kernels::bf16;
use diffuse::kernels::conv2d::{self, ConvGeometry, MatmulMode, Purpose, Winograd};
use std::time::Instant;

/// (input channels, output channels, image size) of the forward passes.
const SHAPES: [(usize, usize, usize); 13] = [
    (32, 32, 28),
    (64, 32, 28),
    (32, 64, 14),
    (64, 64, 14),
    (128, 64, 14),
    (64, 64, 7),
    (64, 64, 32),
    (192, 64, 32),
    (64, 128, 16),
    (128, 128, 16),
    (256, 128, 16),
    (128, 128, 8),
    (256, 128, 8),
];

/// (batch, input channels, output channels, image size) of the weight gradients.
const GRAD_SHAPES: [(usize, usize, usize, usize); 16] = [
    (16, 64, 64, 32),
    (16, 128, 64, 32),
    (16, 192, 64, 32),
    (16, 128, 128, 16),
    (16, 256, 128, 16),
    (16, 256, 256, 8),
    (16, 512, 256, 8),
    (64, 64, 64, 32),
    (64, 128, 128, 16),
    (64, 256, 256, 8),
    (32, 24, 24, 28),
    (32, 48, 24, 28),
    (32, 72, 24, 28),
    (32, 48, 48, 14),
    (32, 96, 96, 7),
    (4, 64, 64, 32),
];

/// A 3x3 convolution keeping the image size.
fn geometry(batch: usize, c_in: usize, c_out: usize, size: usize) -> ConvGeometry {
    ConvGeometry {
        batch,
        c_in,
        h: size,
        w: size,
        c_out,
        kh: 3,
        kw: 3,
        stride: [1, 1],
        pad: [1, 1],
    }
}

/// `len` values in [-1, 1) times `scale`, spread by the prime `p`.
fn values(len: usize, p: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * p % 1000) as f32 - 500.0) / 500.0 * scale)
        .collect()
}

/// Median milliseconds of `repeats` calls of `f`, after one untimed call.
fn median_ms(repeats: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..repeats + 1)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .skip(1)
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    if !diffuse::kernels::bf16_available() {
        eprintln!("skipped: no bf16 engine on this processor");
        return;
    }
    let repeats: usize = std::env::var("REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9);
    for (purpose, batches, route) in [
        (Purpose::Inference, [2, 64, 128], Winograd::F43),
        (Purpose::Training, [16, 32, 64], Winograd::F23),
    ] {
        let name = match route {
            Winograd::F43 => "f43",
            Winograd::F23 => "f23",
        };
        println!("{purpose:?}");
        println!("batch  c_in c_out  size   direct ms   {name} ms   direct/{name}   default");
        for batch in batches {
            for (c_in, c_out, size) in SHAPES {
                let g = geometry(batch, c_in, c_out, size);
                let x = values(batch * c_in * size * size, 7919, 1.0);
                let w = values(c_out * g.k(), 104729, 0.1);
                // Training prepares the weights at every call (they change at every step).
                let time = |route: Option<Winograd>| {
                    let prepare =
                        || conv2d::PreparedWeight::for_route(MatmulMode::Bf16, route, &w, &g);
                    let kept = prepare();
                    median_ms(repeats, || {
                        let fresh = (purpose == Purpose::Training).then(prepare);
                        let p = fresh.as_ref().unwrap_or(&kept);
                        std::hint::black_box(conv2d::forward_prepared(p, &x, &w, None, &g));
                    })
                };
                let (d, f) = (time(None), time(Some(route)));
                let chosen = match conv2d::winograd_of(MatmulMode::Bf16, &g, purpose) {
                    Some(Winograd::F43) => "f43",
                    Some(Winograd::F23) => "f23",
                    None => "direct",
                };
                println!(
                    "{batch:5} {c_in:5} {c_out:5} {size:5} {d:11.3} {f:8.3} {:12.2}   {chosen}",
                    d / f
                );
            }
        }
    }
    if bf16::engine() != Some(bf16::Engine::Amx) {
        println!("Weight gradients: skipped, the in-place route needs AMX");
        return;
    }
    println!("Weight gradients");
    println!("batch  c_in c_out  size   in place ms   f32 ms   f32/in place   default");
    for (batch, c_in, c_out, size) in GRAD_SHAPES {
        let g = geometry(batch, c_in, c_out, size);
        let x = values(batch * c_in * size * size, 7919, 1.0);
        let dy = values(batch * c_out * size * size, 104729, 0.1);
        let pairs = median_ms(repeats, || {
            std::hint::black_box(conv2d::backward_weight_pairs(&x, &dy, &g));
        });
        let f32_route = median_ms(repeats, || {
            std::hint::black_box(diffuse::kernels::winograd43::backward_weight(&x, &dy, &g));
        });
        let chosen = if conv2d::grad_reads_pairs(MatmulMode::Bf16, &g) {
            "in place"
        } else {
            "f32"
        };
        println!(
            "{batch:5} {c_in:5} {c_out:5} {size:5} {pairs:13.3} {f32_route:8.3} {:14.2}   {chosen}",
            f32_route / pairs
        );
    }
}
