//! `diffuse fetch NAME`: a dataset, the Inception weights or the text encoder into the cache.

use crate::assets::{self, Named};
use anyhow::Result;

/// `NAME`, one of [`Named::all`]; an unknown name's error lists the known ones.
pub fn parse_name(name: &str) -> Result<Named, String> {
    Named::from_name(name).ok_or_else(|| {
        let known: Vec<&str> = Named::all().into_iter().map(Named::name).collect();
        format!("unknown dataset '{name}' (known: {})", known.join(", "))
    })
}

pub fn run(what: Named) -> Result<()> {
    let dir = assets::fetch(what)?;
    println!("{} is in {}", what.name(), dir.display());
    Ok(())
}
