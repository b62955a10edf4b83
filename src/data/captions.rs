//! Captions of an image folder, for text conditioning. Either a `captions.jsonl` in the folder,
//! one JSON object per line, `{"file": "path/relative/to/the/folder.png", "text": "..."}` (a
//! file named on several lines has several captions, alternatives that training picks among),
//! or a `.txt` file beside an image with the same stem (one caption per non-empty line).

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The captions file's name inside a folder.
pub const FILE: &str = "captions.jsonl";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    file: String,
    text: String,
}

/// The captions of `files` (images inside `dir`), in their order; `None` when the folder has
/// neither `captions.jsonl` nor any `.txt` sidecar. An image without a caption, a line that is
/// not a caption object, or a caption for a file that is not there is an error naming it.
pub fn read(dir: &Path, files: &[PathBuf]) -> Result<Option<Vec<Vec<String>>>> {
    let jsonl = dir.join(FILE);
    let by_file: HashMap<PathBuf, Vec<String>> = if jsonl.exists() {
        let text = std::fs::read_to_string(&jsonl)
            .with_context(|| format!("cannot read {}", jsonl.display()))?;
        let mut map: HashMap<PathBuf, Vec<String>> = HashMap::new();
        for (k, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let l: Line = serde_json::from_str(line).with_context(|| {
                format!(
                    "{} line {}: not a caption (expected {{\"file\": ..., \"text\": ...}})",
                    jsonl.display(),
                    k + 1
                )
            })?;
            let rel = Path::new(&l.file);
            if rel.is_absolute() || rel.components().any(|c| c.as_os_str() == "..") {
                bail!(
                    "{} line {}: file '{}' must be a path inside the folder",
                    jsonl.display(),
                    k + 1,
                    l.file
                );
            }
            let p = dir.join(rel);
            if !p.is_file() {
                bail!(
                    "{} line {}: no image {} in the folder",
                    jsonl.display(),
                    k + 1,
                    l.file
                );
            }
            map.entry(p).or_default().push(l.text.trim().to_string());
        }
        map
    } else {
        let mut map = HashMap::new();
        for f in files {
            let side = f.with_extension("txt");
            if side.is_file() {
                let text = std::fs::read_to_string(&side)
                    .with_context(|| format!("cannot read {}", side.display()))?;
                let caps: Vec<String> = text
                    .lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty())
                    .collect();
                map.insert(f.clone(), caps);
            }
        }
        if map.is_empty() {
            return Ok(None);
        }
        map
    };
    let mut out = Vec::with_capacity(files.len());
    let mut missing = Vec::new();
    for f in files {
        match by_file.get(f) {
            Some(c) if !c.is_empty() => out.push(c.clone()),
            _ => missing.push(f),
        }
    }
    if let Some(first) = missing.first() {
        bail!(
            "{} of {} images in {} have no caption, first {} (give each a line in {FILE} or a .txt file beside it)",
            missing.len(),
            files.len(),
            dir.display(),
            first.display()
        );
    }
    Ok(Some(out))
}
