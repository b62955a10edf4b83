//! The autoregressive family (a gated PixelCNN): causal masks checked by gradients, the cached
//! sampler against the full network, training, resume, sampling, eval and refusals from the
//! CLI on the committed digits.

use super::cli::{
    eval_json, fails, family_train_args, ok, resumes_to_the_same_bits, run_config,
    run_folder_is_complete, same_images_at_any_batch,
};
use super::data::{digits_batch, fixture};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use diffuse::pixelcnn::{LoadedPixelCnn, PixelCnn, PixelCnnConfig, levels, nll_per_image};
use diffuse::train::adamw::AdamW;

fn tiny(channels: usize, classes: Option<usize>) -> PixelCnnConfig {
    PixelCnnConfig {
        features: 12,
        layers: 3,
        first_kernel: 5,
        kernel: 3,
        num_classes: classes,
        class_names: Vec::new(),
        ..PixelCnnConfig::recipe(6, channels)
    }
}

/// Raster order of sub-pixel (row, column, channel): rows, then columns, then channels.
fn order(i: usize, j: usize, c: usize, size: usize, channels: usize) -> usize {
    (i * size + j) * channels + c
}

/// For every sub-pixel of one pixel, the gradient of its logits with respect to the input is
/// zero (to rounding) at that sub-pixel and every later one, and non-zero at earlier ones
/// the receptive field reaches, above-right included (no blind spot).
#[test]
fn no_output_depends_on_a_later_sub_pixel() {
    for channels in [1, 3] {
        let dev = Device::flex().autodiff();
        dev.seed(11);
        let cfg = tiny(channels, Some(2));
        // Without biases no unit is silenced by a ReLU whatever the input, so every path the
        // masks leave open carries gradient.
        let net = PixelCnn::new(&cfg, &dev).unwrap();
        let mut t = diffuse::weights::NamedTensors::new();
        diffuse::weights::collect(&net, "", &mut t);
        for (name, v) in t.iter_mut() {
            if name.ends_with("bias") {
                v.data.iter_mut().for_each(|b| *b = 0.0);
            }
        }
        let net = diffuse::weights::apply(net, &t, "").unwrap();
        let size = cfg.image_size;
        let (i, j) = (3, 2);
        for s in 0..channels {
            // |gradient| summed over a few inputs, so a unit that ReLU silences at one input
            // shows at another.
            let mut g = vec![0f32; channels * size * size];
            for _ in 0..6 {
                let x = Tensor::<4>::random(
                    [1, channels, size, size],
                    Distribution::Uniform(-1.0, 1.0),
                    &dev,
                )
                .require_grad();
                let out = net
                    .forward(x.clone(), Some(&[1]))
                    .narrow(1, s * 256, 256)
                    .narrow(2, i, 1)
                    .narrow(3, j, 1)
                    .sum();
                let grads = out.backward();
                let gx: Vec<f32> = x
                    .grad(&grads)
                    .unwrap()
                    .into_data()
                    .try_into_vec::<f32>()
                    .unwrap();
                for (a, b) in g.iter_mut().zip(gx) {
                    *a += b.abs();
                }
            }
            let max = g.iter().fold(0f32, |m, v| m.max(*v));
            assert!(max > 0.0, "the logits depend on something");
            let at = |c: usize, y: usize, x: usize| g[(c * size + y) * size + x].abs();
            let here = order(i, j, s, size, channels);
            for c in 0..channels {
                for y in 0..size {
                    for xx in 0..size {
                        if order(y, xx, c, size, channels) >= here {
                            assert!(
                                at(c, y, xx) <= 1e-5 * max,
                                "{channels} channel(s): sub-pixel ({i},{j},{s}) depends on ({y},{xx},{c}): {} of {max}",
                                at(c, y, xx)
                            );
                        }
                    }
                }
            }
            // Earlier sub-pixels reach it: left, above, above-right, and earlier channels.
            for (y, xx) in [(i, j - 1), (i - 1, j), (i - 1, j + 2), (i - 2, j)] {
                assert!(
                    at(0, y, xx) > 1e-4 * max,
                    "({y},{xx}) does not reach ({i},{j})"
                );
            }
            for c in 0..s {
                assert!(
                    at(c, i, j) > 1e-4 * max,
                    "channel {c} does not reach channel {s}"
                );
            }
        }
    }
}

/// The cached sampler computes what the full network computes: the log-probability it reports
/// for what it drew equals the full network's log-likelihood of the finished images, grey and
/// RGB, with and without a class; and a lower temperature draws likelier images.
#[test]
fn the_sampler_scores_what_it_draws_as_the_full_network_does() {
    for (channels, classes) in [(1, Some(3)), (3, None)] {
        let dev = Device::flex();
        dev.seed(5);
        let cfg = tiny(channels, classes);
        let net = PixelCnn::new(&cfg, &dev).unwrap();
        let model = LoadedPixelCnn {
            config: cfg.clone(),
            net,
            source: "test".into(),
        };
        let n = 3;
        let per = channels * cfg.image_size * cfg.image_size;
        let u: Vec<f32> = (0..n * per)
            .map(|k| ((k * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let labels = classes.map(|_| vec![0, 2, 1]);
        let (x, logp) = model.sample(&u, n, labels.as_deref(), 1.0, &|| false, &mut |_, _| {});
        assert_eq!(x.dims(), [n, channels, 6, 6]);
        let nll = model.nll(x.clone(), labels.as_deref());
        for b in 0..n {
            assert!(
                (nll[b] + logp[b]).abs() < 1e-3 * nll[b].abs(),
                "{channels} channel(s), image {b}: the sampler's log p {} vs the network's {}",
                logp[b],
                -nll[b]
            );
        }
        let px: Vec<f32> = x.into_data().try_into_vec::<f32>().unwrap();
        assert!(
            levels(&px)
                .iter()
                .zip(&px)
                .all(|(&k, &v)| k as f32 / 127.5 - 1.0 == v),
            "8-bit values: {:?}",
            &px[..12]
        );
        // Colder draws are likelier under the model.
        let (cold, _) = model.sample(&u, n, labels.as_deref(), 0.3, &|| false, &mut |_, _| {});
        let cold_nll: f64 = model.nll(cold, labels.as_deref()).iter().sum();
        assert!(
            cold_nll < nll.iter().sum::<f64>(),
            "T=0.3 {cold_nll} vs T=1"
        );
    }
}

/// The exact likelihood the network is trained on falls on one fixed batch.
#[test]
fn the_negative_log_likelihood_falls_on_one_batch() {
    let dev = Device::flex().autodiff();
    dev.seed(2);
    let cfg = PixelCnnConfig {
        image_size: 8,
        ..tiny(1, Some(10))
    };
    let b = 16;
    let (px, labels) = digits_batch(b);
    let values = levels(&px);
    let x = Tensor::<4>::from_data(TensorData::new(px, [b, 1, 8, 8]), &dev);
    let mut net = PixelCnn::new(&cfg, &dev).unwrap();
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.0);
    let mut losses = Vec::new();
    for _ in 0..60 {
        let loss = nll_per_image(net.forward(x.clone(), Some(&labels)), &values)
            .mean()
            .div_scalar(64.0);
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        losses.push(loss.into_scalar::<f32>());
        net = opt.step(net, &grads, 3e-3, 1.0);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        (first - 256f32.ln()).abs() < 0.5,
        "an untrained network is near uniform: {first} nats vs ln 256"
    );
    assert!(last < 0.85 * first, "the NLL fell from {first} to {last}");
}

fn ar_args<'a>(data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    family_train_args(
        "autoregressive",
        data,
        out,
        steps,
        &["--features", "8", "--layers", "2"],
    )
}

#[test]
fn a_tiny_autoregressive_model_trains_resumes_samples_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let data = data.to_str().unwrap();
    let whole = tmp.path().join("whole");
    let w = whole.to_str().unwrap();
    ok(&ar_args(data, w, "6"));
    let lines = run_folder_is_complete(&whole);
    let cfg = run_config(&whole);
    assert_eq!(cfg["model"]["family"], "autoregressive");
    assert_eq!(cfg["model"]["num_classes"], 10);
    assert_eq!(cfg["model"]["features"], 8);
    assert_eq!(cfg["train"]["lr"], 1e-3, "the family's own default --lr");
    assert_eq!(lines.len(), 6);
    let (loss, bpd) = (
        lines[5]["loss"].as_f64().unwrap(),
        lines[5]["bits_per_dim"].as_f64().unwrap(),
    );
    assert!(
        (bpd - loss / std::f64::consts::LN_2).abs() < 1e-9,
        "bits/dim is nats/dim over ln 2"
    );

    // Three steps, then --resume to six: the same bits as six at once.
    let train = |out: &str, steps: &str| -> Vec<String> {
        ar_args(data, out, steps)
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    resumes_to_the_same_bits(&whole, &tmp.path().join("cut"), &train);

    // Sampling: the same images whatever the batch; the temperature changes them.
    let warm = same_images_at_any_batch(w, &tmp.path().join("warm"), &["--temperature", "1"]);
    let cold = same_images_at_any_batch(w, &tmp.path().join("cold"), &["--temperature", "0.5"]);
    assert_ne!(warm, cold);
    let grid = tmp.path().join("grid.png");

    // eval: FID and friends, and the likelihood of the data in bits per dimension.
    let v = eval_json(w, data, tmp.path(), "autoregressive");
    assert_eq!(v["evaluations"], 64, "one per sub-pixel");
    assert_eq!(v["nll_data"], data, "digits have no test split");
    assert_eq!(v["nll_images"], 20);
    let bpd = v["bits_per_dim"].as_f64().unwrap();
    assert!(bpd > 0.5 && bpd < 8.5, "{bpd}");

    // Options of other families, and of other commands' models, are refused.
    fails(
        &["sample", "--model", w, "--steps", "4"],
        "--steps is an option of diffusion models; ",
    );
    fails(
        &["sample", "--model", w, "--temperature", "0"],
        "the temperature must be between 0.01 and 10 (got 0)",
    );
    fails(
        &["sample", "--temperature", "0.5"],
        "--temperature is an option of autoregressive models; ",
    );
    fails(
        &["eval", "--nll-data", data, "--n", "8"],
        "--nll-data is an option of models with a likelihood",
    );
    let other = tmp.path().join("other");
    let o = other.to_str().unwrap();
    let mut gan = ar_args(data, o, "2");
    gan[2] = "gan";
    fails(
        &gan,
        "--features, --layers are options of --family autoregressive",
    );
    let mut z = ar_args(data, o, "2");
    z.extend(["--z-dim", "4"]);
    fails(&z, "--z-dim is an option of --family gan");
    let mut sched = ar_args(data, o, "2");
    sched.extend(["--timesteps", "10"]);
    fails(
        &sched,
        "--timesteps is an option of diffusion models; this run is an autoregressive model",
    );
    let mut wrong = ar_args(data, w, "9");
    wrong.push("--resume");
    wrong[2] = "gan";
    fails(&wrong, "holds an autoregressive model run");
    fails(
        &["edit", "--model", w, "--image", grid.to_str().unwrap()],
        "is an autoregressive model; diffuse edit takes diffusion models",
    );
}

/// `diffuse serve` serves an autoregressive model: `/v1/models` says its family, a class request
/// at a temperature gives the PNG `diffuse sample` gives, and bad temperatures and sampler
/// options are a 400 naming them.
#[test]
fn serve_takes_an_autoregressive_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    ok(&ar_args(data.to_str().unwrap(), r, "3"));
    super::serve::serves_like_sample(
        r,
        "autoregressive",
        r#", "temperature": 0.8"#,
        &["--temperature", "0.8"],
        &[
            (
                r#"{"temperature": 0}"#,
                "temperature must be between 0.01 and 10 (got 0)",
            ),
            (
                r#"{"sampler": "ddim"}"#,
                "sampler is an option of diffusion models; the served model is an autoregressive model",
            ),
        ],
    );
}
