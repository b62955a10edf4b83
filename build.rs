//! Test configuration from the machine that builds (CI builds and tests on one machine):
//! `has_bf16` where the processor lists AVX-512 BF16 or AMX-BF16 (the bf16 products' engines),
//! `golden_pinned` where
//! `tests/fixtures/golden/hashes.json` holds output hashes for this kind of machine,
//! `builds_as_root` where the build runs as root (file permissions do not bind it). Tests that
//! cannot run here are marked ignored with the reason, so `cargo test` prints them as skipped.
//! DIFFUSE_MACHINE_KEY is the key the golden test checks against the one it computes at run time.

use std::path::Path;

/// `model name` from /proc/cpuinfo, with the vector width the kernels take (wide = AVX-512).
fn machine_key() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into());
    let flags: Vec<&str> = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    let has = |f: &str| flags.contains(&f);
    let wide = ["avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"]
        .iter()
        .all(|f| has(f));
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    format!("{arch} {model} {}", if wide { "avx512" } else { "avx2" })
}

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=tests/fixtures/golden/hashes.json");
    println!("cargo::rustc-check-cfg=cfg(has_bf16)");
    println!("cargo::rustc-check-cfg=cfg(golden_pinned)");
    println!("cargo::rustc-check-cfg=cfg(builds_as_root)");
    // Root reads every file whatever its permissions: permission tests are skipped there.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    if uid == Some("0") {
        println!("cargo::rustc-cfg=builds_as_root");
    }
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if info.lines().any(|l| {
        l.starts_with("flags")
            && l.split_whitespace()
                .any(|f| f == "amx_bf16" || f == "avx512_bf16")
    }) {
        println!("cargo::rustc-cfg=has_bf16");
    }
    let key = machine_key();
    println!("cargo::rustc-env=DIFFUSE_MACHINE_KEY={key}");
    let golden = Path::new("tests/fixtures/golden/hashes.json");
    let pinned = std::fs::read_to_string(golden)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .is_some_and(|v| v.get(&key).is_some());
    if pinned {
        println!("cargo::rustc-cfg=golden_pinned");
    }
}
