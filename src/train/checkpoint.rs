//! Checkpoints: the whole training state in one safetensors file, written atomically.
//! Tensors: `model.*` (weights), `ema.*` (EMA weights), `opt.m.*` / `opt.v.*` (AdamW
//! moments). Metadata: the run config, the step and the optimizer's update count. The random
//! state needs no saving: every draw of step `s` derives from `(seed, s)`. Each checkpoint
//! also refreshes `model.safetensors`, the EMA weights ready for `diffuse sample`.

use super::adamw::AdamW;
use super::{RunConfig, RunPaths, RunSpec};
use crate::model::{self, CONFIG_KEY};
use crate::unet::UNet;
use crate::weights::{self, NamedTensors, StoreDtype};
use anyhow::{Context, Result, anyhow, bail};
use std::collections::HashMap;
use std::path::Path;

/// Metadata key of the run config: what marks a file as a checkpoint.
pub const RUN_KEY: &str = "diffuse.run";
const STEP_KEY: &str = "diffuse.step";
const ADAM_T_KEY: &str = "diffuse.adam_t";

/// A loaded checkpoint (of a diffusion run unless `R` says otherwise).
pub struct Checkpoint<R = RunConfig> {
    pub run: R,
    pub step: usize,
    pub adam_t: u64,
    pub tensors: NamedTensors,
}

/// Tensors saved besides the model, the EMA and the optimiser.
#[derive(Clone, Copy)]
pub struct Files<'a> {
    /// Into the checkpoint and the model file: a latent model's VAE, under `vae.`.
    pub both: &'a NamedTensors,
    /// Into the checkpoint only: a distillation run's teacher, under `teacher.`.
    pub checkpoint_only: &'a NamedTensors,
}

/// Writes `checkpoint.safetensors` and `model.safetensors` (EMA, f32) atomically, with the
/// extra tensors of `files`.
pub fn save(
    paths: &RunPaths,
    cfg: &RunConfig,
    model: &UNet,
    ema: &UNet,
    opt: &AdamW,
    step: usize,
    files: Files,
) -> Result<()> {
    let extra = files.both;
    let mut t = NamedTensors::new();
    weights::collect(model, "model.", &mut t);
    weights::collect(ema, "ema.", &mut t);
    opt.export("opt.", &mut t);
    t.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    t.extend(
        files
            .checkpoint_only
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    let mut e = NamedTensors::new();
    weights::collect(ema, "", &mut e);
    e.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    let model_file = model::model_bytes(&cfg.model, &e, StoreDtype::F32)?;
    let parts = Parts {
        run_json: serde_json::to_string(cfg)?,
        config_json: serde_json::to_string(&cfg.model)?,
        step,
        adam_t: opt.t,
    };
    write(paths, &parts, &t, &model_file)
}

/// The metadata of a checkpoint.
pub(crate) struct Parts {
    /// The run config (`diffuse.run`).
    pub run_json: String,
    /// The model config (`diffuse.config`).
    pub config_json: String,
    pub step: usize,
    /// Updates of the (first) optimiser.
    pub adam_t: u64,
}

/// Writes `checkpoint.safetensors` (f32 `tensors` with the metadata of `parts`) and then the
/// model file's bytes as `model.safetensors`, each atomically.
pub(crate) fn write(
    paths: &RunPaths,
    parts: &Parts,
    tensors: &NamedTensors,
    model_file: &[u8],
) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert(RUN_KEY.to_string(), parts.run_json.clone());
    meta.insert(CONFIG_KEY.to_string(), parts.config_json.clone());
    meta.insert(STEP_KEY.to_string(), parts.step.to_string());
    meta.insert(ADAM_T_KEY.to_string(), parts.adam_t.to_string());
    let bytes = weights::to_safetensors(tensors, &meta, StoreDtype::F32)?;
    crate::files::write_atomic(&paths.checkpoint(), &bytes)?;
    crate::files::write_atomic(&paths.model(), model_file)
}

/// The family of the run a checkpoint holds (its run config's `model.family`; absent:
/// diffusion).
pub fn family(path: &Path) -> Result<crate::model::Family> {
    let what = path.display().to_string();
    let (_, meta) = weights::read_safetensors(path)?;
    let run = meta
        .get(RUN_KEY)
        .ok_or_else(|| anyhow!("{what} is not a diffuse checkpoint (no '{RUN_KEY}' metadata)"))?;
    run_family(run, &what)
}

fn run_family(run_json: &str, what: &str) -> Result<crate::model::Family> {
    let v: serde_json::Value =
        serde_json::from_str(run_json).with_context(|| format!("{what}: invalid run config"))?;
    let model = v.get("model").map(|m| m.to_string()).unwrap_or_default();
    if model.is_empty() {
        bail!("{what}: invalid run config (no model)");
    }
    crate::model::family_of(&model, what)
}

/// Reads a diffusion run's checkpoint ([`load_run`]).
pub fn load(path: &Path) -> Result<Checkpoint> {
    load_run(path)
}

/// Reads a checkpoint of a run of `R`'s family, naming the file in every error.
pub fn load_run<R: RunSpec>(path: &Path) -> Result<Checkpoint<R>> {
    let what = path.display().to_string();
    let (tensors, meta) = weights::read_safetensors(path)?;
    let get = |k: &str| {
        meta.get(k)
            .ok_or_else(|| anyhow!("{what} is not a diffuse checkpoint (no '{k}' metadata)"))
    };
    let run_json = get(RUN_KEY)?;
    let family = run_family(run_json, &what)?;
    if family != R::FAMILY {
        bail!(
            "{what} is a checkpoint of {} run, not of {}",
            family.article_name(),
            R::FAMILY.article_name()
        );
    }
    let run: R =
        serde_json::from_str(run_json).with_context(|| format!("{what}: invalid run config"))?;
    let step = get(STEP_KEY)?
        .parse()
        .with_context(|| format!("{what}: invalid step"))?;
    let adam_t: u64 = get(ADAM_T_KEY)?
        .parse()
        .with_context(|| format!("{what}: invalid optimizer step"))?;
    // Every step updates the optimizer once, and a checkpoint is written at a step of its
    // run: a step beyond the run's target, or out of step with the optimizer, is damage.
    let steps = run.train().steps;
    if step == 0 || step > steps || adam_t != step as u64 {
        bail!(
            "{what} is corrupt: it claims step {step} (optimizer step {adam_t}) of a run of {steps} steps"
        );
    }
    weights::note_if_unverified(&meta, &what, "its next checkpoint is written with one");
    Ok(Checkpoint {
        run,
        step,
        adam_t,
        tensors,
    })
}
