//! Conditioning: what steers the denoiser besides the noisy image and the timestep. Class
//! labels are embedded inside the U-Net (`unet`); prompts go through the frozen text encoder
//! here; a low-resolution image (super-resolution) is resized here.

pub mod lowres;
pub mod text;
