//! The autoencoder: output parity with diffusers' AutoencoderKL on a random-weight small
//! config (fixture made by tests/fixtures/vae/make_vae_fixture.py), folder round trips, and
//! bad folders.

use super::data::fixture;
use super::interop::{rel_err, tensor4};
use burn::tensor::Tensor;
use diffuse::device::inference_device;
use diffuse::vae::{self, WEIGHTS_FILE};
use diffuse::weights::{StoreDtype, read_safetensors};

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec().unwrap()
}

#[test]
fn autoencoderkl_matches_diffusers() {
    let dev = inference_device();
    let v = vae::load(&fixture("vae/tiny-autoencoderkl"), &dev).unwrap();
    let (io, _) = read_safetensors(&fixture("vae/tiny-autoencoderkl_io.safetensors")).unwrap();
    let post = v.vae.encode(tensor4(&io["input"]));
    assert_eq!(post.mean.dims(), [2, 4, 4, 4]);
    let e_mean = rel_err(&values(post.mean.clone()), &io["mean"].data);
    let e_logvar = rel_err(&values(post.logvar.clone()), &io["logvar"].data);
    let e_dec = rel_err(&values(v.vae.decode(post.mean)), &io["decoded"].data);
    assert!(e_mean < 1e-5, "mean differs from diffusers by {e_mean}");
    assert!(
        e_logvar < 1e-5,
        "logvar differs from diffusers by {e_logvar}"
    );
    assert!(e_dec < 1e-5, "decode differs from diffusers by {e_dec}");
    // decode(encode(x)) through the scaled interface is the same as diffusers' forward.
    let z = v.encode_scaled(tensor4(&io["input"]));
    let e_fwd = rel_err(&values(v.decode_scaled(z)), &io["forward"].data);
    assert!(e_fwd < 1e-4, "forward differs from diffusers by {e_fwd}");
}

#[test]
fn vae_folders_round_trip_with_diffusers_names() {
    let dev = inference_device();
    let v = vae::load(&fixture("vae/tiny-autoencoderkl"), &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    vae::save(&v, dir.path(), StoreDtype::F32).unwrap();
    // Same tensor names, shapes and values as the diffusers file.
    let (theirs, _) =
        read_safetensors(&fixture("vae/tiny-autoencoderkl").join(WEIGHTS_FILE)).unwrap();
    let (ours, _) = read_safetensors(&dir.path().join(WEIGHTS_FILE)).unwrap();
    assert_eq!(ours, theirs);
    let back = vae::load(dir.path(), &dev).unwrap();
    assert_eq!(back.config, v.config);
    let (io, _) = read_safetensors(&fixture("vae/tiny-autoencoderkl_io.safetensors")).unwrap();
    let a = values(v.vae.decode(v.vae.encode(tensor4(&io["input"])).mean));
    let b = values(back.vae.decode(back.vae.encode(tensor4(&io["input"])).mean));
    assert_eq!(a, b);
}

#[test]
fn bad_vae_folders_say_what_is_wrong() {
    let dev = inference_device();
    let err = |p: &std::path::Path| format!("{:#}", vae::load(p, &dev).unwrap_err());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(err(&d.join("nope")).contains("does not exist"));
    assert!(err(d).contains("has no config.json"));
    let src = fixture("vae/tiny-autoencoderkl");
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("UpDecoderBlock2D", "AttnUpDecoderBlock2D"),
    )
    .unwrap();
    std::fs::copy(src.join(WEIGHTS_FILE), d.join(WEIGHTS_FILE)).unwrap();
    assert!(
        err(d).contains("only UpDecoderBlock2D is supported"),
        "{}",
        err(d)
    );
    // Weights of another shape: latent_channels 8 does not fit the 4-channel weights.
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"latent_channels\": 4", "\"latent_channels\": 8"),
    )
    .unwrap();
    let e = err(d);
    assert!(
        e.contains("does not match its config") && e.contains("shape"),
        "{e}"
    );
    std::fs::write(d.join("config.json"), &cfg).unwrap();
    std::fs::write(d.join(WEIGHTS_FILE), b"junk").unwrap();
    assert!(err(d).contains("not a valid safetensors"), "{}", err(d));
}

#[test]
fn vae_and_latent_diffusion_run_from_the_cli() {
    use super::cli::{fails, ok};
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).display().to_string();
    let folder = fixture("folder").display().to_string();
    ok(&[
        "train-vae",
        "--data",
        &folder,
        "--image-size",
        "16",
        "--widths",
        "8,16",
        "--steps",
        "4",
        "--batch",
        "4",
        "--save-every",
        "2",
        "--out",
        &t("vae"),
    ]);
    for f in [
        "config.json",
        WEIGHTS_FILE,
        "recon.png",
        "samples.png",
        "metrics.jsonl",
    ] {
        assert!(tmp.path().join("vae").join(f).exists(), "{f}");
    }
    let v = vae::load(&tmp.path().join("vae"), &inference_device()).unwrap();
    assert_eq!(v.config.latent_shape(16), [4, 8, 8]);
    assert!(v.config.scaling_factor > 0.0 && v.config.scaling_factor.is_finite());
    // encode -> decode: latents of the right shape, images of the VAE's size.
    let img = fixture("folder/circle/a_grey.png").display().to_string();
    let img2 = fixture("folder/square").join(
        std::fs::read_dir(fixture("folder/square"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name(),
    );
    ok(&[
        "vae",
        "encode",
        "--vae",
        &t("vae"),
        "--image",
        &img,
        &img2.display().to_string(),
        "--out",
        &t("z.safetensors"),
    ]);
    let (z, _) = read_safetensors(&tmp.path().join("z.safetensors")).unwrap();
    assert_eq!(z["latent"].shape, vec![2, 4, 8, 8]);
    ok(&[
        "vae",
        "decode",
        "--vae",
        &t("vae"),
        "--latent",
        &t("z.safetensors"),
        "--out",
        &t("dec.png"),
        "--out-dir",
        &t("dec"),
    ]);
    assert_eq!(
        image::image_dimensions(t("dec/00001.png")).unwrap(),
        (16, 16)
    );
    fails(
        &["vae", "decode", "--vae", &t("vae"), "--latent", &img],
        "not a valid safetensors",
    );
    fails(
        &["vae", "encode", "--vae", &t("nope"), "--image", &img],
        "does not exist",
    );

    // A latent model: trains on 4x8x8 latents, samples 16x16 images, edits.
    ok(&[
        "train",
        "--data",
        &folder,
        "--latent",
        &t("vae"),
        "--image-size",
        "16",
        "--out",
        &t("ldm"),
        "--steps",
        "3",
        "--batch",
        "4",
        "--base-channels",
        "8",
        "--norm-groups",
        "4",
        "--res-blocks",
        "1",
        "--checkpoint-every",
        "3",
        "--sample-every",
        "3",
        "--warmup",
        "1",
    ]);
    assert!(tmp.path().join("ldm/samples/step-000003.png").exists());
    for dir in ["s1", "s2"] {
        ok(&[
            "sample",
            "--model",
            &t("ldm"),
            "--n",
            "2",
            "--steps",
            "3",
            "--out-dir",
            &t(dir),
        ]);
    }
    assert_eq!(
        image::image_dimensions(t("s1/00000.png")).unwrap(),
        (16, 16)
    );
    assert_eq!(
        std::fs::read(t("s1/00001.png")).unwrap(),
        std::fs::read(t("s2/00001.png")).unwrap()
    );
    ok(&[
        "edit",
        "--model",
        &t("ldm"),
        "--image",
        &img,
        "--strength",
        "0.5",
        "--steps",
        "4",
        "--out",
        &t("e.png"),
        "--out-dir",
        &t("e"),
    ]);
    assert_eq!(image::image_dimensions(t("e/00000.png")).unwrap(), (16, 16));
    // The VAE travels in the model file: the folder can go.
    std::fs::remove_dir_all(tmp.path().join("vae")).unwrap();
    ok(&[
        "sample",
        "--model",
        &t("ldm"),
        "--n",
        "1",
        "--steps",
        "2",
        "--out",
        &t("x.png"),
    ]);
    // A diffusers AutoencoderKL folder serves as the VAE as well (latents 4x4x4 here).
    let theirs = fixture("vae/tiny-autoencoderkl").display().to_string();
    ok(&[
        "train",
        "--data",
        &folder,
        "--latent",
        &theirs,
        "--image-size",
        "16",
        "--out",
        &t("ldm2"),
        "--steps",
        "1",
        "--batch",
        "2",
        "--base-channels",
        "8",
        "--norm-groups",
        "4",
        "--res-blocks",
        "1",
        "--sample-every",
        "0",
    ]);
    ok(&[
        "sample",
        "--model",
        &t("ldm2"),
        "--n",
        "1",
        "--steps",
        "2",
        "--out-dir",
        &t("s3"),
    ]);
    assert_eq!(
        image::image_dimensions(t("s3/00000.png")).unwrap(),
        (16, 16)
    );
    // Bad input.
    fails(
        &[
            "train",
            "--data",
            &folder,
            "--latent",
            &t("vae"),
            "--out",
            &t("bad"),
        ],
        "does not exist",
    );
    ok(&[
        "train-vae",
        "--data",
        &folder,
        "--image-size",
        "16",
        "--widths",
        "8,16,16",
        "--steps",
        "1",
        "--batch",
        "2",
        "--out",
        &t("vae3"),
    ]);
    fails(
        &[
            "train",
            "--data",
            &folder,
            "--latent",
            &t("vae3"),
            "--image-size",
            "18",
            "--out",
            &t("bad"),
        ],
        "not a multiple of the VAE's downscale 4",
    );
    fails(
        &[
            "train",
            "--data",
            &folder,
            "--latent",
            &t("vae3"),
            "--channels",
            "1",
            "--out",
            &t("bad"),
        ],
        "takes 3 channels",
    );
    fails(
        &[
            "train-vae",
            "--data",
            &folder,
            "--image-size",
            "18",
            "--widths",
            "8,16,16",
            "--out",
            &t("bad"),
        ],
        "must be a positive multiple of 4",
    );
    fails(
        &["export", "--model", &t("ldm"), "--diffusers", &t("exp")],
        "only unconditioned and class-conditioned pixel models",
    );
}
