//! Which compute device the library runs on: burn's Flex CPU backend by default, CUDA with the
//! `cuda` cargo feature, the first Vulkan GPU with the `vulkan` feature (burn's wgpu backend
//! compiling to SPIR-V; needs only the system's Vulkan loader and driver at run time).

use burn::tensor::Device;

/// The device for inference (no autodiff).
pub fn inference_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        Device::cuda(0)
    }
    #[cfg(all(feature = "vulkan", not(feature = "cuda")))]
    {
        Device::vulkan(burn::tensor::DeviceKind::DefaultDevice)
    }
    #[cfg(not(any(feature = "cuda", feature = "vulkan")))]
    {
        Device::flex()
    }
}

/// The device for training: the inference device with automatic differentiation.
pub fn training_device() -> Device {
    inference_device().autodiff()
}

/// Refuses training where the backend is known to train wrongly: on burn 0.22.1's Vulkan
/// backend the first loss of a fresh model came out 0.300 where Flex gives 1.054 from the same
/// data and noise (H100, 2026-11-26; README, GPU), so a run would silently learn the wrong
/// thing. `DIFFUSE_VULKAN_TRAIN=1` runs it anyway, to investigate.
pub fn check_training_backend() -> anyhow::Result<()> {
    if cfg!(feature = "vulkan")
        && !cfg!(feature = "cuda")
        && std::env::var("DIFFUSE_VULKAN_TRAIN").as_deref() != Ok("1")
    {
        anyhow::bail!(
            "training on the Vulkan backend gives wrong losses with burn 0.22.1 (see README, GPU): \
             train with the default CPU build, or set DIFFUSE_VULKAN_TRAIN=1 to run it anyway"
        );
    }
    Ok(())
}

/// A short name of the active backend, for logs and benchmark reports.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "vulkan") {
        "vulkan"
    } else {
        "flex-cpu"
    }
}

/// Keeps freed tensor memory in the process for reuse.
///
/// A training step allocates and frees the same large buffers every step. glibc's malloc hands
/// blocks above its mmap threshold (adaptive, at most 32 MiB) straight back to the kernel, which
/// must then zero fresh pages on the next step: on the benchmark U-Net that was about 15% of a
/// training step, mostly in the kernel. This raises the mmap threshold and the trim threshold
/// so that those blocks stay in the heap. Peak memory is unchanged (the same buffers are live at
/// the peak); memory is simply not returned between steps. The `diffuse` binary calls it first
/// thing; a program using the library may call it too. Does nothing outside glibc, or when
/// `DIFFUSE_KEEP_FREED=0` (how the benchmark measures its effect).
pub fn keep_freed_memory() {
    if std::env::var("DIFFUSE_KEEP_FREED").is_ok_and(|v| v == "0") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning parameters; it is called before the program
    // has started any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
