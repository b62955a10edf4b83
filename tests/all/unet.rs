//! The denoiser: shapes, learning, and weight round trips.

use burn::module::Module;
use burn::optim::GradientsParams;
use diffuse::device::{inference_device, training_device};
use diffuse::rng::{Stream, normal_tensor, rng_for};
use diffuse::train::adamw::AdamW;
use diffuse::unet::{UNet, UNetConfig};
use diffuse::weights::{self, NamedTensors, StoreDtype};

pub fn tiny(size: usize, channels: usize, classes: Option<usize>) -> UNetConfig {
    UNetConfig {
        image_size: size,
        in_channels: channels,
        out_channels: channels,
        base_channels: 16,
        channel_mult: vec![1, 2, 2],
        num_res_blocks: 1,
        attention_resolutions: vec![size.div_ceil(4)],
        dropout: 0.0,
        norm_groups: 8,
        num_classes: classes,
        ..UNetConfig::default()
    }
}

/// A model whose every weight is drawn from N(0, 0.05^2), so that (unlike a fresh model,
/// whose last layers start at zero) its output depends on every input.
pub fn randomized(cfg: &UNetConfig, seed: u64) -> UNet {
    let dev = inference_device();
    let m = UNet::new(cfg, &dev).unwrap();
    let mut t = NamedTensors::new();
    weights::collect(&m, "", &mut t);
    let mut rng = rng_for(seed, Stream::Init, 0);
    for v in t.values_mut() {
        v.data = diffuse::rng::normal_vec(&mut rng, v.data.len())
            .iter()
            .map(|x| x * 0.05)
            .collect();
    }
    weights::apply(m, &t, "").unwrap()
}

#[test]
fn output_shape_matches_input_for_1_and_3_channels_and_odd_sizes() {
    let dev = inference_device();
    for (size, ch) in [(8usize, 1usize), (9, 3), (13, 1), (28, 1), (16, 3)] {
        let cfg = tiny(size, ch, Some(3));
        let m = UNet::new(&cfg, &dev).unwrap();
        let x = normal_tensor(
            &mut rng_for(0, Stream::Sample, 0),
            [2, ch, size, size],
            &dev,
        );
        let y = m.forward(x, &[5.0, 700.0], Some(&[0, 3]));
        assert_eq!(y.dims(), [2, ch, size, size], "size {size} channels {ch}");
    }
}

#[test]
fn invalid_configs_are_rejected_not_panicking() {
    let dev = inference_device();
    let bad = [
        UNetConfig {
            image_size: 0,
            ..tiny(8, 1, None)
        },
        UNetConfig {
            norm_groups: 5,
            ..tiny(8, 1, None)
        },
        UNetConfig {
            in_channels: 0,
            ..tiny(8, 1, None)
        },
        UNetConfig {
            channel_mult: vec![],
            ..tiny(8, 1, None)
        },
        UNetConfig {
            num_classes: Some(0),
            ..tiny(8, 1, None)
        },
        UNetConfig {
            dropout: 1.0,
            ..tiny(8, 1, None)
        },
    ];
    for cfg in bad {
        assert!(UNet::new(&cfg, &dev).is_err(), "{cfg:?}");
    }
}

#[test]
fn tiny_model_overfits_one_batch() {
    let dev = training_device();
    dev.seed(1);
    let cfg = tiny(8, 1, None);
    let mut model = UNet::new(&cfg, &dev).unwrap();
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.0);
    let mut rng = rng_for(1, Stream::TrainStep, 0);
    let x = normal_tensor(&mut rng, [4, 1, 8, 8], &dev);
    let target = normal_tensor(&mut rng, [4, 1, 8, 8], &dev);
    let t = [10.0, 200.0, 500.0, 900.0];
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..150 {
        let loss = (model.forward(x.clone(), &t, None) - target.clone())
            .square()
            .mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        last = loss.into_scalar::<f32>();
        first.get_or_insert(last);
        model = opt.step(model, &grads, 3e-3, 1.0);
    }
    let first = first.unwrap();
    assert!(last < first / 10.0, "loss went from {first} to {last}");
}

#[test]
fn weights_round_trip_through_safetensors_bit_for_bit() {
    let dev = inference_device();
    let cfg = tiny(9, 3, Some(4));
    let a = randomized(&cfg, 11);
    let b = randomized(&cfg, 12);
    let x = normal_tensor(&mut rng_for(2, Stream::Sample, 0), [2, 3, 9, 9], &dev);
    let run = |m: &UNet| {
        m.forward(x.clone(), &[1.0, 999.0], Some(&[2, 4]))
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    };
    let ya = run(&a);
    assert_ne!(ya, run(&b), "two seeds should give two models");
    let mut t = NamedTensors::new();
    weights::collect(&a, "", &mut t);
    let bytes = weights::to_safetensors(&t, &Default::default(), StoreDtype::F32).unwrap();
    let (back, _) = weights::from_safetensors(&bytes, "test").unwrap();
    assert_eq!(back, t);
    let b = weights::apply(b, &back, "").unwrap();
    assert_eq!(
        ya,
        run(&b),
        "loaded model must reproduce the saved one exactly"
    );
}

#[test]
fn loading_mismatched_weights_names_the_tensor() {
    let dev = inference_device();
    let small = UNet::new(&tiny(8, 1, None), &dev).unwrap();
    let mut t = NamedTensors::new();
    weights::collect(&small, "", &mut t);
    let other = UNet::new(
        &UNetConfig {
            base_channels: 24,
            ..tiny(8, 1, None)
        },
        &dev,
    )
    .unwrap();
    let err = weights::apply(other, &t, "").unwrap_err().to_string();
    assert!(
        err.contains("stem.weight") || err.contains("has shape"),
        "{err}"
    );
    let cond = UNet::new(&tiny(8, 1, Some(3)), &dev).unwrap();
    let err = weights::apply(cond, &t, "").unwrap_err().to_string();
    assert!(
        err.contains("class_embed.weight") && err.contains("missing"),
        "{err}"
    );
    assert!(weights::from_safetensors(b"not a safetensors file", "x.safetensors").is_err());
}

#[test]
fn benchmark_unet_from_our_blocks_has_the_reference_parameter_count() {
    let dev = inference_device();
    let m = diffuse::bench::ReferenceUNet::new(&dev);
    // shared/bench/MODEL.md: 5,068,547 parameters, like the PyTorch twin.
    assert_eq!(m.num_params(), 5_068_547);
    let x = normal_tensor(&mut rng_for(0, Stream::Sample, 0), [1, 3, 32, 32], &dev);
    assert_eq!(m.forward(x, &[13.0]).dims(), [1, 3, 32, 32]);
}
