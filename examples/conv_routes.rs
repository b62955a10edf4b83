//! Times one 3x3 stride-1 convolution's forward pass in bf16 by the direct product and by
//! Winograd's F(2x2, 3x3) and F(4x4, 3x3), over the shapes of the embedded Fashion-MNIST model and the benchmark U-Net:
//! the measurement behind `conv2d::bf16_winograd`'s choices.
//!
//! - **inference**, at the batches sampling gives (one image with guidance: 2; 64 with
//!   guidance: 128) and at 64 (the benchmark's forward pass): direct against F(4x4, 3x3),
//!   weights prepared beforehand, as a loaded model keeps them;
//! - **training**, at batches 16, 32 (the embedded recipe) and 64 (the benchmark's): direct
//!   against F(2x2, 3x3), weights prepared in every call, as a training step does (its input
//!   gradient is a forward pass of the same kind, with the channel counts swapped).
//!
//!   cargo run --release --example conv_routes
//!
//! Prints one line per shape: milliseconds per call by each route (median of REPEATS, 9),
//! the direct product's time over the Winograd one's, and the route taken by default. Needs a
//! processor with a bf16 engine.
use diffuse::kernels::conv2d::{self, ConvGeometry, MatmulMode, Purpose, Winograd};
use std::time::Instant;

/// (input channels, output channels, image size).
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
                let g = ConvGeometry {
                    batch,
                    c_in,
                    h: size,
                    w: size,
                    c_out,
                    kh: 3,
                    kw: 3,
                    stride: [1, 1],
                    pad: [1, 1],
                };
                let x: Vec<f32> = (0..batch * c_in * size * size)
                    .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
                    .collect();
                let w: Vec<f32> = (0..c_out * g.k())
                    .map(|i| ((i * 104729 % 1000) as f32 - 500.0) / 5000.0)
                    .collect();
                // Training prepares the weights at every call (they change at every step).
                let time = |route: Option<Winograd>| {
                    let prepare =
                        || conv2d::PreparedWeight::for_route(MatmulMode::Bf16, route, &w, &g);
                    let kept = prepare();
                    let mut t: Vec<f64> = (0..repeats + 1)
                        .map(|_| {
                            let t0 = Instant::now();
                            let fresh = (purpose == Purpose::Training).then(prepare);
                            let p = fresh.as_ref().unwrap_or(&kept);
                            std::hint::black_box(conv2d::forward_prepared(p, &x, &w, None, &g));
                            t0.elapsed().as_secs_f64() * 1e3
                        })
                        .skip(1)
                        .collect();
                    t.sort_by(f64::total_cmp);
                    t[t.len() / 2]
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
}
