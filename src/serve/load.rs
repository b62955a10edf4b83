//! A small blocking HTTP/1.1 client (one request per connection) and the load test behind
//! `diffuse loadtest`: N clients for M seconds against a running server, a mix of good
//! requests, bad ones and clients that hang up early; it checks every answer and reports
//! throughput, latency percentiles and the server's peak memory.

use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// A response: status, headers (names lower-cased) and the body (de-chunked).
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "response body is not JSON: {}",
                String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
            )
        })
    }
}

/// Resolves `host:port` (or a `http://host:port` URL) to a socket address.
pub fn resolve(url: &str) -> Result<SocketAddr> {
    let hostport = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    hostport
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve '{url}'"))?
        .next()
        .with_context(|| format!("'{url}' resolves to no address"))
}

/// One request on a fresh connection (`Connection: close`); reads the whole answer.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    // The server may answer (413) before reading all of a large body and close: not an error.
    let _ = s.write_all(body);
    let raw =
        read_answer(&mut s).with_context(|| format!("reading the answer to {method} {path}"))?;
    parse_response(&raw)
}

/// Reads one answer: up to its Content-Length, its last chunk, or the end of the stream
/// (some servers keep the connection open after answering despite `Connection: close`).
fn read_answer(s: &mut TcpStream) -> Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let k = s.read(&mut buf)?;
        if k == 0 {
            return Ok(raw);
        }
        raw.extend_from_slice(&buf[..k]);
        let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        let body = &raw[split + 4..];
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let done = match length {
            Some(n) => body.len() >= n,
            None if head.contains("transfer-encoding: chunked") => body.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if done {
            return Ok(raw);
        }
    }
}

/// `GET path` with a 10 s limit.
pub fn get(addr: SocketAddr, path: &str) -> Result<HttpResponse> {
    request(addr, "GET", path, &[], &[], Duration::from_secs(10))
}

/// Sends the head and part of a body, then hangs up: a client that leaves early.
pub fn hang_up(addr: SocketAddr, path: &str, body: &[u8], after: Duration) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    std::thread::sleep(after);
    s.shutdown(std::net::Shutdown::Both)?;
    Ok(())
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the answer has no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).context("the answer's head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line '{status_line}'"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_str = std::str::from_utf8(&b[..eol])?;
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size '{size_str}'"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Server-sent events in a body: `(event, data)` pairs.
pub fn parse_sse(body: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(body);
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut event = String::from("message");
        let mut data = Vec::new();
        let mut any = false;
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
                any = true;
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                any = true;
            }
        }
        if any {
            out.push((event, data.join("\n")));
        }
    }
    out
}

/// `(width, height)` of a PNG, if `b` is one.
pub fn png_size(b: &[u8]) -> Option<(u32, u32)> {
    if b.len() < 24 || &b[..8] != b"\x89PNG\r\n\x1a\n" || &b[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(b[16..20].try_into().ok()?);
    let h = u32::from_be_bytes(b[20..24].try_into().ok()?);
    Some((w, h))
}

/// Load test settings.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub addr: SocketAddr,
    pub clients: usize,
    pub duration: Duration,
    /// Sampling steps of each good request.
    pub steps: usize,
    /// Images per good request.
    pub n: usize,
    /// Per-request client time limit.
    pub request_timeout: Duration,
}

/// What the load test saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadReport {
    pub clients: usize,
    pub seconds: f64,
    pub good_requests: usize,
    /// Good requests answered with their images (after any retries on 503).
    pub good_ok: usize,
    pub images: usize,
    pub bad_requests: usize,
    /// Bad requests answered 4xx with a JSON error.
    pub bad_rejected: usize,
    pub hang_ups: usize,
    /// 503 answers (queue full) that were retried.
    pub retried_503: usize,
    pub good_per_s: f64,
    pub images_per_s: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p90: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
    pub server_peak_rss_bytes: u64,
    pub server_rss_bytes: u64,
    /// Every unexpected answer, one line each (empty when all went as they should).
    pub failures: Vec<String>,
}

/// The bad requests of the mix: (what, method, path, body, content type).
fn bad_request(k: usize, max_body: usize) -> (&'static str, &'static str, &'static str, Vec<u8>) {
    let j = |s: &str| s.as_bytes().to_vec();
    match k % 10 {
        0 => ("malformed JSON", "POST", "/v1/generate", j("{\"n\": 1,")),
        1 => ("wrong type", "POST", "/v1/generate", j("{\"n\": \"four\"}")),
        2 => ("negative n", "POST", "/v1/generate", j("{\"n\": -3}")),
        3 => (
            "huge steps",
            "POST",
            "/v1/generate",
            j("{\"steps\": 99999999999}"),
        ),
        4 => (
            "unknown sampler",
            "POST",
            "/v1/generate",
            j("{\"sampler\": \"magic\"}"),
        ),
        5 => (
            "unknown class",
            "POST",
            "/v1/generate",
            j("{\"class\": \"spaceship\"}"),
        ),
        6 => (
            "oversized body",
            "POST",
            "/v1/generate",
            vec![b' '; max_body + 1024],
        ),
        7 => ("unknown field", "POST", "/v1/generate", j("{\"stepz\": 3}")),
        8 => ("unknown route", "GET", "/v1/nothing", Vec::new()),
        _ => (
            "NaN guidance",
            "POST",
            "/v1/generate",
            j("{\"guidance\": 1e999}"),
        ),
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Runs the load test. Each client loops until the time is up: a good request, then in
/// every other round a bad one, and in every fifth a request it abandons (clients start at
/// different points of that cycle, so all kinds come from the first round on).
pub fn run(cfg: &LoadConfig) -> Result<LoadReport> {
    let health = get(cfg.addr, "/health").context("the server does not answer /health")?;
    if health.status != 200 {
        bail!("/health answered {}", health.status);
    }
    let models = get(cfg.addr, "/v1/models")?.json()?;
    let m = &models["models"][0];
    let size = m["image_size"].as_u64().unwrap_or(0) as u32;
    let classes = m["classes"].as_array().map(|a| a.len()).unwrap_or(0);
    let max_body = m["limits"]["max_body_bytes"].as_u64().unwrap_or(16384) as usize;
    let t0 = Instant::now();
    let end = t0 + cfg.duration;
    let results: Vec<Result<ClientLog>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..cfg.clients)
            .map(|c| sc.spawn(move || client(cfg, c, end, size, classes, max_body)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))
            })
            .collect()
    });
    let seconds = t0.elapsed().as_secs_f64();
    let mut r = LoadReport {
        clients: cfg.clients,
        seconds,
        ..Default::default()
    };
    let mut lat = Vec::new();
    for log in results {
        let log = log?;
        r.good_requests += log.good;
        r.good_ok += log.good_ok;
        r.images += log.images;
        r.bad_requests += log.bad;
        r.bad_rejected += log.bad_rejected;
        r.hang_ups += log.hang_ups;
        r.retried_503 += log.retried;
        lat.extend(log.latencies_ms);
        r.failures.extend(log.failures);
    }
    lat.sort_by(f64::total_cmp);
    r.latency_ms_p50 = percentile(&lat, 0.5);
    r.latency_ms_p90 = percentile(&lat, 0.9);
    r.latency_ms_p99 = percentile(&lat, 0.99);
    r.latency_ms_max = lat.last().copied().unwrap_or(0.0);
    r.good_per_s = r.good_ok as f64 / seconds;
    r.images_per_s = r.images as f64 / seconds;
    let h = get(cfg.addr, "/health")
        .context("the server stopped answering /health after the load")?
        .json()?;
    r.server_peak_rss_bytes = h["peak_rss_bytes"].as_u64().unwrap_or(0);
    r.server_rss_bytes = h["rss_bytes"].as_u64().unwrap_or(0);
    Ok(r)
}

#[derive(Default)]
struct ClientLog {
    good: usize,
    good_ok: usize,
    images: usize,
    bad: usize,
    bad_rejected: usize,
    hang_ups: usize,
    retried: usize,
    latencies_ms: Vec<f64>,
    failures: Vec<String>,
}

fn client(
    cfg: &LoadConfig,
    c: usize,
    end: Instant,
    size: u32,
    classes: usize,
    max_body: usize,
) -> Result<ClientLog> {
    let mut log = ClientLog::default();
    let mut round = 0usize;
    while Instant::now() < end {
        let class = if classes > 0 {
            format!(", \"class\": {}", (c + round) % classes)
        } else {
            String::new()
        };
        let good = format!(
            "{{\"n\": {}, \"steps\": {}, \"sampler\": \"ddim\", \"seed\": {}{class}}}",
            cfg.n,
            cfg.steps,
            1000 * c + round
        );
        // Every client's rounds mix the kinds from its first round on, whatever the pace.
        if (c + round).is_multiple_of(5) {
            // Leaves while its job waits or runs; the server must cancel it.
            hang_up(
                cfg.addr,
                "/v1/generate",
                good.as_bytes(),
                Duration::from_millis(50),
            )?;
            log.hang_ups += 1;
        }
        log.good += 1;
        let t = Instant::now();
        loop {
            let hdr = [
                ("Content-Type", "application/json"),
                ("Accept", "application/json"),
            ];
            let r = request(
                cfg.addr,
                "POST",
                "/v1/generate",
                &hdr,
                good.as_bytes(),
                cfg.request_timeout,
            );
            match r {
                Ok(r) if r.status == 503 && r.header("retry-after").is_some() => {
                    log.retried += 1;
                    if Instant::now() > end + cfg.request_timeout {
                        log.failures
                            .push(format!("client {c}: still 503 after the test's end"));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(r) if r.status == 200 => {
                    let ok = r.json().ok().and_then(|j| {
                        let imgs = j["images"].as_array()?.clone();
                        let b64 = base64::engine::general_purpose::STANDARD;
                        use base64::Engine;
                        let all = imgs.iter().all(|s| {
                            s.as_str()
                                .and_then(|s| b64.decode(s).ok())
                                .and_then(|p| png_size(&p))
                                == Some((size, size))
                        });
                        (all && imgs.len() == cfg.n).then_some(imgs.len())
                    });
                    match ok {
                        Some(k) => {
                            log.good_ok += 1;
                            log.images += k;
                            log.latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                        None => log.failures.push(format!(
                            "client {c}: a good request got 200 without its images"
                        )),
                    }
                    break;
                }
                Ok(r) => {
                    log.failures.push(format!(
                        "client {c}: a good request got {}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
                    ));
                    break;
                }
                Err(e) => {
                    log.failures
                        .push(format!("client {c}: a good request failed: {e:#}"));
                    break;
                }
            }
        }
        if (c + round).is_multiple_of(2) {
            let (what, method, path, body) = bad_request(c + round / 2, max_body);
            log.bad += 1;
            let hdr = [("Content-Type", "application/json")];
            match request(cfg.addr, method, path, &hdr, &body, cfg.request_timeout) {
                Ok(r)
                    if (400..500).contains(&r.status)
                        && r.json().ok().is_some_and(|j| j["error"].is_string()) =>
                {
                    log.bad_rejected += 1
                }
                Ok(r) => log.failures.push(format!(
                    "client {c}: bad request ({what}) got {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
                )),
                Err(e) => log
                    .failures
                    .push(format!("client {c}: bad request ({what}) failed: {e:#}")),
            }
        }
        round += 1;
    }
    Ok(log)
}
