//! Times one 3x3 stride-1 convolution's forward pass in bf16 by the direct product and by
//! Winograd's F(4x4, 3x3) (weights prepared beforehand, as a loaded model keeps them), over
//! the shapes of the embedded Fashion-MNIST model and the benchmark U-Net, at the batches
//! sampling gives them (one image with guidance: 2; 64 with guidance: 128) and at 64 (the
//! benchmark's forward pass): the measurement behind `conv2d::bf16_winograd`'s choice for
//! inference.
//!
//!   cargo run --release --example conv_routes
//!
//! Prints one line per shape: milliseconds per call by each route (median of REPEATS, 9),
//! their ratio, and the route sampling takes by default. Needs a processor with a bf16 engine.
use diffuse::kernels::conv2d::{self, ConvGeometry, MatmulMode, Purpose, Winograd};
use std::time::Instant;

fn main() {
    if !diffuse::kernels::bf16_available() {
        eprintln!("skipped: no bf16 engine on this processor");
        return;
    }
    let repeats: usize = std::env::var("REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9);
    println!("batch  c_in c_out  size   direct ms   f43 ms   direct/f43   default");
    for batch in [2, 64, 128] {
        for (c_in, c_out, size) in [
            (32, 32, 28),
            (64, 64, 14),
            (64, 64, 7),
            (64, 64, 32),
            (128, 128, 16),
            (128, 128, 8),
            (256, 128, 8),
        ] {
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
            let time = |route: Option<Winograd>| {
                let p = conv2d::PreparedWeight::for_route(MatmulMode::Bf16, route, &w, &g);
                let mut t: Vec<f64> = (0..repeats + 1)
                    .map(|_| {
                        let t0 = Instant::now();
                        std::hint::black_box(conv2d::forward_prepared(&p, &x, &w, None, &g));
                        t0.elapsed().as_secs_f64() * 1e3
                    })
                    .skip(1)
                    .collect();
                t.sort_by(f64::total_cmp);
                t[t.len() / 2]
            };
            let (d, f) = (time(None), time(Some(Winograd::F43)));
            let chosen = match conv2d::winograd_of(MatmulMode::Bf16, &g, Purpose::Inference) {
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
