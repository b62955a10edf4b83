//! `diffuse serve` and `diffuse loadtest`.

use crate::device::inference_device;
use crate::pipeline::{Generator, load_generator};
use crate::serve::{self, ServeConfig, load};
use anyhow::{Result, bail};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    /// Run folder or model file (default: the embedded Fashion-MNIST model).
    #[arg(long)]
    model: Option<String>,
    /// Address to bind: loopback by default; another address exposes the API (no
    /// authentication) to the network.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Most requests waiting beyond the one running; past it, 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// Most images per request.
    #[arg(long, default_value_t = 16)]
    max_n: usize,
    /// Most sampling steps per request.
    #[arg(long, default_value_t = 1000)]
    max_steps: usize,
    /// Time limit per request in seconds, queueing included (504 past it).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Images denoised at once (default: what fits about 1 GiB for the model); larger
    /// batches of requests run in chunks of this many.
    #[arg(long)]
    batch: Option<usize>,
}

pub fn serve_cmd(a: ServeArgs) -> Result<()> {
    if a.queue == 0 || a.queue > 10_000 {
        bail!("--queue must be between 1 and 10000 (got {})", a.queue);
    }
    if a.max_n == 0 || a.max_n > 1000 {
        bail!("--max-n must be between 1 and 1000 (got {})", a.max_n);
    }
    if a.batch
        .is_some_and(|b| !(1..=crate::pipeline::MAX_BATCH).contains(&b))
    {
        bail!(
            "--batch must be between 1 and {} (got {})",
            crate::pipeline::MAX_BATCH,
            a.batch.unwrap_or(0)
        );
    }
    if a.max_steps == 0 {
        bail!("--max-steps must be at least 1");
    }
    if a.timeout == 0 || a.timeout > 86_400 {
        bail!(
            "--timeout must be between 1 and 86400 seconds (got {})",
            a.timeout
        );
    }
    let dev = inference_device();
    let m = load_generator(a.model.as_deref(), &dev)?;
    if let crate::model::Loaded::Diffusion(d) = &m
        && d.config.superres.is_some()
    {
        anyhow::bail!(
            "{} is a super-resolution model; serve generates images (use `diffuse upscale`)",
            d.source
        );
    }

    let cfg = ServeConfig {
        host: a.host,
        port: a.port,
        queue: a.queue,
        max_n: a.max_n,
        max_steps: a.max_steps,
        timeout: Duration::from_secs(a.timeout),
        batch: a.batch,
        ..Default::default()
    };
    serve::serve(Generator::from_loaded(m, &dev, true)?, cfg)
}

#[derive(Args)]
pub struct LoadTestArgs {
    /// The server, as host:port or http://host:port. Loopback only.
    #[arg(long, default_value = "127.0.0.1:8080")]
    url: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds during which clients start new requests.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Sampling steps of each good request.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Images per good request.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn loadtest_cmd(a: LoadTestArgs) -> Result<()> {
    let addr = load::resolve(&a.url)?;
    if !addr.ip().is_loopback() {
        bail!(
            "--url {}: the load test runs against loopback addresses only",
            a.url
        );
    }
    if a.clients == 0 || a.clients > 256 {
        bail!("--clients must be between 1 and 256 (got {})", a.clients);
    }
    if a.seconds == 0 || a.seconds > 3600 {
        bail!("--seconds must be between 1 and 3600 (got {})", a.seconds);
    }
    let cfg = load::LoadConfig {
        addr,
        clients: a.clients,
        duration: Duration::from_secs(a.seconds),
        steps: a.steps,
        n: a.n,
        request_timeout: Duration::from_secs(600),
    };
    let r = load::run(&cfg)?;
    let json = serde_json::to_string_pretty(&r)?;
    if let Some(p) = &a.json {
        crate::files::write_atomic(p, json.as_bytes())?;
    }
    println!("{json}");
    if !r.failures.is_empty() {
        bail!("{} unexpected answers (listed above)", r.failures.len());
    }
    Ok(())
}
