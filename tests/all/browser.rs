//! The page at `/` in headless Chromium, driven through chromedriver (W3C WebDriver over
//! HTTP): open it, press Generate, see the images appear.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Without them the
//! test says so and passes, unless `DIFFUSE_BROWSER_TEST=required` (set by `.ci/run`), when
//! it fails. `DIFFUSE_SCREENSHOT=FILE` saves a screenshot of the page after generating.

use diffuse::serve::load::request;
use serde_json::{Value, json};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Driver {
    child: Child,
    addr: SocketAddr,
    session: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = request(
                self.addr,
                "DELETE",
                &path,
                &[],
                &[],
                Duration::from_secs(10),
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let body = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let r = request(
            self.addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            &body,
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("chromedriver {method} {path}: {e:#}"));
        let j = r.json().unwrap();
        assert_eq!(r.status, 200, "chromedriver {method} {path}: {j}");
        j["value"].clone()
    }

    fn session_call(&self, method: &str, what: &str, body: Value) -> Value {
        self.call(method, &format!("/session/{}/{what}", self.session), body)
    }

    fn script(&self, js: &str) -> Value {
        self.session_call("POST", "execute/sync", json!({ "script": js, "args": [] }))
    }
}

fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for n in names {
        for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]) {
            let p = dir.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn page_generates_images_in_headless_chromium() {
    let required = std::env::var("DIFFUSE_BROWSER_TEST").is_ok_and(|v| v == "required");
    let (Some(driver), Some(browser)) = (
        find(&["chromedriver"]),
        find(&["chromium", "chromium-browser", "google-chrome"]),
    ) else {
        assert!(
            !required,
            "the browser test needs chromium and chromedriver: apt-get install chromium chromium-driver"
        );
        eprintln!(
            "note: browser test not run: chromium or chromedriver missing (apt-get install chromium chromium-driver)"
        );
        return;
    };
    let server = super::serve::start(&[]);
    let port = free_port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let mut d = Driver {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        session: String::new(),
    };
    let t0 = Instant::now();
    loop {
        let ready = request(d.addr, "GET", "/status", &[], &[], Duration::from_secs(5))
            .ok()
            .and_then(|r| r.json().ok())
            .is_some_and(|j| j["value"]["ready"] == true);
        if ready {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "chromedriver did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let caps = json!({ "capabilities": { "alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": browser,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1000,800"],
        },
    }}});
    let s = d.call("POST", "/session", caps);
    d.session = s["sessionId"].as_str().expect("session id").to_string();
    let url = format!("http://{}/", server.addr);
    d.session_call("POST", "url", json!({ "url": url }));

    let wait = |what: &str, js: &str, secs: u64| -> Value {
        let t0 = Instant::now();
        loop {
            let v = d.script(js);
            if !(v.is_null() || v == false) {
                return v;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "{what}: page status '{}'",
                d.script("return document.getElementById('status').textContent")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // The model list fills the pickers.
    wait(
        "model list",
        "return document.getElementById('class').options.length === 11 && document.getElementById('sampler').options.length === 6",
        30,
    );
    let model_line = d.script("return document.getElementById('model').textContent");
    assert!(
        model_line.as_str().unwrap().contains("28x28"),
        "{model_line}"
    );
    // A user picks a class, fewer images and steps, then presses Generate.
    d.script(
        "document.getElementById('class').value = '7';
         document.getElementById('n').value = '2';
         document.getElementById('steps').value = '15';
         document.getElementById('seed').value = '5';",
    );
    let button = d.session_call(
        "POST",
        "element",
        json!({ "using": "css selector", "value": "#generate" }),
    );
    let id = button[ELEMENT].as_str().unwrap().to_string();
    d.session_call("POST", &format!("element/{id}/click"), json!({}));
    let sizes = wait(
        "two images in the gallery",
        "const im = [...document.querySelectorAll('#gallery img')];
         return im.length === 2 && im.every(i => i.complete && i.naturalWidth > 0)
           ? im.map(i => [i.naturalWidth, i.naturalHeight, i.alt]) : null;",
        120,
    );
    assert_eq!(sizes, json!([[28, 28, "Sneaker"], [28, 28, "Sneaker"]]));
    assert_eq!(
        d.script("return document.getElementById('progress').value"),
        1
    );
    let status = d.script("return document.getElementById('status').textContent");
    assert!(status.as_str().unwrap().contains("2 image(s)"), "{status}");
    assert_eq!(
        d.script("return document.getElementById('generate').disabled"),
        false
    );

    // A value the server refuses shows its error on the page. (The form's own limits would
    // stop this one in the browser; lift them, as an out-of-date page would have.)
    d.script(
        "const s = document.getElementById('steps'); s.removeAttribute('max'); s.value = '5000';",
    );
    d.session_call("POST", &format!("element/{id}/click"), json!({}));
    let err = wait(
        "an error line",
        "const s = document.getElementById('status'); return s.className === 'error' ? s.textContent : null;",
        30,
    );
    assert!(
        err.as_str().unwrap().contains("steps must be between"),
        "{err}"
    );

    if let Some(path) = std::env::var_os("DIFFUSE_SCREENSHOT") {
        d.script("document.getElementById('steps').value = '50'; document.getElementById('n').value = '8'; document.getElementById('class').value = '5';");
        d.session_call("POST", &format!("element/{id}/click"), json!({}));
        wait(
            "ten images",
            "return document.querySelectorAll('#gallery img').length === 10 && document.getElementById('generate').disabled === false",
            120,
        );
        let png = d.session_call("GET", "screenshot", Value::Null);
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}
