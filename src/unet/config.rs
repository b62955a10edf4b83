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
        if self.image_size == 0 {
            bail!("image size must be positive");
        }
        if !(1..=4).contains(&self.in_channels) || self.out_channels == 0 {
            bail!(
                "channels must be between 1 and 4 (got in {} out {})",
                self.in_channels,
                self.out_channels
            );
        }
        if self.base_channels == 0 || self.channel_mult.is_empty() {
            bail!("base channels and channel multipliers must be non-empty and positive");
        }
        if self.channel_mult.contains(&0) {
            bail!("channel multipliers must be positive");
        }
        if self.norm_groups == 0 {
            bail!("norm groups must be positive");
        }
        for m in &self.channel_mult {
            let c = self.base_channels * m;
            if c % self.norm_groups != 0 {
                bail!(
                    "norm groups ({}) must divide every channel count (level with {c} channels)",
                    self.norm_groups
                );
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("dropout must be in [0, 1) (got {})", self.dropout);
        }
        if self.num_classes == Some(0) {
            bail!("a class-conditioned model needs at least one class");
        }
        Ok(())
    }
}
