//! The test suite, as one binary: `cargo test --release`.

mod autoregressive;
mod browser;
mod cli;
mod data;
mod distill;
mod eval;
mod families;
mod flow;
mod fuzz;
mod gan;
mod golden;
mod hardening;
mod interop;
mod kernels;
mod objective;
mod parity;
mod replicas;
mod sampler;
mod schedule;
mod serve;
mod superres;
mod text;
mod unet;
mod vae;
mod vae_generator;
