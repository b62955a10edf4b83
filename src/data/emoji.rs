//! The Noto emoji dataset (`diffuse fetch emoji`): the 64x64 PNGs of the npm package
//! `emoji-datasource-google` (Apache-2.0 images) with captions made from its `emoji.json`
//! (name, short names, category, subcategory) and the keywords of `@emoji-mart/data`. The
//! folder it writes is an ordinary captioned image folder (`images/*.png` and
//! `captions.jsonl`, [`super::captions`]); transparency is composited on white when loaded.

use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::Path;

/// Package versions fetched.
pub const GOOGLE: &str = "emoji-datasource-google@16.0.0";
pub const MART: &str = "@emoji-mart/data@1.2.1";

/// Captions per emoji image: `(image file name, captions)`, for the emoji of `emoji.json`
/// with a Google image, from `emoji.json` and emoji-mart's `native.json`. Three captions each:
/// the name; the name with short names and keywords; the name with category and
/// subcategory. All lower case.
pub fn captions(emoji_json: &str, mart_json: &str) -> Result<Vec<(String, Vec<String>)>> {
    let emoji: serde_json::Value =
        serde_json::from_str(emoji_json).context("emoji.json is not JSON")?;
    let mart: serde_json::Value =
        serde_json::from_str(mart_json).context("emoji-mart's native.json is not JSON")?;
    let mut keywords: HashMap<String, Vec<String>> = HashMap::new();
    if let Some(m) = mart["emojis"].as_object() {
        for e in m.values() {
            let Some(u) = e["skins"][0]["unified"].as_str() else {
                continue;
            };
            let kw = e["keywords"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|k| k.as_str())
                        .map(str::to_lowercase)
                        .collect()
                })
                .unwrap_or_default();
            keywords.insert(u.to_lowercase(), kw);
        }
    }
    let list = emoji.as_array().context("emoji.json is not a list")?;
    let clean = |s: &str| s.replace(['_', '-'], " ").to_lowercase();
    let mut out = Vec::new();
    for e in list {
        if e["has_img_google"].as_bool() != Some(true) {
            continue;
        }
        let (Some(image), Some(unified)) = (e["image"].as_str(), e["unified"].as_str()) else {
            continue;
        };
        // Some flags and keycaps have no name; their first short name stands in.
        let shorts: Vec<String> = e["short_names"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str()).map(clean).collect())
            .unwrap_or_default();
        let name = match e["name"].as_str().map(|n| n.trim().to_lowercase()) {
            Some(n) if !n.is_empty() => n,
            _ => match shorts.first() {
                Some(s) => s.clone(),
                None => continue,
            },
        };
        let u = unified.to_lowercase();
        let kw = keywords
            .get(&u)
            .or_else(|| keywords.get(u.trim_end_matches("-fe0f")))
            .cloned()
            .unwrap_or_default();
        let mut words: Vec<String> = Vec::new();
        for w in shorts.iter().chain(kw.iter()).map(|w| clean(w)) {
            if w != name && !words.contains(&w) {
                words.push(w);
            }
        }
        let mut caps = vec![name.clone()];
        if !words.is_empty() {
            caps.push(format!("{name}, {}", words.join(", ")));
        }
        let cat = e["category"].as_str().map(clean).unwrap_or_default();
        let sub = e["subcategory"].as_str().map(clean).unwrap_or_default();
        if !cat.is_empty() {
            caps.push(format!("{name}, {sub}, {cat}"));
        }
        out.push((image.to_string(), caps));
    }
    if out.is_empty() {
        bail!("emoji.json lists no emoji with a Google image");
    }
    Ok(out)
}

/// `diffuse fetch emoji`: `npm pack` both packages into `work`, then write `out/images/` and
/// `out/captions.jsonl`.
pub fn fetch_into(work: &Path, out: &Path) -> Result<()> {
    for pkg in [GOOGLE, MART] {
        crate::fetch::run(
            std::process::Command::new("npm")
                .args(["pack", pkg, "--silent"])
                .current_dir(work),
            &format!("npm pack {pkg}"),
        )?;
    }
    let unpack = |prefix: &str, members: &[&str], into: &str| -> Result<()> {
        let tgz = std::fs::read_dir(work)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    n.to_string_lossy().starts_with(prefix) && n.to_string_lossy().ends_with(".tgz")
                })
            })
            .with_context(|| format!("npm pack produced no {prefix}*.tgz"))?;
        let dir = work.join(into);
        std::fs::create_dir_all(&dir)?;
        crate::fetch::run(
            std::process::Command::new("tar")
                .arg("-xzf")
                .arg(&tgz)
                .arg("-C")
                .arg(&dir)
                .args(members),
            "tar -xzf",
        )
    };
    unpack(
        "emoji-datasource-google",
        &["package/emoji.json", "package/img/google/64"],
        "g",
    )?;
    unpack("emoji-mart-data", &["package/sets/15/native.json"], "m")?;
    let read = |p: &Path| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    let caps = captions(
        &read(&work.join("g/package/emoji.json"))?,
        &read(&work.join("m/package/sets/15/native.json"))?,
    )?;
    let images = out.join("images");
    std::fs::create_dir_all(&images)?;
    let mut lines = String::new();
    let mut copied = 0usize;
    for (image, texts) in &caps {
        let src = work.join("g/package/img/google/64").join(image);
        if !src.is_file() {
            continue;
        }
        std::fs::copy(&src, images.join(image))?;
        copied += 1;
        for t in texts {
            let line = serde_json::json!({ "file": format!("images/{image}"), "text": t });
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
    }
    if copied == 0 {
        bail!("the emoji package holds none of the images emoji.json names");
    }
    std::fs::write(out.join(super::captions::FILE), lines)?;
    Ok(())
}
