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
    /// GroupNorm epsilon.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Channels per attention head; `None`: one head over all channels.
    #[serde(default)]
    pub attention_head_dim: Option<usize>,
    /// Timestep sinusoids with the cosines first (diffusers' `flip_sin_to_cos`).
    #[serde(default)]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep sinusoids (diffusers' `freq_shift`).
    #[serde(default)]
    pub freq_shift: f64,
    /// Downsampling padding: 1 on every side, or 0 for bottom/right only (diffusers'
    /// `downsample_padding`).
    #[serde(default = "default_downsample_padding")]
    pub downsample_padding: usize,
    /// Self-attention between the two middle residual blocks.
    #[serde(default = "default_mid_attention")]
    pub mid_attention: bool,
    /// Width of the text encoder's token states for a text-conditioned model (384 for
    /// all-MiniLM-L6-v2); `None`: no text conditioning.
    #[serde(default)]
    pub text_dim: Option<usize>,
    /// Feature-map side lengths at which cross-attention to the text tokens follows each
    /// residual block (and between the middle blocks when `mid_attention`); text models only.
    #[serde(default)]
    pub cross_attention_resolutions: Vec<usize>,
    /// Extra input channels concatenated to the noisy image (SR3's upsampled low-resolution
    /// image, Saharia et al. 2021, section 2); 0: none.
    #[serde(default)]
    pub cond_channels: usize,
}

fn default_norm_eps() -> f64 {
    1e-5
}

fn default_downsample_padding() -> usize {
    1
}

fn default_mid_attention() -> bool {
    true
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
            norm_eps: default_norm_eps(),
            attention_head_dim: None,
            flip_sin_to_cos: false,
            freq_shift: 0.0,
            downsample_padding: default_downsample_padding(),
            mid_attention: true,
            text_dim: None,
            cross_attention_resolutions: Vec::new(),
            cond_channels: 0,
        }
    }
}

impl UNetConfig {
    /// The small-model recipe `diffuse train` starts from: 24 base channels, one residual block
    /// per level, no dropout, 8 normalisation groups, channel multipliers by image size
    /// ([`Self::default_channel_mult`]), self-attention at the lowest resolution.
    ///
    /// Chosen by the equal-compute study of docs/fast-generation.md (class-conditioned
    /// Fashion-MNIST, 20 minutes of a 2-core CPU): this network costs half as much a step as
    /// the embedded model's (32 channels, two blocks a level), takes twice the steps in the
    /// same time, and samples with a third lower FID at 20 minutes. It levels off sooner: at 60
    /// minutes the larger network is ahead (FID 0.46 against 0.53), so long runs want
    /// `--base-channels 32 --res-blocks 2` or wider, as the embedded model and the documented
    /// runs before 2026-12-07 used.
    pub fn recipe(image_size: usize) -> Self {
        let channel_mult = Self::default_channel_mult(image_size);
        let mut c = Self {
            image_size,
            base_channels: 24,
            channel_mult,
            num_res_blocks: 1,
            dropout: 0.0,
            norm_groups: 8,
            ..Self::default()
        };
        c.attention_resolutions = c.level_sizes().last().copied().into_iter().collect();
        c
    }

    /// Channel multipliers per level for an image side: two levels up to 16, three up to 32,
    /// four up to 64, five above.
    pub fn default_channel_mult(size: usize) -> Vec<usize> {
        match size {
            0..=16 => vec![1, 2],
            17..=32 => vec![1, 2, 2],
            33..=64 => vec![1, 2, 2, 2],
            _ => vec![1, 1, 2, 2, 4],
        }
    }

    /// Feature-map side length at each level, following stride-2 convolutions: with padding
    /// 1, `s_{i+1} = ceil(s_i / 2)`; with bottom/right padding only, `floor(s_i / 2)`.
    pub fn level_sizes(&self) -> Vec<usize> {
        let mut s = self.image_size;
        let mut out = Vec::new();
        for _ in &self.channel_mult {
            out.push(s);
            s = if self.downsample_padding == 0 {
                s / 2
            } else {
                s.div_ceil(2)
            };
        }
        out
    }

    /// Channel count of each level.
    pub fn level_channels(&self) -> Vec<usize> {
        self.channel_mult
            .iter()
            .map(|m| m * self.base_channels)
            .collect()
    }

    /// A lower bound of the network's weight count: the second 3x3 convolution of every
    /// residual block on the way down (`num_res_blocks * 9 * c^2` per level of `c` channels),
    /// to check a config against the weights a file holds before allocating it.
    pub fn min_parameters(&self) -> usize {
        self.level_channels()
            .iter()
            .map(|c| {
                self.num_res_blocks
                    .saturating_mul(9)
                    .saturating_mul(c.saturating_mul(*c))
            })
            .fold(0, usize::saturating_add)
    }

    /// Attention heads for a layer of `channels` channels.
    pub fn heads(&self, channels: usize) -> usize {
        self.attention_head_dim.map_or(1, |d| channels / d)
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
        if !(1..=16).contains(&self.in_channels) || self.out_channels != self.in_channels {
            bail!(
                "channels must be between 1 and 16, the same in and out (got in {} out {})",
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
        if self.cond_channels > 16 {
            bail!(
                "cond channels must be at most 16 (got {})",
                self.cond_channels
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
        if !(self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            bail!("norm eps must be in (0, 1) (got {})", self.norm_eps);
        }
        if self.downsample_padding > 1 {
            bail!(
                "downsample padding must be 0 or 1 (got {})",
                self.downsample_padding
            );
        }
        if sizes.contains(&0) {
            bail!(
                "{} levels of downsampling leave no pixels of a {}-pixel image",
                self.channel_mult.len() - 1,
                self.image_size
            );
        }
        if !(self.freq_shift.is_finite() && self.freq_shift < (self.base_channels / 2) as f64) {
            bail!(
                "freq shift must be below half the base channels (got {})",
                self.freq_shift
            );
        }
        if let Some(d) = self.attention_head_dim {
            let chans = self.level_channels();
            let attn_chans = sizes
                .iter()
                .zip(&chans)
                .filter(|(s, _)| self.attention_resolutions.contains(s))
                .map(|(_, c)| *c)
                .chain(self.mid_attention.then(|| chans[chans.len() - 1]));
            for c in attn_chans {
                if d == 0 || c % d != 0 {
                    bail!("attention head dim {d} must divide the attention layers' {c} channels");
                }
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("dropout must be in [0, 1) (got {})", self.dropout);
        }
        match self.text_dim {
            Some(d) if !(1..=4096).contains(&d) => {
                bail!("text width must be between 1 and 4096 (got {d})")
            }
            Some(_) if self.num_classes.is_some() => {
                bail!("a model is conditioned on classes or on text, not both")
            }
            None if !self.cross_attention_resolutions.is_empty() => {
                bail!("cross-attention needs a text-conditioned model (text width)")
            }
            _ => {}
        }
        if let Some(a) = self
            .cross_attention_resolutions
            .iter()
            .find(|a| !sizes.contains(a))
        {
            bail!(
                "cross-attention resolution {a} matches no level of the U-Net (its levels are {sizes:?} pixels)"
            );
        }
        if let Some(d) = self.attention_head_dim {
            let chans = self.level_channels();
            for (s, c) in sizes.iter().zip(&chans) {
                if self.cross_attention_resolutions.contains(s) && c % d != 0 {
                    bail!(
                        "attention head dim {d} must divide the cross-attention layers' {c} channels"
                    );
                }
            }
        }
        match self.num_classes {
            Some(0) => bail!("a class-conditioned model needs at least one class"),
            Some(k) if k > 100_000 => bail!("at most 100000 classes (got {k})"),
            _ => {}
        }
        Ok(())
    }
}
