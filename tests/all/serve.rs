//! `diffuse serve` end to end: the real binary on a loopback port, spoken to over HTTP.

use diffuse::serve::load::{self, HttpResponse, parse_sse, png_size, request};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_diffuse");
const T: Duration = Duration::from_secs(120);

/// A running server, killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `diffuse serve --port 0 ARGS` and waits for its address.
pub fn start(args: &[&str]) -> Server {
    let mut child = Command::new(BIN)
        .args(["serve", "--port", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start diffuse serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read the address");
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .parse()
        .unwrap();
    Server { child, addr }
}

/// Serves the run `run` of another family than diffusion and checks what every such server
/// does: `/v1/models` names the family (`family`), lists no samplers and the 8x8 class
/// model's shape; one image of class 3 with seed 5 and the JSON options `options` is the PNG
/// `diffuse sample` writes with the CLI options `cli`; and each `(body, error)` of `refused`
/// is a 400 with that error.
pub fn serves_like_sample(
    run: &str,
    family: &str,
    options: &str,
    cli: &[&str],
    refused: &[(&str, &str)],
) {
    let s = start(&["--model", run]);
    let m: serde_json::Value = get(s.addr, "/v1/models").json().unwrap();
    let m = &m["models"][0];
    assert_eq!(m["family"], family);
    assert_eq!(m["samplers"], serde_json::json!([]));
    assert_eq!(m["conditioning"], "class");
    assert_eq!(m["image_size"], 8);
    let one = post(
        s.addr,
        &format!(r#"{{"class": 3, "n": 1, "seed": 5{options}}}"#),
        None,
    );
    assert_eq!(one.status, 200, "{}", String::from_utf8_lossy(&one.body));
    let out = tempfile::tempdir().unwrap();
    let mut args = vec![
        "sample", "--model", run, "--class", "3", "--n", "1", "--seed", "5",
    ];
    args.extend_from_slice(cli);
    args.extend(["--out-dir", out.path().to_str().unwrap()]);
    super::cli::ok(&args);
    assert_eq!(
        one.body,
        std::fs::read(out.path().join("00000.png")).unwrap()
    );
    let mut refused = refused.to_vec();
    refused.push((r#"[1, 3]"#, "it must be a JSON object"));
    refused.push((
        r#"{"class": -1}"#,
        "class -1 is negative: give a class index (0, 1, ...) or a class name at line 1 column 12",
    ));
    for (body, error) in refused {
        let bad = post(s.addr, body, None);
        assert_eq!(bad.status, 400, "{body}");
        let e: serde_json::Value = bad.json().unwrap();
        assert!(
            e["error"].as_str().unwrap().ends_with(error),
            "{body}: {}",
            e["error"]
        );
    }
    // The JSON answer names what this family used: no sampler or steps; the temperature
    // for an autoregressive model.
    let json = post(
        s.addr,
        &format!(r#"{{"class": 3, "n": 2, "seed": 5{options}}}"#),
        Some("application/json"),
    );
    assert_eq!(json.status, 200);
    let v: serde_json::Value = json.json().unwrap();
    assert_eq!(v["images"].as_array().unwrap().len(), 2);
    assert!(
        v.get("steps").is_none() && v.get("sampler").is_none(),
        "{v}"
    );
    assert_eq!(
        v.get("temperature").is_some(),
        family == "autoregressive",
        "{v}"
    );
}

fn post(addr: SocketAddr, body: &str, accept: Option<&str>) -> HttpResponse {
    let mut h = vec![("Content-Type", "application/json")];
    if let Some(a) = accept {
        h.push(("Accept", a));
    }
    request(addr, "POST", "/v1/generate", &h, body.as_bytes(), T).unwrap()
}

fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    request(addr, "GET", path, &[], &[], T).unwrap()
}

fn health(addr: SocketAddr) -> serde_json::Value {
    get(addr, "/health").json().unwrap()
}

fn b64(s: &serde_json::Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s.as_str().unwrap())
        .unwrap()
}

#[test]
fn serve_generates_the_same_images_as_the_cli_in_all_three_forms() {
    let s = start(&[]);
    let h = health(s.addr);
    assert_eq!(h["status"], "ok");
    let m = get(s.addr, "/v1/models").json().unwrap();
    let m = &m["models"][0];
    assert_eq!(m["image_size"], 28);
    assert_eq!(m["conditioning"], "class");
    assert_eq!(m["classes"][7], "Sneaker");
    let page = get(s.addr, "/");
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    assert!(String::from_utf8_lossy(&page.body).contains("id=\"generate\""));

    // One image: a PNG body, the same bytes as `diffuse sample --out-dir` gives.
    let req =
        r#"{"class": "sneaker", "n": 1, "steps": 12, "sampler": "ddim", "guidance": 2, "seed": 7}"#;
    let one = post(s.addr, req, None);
    assert_eq!(one.status, 200, "{}", String::from_utf8_lossy(&one.body));
    assert_eq!(one.header("content-type"), Some("image/png"));
    assert_eq!(one.header("x-seed"), Some("7"));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cli");
    super::cli::ok(&[
        "sample",
        "--class",
        "sneaker",
        "--n",
        "1",
        "--steps",
        "12",
        "--sampler",
        "ddim",
        "--guidance",
        "2",
        "--seed",
        "7",
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert_eq!(one.body, std::fs::read(out.join("00000.png")).unwrap());

    // Several: JSON with base64 PNGs; the first image is the n=1 one only if n is equal, so
    // check sizes and that the images differ from one another.
    let req3 = r#"{"class": 7, "n": 3, "steps": 12, "seed": 7}"#;
    let j = post(s.addr, req3, None).json().unwrap();
    let imgs = j["images"].as_array().unwrap();
    assert_eq!(imgs.len(), 3);
    let pngs: Vec<Vec<u8>> = imgs.iter().map(b64).collect();
    assert!(pngs.iter().all(|p| png_size(p) == Some((28, 28))));
    assert_ne!(pngs[0], pngs[1]);
    assert_eq!(j["seed"], 7);
    assert_eq!(j["classes"], serde_json::json!([7, 7, 7]));
    // Same request, same bits.
    let again = post(s.addr, req3, None).json().unwrap();
    assert_eq!(again["images"], j["images"]);

    // Events: queued, started, one progress per step in order, then done with the images.
    let ev = post(s.addr, req, Some("text/event-stream"));
    assert_eq!(ev.status, 200);
    assert!(
        ev.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = parse_sse(&ev.body);
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names[..2], ["queued", "started"]);
    assert_eq!(names.last(), Some(&"done"));
    let steps: Vec<u64> = events
        .iter()
        .filter(|(e, _)| e == "progress")
        .map(|(_, d)| {
            serde_json::from_str::<serde_json::Value>(d).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<u64>>());
    let done: serde_json::Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(b64(&done["images"][0]), one.body);
}

#[test]
fn serve_answers_bad_requests_with_4xx_json_and_stays_up() {
    let s = start(&["--max-n", "4", "--max-steps", "50"]);
    let big = " ".repeat(20_000);
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        (
            "POST",
            "/v1/generate",
            "{\"n\": 1,",
            400,
            "not a valid generate request",
        ),
        (
            "POST",
            "/v1/generate",
            "{\"n\": \"four\"}",
            400,
            "invalid type",
        ),
        ("POST", "/v1/generate", "{\"n\": -3}", 400, "invalid value"),
        (
            "POST",
            "/v1/generate",
            "{\"n\": 5}",
            400,
            "n must be between 1 and 4",
        ),
        (
            "POST",
            "/v1/generate",
            "{\"steps\": 51}",
            400,
            "steps must be between 1 and 50",
        ),
        (
            "POST",
            "/v1/generate",
            "{\"steps\": 0}",
            400,
            "steps must be between",
        ),
        (
            "POST",
            "/v1/generate",
            "{\"seed\": 1e400}",
            400,
            "out of range",
        ),
        (
            "POST",
            "/v1/generate",
            "{\"guidance\": -1}",
            400,
            "guidance must be between",
        ),
        (
            "POST",
            "/v1/generate",
            "{\"eta\": 2}",
            400,
            "eta must be between 0 and 1",
        ),
        (
            "POST",
            "/v1/generate",
            "{\"temperature\": 0.5}",
            400,
            "temperature is an option of autoregressive models; the served model is a diffusion model",
        ),
        (
            "POST",
            "/v1/generate",
            "{\"sampler\": \"magic\"}",
            400,
            "unknown sampler 'magic'",
        ),
        (
            "POST",
            "/v1/generate",
            "{\"class\": \"spaceship\"}",
            400,
            "not a class of this model",
        ),
        (
            "POST",
            "/v1/generate",
            "{\"class\": 10}",
            400,
            "out of range",
        ),
        (
            "POST",
            "/v1/generate",
            "{\"class\": -1}",
            400,
            "not a valid generate request",
        ),
        (
            "POST",
            "/v1/generate",
            "{\"prompt\": \"bag\", \"class\": 1}",
            400,
            "either class or prompt",
        ),
        (
            "POST",
            "/v1/generate",
            "{\"stepz\": 3}",
            400,
            "unknown field",
        ),
        (
            "POST",
            "/v1/generate",
            "null",
            400,
            "not a valid generate request",
        ),
        ("POST", "/v1/generate", &big, 413, "larger than"),
        ("GET", "/v1/nothing", "", 404, "no such route"),
        ("GET", "/v1/generate", "", 405, "method"),
        ("DELETE", "/health", "", 405, "method"),
        ("GET", "/../../etc/passwd", "", 404, "no such route"),
    ];
    for (method, path, body, status, needle) in cases {
        let r = request(
            s.addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
            T,
        )
        .unwrap();
        let what = format!("{method} {path} {}", &body[..body.len().min(40)]);
        assert_eq!(
            r.status,
            *status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let j = r.json().unwrap_or_else(|e| panic!("{what}: {e}"));
        let msg = j["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no error field"));
        assert!(msg.contains(needle), "{what}: '{msg}' lacks '{needle}'");
    }
    // A prompt names a class on a class model.
    let r = post(s.addr, r#"{"prompt": "bag", "steps": 2}"#, None);
    assert_eq!(r.status, 200);
    assert_eq!(health(s.addr)["status"], "ok");
}

#[test]
fn serve_bounds_its_queue_times_out_and_cancels_jobs_of_clients_that_leave() {
    let s = start(&["--queue", "1", "--timeout", "3"]);
    let addr = s.addr;
    let long = r#"{"n": 16, "steps": 1000, "sampler": "ddpm"}"#;
    // One runs, one waits, the third finds the queue full.
    let a = std::thread::spawn(move || post(addr, long, None));
    let wait_for = |f: &dyn Fn(&serde_json::Value) -> bool| {
        let t0 = Instant::now();
        while !f(&health(addr)) {
            assert!(t0.elapsed() < Duration::from_secs(30), "{}", health(addr));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(&|h| h["queue"]["running"] == 1);
    let b = std::thread::spawn(move || post(addr, long, None));
    wait_for(&|h| h["queue"]["waiting"] == 1);
    let c = post(addr, long, None);
    assert_eq!(c.status, 503, "{}", String::from_utf8_lossy(&c.body));
    let retry: u64 = c.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert!(
        c.json().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("queue is full")
    );
    // Both time out after 3 s (the second while waiting or just after it starts).
    for r in [a.join().unwrap(), b.join().unwrap()] {
        assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
        assert!(
            r.json().unwrap()["error"]
                .as_str()
                .unwrap()
                .contains("3 s limit")
        );
    }
    wait_for(&|h| h["queue"]["running"] == 0 && h["queue"]["waiting"] == 0);
    let h = health(addr);
    assert_eq!(h["jobs"]["timed_out"], 2, "{h}");
    assert_eq!(h["jobs"]["rejected_queue_full"], 1, "{h}");

    // A client that leaves: its job stops long before it would have finished.
    load::hang_up(
        addr,
        "/v1/generate",
        long.as_bytes(),
        Duration::from_millis(300),
    )
    .unwrap();
    wait_for(&|h| h["jobs"]["cancelled"] == 1 && h["queue"]["running"] == 0);
    // And one that leaves an event stream.
    let t0 = Instant::now();
    {
        use std::io::{Read, Write};
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        write!(
            sock,
            "POST /v1/generate HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nContent-Length: {}\r\n\r\n{long}",
            long.len()
        )
        .unwrap();
        let mut buf = [0u8; 256];
        let _ = sock.read(&mut buf).unwrap();
    }
    wait_for(&|h| h["jobs"]["cancelled"] == 2 && h["queue"]["running"] == 0);
    assert!(t0.elapsed() < Duration::from_secs(3));
    // Still serving.
    assert_eq!(post(addr, r#"{"steps": 2}"#, None).status, 200);
}

#[test]
fn serve_load_test_small() {
    let s = start(&["--queue", "4"]);
    let cfg = load::LoadConfig {
        addr: s.addr,
        clients: 6,
        duration: Duration::from_secs(6),
        steps: 4,
        n: 2,
        request_timeout: T,
    };
    let r = load::run(&cfg).unwrap();
    assert!(r.failures.is_empty(), "{:#?}", r.failures);
    assert!(r.good_requests >= cfg.clients, "{r:?}");
    assert_eq!(r.good_ok, r.good_requests, "{r:?}");
    assert_eq!(r.images, 2 * r.good_ok);
    assert_eq!(r.bad_rejected, r.bad_requests, "{r:?}");
    assert!(r.bad_requests > 0 && r.hang_ups > 0, "{r:?}");
    assert!(r.latency_ms_p50 > 0.0 && r.latency_ms_p50 <= r.latency_ms_max);
    // Memory stays bounded: well under a gigabyte for this small model.
    assert!(r.server_peak_rss_bytes < 1 << 30, "{r:?}");
    assert_eq!(health(s.addr)["status"], "ok");
}
