//! `diffuse fetch NAME`: a dataset, the Inception weights or the text encoder into the cache.

use anyhow::{Result, bail};
use diffuse::assets::{self, Named};

pub fn run(name: &str) -> Result<()> {
    let Some(what) = Named::from_name(name) else {
        let known: Vec<&str> = Named::all().into_iter().map(Named::name).collect();
        bail!("unknown dataset '{name}' (known: {})", known.join(", "));
    };
    let dir = assets::fetch(what)?;
    println!("{} is in {}", what.name(), dir.display());
    Ok(())
}
