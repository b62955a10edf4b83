//! The project's CPU kernels against burn's own operations: same outputs and same gradients.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig;
use burn::tensor::{Device, Tensor};
use diffuse::device::{inference_device, training_device};
use diffuse::kernels;
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
