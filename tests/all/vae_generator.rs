//! The VAE family: the discretised logistic likelihood and the ELBO against closed forms, and
//! training, resume, sampling, eval and refusals from the CLI on the committed digits.

use super::cli::{
    eval_json, fails, family_train_args, ok, resumes_to_the_same_bits, run_config,
    run_folder_is_complete, same_images_at_any_batch,
};
use super::data::{digits_batch, fixture};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use diffuse::vae::generator::{VaeGenConfig, VaeGenerator, discretized_logistic_nll};

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The probability of the 8-bit value `k` under a discretised logistic, in f64.
fn mass(k: usize, mu: f64, s: f64) -> f64 {
    let x = k as f64 / 127.5 - 1.0;
    let hi = if k == 255 {
        1.0
    } else {
        sigmoid((x + 1.0 / 255.0 - mu) / s)
    };
    let lo = if k == 0 {
        0.0
    } else {
        sigmoid((x - 1.0 / 255.0 - mu) / s)
    };
    hi - lo
}

/// Every one of the 256 values gets the logistic's mass on its bin (the edge bins open), so
/// the probabilities sum to 1; the tensor version agrees with an f64 one.
#[test]
fn the_discretised_logistic_is_a_distribution_over_256_values() {
    let dev = Device::flex();
    for (mu, log_s) in [(0.0, -3.0), (-0.9, -2.0), (0.97, -4.0), (0.3, 0.5)] {
        let s: f64 = f64::exp(log_s);
        let xs: Vec<f32> = (0..256).map(|k| k as f32 / 127.5 - 1.0).collect();
        let x = Tensor::<4>::from_data(TensorData::new(xs, [256, 1, 1, 1]), &dev);
        let mu_t = Tensor::<4>::full([256, 1, 1, 1], mu, &dev);
        let ls = Tensor::<4>::full([256, 1, 1, 1], log_s, &dev);
        let nll: Vec<f32> = discretized_logistic_nll(x, mu_t, ls)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let total: f64 = nll.iter().map(|&v| f64::exp(-f64::from(v))).sum();
        assert!(
            (total - 1.0).abs() < 2e-3,
            "mu {mu}, log s {log_s}: sums to {total}"
        );
        for k in [0, 1, 100, 127, 128, 200, 254, 255] {
            let want = mass(k, mu, s);
            if want > 1e-5 {
                let got = f64::exp(-f64::from(nll[k]));
                assert!(
                    (got - want).abs() < 1e-4 * want.max(1e-2),
                    "mu {mu}, log s {log_s}, value {k}: {got} vs {want}"
                );
            }
        }
    }
}

/// The ELBO's terms: the KL is `0.5 sum(mean^2 + var - 1 - logvar)` of the encoder's posterior,
/// and the reconstruction term is the discretised logistic NLL of the images under the decoder's
/// outputs at `z = mean + std * eps`, computed here from the parts.
#[test]
fn the_elbo_is_its_closed_form_terms() {
    let dev = Device::flex();
    dev.seed(4);
    let cfg = VaeGenConfig {
        num_classes: Some(3),
        ..VaeGenConfig::recipe(8, 1, &[8, 8], 2)
    };
    let net = VaeGenerator::new(&cfg, &dev).unwrap();
    let levels: Vec<f32> = (0..2 * 64)
        .map(|i| ((i * 37) % 256) as f32 / 127.5 - 1.0)
        .collect();
    let x = Tensor::<4>::from_data(TensorData::new(levels, [2, 1, 8, 8]), &dev);
    let eps = Tensor::<4>::random([2, 2, 4, 4], Distribution::Normal(0.0, 1.0), &dev);
    let labels = [2, 0];
    let e = net.elbo(x.clone(), Some(&labels), eps.clone());
    let q = net.vae.encode(x.clone());
    let m: Vec<f32> = q.mean.clone().into_data().try_into_vec().unwrap();
    let lv: Vec<f32> = q.logvar.clone().into_data().try_into_vec().unwrap();
    let kl: Vec<f32> = e.kl.into_data().try_into_vec().unwrap();
    for (b, got) in kl.iter().enumerate() {
        let want: f64 = (b * 32..(b + 1) * 32)
            .map(|i| {
                let (m, lv) = (f64::from(m[i]), f64::from(lv[i]));
                0.5 * (m * m + lv.exp() - 1.0 - lv)
            })
            .sum();
        assert!(
            (f64::from(*got) - want).abs() < 1e-4 * want.max(1.0),
            "KL {b}"
        );
    }
    let (mu, log_s) = net.decode(q.sample(eps), Some(&labels));
    let recon: Vec<f32> = e.recon.into_data().try_into_vec().unwrap();
    let want: Vec<f32> = discretized_logistic_nll(x, mu, log_s)
        .into_data()
        .try_into_vec()
        .unwrap();
    assert_eq!(recon, want);
    // A class changes the decoder's output.
    let (a, _) = net.decode(Tensor::zeros([1, 2, 4, 4], &dev), Some(&[0]));
    let (b, _) = net.decode(Tensor::zeros([1, 2, 4, 4], &dev), Some(&[1]));
    assert!((a - b).abs().max().into_scalar::<f32>() > 0.0);
}

fn vae_args<'a>(data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    family_train_args(
        "vae",
        data,
        out,
        steps,
        &[
            "--vae-widths",
            "8,8",
            "--latent-channels",
            "2",
            "--kl-anneal",
            "4",
        ],
    )
}

#[test]
fn a_tiny_vae_trains_resumes_samples_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let data = data.to_str().unwrap();
    let whole = tmp.path().join("whole");
    let w = whole.to_str().unwrap();
    ok(&vae_args(data, w, "6"));
    let lines = run_folder_is_complete(&whole);
    let cfg = run_config(&whole);
    assert_eq!(cfg["model"]["family"], "vae");
    assert_eq!(cfg["model"]["vae"]["out_channels"], 2, "location and scale");
    assert_eq!(cfg["kl_anneal"], 4);
    assert_eq!(lines.len(), 6);
    // The KL weight rises to 1 over --kl-anneal steps; the loss weighs the KL by it.
    let betas: Vec<f64> = lines.iter().map(|l| l["beta"].as_f64().unwrap()).collect();
    assert_eq!(betas, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
    for l in &lines {
        let (loss, recon, kl, beta) = (
            l["loss"].as_f64().unwrap(),
            l["recon_bpd"].as_f64().unwrap() * std::f64::consts::LN_2,
            l["kl"].as_f64().unwrap() / 64.0,
            l["beta"].as_f64().unwrap(),
        );
        assert!((loss - (recon + beta * kl)).abs() < 1e-4, "{l}");
    }

    // Three steps, then --resume to six: the same bits as six at once.
    let train = |out: &str, steps: &str| -> Vec<String> {
        vae_args(data, out, steps)
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    resumes_to_the_same_bits(&whole, &tmp.path().join("cut"), &train);

    // Sampling from the prior: the same images whatever the batch.
    same_images_at_any_batch(w, tmp.path(), &[]);

    // eval: FID and friends, and the negative ELBO in bits per dimension.
    let v = eval_json(w, data, tmp.path(), "vae");
    assert_eq!(v["likelihood"], "elbo");
    assert_eq!(v["nll_images"], 20);
    let bpd = v["bits_per_dim"].as_f64().unwrap();
    assert!(bpd > 0.5 && bpd < 12.0, "{bpd}");

    // Options of other families are refused.
    fails(
        &["sample", "--model", w, "--temperature", "0.5"],
        "--temperature is an option of autoregressive models; ",
    );
    fails(
        &["sample", "--model", w, "--sampler", "ddim"],
        "--sampler is an option of diffusion models; ",
    );
    let other = tmp.path().join("other");
    let o = other.to_str().unwrap();
    let mut gan = vae_args(data, o, "2");
    gan[2] = "gan";
    fails(
        &gan,
        "--vae-widths, --latent-channels, --kl-anneal are options of --family vae",
    );
    let mut zero = vae_args(data, o, "2");
    let at = zero.iter().position(|a| *a == "8,8").unwrap();
    zero[at] = "8,0";
    fails(
        &zero,
        "--vae-widths must be positive channel counts, one per level (got '8,0')",
    );
    assert!(!other.exists(), "a refused run leaves no folder");
    let mut z = vae_args(data, o, "2");
    z.extend(["--layers", "4"]);
    fails(&z, "--layers is an option of --family autoregressive");
    fails(
        &["eval", "--model", "fashion-mnist", "--nll-data", data],
        "--nll-data is an option of models with a likelihood",
    );
}

/// On one fixed batch of digits the negative ELBO falls, and the networks' shapes are the
/// config's: a 2x4x4 posterior for 8x8 images, decoded to a location and a log-scale of 1x8x8.
#[test]
fn the_negative_elbo_falls_on_one_batch() {
    use burn::optim::GradientsParams;
    let dev = Device::flex().autodiff();
    dev.seed(6);
    let cfg = VaeGenConfig {
        num_classes: Some(10),
        ..VaeGenConfig::recipe(8, 1, &[8, 16], 2)
    };
    assert_eq!(cfg.latent_shape(), [2, 4, 4]);
    let b = 16;
    let (px, labels) = digits_batch(b);
    let x = Tensor::<4>::from_data(TensorData::new(px, [b, 1, 8, 8]), &dev);
    let mut net = VaeGenerator::new(&cfg, &dev).unwrap();
    let q = net.vae.encode(x.clone());
    assert_eq!(q.mean.dims(), [b, 2, 4, 4]);
    let (mu, log_s) = net.decode(q.mean, Some(&labels));
    assert_eq!((mu.dims(), log_s.dims()), ([b, 1, 8, 8], [b, 1, 8, 8]));
    let mut opt = diffuse::train::adamw::AdamW::new(0.9, 0.999, 1e-8, 0.0);
    let mut losses = Vec::new();
    for _ in 0..40 {
        let eps = Tensor::<4>::random([b, 2, 4, 4], Distribution::Normal(0.0, 1.0), &dev);
        let e = net.elbo(x.clone(), Some(&labels), eps);
        let loss = (e.recon + e.kl).mean().div_scalar(64.0);
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        losses.push(loss.into_scalar::<f32>());
        net = opt.step(net, &grads, 3e-3, 1.0);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        last < 0.8 * first,
        "the negative ELBO fell from {first} to {last} nats/dim"
    );
}
