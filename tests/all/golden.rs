//! Output bits pinned across refactors: fixed-seed runs of `sample` (class, prompt, every
//! output form), `edit` (SDEdit and inpainting), `train` (checkpoint and preview grid),
//! `upscale` and `serve`, hashed and compared with `tests/fixtures/golden/hashes.json`.
//!
//! Bits are the same for the same build on the same kind of machine, not across processors
//! (matrix-product blocking follows the caches), so the hashes are kept per machine kind: the
//! key build.rs prints as DIFFUSE_MACHINE_KEY (architecture, CPU model, vector width). Where no
//! hashes are pinned for this machine the test is ignored and `cargo test` lists it so; pin
//! them from a build known to be right with
//! `DIFFUSE_GOLDEN=write cargo test --release golden -- --include-ignored`.

use super::cli::ok;
use super::data::fixture;
use std::collections::BTreeMap;
use std::path::Path;

/// 64-bit FNV-1a: enough to tell two outputs apart (no adversary here).
fn fnv(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

fn hash_file(p: &Path) -> String {
    fnv(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

/// A safetensors output hashed by its content: its tensors (as f32) and metadata, less the
/// checksum, as the `safetensors` crate serialises them (how diffuse wrote files when the
/// hashes were pinned), so the hash follows what a file holds, not the writer's layout.
fn hash_tensors(p: &Path) -> String {
    let (t, meta) = diffuse::weights::read_safetensors(p).unwrap();
    fnv(&super::hardening::without_checksum(&t, &meta))
}

/// Every case's outputs, by name.
fn outputs() -> BTreeMap<String, String> {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).display().to_string();
    let mut got = BTreeMap::new();
    let mut put = |name: &str, path: String| {
        let p = Path::new(&path);
        let h = if path.ends_with(".safetensors") {
            hash_tensors(p)
        } else {
            hash_file(p)
        };
        got.insert(name.to_string(), h);
    };

    // The embedded class-conditioned model: the default sampler with guidance, a trajectory
    // and the model-space tensor.
    ok(&[
        "sample",
        "--precision",
        "f32",
        "--n",
        "8",
        "--steps",
        "25",
        "--guidance",
        "2",
        "--seed",
        "1",
        "--out",
        &t("sample.png"),
        "--trajectory",
        &t("traj.png"),
        "--save-tensor",
        &t("sample.safetensors"),
    ]);
    put("sample grid", t("sample.png"));
    put("sample trajectory", t("traj.png"));
    put("sample tensor", t("sample.safetensors"));
    // One class by name, a multistep sampler on Karras sigmas, one file per image.
    ok(&[
        "sample",
        "--precision",
        "f32",
        "--class",
        "sneaker",
        "--n",
        "3",
        "--sampler",
        "dpmpp-2m",
        "--karras",
        "--steps",
        "12",
        "--seed",
        "5",
        "--out-dir",
        &t("dpm"),
    ]);
    put("sample dpmpp-2m image 0", t("dpm/00000.png"));
    put("sample dpmpp-2m image 2", t("dpm/00002.png"));
    // Given starting noise: the tensor written above is a valid [N, 1, 28, 28] input once
    // renamed, so write a small one of our own.
    let noise: Vec<f32> = (0..2 * 28 * 28)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let mut tensors = diffuse::weights::NamedTensors::new();
    tensors.insert(
        "noise".into(),
        diffuse::weights::HostTensor {
            shape: vec![2, 1, 28, 28],
            data: noise,
        },
    );
    let bytes = diffuse::weights::to_safetensors(
        &tensors,
        &Default::default(),
        diffuse::weights::StoreDtype::F32,
    )
    .unwrap();
    std::fs::write(t("noise.safetensors"), bytes).unwrap();
    ok(&[
        "sample",
        "--precision",
        "f32",
        "--class",
        "2",
        "--init-noise",
        &t("noise.safetensors"),
        "--sampler",
        "ddim",
        "--eta",
        "0.5",
        "--steps",
        "10",
        "--out",
        &t("init.png"),
    ]);
    put("sample from given noise", t("init.png"));

    // The shipped text model: a prompt and a negative prompt.
    super::text::encoder_dir();
    ok(&[
        "sample",
        "--precision",
        "f32",
        "--model",
        "emoji",
        "--prompt",
        "a red heart",
        "--negative-prompt",
        "blue",
        "--n",
        "2",
        "--sampler",
        "euler",
        "--steps",
        "8",
        "--seed",
        "3",
        "--out",
        &t("emoji.png"),
    ]);
    put("sample prompt", t("emoji.png"));

    // Editing: SDEdit towards a class, and inpainting the left half.
    let image = fixture("folder/circle/a_grey.png").display().to_string();
    ok(&[
        "edit",
        "--precision",
        "f32",
        "--image",
        &image,
        "--class",
        "3",
        "--strength",
        "0.6",
        "--steps",
        "20",
        "--n",
        "2",
        "--seed",
        "2",
        "--out",
        &t("edit.png"),
    ]);
    put("edit sdedit", t("edit.png"));
    let mask =
        image::GrayImage::from_fn(28, 28, |x, _| image::Luma([if x < 14 { 255 } else { 0 }]));
    mask.save(t("mask.png")).unwrap();
    ok(&[
        "edit",
        "--precision",
        "f32",
        "--image",
        &image,
        "--mask",
        &t("mask.png"),
        "--prompt",
        "bag",
        "--sampler",
        "ddpm",
        "--steps",
        "15",
        "--seed",
        "4",
        "--out",
        &t("inpaint.png"),
    ]);
    put("edit inpaint", t("inpaint.png"));

    // Training: a tiny class-conditioned run (checkpoint, model and preview grid), then a tiny
    // super-resolution run and an upscale with it.
    let folder = fixture("folder").display().to_string();
    let run = |out: &str, extra: &[&str]| {
        let mut a = vec![
            "train".to_string(),
            "--data".into(),
            folder.clone(),
            "--out".into(),
        ];
        a.push(out.to_string());
        // The pinned runs are diffusion models (epsilon, the default until 2026-12).
        let mut more = vec![
            "--precision",
            "f32",
            "--image-size",
            "16",
            "--objective",
            "epsilon",
        ];
        more.extend(extra);
        a.extend(super::superres::tiny(&more));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        ok(&a);
    };
    run(&t("class"), &["--cond", "class"]);
    put("train class model", t("class/model.safetensors"));
    put("train class preview", t("class/samples/step-000003.png"));
    run(&t("sr"), &["--task", "superres", "--scale", "2"]);
    put("train superres model", t("sr/model.safetensors"));
    let small = image::open(fixture("folder/circle/a_grey.png"))
        .unwrap()
        .resize_exact(8, 8, image::imageops::FilterType::Triangle);
    small.save(t("small.png")).unwrap();
    ok(&[
        "upscale",
        "--precision",
        "f32",
        "--model",
        &t("sr"),
        "--image",
        &t("small.png"),
        "--steps",
        "4",
        "--n",
        "2",
        "--seed",
        "6",
        "--out",
        &t("up.png"),
    ]);
    put("upscale", t("up.png"));

    // A served image (JSON with base64 PNGs).
    let s = super::serve::start(&["--precision", "f32"]);
    let body =
        r#"{"class": "bag", "n": 2, "steps": 9, "sampler": "euler-a", "guidance": 3, "seed": 11}"#;
    let r = diffuse::serve::load::request(
        s.addr,
        "POST",
        "/v1/generate",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
        std::time::Duration::from_secs(120),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json().unwrap();
    for (i, img) in j["images"].as_array().unwrap().iter().enumerate() {
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(img.as_str().unwrap())
            .unwrap();
        got.insert(format!("serve image {i}"), fnv(&png));
    }
    got
}

#[test]
#[cfg_attr(
    not(golden_pinned),
    ignore = "skipped: no golden hashes pinned for this machine kind (tests/fixtures/golden)"
)]
fn outputs_are_bit_identical_to_the_pinned_ones() {
    let key = env!("DIFFUSE_MACHINE_KEY");
    let path = fixture("golden/hashes.json");
    let mut all: BTreeMap<String, BTreeMap<String, String>> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let got = outputs();
    if std::env::var("DIFFUSE_GOLDEN").as_deref() == Ok("write") {
        all.insert(key.to_string(), got);
        let json = serde_json::to_string_pretty(&all).unwrap() + "\n";
        std::fs::write(&path, json).unwrap();
        eprintln!("wrote the golden hashes for '{key}' to {}", path.display());
        return;
    }
    let want = all
        .get(key)
        .unwrap_or_else(|| panic!("no hashes for '{key}' in {}", path.display()));
    let differ: Vec<String> = want
        .iter()
        .filter(|(name, h)| got.get(*name) != Some(*h))
        .map(|(name, h)| format!("{name}: pinned {h}, got {:?}", got.get(name)))
        .collect();
    assert!(
        differ.is_empty(),
        "outputs differ from the pinned ones on '{key}':\n{}",
        differ.join("\n")
    );
    assert_eq!(got.len(), want.len(), "cases added or removed: re-pin");
}
