//! Super-resolution and latent diffusion: the resizes against PyTorch (fixture made by
//! tests/fixtures/superres/make_fixture.py), PSNR/SSIM properties, and both paths end to end
//! from the CLI on the committed image folder, with their bad input.

use super::cli::{fails, ok};
use super::data::fixture;
use diffuse::conditioning::lowres::{condition, downsample_area};
use diffuse::eval::superres::{psnr, ssim};
use diffuse::weights::read_safetensors;

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn resizes_match_pytorch() {
    let (t, _) = read_safetensors(&fixture("superres/resize.safetensors")).unwrap();
    let high = &t["high"].data;
    for (k, low, up) in [(4, "low4", "up4"), (2, "low2", "up2")] {
        let l = downsample_area(high, 2, 3, 16, k);
        assert!(max_diff(&l, &t[low].data) < 1e-6, "area /{k}");
        let u = condition(&l, 2, 3, 16 / k, k);
        assert!(max_diff(&u, &t[up].data) < 1e-5, "bicubic x{k}");
    }
}

#[test]
fn psnr_and_ssim_behave() {
    let a: Vec<f32> = (0..3 * 16 * 16)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    assert!(psnr(&a, &a).is_infinite());
    assert!((ssim(&a, &a, 3, 16) - 1.0).abs() < 1e-9);
    // A constant offset of 0.2 in [-1, 1]: MSE 0.04, PSNR = 10 log10(4 / 0.04) = 20 dB.
    let b: Vec<f32> = a.iter().map(|v| v + 0.2).collect();
    assert!((psnr(&a, &b) - 20.0).abs() < 1e-4);
    // More damage, lower scores.
    let c: Vec<f32> = a
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 3 == 0 { -v } else { *v })
        .collect();
    let d: Vec<f32> = a.iter().map(|v| -v).collect();
    assert!(ssim(&a, &c, 3, 16) > ssim(&a, &d, 3, 16));
    assert!(psnr(&a, &c) > psnr(&a, &d));
}

/// The options of a tiny training run (3 steps, 8 base channels), then `extra`.
pub fn tiny(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
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
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run(args: Vec<String>) -> String {
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    ok(&a)
}

#[test]
fn superres_trains_and_upscales_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).display().to_string();
    let folder = fixture("folder").display().to_string();
    let mut a = vec![
        "train".to_string(),
        "--data".into(),
        folder.clone(),
        "--out".into(),
        t("sr"),
    ];
    a.extend(tiny(&[
        "--task",
        "superres",
        "--scale",
        "2",
        "--image-size",
        "16",
    ]));
    run(a);
    assert!(tmp.path().join("sr/samples/step-000003.png").exists());
    // An 8x8 input becomes 16x16; the same seed gives the same bits.
    let small = fixture("folder/circle/a_grey.png");
    let img =
        image::open(&small)
            .unwrap()
            .resize_exact(8, 8, image::imageops::FilterType::Triangle);
    img.save(t("small.png")).unwrap();
    for out in ["a.png", "b.png"] {
        ok(&[
            "upscale",
            "--model",
            &t("sr"),
            "--image",
            &t("small.png"),
            "--steps",
            "4",
            "--out",
            &t(out),
        ]);
    }
    assert_eq!(image::image_dimensions(t("a.png")).unwrap(), (16, 16));
    assert_eq!(
        std::fs::read(t("a.png")).unwrap(),
        std::fs::read(t("b.png")).unwrap()
    );
    // A larger image is reduced first (a note, not an error).
    ok(&[
        "upscale",
        "--model",
        &t("sr"),
        "--image",
        &small.display().to_string(),
        "--steps",
        "2",
        "--out",
        &t("c.png"),
    ]);
    // The comparison with bicubic.
    let out = ok(&[
        "upscale",
        "--model",
        &t("sr"),
        "--eval",
        &folder,
        "--n",
        "4",
        "--steps",
        "2",
        "--out",
        &t("cmp.png"),
        "--json",
        &t("cmp.json"),
    ]);
    assert!(
        out.contains("bicubic") && out.contains("diffusion"),
        "{out}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t("cmp.json")).unwrap()).unwrap();
    assert!(j["bicubic"]["psnr"].as_f64().unwrap() > 5.0);
    assert!(j["diffusion"]["ssim"].as_f64().unwrap() <= 1.0);
    assert_eq!(image::image_dimensions(t("cmp.png")).unwrap().1 % 4, 0);
    // Bad input.
    fails(
        &[
            "upscale",
            "--model",
            &t("sr"),
            "--eval",
            &folder,
            "--steps",
            "2",
        ],
        "give --n of at least 2 (got 1)",
    );
    let tiny_img = t("tiny.png");
    img.resize_exact(4, 4, image::imageops::FilterType::Triangle)
        .save(&tiny_img)
        .unwrap();
    fails(
        &["upscale", "--model", &t("sr"), "--image", &tiny_img],
        "smaller than the model's input of 8x8",
    );
    fails(
        &[
            "upscale",
            "--model",
            &t("sr"),
            "--image",
            &t("small.png"),
            "--scale",
            "4",
        ],
        "trained to enlarge 2x, not 4x",
    );
    fails(
        &[
            "upscale",
            "--image",
            &t("small.png"),
            "--model",
            &fixture("diffusers/tiny-uncond.safetensors")
                .display()
                .to_string(),
        ],
        "not a super-resolution model",
    );
    fails(&["sample", "--model", &t("sr")], "use `diffuse upscale");
    fails(
        &[
            "train",
            "--data",
            &folder,
            "--out",
            &t("x"),
            "--task",
            "superres",
            "--scale",
            "3",
            "--image-size",
            "16",
        ],
        "--scale must be 2 or 4",
    );
    fails(
        &[
            "train",
            "--data",
            &folder,
            "--out",
            &t("x"),
            "--task",
            "superres",
            "--scale",
            "4",
            "--image-size",
            "18",
        ],
        "must be a multiple of --scale 4",
    );
    fails(
        &[
            "train",
            "--data",
            &folder,
            "--out",
            &t("x"),
            "--task",
            "superres",
        ],
        "needs --scale",
    );
}
