//! `diffuse convert`: a model file (of any family) rewritten, e.g. in half precision for
//! shipping.

use crate::device::inference_device;
use crate::model;
use crate::pipeline::load_generator;
use crate::weights::{self, NamedTensors, StoreDtype};
use anyhow::{Result, bail};
use std::path::Path;

/// Rewrites `spec` to `out` in `dtype`; `default_steps` changes a distilled student's default
/// sampling steps (at most the grid it was distilled on).
pub fn run(spec: &str, out: &Path, dtype: StoreDtype, default_steps: Option<usize>) -> Result<()> {
    let given = Path::new(spec);
    let input = if given.is_dir() {
        given.join("model.safetensors")
    } else {
        given.to_path_buf()
    };
    super::check_output("--out", out, "safetensors", &[&input])?;
    let dev = inference_device();
    let mut m = match load_generator(Some(spec), &dev)? {
        model::Loaded::Diffusion(m) => m,
        other => {
            if default_steps.is_some() {
                bail!(
                    "--default-steps is for distilled students (diffuse distill); {spec} is {}",
                    other.family().article_name()
                );
            }
            let mut t = NamedTensors::new();
            let config = match other {
                model::Loaded::Gan(g) => {
                    weights::collect(&g.generator, "", &mut t);
                    model::FamilyConfig::Gan(g.config)
                }
                model::Loaded::Autoregressive(m) => {
                    weights::collect(&m.net, "", &mut t);
                    model::FamilyConfig::Autoregressive(m.config)
                }
                model::Loaded::Vae(m) => {
                    weights::collect(&m.net, "", &mut t);
                    model::FamilyConfig::Vae(m.config)
                }
                model::Loaded::Diffusion(_) => unreachable!("matched above"),
            };
            return write(out, &model::family_model_bytes(&config, &t, dtype)?);
        }
    };
    if let Some(k) = default_steps {
        let Some(s) = m.config.sampling.as_mut() else {
            bail!("--default-steps is for distilled students (diffuse distill); {spec} is not one");
        };
        if !(1..=s.max_steps).contains(&k) {
            bail!(
                "--default-steps must be between 1 and {}, the steps {spec} was distilled for (got {k})",
                s.max_steps
            );
        }
        if !s.max_steps.is_multiple_of(k) {
            bail!(
                "--default-steps {k} must divide {}, the grid {spec} was distilled on, so that its sampling times are on it",
                s.max_steps
            );
        }
        s.steps = k;
    }
    let mut t = NamedTensors::new();
    weights::collect(&m.unet, "", &mut t);
    // A latent model's VAE travels in the same file.
    if let Some(v) = &m.vae {
        t.extend(
            v.tensors()
                .into_iter()
                .map(|(k, x)| (format!("{}{k}", model::VAE_PREFIX), x)),
        );
    }
    write(out, &model::model_bytes(&m.config, &t, dtype)?)
}

fn write(out: &Path, bytes: &[u8]) -> Result<()> {
    crate::files::write_atomic(out, bytes)?;
    println!("wrote {} ({} bytes)", out.display(), bytes.len());
    Ok(())
}
