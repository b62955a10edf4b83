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

fn text_cfg(size: usize) -> UNetConfig {
    UNetConfig {
        num_classes: None,
        text_dim: Some(12),
        cross_attention_resolutions: vec![size.div_ceil(2), size.div_ceil(4)],
        ..tiny(size, 3, None)
    }
}

/// Random prompts: `[B, L, 12]` token states with `lens[i]` real tokens, padding zeroed.
fn prompts(lens: &[usize], l: usize, seed: u64, null: Vec<bool>) -> diffuse::unet::TextCond {
    use burn::tensor::{Tensor, TensorData};
    let dev = inference_device();
    let b = lens.len();
    let mut rng = rng_for(seed, Stream::Sample, 1);
    let mut tok = diffuse::rng::normal_vec(&mut rng, b * l * 12);
    let mut mask = vec![0f32; b * l];
    for (i, &n) in lens.iter().enumerate() {
        for j in 0..l {
            if j < n {
                mask[i * l + j] = 1.0;
            } else {
                tok[(i * l + j) * 12..(i * l + j + 1) * 12].fill(0.0);
            }
        }
    }
    let pooled = diffuse::rng::normal_vec(&mut rng, b * 12);
    diffuse::unet::TextCond {
        tokens: Tensor::from_data(TensorData::new(tok, [b, l, 12]), &dev),
        mask: Tensor::from_data(TensorData::new(mask, [b, l]), &dev),
        pooled: Tensor::from_data(TensorData::new(pooled, [b, 12]), &dev),
        null,
    }
}

fn vals(t: burn::tensor::Tensor<4>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// The text path: shapes, prompts matter, padding does not, the null text is what `None`
/// means, and its weights (null text included) round-trip by name.
#[test]
fn text_conditioned_unet_reads_prompts_through_cross_attention() {
    use diffuse::unet::Cond;
    let dev = inference_device();
    let cfg = text_cfg(8);
    let m = randomized(&cfg, 3);
    let x = || normal_tensor(&mut rng_for(0, Stream::Sample, 0), [2, 3, 8, 8], &dev);
    let t = [10.0, 600.0];
    let p = prompts(&[3, 5], 5, 1, vec![false, false]);
    let y = vals(m.forward_cond(x(), &t, Cond::Text(&p)));
    assert_eq!(y.len(), 2 * 3 * 64);
    // Another prompt, another output.
    let q = prompts(&[3, 5], 5, 2, vec![false, false]);
    assert!(max_diff(&y, &vals(m.forward_cond(x(), &t, Cond::Text(&q)))) > 1e-3);
    // Padding changes nothing: item 0 alone with its 3 tokens, against inside the batch.
    use burn::tensor::Tensor;
    let alone = diffuse::unet::TextCond {
        tokens: p.tokens.clone().narrow(0, 0, 1).narrow(1, 0, 3),
        mask: p.mask.clone().narrow(0, 0, 1).narrow(1, 0, 3),
        pooled: p.pooled.clone().narrow(0, 0, 1),
        null: vec![false],
    };
    let x0: Tensor<4> = x().narrow(0, 0, 1);
    let y0 = vals(m.forward_cond(x0, &t[..1], Cond::Text(&alone)));
    assert!(
        max_diff(&y0, &y[..3 * 64]) < 1e-5,
        "{}",
        max_diff(&y0, &y[..3 * 64])
    );
    // All-null prompts are the unconditional model (Cond::None), whatever their tokens.
    let nulls = prompts(&[3, 5], 5, 1, vec![true, true]);
    let yn = vals(m.forward_cond(x(), &t, Cond::Text(&nulls)));
    let y_none = vals(m.forward_cond(x(), &t, Cond::None));
    assert!(max_diff(&yn, &y_none) < 1e-5, "{}", max_diff(&yn, &y_none));
    assert!(max_diff(&yn, &y) > 1e-3);
    // Mixed: the null item matches the unconditional output, the other the prompted one.
    let mixed = prompts(&[3, 5], 5, 1, vec![false, true]);
    let ym = vals(m.forward_cond(x(), &t, Cond::Text(&mixed)));
    assert!(max_diff(&ym[..192], &y[..192]) < 1e-5);
    assert!(max_diff(&ym[192..], &y_none[192..]) < 1e-5);
    // Weights by name, the null text included.
    let mut named = NamedTensors::new();
    weights::collect(&m, "", &mut named);
    assert!(
        named.keys().any(|k| k.starts_with("null_tokens")),
        "{:?}",
        named.keys().take(5).collect::<Vec<_>>()
    );
    assert!(named.keys().any(|k| k.contains("cross")));
    let back = weights::apply(UNet::new(&cfg, &dev).unwrap(), &named, "").unwrap();
    assert_eq!(vals(back.forward_cond(x(), &t, Cond::Text(&p))), y);
    // Configs: text and classes together, cross-attention without text, a size no level has.
    for bad in [
        UNetConfig {
            num_classes: Some(3),
            ..text_cfg(8)
        },
        UNetConfig {
            text_dim: None,
            ..text_cfg(8)
        },
        UNetConfig {
            cross_attention_resolutions: vec![5],
            ..text_cfg(8)
        },
        UNetConfig {
            text_dim: Some(0),
            ..text_cfg(8)
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

/// Gradients reach the cross-attention and the null text.
#[test]
fn text_unet_trains_its_cross_attention_and_null_text() {
    use burn::tensor::Tensor;
    use diffuse::unet::Cond;
    let dev = training_device();
    let cfg = text_cfg(8);
    let mut named = NamedTensors::new();
    weights::collect(&randomized(&cfg, 4), "", &mut named);
    let m = weights::apply(UNet::new(&cfg, &dev).unwrap(), &named, "").unwrap();
    let x = normal_tensor(&mut rng_for(0, Stream::Sample, 0), [2, 3, 8, 8], &dev);
    let mut p = prompts(&[2, 4], 4, 5, vec![false, true]);
    p.tokens = p.tokens.to_device(&dev);
    p.mask = p.mask.to_device(&dev);
    p.pooled = p.pooled.to_device(&dev);
    let y: Tensor<4> = m.forward_cond(x, &[100.0, 200.0], Cond::Text(&p));
    let grads = y.powi_scalar(2).mean().backward();
    let gp = GradientsParams::from_grads(grads, &m);
    let null_id = m.null_tokens.as_ref().unwrap().id;
    let k_id = m
        .mid_cross
        .as_ref()
        .or(m.down[1].cross[0].as_ref())
        .unwrap()
        .k
        .weight
        .id;
    for (what, id) in [("null tokens", null_id), ("cross-attention keys", k_id)] {
        let g: Tensor<2> = gp
            .get(id)
            .unwrap_or_else(|| panic!("no gradient for {what}"));
        let s: f32 = g.abs().sum().into_scalar::<f32>();
        assert!(s > 0.0, "{what}: zero gradient");
    }
}
