//! `diffuse export`: a model as a diffusers pipeline folder (DDPMPipeline with a UNet2DModel).

use anyhow::Result;
use diffuse::device::inference_device;
use diffuse::pipeline::load_generator;
use std::path::Path;

pub fn run(spec: Option<&str>, out: &Path) -> Result<()> {
    let dev = inference_device();
    let m = load_generator(spec, &dev)?.into_diffusion("diffuse export")?;
    diffuse::interop::diffusers::export_pipeline(&m, out)?;
    println!(
        "wrote diffusers pipeline {} (from {})",
        out.display(),
        m.source
    );
    Ok(())
}
