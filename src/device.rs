//! Which compute device the library runs on: burn's Flex CPU backend by default, CUDA with the
//! `cuda` cargo feature, the first Vulkan GPU with the `vulkan` feature (burn's wgpu backend
//! compiling to SPIR-V; needs only the system's Vulkan loader and driver at run time), and the
//! first CUDA GPU through libtorch with the `libtorch` feature (burn's LibTorch backend; the
//! CPU through libtorch where no GPU is found).

use burn::tensor::Device;

/// The device for inference (no autodiff).
pub fn inference_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        Device::cuda(0)
    }
    #[cfg(all(feature = "wgpu-vulkan", not(feature = "cuda")))]
    {
        Device::vulkan(burn::tensor::DeviceKind::DefaultDevice)
    }
    // burn 0.22 marks burn-tch deprecated (to be removed for its CubeCL backends); it is kept
    // as the one CUDA route that builds from the registries here (README, GPU).
    #[cfg(all(
        feature = "libtorch",
        not(any(feature = "cuda", feature = "wgpu-vulkan"))
    ))]
    #[allow(deprecated)]
    {
        if libtorch_gpus() > 0 {
            Device::libtorch_cuda(0)
        } else {
            Device::libtorch()
        }
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu-vulkan", feature = "libtorch")))]
    {
        Device::flex()
    }
}

/// The CUDA GPUs libtorch finds (counted once).
#[cfg(feature = "libtorch")]
fn libtorch_gpus() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| Device::enumerate(burn::tensor::DeviceType::LibTorch).len())
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
    if cfg!(feature = "wgpu-vulkan")
        && !cfg!(feature = "cuda")
        && std::env::var("DIFFUSE_VULKAN_TRAIN").as_deref() != Ok("1")
    {
        anyhow::bail!(
            "training on the Vulkan backend gave wrong losses with burn 0.22.1 (see README, GPU; \
             the build without fusion is not yet checked on a GPU): train with the default CPU \
             build or --features libtorch, or set DIFFUSE_VULKAN_TRAIN=1 to run it anyway"
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
    } else if cfg!(feature = "wgpu-vulkan") {
        "vulkan-unfused"
    } else if cfg!(feature = "libtorch") {
        "libtorch"
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
/// thing, the Python package when it is imported; a program using the library may call it too.
/// Does nothing outside glibc, or when `DIFFUSE_KEEP_FREED=0` (how the benchmark measures its
/// effect).
pub fn keep_freed_memory() {
    if std::env::var("DIFFUSE_KEEP_FREED").is_ok_and(|v| v == "0") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning parameters, under the allocator's own lock
    // (so other threads, such as an interpreter's, may be running).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// The devices of a data-parallel training run (`diffuse train --devices`), one replica of the
/// model on each.
///
/// `spec` is a count `N` (N replicas on this build's device: the CPU, or the first N GPUs of
/// the `cuda` or `vulkan` build), or a comma list of `KIND:I` and `KIND:A..B` (the indices A
/// to B, both included) of one kind: `cpu`, `vulkan` or `cuda`. The CPU is one device to burn
/// (Flex), so `cpu:0,cpu:1` are two replicas sharing its cores (they run one after the other,
/// each on its share of the batch: the update of the whole batch, at a smaller peak memory); a
/// GPU index must name a GPU that exists. Every device is returned with autodiff, beside its
/// name (`cpu:1`).
pub fn parse_devices(spec: &str) -> anyhow::Result<Vec<(String, Device)>> {
    use anyhow::bail;
    let spec = spec.trim();
    let what = |s: &str| format!("--devices '{s}'");
    if let Ok(n) = spec.parse::<usize>() {
        if n == 0 {
            bail!("{}: the count of devices must be at least 1", what(spec));
        }
        let kind = match backend_name() {
            "cuda" => "cuda",
            b if b.starts_with("vulkan") => "vulkan",
            #[cfg(feature = "libtorch")]
            "libtorch" if libtorch_gpus() > 0 => "cuda",
            _ => "cpu",
        };
        return parse_devices(&format!("{kind}:0..{}", n - 1));
    }
    let mut kind_seen: Option<&str> = None;
    let mut indices: Vec<usize> = Vec::new();
    for item in spec.split(',').map(str::trim) {
        let Some((kind, range)) = item.split_once(':') else {
            bail!(
                "{}: '{item}' is not KIND:INDEX (kinds cpu, vulkan, cuda) nor a count",
                what(spec)
            );
        };
        let kind = match kind {
            "cpu" => "cpu",
            "vulkan" => "vulkan",
            "cuda" => "cuda",
            other => bail!(
                "{}: unknown device kind '{other}' (expected cpu, vulkan or cuda)",
                what(spec)
            ),
        };
        if let Some(k) = kind_seen
            && k != kind
        {
            bail!(
                "{}: every device of a run must be of one kind ({k} and {kind} given)",
                what(spec)
            );
        }
        kind_seen = Some(kind);
        let index = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| anyhow::anyhow!("{}: '{s}' in '{item}' is not an index", what(spec)))
        };
        let (a, b) = match range.split_once("..") {
            Some((a, b)) => (index(a)?, index(b)?),
            None => (index(range)?, index(range)?),
        };
        if b < a {
            bail!("{}: the range '{item}' is reversed", what(spec));
        }
        for i in a..=b {
            if indices.contains(&i) {
                bail!("{}: {kind}:{i} is listed twice", what(spec));
            }
            indices.push(i);
        }
    }
    let kind = kind_seen.expect("a non-empty list");
    let compiled = match (kind, backend_name()) {
        ("cpu", b) => b == "flex-cpu" || b == "libtorch",
        ("cuda", b) => b == "cuda" || b == "libtorch",
        (_, b) => b.starts_with("vulkan"),
    };
    if !compiled {
        bail!(
            "{}: this build trains on {}, not {kind} (build with --features {} for it)",
            what(spec),
            match backend_name() {
                "flex-cpu" => "the CPU",
                b => b,
            },
            match kind {
                "cpu" => "none (the default build)",
                "cuda" => "libtorch (or cuda)",
                k => k,
            }
        );
    }
    indices
        .into_iter()
        .map(|i| gpu_or_cpu(kind, i).map(|d| (format!("{kind}:{i}"), d.autodiff())))
        .collect::<anyhow::Result<Vec<_>>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", what(spec)))
}

/// The (inference) device `kind:i` of this build, checked to exist for a GPU.
fn gpu_or_cpu(kind: &str, i: usize) -> anyhow::Result<Device> {
    #[cfg(all(
        feature = "libtorch",
        not(any(feature = "cuda", feature = "wgpu-vulkan"))
    ))]
    #[allow(deprecated)]
    {
        if kind == "cpu" {
            return Ok(Device::libtorch());
        }
        let n = libtorch_gpus();
        if i >= n {
            anyhow::bail!("{kind}:{i} does not exist: libtorch finds {n} CUDA device(s)");
        }
        return Ok(Device::libtorch_cuda(i));
    }
    #[cfg(any(feature = "cuda", feature = "wgpu-vulkan"))]
    {
        #[cfg(feature = "cuda")]
        let found = Device::enumerate(burn::tensor::DeviceType::Cuda);
        #[cfg(all(feature = "wgpu-vulkan", not(feature = "cuda")))]
        let found = Device::enumerate(burn::tensor::DeviceType::Vulkan);
        let found: Vec<Device> = found.into_iter().collect();
        return found.get(i).cloned().ok_or_else(|| {
            anyhow::anyhow!(
                "{kind}:{i} does not exist: this machine has {} {kind} device(s)",
                found.len()
            )
        });
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu-vulkan", feature = "libtorch")))]
    {
        let _ = (kind, i);
        Ok(Device::flex())
    }
}
