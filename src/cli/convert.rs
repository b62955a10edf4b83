//! `diffuse convert`: a model file rewritten, e.g. in half precision for shipping.

use anyhow::Result;
use diffuse::device::inference_device;
use diffuse::model;
use diffuse::pipeline::load_model;
use diffuse::weights::{self, NamedTensors, StoreDtype};
use std::path::Path;

pub fn run(spec: &str, out: &Path, dtype: StoreDtype) -> Result<()> {
    let dev = inference_device();
    let m = load_model(Some(spec), &dev)?;
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
    let bytes = model::model_bytes(&m.config, &t, dtype)?;
    diffuse::files::write_atomic(out, &bytes)?;
    println!("wrote {} ({} bytes)", out.display(), bytes.len());
    Ok(())
}
