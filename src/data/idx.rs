//! Array file formats: IDX (MNIST, Fashion-MNIST; gzipped or not) and the scikit-learn
//! digits CSV (8x8 images, values 0..16, label last).

use super::Dataset;
use anyhow::{Context, Result, bail};
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Reads a file, transparently gunzipping it when it starts with the gzip magic bytes.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{} is not a valid gzip file", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX buffer of unsigned bytes: returns the dimensions and the data.
pub fn parse_idx(buf: &[u8], what: &str) -> Result<(Vec<usize>, Vec<u8>)> {
    if buf.len() < 4 || buf[0] != 0 || buf[1] != 0 {
        bail!("{what} is not an IDX file (bad magic number)");
    }
    if buf[2] != 0x08 {
        bail!(
            "{what}: only unsigned-byte IDX data is supported (type 0x{:02x})",
            buf[2]
        );
    }
    let nd = buf[3] as usize;
    let header = 4 + 4 * nd;
    if nd == 0 || buf.len() < header {
        bail!("{what}: truncated IDX header");
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| u32::from_be_bytes(buf[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let n = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= buf.len())
        .unwrap_or(usize::MAX);
    if n == usize::MAX || buf.len() < header + n {
        bail!(
            "{what}: truncated IDX data ({} bytes, dimensions {:?} need {})",
            buf.len() - header,
            dims,
            n
        );
    }
    Ok((dims, buf[header..header + n].to_vec()))
}

fn idx_images_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().contains("images-idx3-ubyte"))
                .unwrap_or(false)
        })
        .collect();
    found.sort();
    // Prefer the training split when both are present.
    found
        .iter()
        .find(|p| p.to_string_lossy().contains("train"))
        .or(found.first())
        .cloned()
}

/// True for an IDX image file, or a folder holding one.
pub fn is_idx(path: &Path) -> Result<bool> {
    if path.is_dir() {
        return Ok(idx_images_in(path).is_some());
    }
    Ok(path
        .file_name()
        .map(|n| n.to_string_lossy().contains("-idx"))
        .unwrap_or(false))
}

/// Loads IDX images (`[N, H, W]`, square) and, when present, the matching labels file
/// (`images-idx3` replaced by `labels-idx1` in the name) and a `classes.txt` beside it.
pub fn load_idx(path: &Path) -> Result<Dataset> {
    let img_path = if path.is_dir() {
        idx_images_in(path).expect("checked by is_idx")
    } else {
        path.to_path_buf()
    };
    let what = img_path.display().to_string();
    let (dims, pixels) = parse_idx(&read_maybe_gz(&img_path)?, &what)?;
    if dims.len() != 3 || dims[1] != dims[2] || dims[1] == 0 {
        bail!("{what}: expected square images [N, H, W], found dimensions {dims:?}");
    }
    let name = img_path.file_name().unwrap().to_string_lossy().into_owned();
    let label_path = img_path.with_file_name(name.replace("images-idx3", "labels-idx1"));
    let (labels, class_names) = if label_path.exists() && label_path != img_path {
        let lw = label_path.display().to_string();
        let (ldims, l) = parse_idx(&read_maybe_gz(&label_path)?, &lw)?;
        if ldims != [dims[0]] {
            bail!("{lw}: {} labels for {} images", ldims[0], dims[0]);
        }
        let labels: Vec<usize> = l.iter().map(|&v| v as usize).collect();
        let k = labels.iter().max().map(|m| m + 1).unwrap_or(0);
        let names_file = img_path.with_file_name("classes.txt");
        let mut names: Vec<String> = std::fs::read_to_string(&names_file)
            .map(|s| {
                s.lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if names.len() < k {
            names = (0..k).map(|i| i.to_string()).collect();
        }
        (Some(labels), names)
    } else {
        (None, Vec::new())
    };
    Ok(Dataset {
        pixels,
        labels,
        class_names,
        captions: None,
        channels: 1,
        size: dims[1],
        source: what,
    })
}

/// True for a file named like scikit-learn's `digits.csv` / `digits.csv.gz`.
pub fn is_digits_csv(path: &Path) -> bool {
    let n = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    path.is_file() && (n.ends_with(".csv") || n.ends_with(".csv.gz"))
}

/// Loads the scikit-learn digits CSV: each row 64 pixel values in `0..=16` then the label.
/// Pixels are scaled to `0..=255`; class names are "0".."9".
pub fn load_digits_csv(path: &Path) -> Result<Dataset> {
    let what = path.display().to_string();
    let text = String::from_utf8(read_maybe_gz(path)?)
        .with_context(|| format!("{what} is not a text CSV file"))?;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let vals: Vec<f64> = line
            .split(',')
            .map(|v| v.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("{what}, line {}: not a row of numbers", i + 1))?;
        if vals.len() != 65 {
            bail!(
                "{what}, line {}: expected 65 values (64 pixels and a label), found {}",
                i + 1,
                vals.len()
            );
        }
        for v in &vals[..64] {
            if !(0.0..=16.0).contains(v) {
                bail!("{what}, line {}: pixel value {v} outside 0..16", i + 1);
            }
            pixels.push((v * 255.0 / 16.0).round() as u8);
        }
        let label = vals[64];
        if !(label.fract() == 0.0 && (0.0..=255.0).contains(&label)) {
            bail!(
                "{what}, line {}: label {label} is not an integer in 0..255",
                i + 1
            );
        }
        labels.push(label as usize);
    }
    let k = labels.iter().max().map(|m| m + 1).unwrap_or(0);
    Ok(Dataset {
        pixels,
        labels: Some(labels),
        class_names: (0..k).map(|i| i.to_string()).collect(),
        captions: None,
        channels: 1,
        size: 8,
        source: what,
    })
}
