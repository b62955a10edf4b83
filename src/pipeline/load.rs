//! Loading `--model` in any supported format: the one dispatcher above the native format
//! ([`crate::model`]) and diffusers interop ([`crate::interop::diffusers`]).

use crate::interop::diffusers;
use crate::model::{
    EMBEDDED_MODEL, LoadedModel, NAMED_MODELS, load_from_bytes, model_file_in, named_model,
};
use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use std::path::Path;

/// Loads `--model`: `None` for the embedded Fashion-MNIST model, a run folder, a diffusers
/// pipeline folder, a `.safetensors` file, or the name of a shipped model (`emoji`,
/// `fashion-mnist`, `fashion-mnist-fast`) when no such path exists.
pub fn load_model(spec: Option<&str>, device: &Device) -> Result<LoadedModel> {
    let Some(spec) = spec else {
        return load_from_bytes(EMBEDDED_MODEL, "the embedded model", device);
    };
    let p = Path::new(spec);
    if p.is_dir() && diffusers::is_pipeline(p) {
        return diffusers::load_pipeline(p, device);
    }
    let file = if p.is_dir() {
        let f = model_file_in(p);
        if !f.exists()
            && let Some(bytes) = named_model(spec)
        {
            // A folder that is not a model (say, a dataset called `emoji`) does not hide the
            // shipped model of that name.
            return load_from_bytes(bytes, &format!("the shipped model '{spec}'"), device);
        }
        if !f.exists() {
            bail!(
                "{} holds neither model.safetensors (a diffuse run: train into it with `diffuse train --out {}`) nor model_index.json (a diffusers pipeline)",
                p.display(),
                p.display()
            );
        }
        f
    } else if p.exists() {
        p.to_path_buf()
    } else if let Some(bytes) = named_model(spec) {
        return load_from_bytes(bytes, &format!("the shipped model '{spec}'"), device);
    } else {
        let names: Vec<&str> = NAMED_MODELS.iter().map(|(n, _)| *n).collect();
        bail!(
            "model '{spec}' is neither a file or folder nor a shipped model ({})",
            names.join(", ")
        );
    };
    let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    load_from_bytes(&bytes, &file.display().to_string(), device)
}
