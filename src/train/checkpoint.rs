//! Checkpoints: the whole training state in one safetensors file, written atomically.
//! Tensors: `model.*` (weights), `ema.*` (EMA weights), `opt.m.*` / `opt.v.*` (AdamW
//! moments). Metadata: the run config, the step and the optimizer's update count. The random
//! state needs no saving: every draw of step `s` derives from `(seed, s)`. Each checkpoint
//! also refreshes `model.safetensors`, the EMA weights ready for `diffuse sample`.

use super::adamw::AdamW;
use super::{RunConfig, RunPaths};
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

/// A loaded checkpoint.
pub struct Checkpoint {
    pub run: RunConfig,
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
    let mut meta = HashMap::new();
    meta.insert(RUN_KEY.to_string(), serde_json::to_string(cfg)?);
    meta.insert(CONFIG_KEY.to_string(), serde_json::to_string(&cfg.model)?);
    meta.insert(STEP_KEY.to_string(), step.to_string());
    meta.insert(ADAM_T_KEY.to_string(), opt.t.to_string());
    let bytes = weights::to_safetensors(&t, &meta, StoreDtype::F32)?;
    crate::files::write_atomic(&paths.checkpoint(), &bytes)?;

    let mut e = NamedTensors::new();
    weights::collect(ema, "", &mut e);
    e.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    let bytes = model::model_bytes(&cfg.model, &e, StoreDtype::F32)?;
    crate::files::write_atomic(&paths.model(), &bytes)
}

/// Reads a checkpoint, naming the file in every error.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let what = path.display().to_string();
    let (tensors, meta) = weights::read_safetensors(path)?;
    let get = |k: &str| {
        meta.get(k)
            .ok_or_else(|| anyhow!("{what} is not a diffuse checkpoint (no '{k}' metadata)"))
    };
    let run: RunConfig = serde_json::from_str(get(RUN_KEY)?)
        .with_context(|| format!("{what}: invalid run config"))?;
    let step = get(STEP_KEY)?
        .parse()
        .with_context(|| format!("{what}: invalid step"))?;
    let adam_t: u64 = get(ADAM_T_KEY)?
        .parse()
        .with_context(|| format!("{what}: invalid optimizer step"))?;
    // Every step updates the optimizer once, and a checkpoint is written at a step of its
    // run: a step beyond the run's target, or out of step with the optimizer, is damage.
    if step == 0 || step > run.train.steps || adam_t != step as u64 {
        bail!(
            "{what} is corrupt: it claims step {step} (optimizer step {adam_t}) of a run of {} steps",
            run.train.steps
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
