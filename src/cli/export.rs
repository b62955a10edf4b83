//! `diffuse export`: a model as a diffusers pipeline folder (DDPMPipeline with a UNet2DModel).

use crate::device::inference_device;
use crate::pipeline::load_generator;
use anyhow::Result;
use std::path::Path;

pub fn run(spec: Option<&str>, out: &Path) -> Result<()> {
    let dev = inference_device();
    let m = load_generator(spec, &dev)?.into_diffusion("diffuse export")?;
    crate::interop::diffusers::export_pipeline(&m, out)?;
    println!(
        "wrote diffusers pipeline {} (from {})",
        out.display(),
        m.source
    );
    Ok(())
}
