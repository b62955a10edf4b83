//! Which compute device the library runs on: burn's Flex CPU backend by default, CUDA with the
//! `cuda` cargo feature.

use burn::tensor::Device;

/// The device for inference (no autodiff).
pub fn inference_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        Device::cuda(0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Device::flex()
    }
}

/// The device for training: the inference device with automatic differentiation.
pub fn training_device() -> Device {
    inference_device().autodiff()
}

/// A short name of the active backend, for logs and benchmark reports.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else {
        "flex-cpu"
    }
}
