//! Which inference timesteps a sampler visits among the `T` training steps: the one home of
//! timestep spacing, used by every sampler.

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// How `K` inference timesteps are chosen among `T` (Lin et al. 2024, "Common Diffusion Noise
/// Schedules and Sample Steps are Flawed", table 2; names as in diffusers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TimestepSpacing {
    /// `t_i = i * floor(T/K) + steps_offset`, descending (DDIM's original choice).
    Leading,
    /// `t_i = round(T - i * T/K) - 1`: always starts at `T - 1`.
    Trailing,
    /// `round(linspace(0, T-1, K))`, descending.
    Linspace,
}

impl std::str::FromStr for TimestepSpacing {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        super::parse_named(s, "timestep spacing")
    }
}

/// `K` timesteps out of `T`, descending, as diffusers' `set_timesteps` computes them (numpy's
/// rounding: halves to even).
pub fn spaced_timesteps(t: usize, k: usize, spacing: TimestepSpacing, offset: usize) -> Vec<usize> {
    match spacing {
        TimestepSpacing::Leading => {
            let ratio = t / k;
            (0..k).rev().map(|i| i * ratio + offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = t as f64 / k as f64;
            (0..k)
                .map(|i| {
                    ((t as f64 - i as f64 * ratio).round_ties_even() as usize).saturating_sub(1)
                })
                .collect()
        }
        TimestepSpacing::Linspace => (0..k)
            .rev()
            .map(|i| {
                if k == 1 {
                    0
                } else {
                    (i as f64 * ((t - 1) as f64 / (k - 1) as f64)).round_ties_even() as usize
                }
            })
            .collect(),
    }
}
