//! The project's CPU kernels: against closed forms, finite differences and burn's own operations
//! (same outputs and same gradients).

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig;
use burn::tensor::{Device, Tensor};
use diffuse::device::{inference_device, training_device};
use diffuse::kernels;
use diffuse::kernels::bf16;
use diffuse::kernels::conv2d::{self, ConvGeometry, MatmulMode};
use diffuse::kernels::group_norm::{self, NormGeometry};
use diffuse::kernels::{winograd, winograd43};
use diffuse::rng::{Stream, normal_tensor, rng_for};

fn max_rel<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    let scale: f32 = b.clone().abs().max().into_scalar();
    let diff: f32 = (a - b).abs().max().into_scalar();
    diff / scale.max(1e-12)
}

/// (c_in, c_out, kernel, stride, padding, bias)
const CASES: [(usize, usize, usize, usize, usize, bool); 5] = [
    (4, 6, 3, 1, 1, true),
    (5, 3, 3, 2, 1, true),
    (6, 4, 1, 1, 0, true),
    (3, 5, 3, 1, 0, false),
    (4, 4, 3, 2, 0, true),
];

fn conv(case: (usize, usize, usize, usize, usize, bool), dev: &Device) -> burn::nn::conv::Conv2d {
    let (ci, co, k, s, p, bias) = case;
    Conv2dConfig::new([ci, co], [k, k])
        .with_stride([s, s])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .with_bias(bias)
        .init(dev)
}

#[test]
fn conv2d_forward_matches_burn() {
    let dev = inference_device();
    for (i, case) in CASES.iter().enumerate() {
        dev.seed(i as u64);
        let m = conv(*case, &dev);
        let mut rng = rng_for(1, Stream::Sample, i as u64);
        let x = normal_tensor(&mut rng, [3, case.0, 9, 7], &dev);
        let ours = kernels::try_conv2d(&m, x.clone()).expect("the kernel applies");
        let theirs = m.forward(x);
        assert_eq!(ours.dims(), theirs.dims(), "case {case:?}");
        let err = max_rel(ours, theirs);
        assert!(err < 1e-5, "case {case:?}: {err}");
    }
}

#[test]
fn conv2d_gradients_match_burn() {
    let dev = training_device();
    for (i, case) in CASES.iter().enumerate() {
        dev.seed(10 + i as u64);
        let m = conv(*case, &dev);
        let mut rng = rng_for(2, Stream::Sample, i as u64);
        let x = normal_tensor(&mut rng, [2, case.0, 8, 8], &dev).require_grad();
        let probe = {
            let [b, _, h, w] = m.forward(x.clone()).dims();
            normal_tensor(&mut rng, [b, case.1, h, w], &dev)
        };
        let grads_of = |y: Tensor<4>| {
            let g = (y * probe.clone()).sum().backward();
            let gx = x.grad(&g).expect("input gradient");
            let gw = m.weight.val().grad(&g).expect("weight gradient");
            let gb = m
                .bias
                .as_ref()
                .map(|b| b.val().grad(&g).expect("bias gradient"));
            (gx, gw, gb)
        };
        let (ox, ow, ob) =
            grads_of(kernels::try_conv2d(&m, x.clone()).expect("the kernel applies"));
        let (tx, tw, tb) = grads_of(m.forward(x.clone()));
        assert!(max_rel(ox, tx) < 1e-5, "input gradient, case {case:?}");
        assert!(max_rel(ow, tw) < 1e-5, "weight gradient, case {case:?}");
        if let (Some(ob), Some(tb)) = (ob, tb) {
            assert!(max_rel(ob, tb) < 1e-5, "bias gradient, case {case:?}");
        }
    }
}

#[test]
fn group_norm_matches_burn_forward_and_gradients() {
    use burn::nn::GroupNormConfig;
    use burn::tensor::activation::silu;
    for (i, silu_after) in [false, true].into_iter().enumerate() {
        // Plain tensors: forward only.
        let dev = inference_device();
        let mut rng = rng_for(3, Stream::Sample, i as u64);
        let m = GroupNormConfig::new(3, 6).init(&dev);
        let x = normal_tensor(&mut rng, [2, 6, 5, 4], &dev)
            .mul_scalar(3.0)
            .add_scalar(1.0);
        let ours = kernels::try_group_norm(&m, x.clone(), silu_after).expect("the kernel applies");
        let theirs = if silu_after {
            silu(m.forward(x.clone()))
        } else {
            m.forward(x)
        };
        assert!(max_rel(ours, theirs) < 1e-5, "forward, silu {silu_after}");

        // Tracked tensors: gradients of <probe, y> in x, gamma and beta (non-trivial affine).
        let dev = training_device();
        let mut m = GroupNormConfig::new(3, 6).init(&dev);
        let gamma = normal_tensor(&mut rng, [1, 1, 1, 6], &dev).reshape([6]);
        let beta = normal_tensor(&mut rng, [1, 1, 1, 6], &dev).reshape([6]);
        m.gamma = Some(burn::module::Param::from_tensor(gamma));
        m.beta = Some(burn::module::Param::from_tensor(beta));
        let x = normal_tensor(&mut rng, [2, 6, 5, 4], &dev).require_grad();
        let probe = normal_tensor(&mut rng, [2, 6, 5, 4], &dev);
        let grads_of = |y: Tensor<4>| {
            let g = (y * probe.clone()).sum().backward();
            (
                x.grad(&g).expect("input gradient"),
                m.gamma
                    .as_ref()
                    .unwrap()
                    .val()
                    .grad(&g)
                    .expect("gamma gradient"),
                m.beta
                    .as_ref()
                    .unwrap()
                    .val()
                    .grad(&g)
                    .expect("beta gradient"),
            )
        };
        let (ox, og, ob) = grads_of(kernels::try_group_norm(&m, x.clone(), silu_after).unwrap());
        let burn_y = if silu_after {
            silu(m.forward(x.clone()))
        } else {
            m.forward(x.clone())
        };
        let (tx, tg, tb) = grads_of(burn_y);
        assert!(max_rel(ox, tx) < 1e-4, "input gradient, silu {silu_after}");
        assert!(max_rel(og, tg) < 1e-5, "gamma gradient, silu {silu_after}");
        assert!(max_rel(ob, tb) < 1e-5, "beta gradient, silu {silu_after}");
    }
}

/// Deterministic test values uniform in `[-amp, amp]` (xorshift32).
fn test_values(n: usize, seed: u32, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 * amp - amp
        })
        .collect()
}

// The convolution kernel against closed forms.

/// Calls `f(xi, wi, yi)` for every product `x[xi]·w[wi]` that the convolution adds into
/// `y[yi]`: y[b,co,oy,ox] takes w[co,ci,ky,kx]·x[b,ci,oy·s+ky-p,ox·s+kx-p] (zero outside).
fn for_each_tap(g: &ConvGeometry, mut f: impl FnMut(usize, usize, usize)) {
    let [oh, ow] = g.out_hw();
    for b in 0..g.batch {
        for co in 0..g.c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let yi = ((b * g.c_out + co) * oh + oy) * ow + ox;
                    for ci in 0..g.c_in {
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let iy = (oy * g.stride[0] + ky) as isize - g.pad[0] as isize;
                                let ix = (ox * g.stride[1] + kx) as isize - g.pad[1] as isize;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                let xi =
                                    ((b * g.c_in + ci) * g.h + iy as usize) * g.w + ix as usize;
                                let wi = ((co * g.c_in + ci) * g.kh + ky) * g.kw + kx;
                                f(xi, wi, yi);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn to_f32(v: Vec<f64>) -> Vec<f32> {
    v.into_iter().map(|v| v as f32).collect()
}

/// Direct definition in f64: y[b,co,oy,ox] = bias[co] + Σ w[co,ci,ky,kx]·x[b,ci,oy·s+ky-p,ox·s+kx-p].
fn direct(x: &[f32], w: &[f32], bias: &[f32], g: &ConvGeometry) -> Vec<f32> {
    let n = g.n();
    let mut y: Vec<f64> = (0..g.batch * g.c_out * n)
        .map(|i| bias[i / n % g.c_out] as f64)
        .collect();
    for_each_tap(g, |xi, wi, yi| y[yi] += x[xi] as f64 * w[wi] as f64);
    to_f32(y)
}

fn conv_values(n: usize, seed: u32) -> Vec<f32> {
    test_values(n, seed, 1.0)
}

/// A square-kernel geometry with equal strides and padding.
#[allow(clippy::too_many_arguments)]
fn geom(
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k: usize,
    s: usize,
    p: usize,
) -> ConvGeometry {
    ConvGeometry {
        batch,
        c_in,
        h,
        w,
        c_out,
        kh: k,
        kw: k,
        stride: [s, s],
        pad: [p, p],
    }
}

fn geometries() -> Vec<ConvGeometry> {
    let g = geom;
    vec![
        g(3, 4, 7, 6, 5, 3, 1, 1),
        g(2, 3, 8, 8, 4, 3, 2, 1),
        g(1, 5, 5, 9, 3, 1, 1, 0),
        g(2, 2, 6, 6, 3, 3, 2, 0),
        g(4, 3, 4, 4, 2, 3, 1, 2),
        // The kernel reaches past the whole image: some taps see no pixel at all (a 2x2
        // autoregressive model's 7x7 first layer).
        g(2, 2, 2, 2, 3, 7, 1, 3),
        g(1, 2, 3, 2, 2, 5, 2, 3),
    ]
}

fn max_rel_slice(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0.0, f32::max)
}

#[test]
fn conv2d_forward_matches_the_direct_sum() {
    for g in geometries() {
        let x = conv_values(g.batch * g.c_in * g.h * g.w, 1);
        let w = conv_values(g.c_out * g.k(), 2);
        let bias = conv_values(g.c_out, 3);
        let got = conv2d::forward(MatmulMode::F32, &x, &w, Some(&bias), &g);
        let want = direct(&x, &w, &bias, &g);
        assert!(max_rel_slice(&got, &want) < 1e-5, "{g:?}");
    }
}

/// The gradients are the adjoints of the forward map: <dy, conv(x)> is linear in x and in
/// w, so <dy, conv(x; w)> = <backward_input(dy), x> = <backward_weight(x, dy), w> (no bias).
#[test]
fn conv2d_gradients_are_adjoints_of_the_forward_map() {
    for g in geometries() {
        let x = conv_values(g.batch * g.c_in * g.h * g.w, 4);
        let w = conv_values(g.c_out * g.k(), 5);
        let dy = conv_values(g.batch * g.c_out * g.n(), 6);
        let y = conv2d::forward(MatmulMode::F32, &x, &w, None, &g);
        let dot = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(p, q)| *p as f64 * *q as f64).sum()
        };
        let lhs = dot(&dy, &y);
        let dx = conv2d::backward_input(MatmulMode::F32, &dy, &w, &g);
        let (dw, db) = conv2d::backward_weight(MatmulMode::F32, &x, &dy, &g);
        let tol = 1e-4 * lhs.abs().max(1.0);
        assert!((dot(&dx, &x) - lhs).abs() < tol, "input gradient {g:?}");
        assert!((dot(&dw, &w) - lhs).abs() < tol, "weight gradient {g:?}");
        let total: f64 = dy.iter().map(|v| *v as f64).sum();
        assert!((db.iter().map(|v| *v as f64).sum::<f64>() - total).abs() < 1e-3);
    }
}

// Winograd's F(2x2, 3x3) and F(4x4, 3x3) against the direct sums, in f64.

/// Direct gradients of the convolution without bias: dx[b,ci,iy,ix] = Σ dy[b,co,oy,ox]·w[co,ci,ky,kx]
/// and dw[co,ci,ky,kx] = Σ dy[b,co,oy,ox]·x[b,ci,iy,ix], over iy = oy·s + ky - p, ix likewise.
fn direct_grads(x: &[f32], w: &[f32], dy: &[f32], g: &ConvGeometry) -> (Vec<f32>, Vec<f32>) {
    let mut dx = vec![0.0f64; x.len()];
    let mut dw = vec![0.0f64; w.len()];
    for_each_tap(g, |xi, wi, yi| {
        dx[xi] += dy[yi] as f64 * w[wi] as f64;
        dw[wi] += dy[yi] as f64 * x[xi] as f64;
    });
    (to_f32(dx), to_f32(dw))
}

/// 3x3 stride-1 geometries: odd and even sizes, paddings 0-2, one image per group (33x34:
/// more than 256 tiles) and many (6x6: 9 tiles), a last group that is not full (40 images of
/// 9 tiles: groups of 29), several partial sums of the weight gradient, channels past 16.
fn winograd_geometries() -> Vec<ConvGeometry> {
    let g = geom;
    vec![
        g(5, 3, 33, 34, 4, 3, 1, 1),
        g(20, 2, 7, 5, 3, 3, 1, 1),
        g(40, 2, 6, 6, 3, 3, 1, 1),
        g(3, 4, 9, 8, 5, 3, 1, 0),
        g(2, 3, 5, 6, 4, 3, 1, 2),
        g(2, 19, 10, 10, 21, 3, 1, 1),
        g(1, 2, 1, 1, 2, 3, 1, 1),
    ]
}

#[test]
fn winograd_convolution_matches_the_direct_sums() {
    for g in winograd_geometries() {
        assert!(winograd::applies(&g));
        let x = conv_values(g.batch * g.c_in * g.h * g.w, 21);
        let w = conv_values(g.c_out * g.k(), 22);
        let bias = conv_values(g.c_out, 23);
        let dy = conv_values(g.batch * g.c_out * g.n(), 24);
        let want = direct(&x, &w, &bias, &g);
        let y = winograd::forward(MatmulMode::F32, &x, &w, Some(&bias), &g);
        assert!(max_rel_slice(&y, &want) < 1e-5, "forward {g:?}");
        let y43 = winograd43::forward(MatmulMode::F32, &x, &w, Some(&bias), &g);
        assert!(
            max_rel_slice(&y43, &want) < 1e-5,
            "F(4x4,3x3) forward {g:?}"
        );
        let (dx_want, dw_want) = direct_grads(&x, &w, &dy, &g);
        let (dw, db) = winograd::backward_weight(&x, &dy, &g);
        assert!(max_rel_slice(&dw, &dw_want) < 1e-5, "weight gradient {g:?}");
        let (dw43, db43) = winograd43::backward_weight(&x, &dy, &g);
        assert!(
            max_rel_slice(&dw43, &dw_want) < 1e-5,
            "F(4x4,3x3) weight gradient {g:?}"
        );
        assert_eq!(db43, db, "F(4x4,3x3) bias gradient {g:?}");
        let n = g.n();
        let db_want: Vec<f32> = (0..g.c_out)
            .map(|co| {
                let planes = (0..g.batch).map(|b| &dy[(b * g.c_out + co) * n..][..n]);
                planes.flatten().map(|v| *v as f64).sum::<f64>() as f32
            })
            .collect();
        assert!(max_rel_slice(&db, &db_want) < 1e-5, "bias gradient {g:?}");
        // The f32 input gradient takes the forward path with the kernel turned where the
        // convolution keeps the image size, and the column matrix otherwise.
        let dx = conv2d::backward_input(MatmulMode::F32, &dy, &w, &g);
        assert!(max_rel_slice(&dx, &dx_want) < 1e-5, "input gradient {g:?}");
    }
}

/// Same bits on 1 and 3 threads: groups spread over the cores, or each group's steps when
/// there are fewer groups than cores.
#[test]
fn winograd_convolution_is_deterministic() {
    for g in [
        geom(5, 3, 33, 34, 4, 3, 1, 1),
        geom(40, 2, 6, 6, 3, 3, 1, 1),
    ] {
        let x = conv_values(g.batch * g.c_in * g.h * g.w, 25);
        let w = conv_values(g.c_out * g.k(), 26);
        let dy = conv_values(g.batch * g.c_out * g.n(), 27);
        let run = || {
            (
                winograd::forward(MatmulMode::F32, &x, &w, None, &g),
                winograd::backward_weight(&x, &dy, &g),
                winograd43::forward(MatmulMode::F32, &x, &w, None, &g),
                winograd43::backward_weight(&x, &dy, &g),
            )
        };
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(run)
        };
        assert_eq!(on(1), on(3), "{g:?}");
    }
}

// The group-norm kernel against finite differences.

fn norm_values(n: usize, seed: u32) -> Vec<f32> {
    test_values(n, seed, 2.0)
}

/// The analytic backward against central differences of the forward, in every input.
#[test]
fn group_norm_backward_matches_finite_differences() {
    for silu in [false, true] {
        let g = NormGeometry {
            batch: 2,
            channels: 6,
            pixels: 5,
            groups: 3,
            eps: 1e-5,
            silu,
        };
        let x = norm_values(g.batch * g.channels * g.pixels, 1);
        let gamma = norm_values(g.channels, 2);
        let beta = norm_values(g.channels, 3);
        let probe = norm_values(x.len(), 4);
        let loss = |x: &[f32], gm: &[f32], bt: &[f32]| -> f64 {
            group_norm::forward(x, gm, bt, &g)
                .iter()
                .zip(&probe)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum()
        };
        let (dx, dg, db) = group_norm::backward(&x, &gamma, &beta, &probe, &g);
        let h = 1e-2f32;
        let check = |analytic: &[f32], which: usize| {
            for (i, a) in analytic.iter().enumerate() {
                let (mut xp, mut gp, mut bp) = (x.clone(), gamma.clone(), beta.clone());
                let (mut xm, mut gm, mut bm) = (x.clone(), gamma.clone(), beta.clone());
                match which {
                    0 => (xp[i] += h, xm[i] -= h),
                    1 => (gp[i] += h, gm[i] -= h),
                    _ => (bp[i] += h, bm[i] -= h),
                };
                let num = (loss(&xp, &gp, &bp) - loss(&xm, &gm, &bm)) / (2.0 * h as f64);
                assert!(
                    (num - *a as f64).abs() < 2e-2 * (1.0 + num.abs()),
                    "silu {silu}, input {which}, index {i}: numeric {num}, analytic {a}"
                );
            }
        };
        check(&dx, 0);
        check(&dg, 1);
        check(&db, 2);
    }
}

// The bf16 path (AMX or AVX-512 BF16): with its operands rounded to bf16 first, the f32 path computes the
// same products, so the two must agree to f32 summation error, far tighter than the bf16
// rounding itself (about 4e-3 relative).

fn to_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::f32_of(bf16::bf16(x))).collect()
}

#[test]
fn bf16_rounding_is_to_nearest_even() {
    assert_eq!(bf16::bf16(1.0), 0x3f80);
    assert_eq!(bf16::bf16(-2.0), 0xc000);
    // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even neighbour, 1.
    assert_eq!(bf16::bf16(1.0 + 1.0 / 256.0), 0x3f80);
    // 1 + 3·2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: ties go up to the even one.
    assert_eq!(bf16::bf16(1.0 + 3.0 / 256.0), 0x3f82);
    assert_eq!(bf16::f32_of(bf16::bf16(0.1)), 0.100097656);
    assert!(bf16::f32_of(bf16::bf16(f32::NAN)).is_nan());
}

/// The vector rounding that prepares padded images ([`bf16::round_into`]) against the scalar
/// one, at every length up to 40 (whole vectors and masked tails), on ties, signs, extremes,
/// infinities and NaN; subnormal inputs become zero (the conversion instruction reads them as
/// zero), where the scalar rounding keeps them.
#[test]
#[cfg_attr(
    not(has_bf16),
    ignore = "skipped: this processor has neither AVX-512 BF16 nor AMX-BF16"
)]
fn bf16_vector_rounding_matches_the_scalar_one() {
    let special = [
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        -(1.0 + 3.0 / 256.0),
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        f32::NAN,
    ];
    let values: Vec<f32> = special.iter().copied().chain(conv_values(30, 11)).collect();
    for len in 0..=values.len() {
        let src = &values[values.len() - len..];
        let mut got = vec![0xffffu16; len];
        bf16::round_into(src, &mut got);
        for (&x, &h) in src.iter().zip(&got) {
            if x.is_nan() {
                assert!(bf16::f32_of(h).is_nan(), "NaN rounded to {h:#x}");
            } else {
                assert_eq!(h, bf16::bf16(x), "{x:e} at length {len}");
            }
        }
    }
    let mut got = [0xffffu16; 2];
    bf16::round_into(&[1e-40, -1e-40], &mut got);
    assert_eq!(got.map(bf16::f32_of), [0.0, -0.0], "subnormals {got:?}");
}

#[test]
#[cfg_attr(
    not(has_bf16),
    ignore = "skipped: this processor has neither AVX-512 BF16 nor AMX-BF16"
)]
fn bf16_convolution_equals_f32_on_rounded_operands() {
    assert!(
        kernels::bf16_available(),
        "the processor lists a bf16 engine but the bf16 path is not available"
    );
    let mut cases = geometries();
    // Many blocks, panels and chunks along k (K = 2304 exceeds one chunk at 200 rows).
    cases.push(geom(2, 256, 5, 7, 200, 3, 1, 1));
    // Rows of 20 pixels: some 16-column tiles lie inside one image row, others span two.
    cases.push(geom(2, 6, 9, 20, 33, 3, 1, 1));
    cases.push(geom(1, 40, 12, 12, 70, 1, 1, 0));
    // On AMX, multiples of 32 input channels read their tiles from the image in channel
    // pairs (`conv2d::reads_pairs`): panels of 32 columns spanning several padded rows
    // (20 wide), ending mid-row, fewer pixels than one panel (2x2 with a 5x5 kernel), no
    // padding (each output row shorter than the padded one), 64 output channels (the input
    // gradient reads pairs too), output channels past whole blocks, and input channels
    // padded with zero channels to 32 and 64.
    cases.push(geom(2, 32, 20, 20, 40, 3, 1, 1));
    cases.push(geom(2, 24, 9, 9, 48, 3, 1, 1));
    cases.push(geom(1, 40, 6, 6, 20, 3, 1, 1));
    cases.push(geom(1, 64, 9, 11, 33, 3, 1, 0));
    cases.push(geom(3, 32, 2, 2, 16, 5, 1, 2));
    cases.push(geom(2, 32, 8, 8, 64, 3, 1, 1));
    // On AMX, weight gradients of 16 or more input and output channels read the image and
    // dy in pixel pairs in place (`conv2d::grad_reads_pairs`): chunks of four images laid end
    // to end (a batch of 5 gives a second, shorter chunk), channels padded to 32 on both
    // sides, and images smaller than one step of 32 pixels.
    cases.push(geom(5, 16, 7, 9, 24, 3, 1, 1));
    cases.push(geom(6, 48, 3, 3, 40, 3, 1, 0));
    for g in cases {
        let x = conv_values(g.batch * g.c_in * g.h * g.w, 7);
        let w = conv_values(g.c_out * g.k(), 8);
        let bias = conv_values(g.c_out, 9);
        let dy = conv_values(g.batch * g.c_out * g.n(), 10);
        let (xr, wr, dyr) = (to_bf16(&x), to_bf16(&w), to_bf16(&dy));

        let got = conv2d::forward(MatmulMode::Bf16, &x, &w, Some(&bias), &g);
        let want = direct(&xr, &wr, &bias, &g);
        assert!(max_rel_slice(&got, &want) < 1e-5, "forward {g:?}");
        // And the rounding matters: against unrounded operands the error is bf16-sized.
        let exact = direct(&x, &w, &bias, &g);
        let err = max_rel_slice(&got, &exact);
        assert!(err > 1e-5 && err < 2e-2, "forward vs f32 {err} {g:?}");

        let dx = conv2d::backward_input(MatmulMode::Bf16, &dy, &w, &g);
        let dx_want = conv2d::backward_input(MatmulMode::F32, &dyr, &wr, &g);
        assert!(max_rel_slice(&dx, &dx_want) < 1e-5, "input gradient {g:?}");

        let (dw, db) = conv2d::backward_weight(MatmulMode::Bf16, &x, &dy, &g);
        let (dw_f32, db_want) = conv2d::backward_weight(MatmulMode::F32, &x, &dy, &g);
        if conv2d::weight_grad_in_f32(MatmulMode::Bf16, &g) {
            // 3x3 stride-1 convolutions of 16 input channels or more: F(4x4, 3x3) in f32.
            assert_eq!(dw, dw_f32, "weight gradient in f32 {g:?}");
        } else {
            let (dw_want, _) = conv2d::backward_weight(MatmulMode::F32, &xr, &dyr, &g);
            assert!(max_rel_slice(&dw, &dw_want) < 1e-5, "weight gradient {g:?}");
        }
        assert_eq!(db, db_want, "bias gradient {g:?}");
    }
}

/// Which convolutions read their image tiles in place on AMX (`conv2d::reads_pairs`, and for
/// weight gradients `conv2d::grad_reads_pairs`), so that the cases above cover those routes:
/// on any other processor they are off, and the test says so.
#[test]
fn bf16_pairs_route_is_taken_on_amx() {
    let pairs = |g: ConvGeometry| conv2d::reads_pairs(MatmulMode::Bf16, &g);
    if bf16::engine() != Some(bf16::Engine::Amx) {
        println!("skipped: no AMX here, so no convolution reads channel or pixel pairs");
        assert!(!pairs(geom(2, 32, 20, 20, 40, 3, 1, 1)));
        assert!(!conv2d::grad_reads_pairs(
            MatmulMode::Bf16,
            &geom(2, 32, 20, 20, 40, 3, 1, 1)
        ));
        return;
    }
    assert!(pairs(geom(2, 32, 20, 20, 40, 3, 1, 1)));
    assert!(pairs(geom(1, 256, 5, 7, 200, 3, 1, 1)));
    assert!(!conv2d::reads_pairs(
        MatmulMode::F32,
        &geom(2, 32, 20, 20, 40, 3, 1, 1)
    ));
    // Multiples of 8 from 24 on, padded with zero channels.
    assert!(pairs(geom(1, 24, 8, 8, 48, 3, 1, 1)));
    assert!(pairs(geom(1, 72, 8, 8, 48, 3, 1, 1)));
    // 1x1, strided, few channels, and channels not a multiple of 8 keep the packed route.
    assert!(!pairs(geom(1, 64, 8, 8, 64, 1, 1, 0)));
    assert!(!pairs(geom(1, 64, 8, 8, 64, 3, 2, 1)));
    assert!(!pairs(geom(1, 16, 8, 8, 64, 3, 1, 1)));
    assert!(!pairs(geom(1, 36, 8, 8, 64, 3, 1, 1)));
    // Weight gradients: 16 or more input and output channels, stride 1, larger than 1x1, and
    // sums of at most 1.5 MiB (256 by 128 channels of 3x3, not 256 by 256).
    let grads = |g: ConvGeometry| conv2d::grad_reads_pairs(MatmulMode::Bf16, &g);
    for g in [
        geom(2, 32, 20, 20, 40, 3, 1, 1),
        geom(5, 16, 7, 9, 24, 3, 1, 1),
        geom(6, 48, 3, 3, 40, 3, 1, 0),
        geom(1, 36, 8, 8, 64, 3, 1, 1),
        geom(1, 256, 8, 8, 128, 3, 1, 1),
    ] {
        assert!(grads(g), "{g:?}");
        assert!(!conv2d::weight_grad_in_f32(MatmulMode::Bf16, &g), "{g:?}");
    }
    for g in [
        geom(1, 256, 8, 8, 256, 3, 1, 1),
        geom(1, 8, 8, 8, 64, 3, 1, 1),
        geom(1, 64, 8, 8, 8, 3, 1, 1),
        geom(1, 64, 8, 8, 64, 1, 1, 0),
        geom(1, 64, 8, 8, 64, 3, 2, 1),
    ] {
        assert!(!grads(g), "{g:?}");
    }
    assert!(!conv2d::grad_reads_pairs(
        MatmulMode::F32,
        &geom(2, 32, 20, 20, 40, 3, 1, 1)
    ));
}

/// Same inputs, same bits, whatever the number of threads spreading the work.
#[test]
#[cfg_attr(
    not(has_bf16),
    ignore = "skipped: this processor has neither AVX-512 BF16 nor AMX-BF16"
)]
fn bf16_convolution_is_deterministic() {
    assert!(
        kernels::bf16_available(),
        "the processor lists a bf16 engine but the bf16 path is not available"
    );
    let g = geom(1, 32, 16, 16, 48, 3, 1, 1);
    let x = conv_values(g.batch * g.c_in * g.h * g.w, 11);
    let w = conv_values(g.c_out * g.k(), 12);
    let run = || conv2d::forward(MatmulMode::Bf16, &x, &w, None, &g);
    let threads = |n: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    assert_eq!(threads(1).install(run), threads(3).install(run));
    assert_eq!(run(), run());
    // The weight gradient (on AMX read in place, `conv2d::grad_reads_pairs`), over one chunk
    // of images (its blocks spread over the threads) and over three (the chunks spread).
    for batch in [2, 9] {
        let g = geom(batch, 32, 16, 16, 48, 3, 1, 1);
        let x = conv_values(g.batch * g.c_in * g.h * g.w, 13);
        let dy = conv_values(g.batch * g.c_out * g.n(), 14);
        let grad = || conv2d::backward_weight(MatmulMode::Bf16, &x, &dy, &g);
        assert_eq!(threads(1).install(grad), threads(3).install(grad), "{g:?}");
    }
}

/// The bf16 product itself, on every edge of its blocking: rows past whole 32-row blocks,
/// columns past whole 32-column panels and 16-column tiles, `k` past whole steps of 32 and
/// over several chunks (k = 2100 at 200 rows), both layouts of the right operand, and each
/// way of writing the result. Against an f64 sum of the bf16-rounded operands: each product
/// of two bf16 values is exact in f32, so only the f32 sums differ.
#[test]
#[cfg_attr(
    not(has_bf16),
    ignore = "skipped: this processor has neither AVX-512 BF16 nor AMX-BF16"
)]
fn bf16_product_equals_f64_sum_of_rounded_operands() {
    let engine = bf16::engine().expect("the processor lists a bf16 engine but it is not in use");
    println!("bf16 engine: {}", engine.name());
    for (m, k, n) in [
        (1, 1, 1),
        (32, 32, 32),
        (33, 31, 17),
        (70, 45, 50),
        (200, 2100, 40),
        (5, 3000, 96),
    ] {
        let a = conv_values(m * k, 21);
        let b = conv_values(k * n, 22);
        let bias = conv_values(m, 23);
        let (ar, br) = (to_bf16(&a), to_bf16(&b));
        let want = |i: usize, j: usize| -> f64 {
            (0..k)
                .map(|p| ar[i * k + p] as f64 * br[p * n + j] as f64)
                .sum()
        };
        let bt: Vec<f32> = (0..k * n).map(|i| b[(i % k) * n + i / k]).collect();
        let packed = bf16::PackedLhs::new(m, k, (&a, k as isize, 1));
        let start = conv_values(m * n, 24);
        for (layout, rhs) in [
            ("rows", bf16::Rhs::Strided(&b, n as isize, 1)),
            ("columns", bf16::Rhs::Strided(&bt, 1, k as isize)),
        ] {
            for (how, write) in [
                ("set", bf16::Write::Set),
                ("add", bf16::Write::Add),
                ("bias", bf16::Write::SetWithBias(&bias)),
            ] {
                let mut c = start.clone();
                bf16::matmul(&packed, n, rhs, &mut c, write, true);
                let scale = (k as f64).sqrt();
                for i in 0..m {
                    for j in 0..n {
                        let base = match how {
                            "set" => 0.0,
                            "add" => start[i * n + j] as f64,
                            _ => bias[i] as f64,
                        };
                        let err = (c[i * n + j] as f64 - base - want(i, j)).abs() / scale;
                        assert!(
                            err < 1e-5,
                            "{m}x{k}x{n} {layout} {how}: C[{i}, {j}] = {} off by {err}",
                            c[i * n + j]
                        );
                    }
                }
            }
        }
        // Same bits whatever the number of threads.
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut c = vec![0.0f32; m * n];
                bf16::matmul(
                    &packed,
                    n,
                    bf16::Rhs::Strided(&b, n as isize, 1),
                    &mut c,
                    bf16::Write::Set,
                    true,
                );
                c
            })
        };
        assert_eq!(run(1), run(3), "{m}x{k}x{n}: threads");
    }
}

/// Winograd's algorithms with bf16 position products (`DIFFUSE_BF16_WINOGRAD=f23` or `f43`):
/// the transformed tiles and weights are rounded, and the output transform amplifies that
/// rounding, F(4x4, 3x3) about twelve times past the direct bf16 product's, F(2x2, 3x3) about
/// twice. Relative RMS errors against the f64 direct sum: direct bf16 about 2e-3, bf16 F(2x2)
/// about 4e-3, bf16 F(4x4) 1e-2 to 3e-2, f32 F(4x4) under 1e-5.
#[test]
#[cfg_attr(
    not(has_bf16),
    ignore = "skipped: this processor has neither AVX-512 BF16 nor AMX-BF16"
)]
fn bf16_winograd_error_is_bounded() {
    let rms = |a: &[f32], b: &[f32]| {
        let e: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let s: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (e / s).sqrt()
    };
    for g in [
        geom(2, 64, 16, 16, 64, 3, 1, 1),
        geom(2, 128, 8, 8, 130, 3, 1, 1),
        geom(3, 4, 7, 6, 5, 3, 1, 1),
        geom(2, 3, 13, 11, 40, 3, 1, 1),
    ] {
        let x = conv_values(g.batch * g.c_in * g.h * g.w, 7);
        let w = conv_values(g.c_out * g.k(), 8);
        let bias = conv_values(g.c_out, 9);
        let exact = direct(&x, &w, &bias, &g);
        let err = |y: Vec<f32>| rms(&y, &exact);
        let f43 = err(winograd43::forward(
            MatmulMode::Bf16,
            &x,
            &w,
            Some(&bias),
            &g,
        ));
        let f23 = err(winograd::forward(MatmulMode::Bf16, &x, &w, Some(&bias), &g));
        let plain = err(conv2d::forward(MatmulMode::Bf16, &x, &w, Some(&bias), &g));
        let f43_f32 = err(winograd43::forward(
            MatmulMode::F32,
            &x,
            &w,
            Some(&bias),
            &g,
        ));
        println!(
            "{g:?}: bf16 F(4x4) {f43:.2e}, F(2x2) {f23:.2e}, direct {plain:.2e}; f32 F(4x4) {f43_f32:.2e}"
        );
        assert!((1e-3..4e-3).contains(&plain), "bf16 direct {plain} {g:?}");
        assert!(f23 > plain && f23 < 2.5 * plain, "bf16 F(2x2) {f23} {g:?}");
        assert!((5e-3..5e-2).contains(&f43), "bf16 F(4x4) {f43} {g:?}");
        assert!(f43_f32 < 1e-5, "f32 F(4x4) {f43_f32} {g:?}");
    }
}

/// The bf16 route settings go by the names `DIFFUSE_BF16_WINOGRAD` and
/// `examples/route_ab.rs` take; anything else is no setting.
#[test]
fn bf16_routes_are_named_as_the_environment_names_them() {
    use conv2d::{Bf16Routes, Winograd};
    for (name, routes) in [
        ("measured", Bf16Routes::Measured),
        ("direct", Bf16Routes::Direct),
        ("f23", Bf16Routes::Everywhere(Winograd::F23)),
        ("f43", Bf16Routes::Everywhere(Winograd::F43)),
    ] {
        assert_eq!(Bf16Routes::parse(name), Some(routes), "{name}");
    }
    for name in ["", "F43", "f44", "direct "] {
        assert_eq!(Bf16Routes::parse(name), None, "{name:?}");
    }
}

// Weights prepared once and kept across calls (`kernels::weight_cache`).

/// The modes this processor runs, saying so when bf16 is left out.
fn modes_here() -> Vec<MatmulMode> {
    if kernels::bf16_available() {
        vec![MatmulMode::F32, MatmulMode::Bf16]
    } else {
        println!("bf16 skipped: this processor has neither AVX-512 BF16 nor AMX-BF16");
        vec![MatmulMode::F32]
    }
}

/// A convolution with its weights prepared beforehand gives the same bits as one that
/// prepares them itself, on every route: Winograd (3x3 stride 1), the direct product (strided,
/// pointwise, kernels past the image), in f32 and bf16, for training and for inference. In
/// bf16 on the AVX-512 BF16 engine, inference takes F(4x4, 3x3) from 1,024 output tiles on
/// and training the direct product (unless `DIFFUSE_BF16_WINOGRAD` says otherwise).
#[test]
fn prepared_weights_give_the_same_bits_as_forward() {
    use conv2d::{Purpose, Winograd};
    let chosen = std::env::var("DIFFUSE_BF16_WINOGRAD").ok();
    // 16 and 15 images of 8x8 tiles: 1,024 and 960.
    let (big, small) = (
        geom(16, 3, 32, 32, 4, 3, 1, 1),
        geom(15, 3, 32, 29, 4, 3, 1, 1),
    );
    for mode in modes_here() {
        let shapes = geometries().into_iter().chain(winograd_geometries());
        for g in shapes.chain([big, small]) {
            let x = conv_values(g.batch * g.c_in * g.h * g.w, 31);
            let w = conv_values(g.c_out * g.k(), 32);
            let bias = conv_values(g.c_out, 33);
            for purpose in [Purpose::Training, Purpose::Inference] {
                let route = conv2d::winograd_of(mode, &g, purpose);
                let avx512 = bf16::engine() == Some(bf16::Engine::Avx512);
                if mode == MatmulMode::Bf16 && chosen.is_none() && winograd::applies(&g) {
                    let f43 = purpose == Purpose::Inference && avx512 && g == big;
                    let expected = f43.then_some(Winograd::F43);
                    assert_eq!(route, expected, "{purpose:?} {g:?}");
                }
                let want = match route {
                    Some(Winograd::F43) => winograd43::forward(mode, &x, &w, Some(&bias), &g),
                    Some(Winograd::F23) => winograd::forward(mode, &x, &w, Some(&bias), &g),
                    None if purpose == Purpose::Training => {
                        conv2d::forward(mode, &x, &w, Some(&bias), &g)
                    }
                    // Not Winograd for inference either: the training route's bits.
                    None => {
                        assert_eq!(conv2d::winograd_of(mode, &g, Purpose::Training), None);
                        conv2d::forward(mode, &x, &w, Some(&bias), &g)
                    }
                };
                let prepared = conv2d::PreparedWeight::new(mode, purpose, &w, &g);
                for _ in 0..2 {
                    let got = conv2d::forward_prepared(&prepared, &x, &w, Some(&bias), &g);
                    assert_eq!(got, want, "{mode:?} {purpose:?} {g:?}");
                }
            }
        }
    }
}

/// The weights of a burn `Conv2d` as f32 values.
fn weight_values(t: &Tensor<4>) -> Vec<f32> {
    t.to_data().try_to_vec().unwrap()
}

/// An untracked convolution keeps its prepared weights: a second call gives the same bits as
/// the first and as the kernel without the cache; new weights, in place of the old in the same
/// module or computed from them after the module is gone, give their own result, never the
/// one kept for the old.
#[test]
fn kept_weights_follow_the_weights() {
    let dev = inference_device();
    let mode = kernels::matmul_mode();
    // A shape no other test uses.
    let (c_in, c_out) = (7, 11);
    dev.seed(41);
    let mut m = Conv2dConfig::new([c_in, c_out], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(&dev);
    let mut rng = rng_for(41, Stream::Sample, 0);
    let x = normal_tensor(&mut rng, [2, c_in, 9, 10], &dev);
    let g = geom(2, c_in, 9, 10, c_out, 3, 1, 1);
    let xv: Vec<f32> = x.to_data().try_to_vec().unwrap();
    // The kernel without the cache, on the route of untracked convolutions.
    let uncached = |w: &[f32], b: Option<&[f32]>| {
        let p = conv2d::PreparedWeight::new(mode, conv2d::Purpose::Inference, w, &g);
        conv2d::forward_prepared(&p, &xv, w, b, &g)
    };
    let fresh = |w: &Tensor<4>, b: &[f32]| uncached(&weight_values(w), Some(b));
    let bias: Vec<f32> = m
        .bias
        .as_ref()
        .unwrap()
        .val()
        .to_data()
        .try_to_vec()
        .unwrap();
    let out = |m: &burn::nn::conv::Conv2d| -> Vec<f32> {
        let y = kernels::try_conv2d(m, x.clone()).expect("the kernel applies");
        y.to_data().try_to_vec().unwrap()
    };
    let want = fresh(&m.weight.val(), &bias);
    assert_eq!(out(&m), want, "first call");
    assert_eq!(out(&m), want, "second call");

    // New weights in the same module.
    let doubled = m.weight.val() * 2.0;
    m.weight = burn::module::Param::from_tensor(doubled.clone());
    assert_eq!(out(&m), fresh(&doubled, &bias), "new weights");

    // Weights computed from the old ones once the module is gone: an operation on a tensor
    // nothing else holds may write its storage in place, and the cache must not see the old
    // values at the old address.
    let w = m.weight.val();
    drop(m);
    drop(doubled);
    let tripled = w * 1.5;
    let m = Conv2dConfig::new([c_in, c_out], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(false)
        .init(&dev);
    let m = burn::nn::conv::Conv2d {
        weight: burn::module::Param::from_tensor(tripled.clone()),
        ..m
    };
    let y = kernels::try_conv2d(&m, x.clone()).expect("the kernel applies");
    let want = uncached(&weight_values(&tripled), None);
    assert_eq!(
        y.to_data().try_to_vec::<f32>().unwrap(),
        want,
        "computed weights"
    );
}

/// The cache's bounds: within its capacity, entries whose weights nothing else holds go at the
/// next insertion, an entry unused for `STALE` lookups gives way to a new one, and otherwise a
/// new one is not kept (still prepared, with the same result).
#[test]
fn the_weight_cache_stays_within_its_bounds() {
    use kernels::weight_cache::{STALE, WeightCache};
    let g = geom(1, 4, 6, 6, 8, 3, 1, 1);
    let weights = |seed: u32| {
        let v = conv_values(g.c_out * g.k(), seed);
        burn_flex::FlexTensor::from_data(burn::tensor::TensorData::new(v, [8, 4, 3, 3]))
    };
    let mode = MatmulMode::F32;
    let x = conv_values(g.c_in * g.h * g.w, 50);
    let one =
        conv2d::PreparedWeight::new(mode, conv2d::Purpose::Inference, weights(51).storage(), &g)
            .bytes()
            + 4 * g.c_out * g.k();
    // Room for two entries.
    let cache = WeightCache::new(2 * one + one / 2);
    let (a, b, c) = (weights(51), weights(52), weights(53));
    for w in [&a, &b] {
        cache.get(mode, w, &g);
    }
    assert_eq!(cache.usage(), (2, 2 * one));
    // Full, nothing stale: `c` is prepared but not kept.
    let got = cache.get(mode, &c, &g);
    let want = conv2d::forward(mode, &x, c.storage(), None, &g);
    assert_eq!(
        conv2d::forward_prepared(&got, &x, c.storage(), None, &g),
        want
    );
    assert_eq!(cache.usage().0, 2);
    // `a`'s weights dropped: its entry goes when `c` comes again.
    drop(a);
    cache.get(mode, &c, &g);
    assert_eq!(cache.usage(), (2, 2 * one));
    // `b` unused while `c` is looked up STALE + 1 times: a new entry takes its place.
    for _ in 0..=STALE {
        cache.get(mode, &c, &g);
    }
    let d = weights(54);
    cache.get(mode, &d, &g);
    assert_eq!(cache.usage(), (2, 2 * one));
    // A cache of no capacity keeps nothing.
    let none = WeightCache::new(0);
    none.get(mode, &d, &g);
    assert_eq!(none.usage(), (0, 0));
}

/// One set of weights used at a batch that takes F(4x4, 3x3) in bf16 and at one that does not
/// (on AVX-512 BF16): the cache keeps an entry for each route, and each call gets its own
/// route's bits, in whichever order they come.
#[test]
#[cfg_attr(
    not(has_bf16),
    ignore = "skipped: this processor has neither AVX-512 BF16 nor AMX-BF16"
)]
fn bf16_weight_cache_keeps_an_entry_per_route() {
    use conv2d::Purpose;
    use kernels::weight_cache::WeightCache;
    let mode = MatmulMode::Bf16;
    // 64 and 1,024 output tiles.
    let small = geom(1, 4, 32, 32, 8, 3, 1, 1);
    let big = ConvGeometry { batch: 16, ..small };
    let values = conv_values(8 * 4 * 9, 61);
    let w = burn_flex::FlexTensor::from_data(burn::tensor::TensorData::new(
        values.clone(),
        [8, 4, 3, 3],
    ));
    let cache = WeightCache::new(1 << 24);
    for g in [small, big, small, big] {
        let x = conv_values(g.batch * g.c_in * g.h * g.w, 62);
        let got = conv2d::forward_prepared(&cache.get(mode, &w, &g), &x, &values, None, &g);
        let own = conv2d::PreparedWeight::new(mode, Purpose::Inference, &values, &g);
        let want = conv2d::forward_prepared(&own, &x, &values, None, &g);
        assert_eq!(got, want, "batch {}", g.batch);
    }
    let routes = [small, big].map(|g| conv2d::winograd_of(mode, &g, Purpose::Inference));
    let entries = if routes[0] == routes[1] { 1 } else { 2 };
    println!("routes {routes:?}: {entries} entries");
    assert_eq!(cache.usage().0, entries);
}
