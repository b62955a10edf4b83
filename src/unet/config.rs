//! Hyperparameters of the denoising U-Net.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// Shape of the U-Net. Saved with every model; the one source of its hyperparameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Image side length in pixels (square images).
    pub image_size: usize,
    /// Channels of the input image (1 grey, 3 RGB).
    pub in_channels: usize,
    /// Channels of the output (same as input for noise/velocity/x0 prediction).
    pub out_channels: usize,
    /// Channels of the first level; level `i` has `base_channels * channel_mult[i]`.
    pub base_channels: usize,
    /// Channel multiplier per resolution level; one downsampling between consecutive levels.
    pub channel_mult: Vec<usize>,
    /// Residual blocks per level on the way down (the way up has one more per level).
    pub num_res_blocks: usize,
    /// Feature-map side lengths at which self-attention follows each residual block.
    pub attention_resolutions: Vec<usize>,
    /// Dropout probability inside residual blocks.
    pub dropout: f64,
    /// GroupNorm groups (must divide every channel count).
    pub norm_groups: usize,
    /// Number of classes for class conditioning; `None` for an unconditioned model. A
    /// conditioned model has one extra learned "null" class for classifier-free guidance.
    pub num_classes: Option<usize>,
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self {
            image_size: 32,
            in_channels: 3,
            out_channels: 3,
            base_channels: 64,
            channel_mult: vec![1, 2, 2],
            num_res_blocks: 2,
            attention_resolutions: vec![8],
            dropout: 0.1,
            norm_groups: 32,
            num_classes: None,
        }
    }
}

impl UNetConfig {
    /// Feature-map side length at each level, following stride-2 convolutions with padding 1:
    /// `s_{i+1} = ceil(s_i / 2)`.
    pub fn level_sizes(&self) -> Vec<usize> {
        let mut s = self.image_size;
        let mut out = Vec::new();
        for _ in &self.channel_mult {
            out.push(s);
            s = s.div_ceil(2);
        }
        out
    }

    /// Width of the timestep embedding (4x the base channels, as in DDPM).
    pub fn time_embed_dim(&self) -> usize {
        self.base_channels * 4
    }

    /// Checks that the configuration describes a buildable network.
    pub fn validate(&self) -> Result<()> {
        if !(1..=1024).contains(&self.image_size) {
            bail!(
                "image size must be between 1 and 1024 (got {})",
                self.image_size
            );
        }
        if !(self.in_channels == 1 || self.in_channels == 3)
            || self.out_channels != self.in_channels
        {
            bail!(
                "channels must be 1 or 3, the same in and out (got in {} out {})",
                self.in_channels,
                self.out_channels
            );
        }
        if !(1..=1024).contains(&self.base_channels) {
            bail!(
                "base channels must be between 1 and 1024 (got {})",
                self.base_channels
            );
        }
        if self.channel_mult.is_empty() || self.channel_mult.len() > 8 {
            bail!(
                "give between 1 and 8 channel multipliers (got {})",
                self.channel_mult.len()
            );
        }
        if let Some(m) = self.channel_mult.iter().find(|&&m| !(1..=16).contains(&m)) {
            bail!("channel multipliers must be between 1 and 16 (got {m})");
        }
        if !(1..=16).contains(&self.num_res_blocks) {
            bail!(
                "residual blocks per level must be between 1 and 16 (got {})",
                self.num_res_blocks
            );
        }
        if self.norm_groups == 0 {
            bail!("norm groups must be positive");
        }
        let counts = std::iter::once(self.base_channels)
            .chain(self.channel_mult.iter().map(|m| m * self.base_channels));
        for c in counts {
            if c % self.norm_groups != 0 {
                bail!(
                    "norm groups ({}) must divide every channel count (one layer has {c} channels)",
                    self.norm_groups
                );
            }
        }
        let sizes = self.level_sizes();
        if let Some(a) = self
            .attention_resolutions
            .iter()
            .find(|a| !sizes.contains(a))
        {
            bail!(
                "attention resolution {a} matches no level of the U-Net (its levels are {sizes:?} pixels)"
            );
        }
        if let Some(a) = self.attention_resolutions.iter().find(|&&a| a > 64) {
            bail!("attention at {a}x{a} pixels would need too much memory (64 at most)");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("dropout must be in [0, 1) (got {})", self.dropout);
        }
        match self.num_classes {
            Some(0) => bail!("a class-conditioned model needs at least one class"),
            Some(k) if k > 100_000 => bail!("at most 100000 classes (got {k})"),
            _ => {}
        }
        Ok(())
    }
}
