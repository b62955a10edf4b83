//! Loading `--model` in any supported format: the one dispatcher above the native format
//! ([`crate::model`]) and diffusers interop ([`crate::interop::diffusers`]).

use crate::interop::diffusers;
use crate::model::{
    EMBEDDED_MODEL, Loaded, LoadedModel, NAMED_MODELS, load_any_from_bytes, model_file_in,
    named_model,
};
use anyhow::{Context, Result};
use burn::tensor::Device;
use std::path::Path;

/// Where `--model` points, before its bytes are read.
enum Source {
    /// Native bytes (the embedded or a shipped model).
    Bytes(&'static [u8], String),
    /// A native model file.
    File(std::path::PathBuf),
    /// A diffusers pipeline folder.
    Diffusers(std::path::PathBuf),
}

/// Resolves `--model`: `None` for the embedded Fashion-MNIST model, a run folder, a diffusers
/// pipeline folder, a `.safetensors` file, or the name of a shipped model when no such path
/// exists.
fn resolve(spec: Option<&str>) -> Result<Source> {
    let Some(spec) = spec else {
        return Ok(Source::Bytes(EMBEDDED_MODEL, "the embedded model".into()));
    };
    let shipped = |bytes| Ok(Source::Bytes(bytes, format!("the shipped model '{spec}'")));
    let p = Path::new(spec);
    if p.is_dir() && diffusers::is_pipeline(p) {
        return Ok(Source::Diffusers(p.to_path_buf()));
    }
    if p.is_dir() {
        let f = model_file_in(p);
        if !f.exists()
            && let Some(bytes) = named_model(spec)
        {
            // A folder that is not a model (say, a dataset called `emoji`) does not hide the
            // shipped model of that name.
            return shipped(bytes);
        }
        if !f.exists() {
            return Err(crate::files::not_found(format!(
                "{} holds neither model.safetensors (a diffuse run: train into it with `diffuse train --out {}`) nor model_index.json (a diffusers pipeline)",
                p.display(),
                p.display()
            )));
        }
        return Ok(Source::File(f));
    }
    if p.exists() {
        return Ok(Source::File(p.to_path_buf()));
    }
    if let Some(bytes) = named_model(spec) {
        return shipped(bytes);
    }
    let names: Vec<&str> = NAMED_MODELS.iter().map(|(n, _)| *n).collect();
    Err(crate::files::not_found(format!(
        "model '{spec}' is neither a file or folder nor a shipped model ({})",
        names.join(", ")
    )))
}

/// Loads `--model` of any family ([`resolve`] says what it may be).
pub fn load_generator(spec: Option<&str>, device: &Device) -> Result<Loaded> {
    match resolve(spec)? {
        Source::Bytes(bytes, what) => load_any_from_bytes(bytes, &what, device),
        Source::Diffusers(p) => Ok(Loaded::Diffusion(diffusers::load_pipeline(&p, device)?)),
        Source::File(file) => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            load_any_from_bytes(&bytes, &file.display().to_string(), device)
        }
    }
}

/// Loads a diffusion model for `--model` ([`load_generator`]; another family is refused with
/// one line).
pub fn load_model(spec: Option<&str>, device: &Device) -> Result<LoadedModel> {
    load_generator(spec, device)?.into_diffusion("this command")
}
