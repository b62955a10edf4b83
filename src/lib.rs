//! diffuse: denoising diffusion models (DDPM) in Rust.
//!
//! Data flows one way: [`data`] -> [`train`] -> checkpoint ([`model`]) -> [`pipeline`] (which
//! runs a [`sampler`]) -> image ([`imageio`]). The forward process lives in [`schedule`], the
//! denoiser in [`unet`]; diffusers pipeline folders are read and written by [`interop`].
//! docs/ARCHITECTURE.md lays the modules out as layers. The front ends sit on top: [`cli`] (the
//! `diffuse` command's options and commands) and, over it, the Python package
//! (`bindings/python`); nothing below imports them.
//! Same seed, same options, same build: the same bits out.

pub mod assets;
pub mod bench;
pub mod cli;
pub mod conditioning;
pub mod data;
pub mod device;
pub mod eval;
pub mod fetch;
pub mod files;
pub mod gan;
pub mod imageio;
pub mod interop;
pub mod kernels;
pub mod model;
pub mod pipeline;
pub mod pixelcnn;
pub mod plot;
pub mod rng;
pub mod sampler;
pub mod schedule;
pub mod serve;
pub mod train;
pub mod unet;
pub mod vae;
pub mod weights;

/// The message a caught panic was raised with (`panic!("...")` gives a `&str` or a
/// `String`), for the error lines of the code that catches panics at a boundary: the server's
/// worker, the data-parallel replicas and the Python package's functions.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("no message")
}
