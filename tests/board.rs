//! `ytrainer board` end to end: the real binary serves the page, Debian's Chromium (headless, driven through
//! chromedriver's WebDriver over plain HTTP) renders it, and the tests read what the page shows. `.ci/run`
//! installs `chromium` and `chromium-driver` when they are missing. Screenshots of every view are saved under
//! `target/board-screenshots/`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// A child process killed when the test ends, however it ends.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `ytrainer board DIRS --port 0 EXTRA...` and returns it with the address it printed.
fn board(dirs: &[&Path], extra: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(bin());
    cmd.arg("board");
    for d in dirs {
        cmd.arg(d);
    }
    let mut child = cmd
        .args(["--port", "0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start ytrainer board");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("ytrainer board: ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (Proc(child), url)
}

/// One raw HTTP/1.1 request (the path is sent exactly as given: no client-side normalisation of `..`).
fn http(addr: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read the head, then exactly Content-Length bytes (chromedriver keeps the socket open after its answer),
    // or to the end when there is none.
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok());
    let mut raw = Vec::new();
    match length {
        Some(n) => {
            raw.resize(n, 0);
            reader.read_exact(&mut raw).unwrap();
        }
        None => {
            reader.read_to_end(&mut raw).unwrap();
        }
    }
    let rest = String::from_utf8_lossy(&raw).to_string();
    let body = if lower.contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut r = rest.as_str();
        while let Some((len, tail)) = r.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            r = &tail[n + 2..];
        }
        out
    } else {
        rest
    };
    (status, body)
}

fn host_of(url: &str) -> String {
    url.trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A headless Chromium session through chromedriver.
struct Browser {
    _driver: Proc,
    addr: String,
    session: String,
}

impl Browser {
    fn start() -> Browser {
        let driver = which("chromedriver").unwrap_or_else(|| {
            panic!(
                "chromedriver not found: install Debian's `chromium` and `chromium-driver` (.ci/run does) to run the \
                 board's browser tests"
            )
        });
        let chromium = ["chromium", "chromium-browser", "google-chrome"]
            .iter()
            .find_map(|b| which(b))
            .expect("chromium not found: install Debian's `chromium` (.ci/run does)");
        let port = free_port();
        // Owned at once, so a failure below still ends chromedriver.
        let driver = Proc(
            Command::new(driver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver"),
        );
        let addr = format!("127.0.0.1:{port}");
        let t = Instant::now();
        while TcpStream::connect(&addr).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.to_string_lossy(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1400,1000", "--hide-scrollbars"]
            }
        }}});
        let (status, body) = http(&addr, "POST", "/session", Some(&caps));
        assert_eq!(status, 200, "new session: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let session = v["value"]["sessionId"].as_str().unwrap().to_string();
        Browser {
            _driver: driver,
            addr,
            session,
        }
    }

    fn call(&self, method: &str, what: &str, body: Option<Value>) -> Value {
        let (status, text) = http(
            &self.addr,
            method,
            &format!("/session/{}/{what}", self.session),
            body.as_ref(),
        );
        assert_eq!(status, 200, "{method} {what}: {text}");
        serde_json::from_str::<Value>(&text).unwrap()["value"].clone()
    }

    fn open(&self, url: &str) {
        self.call("POST", "url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body) in the page and returns its value.
    fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Waits until `script` returns something truthy and returns it.
    fn wait(&self, what: &str, script: &str, secs: u64) -> Value {
        // A loaded 2-core machine (CI, or builds beside the suite) can take far longer than an idle one; the
        // wait only ends early on success, so a generous floor costs nothing when the page is right.
        let secs = secs.max(90);
        let t = Instant::now();
        loop {
            let v = self.js(script);
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "timed out after {secs}s waiting for {what}; page text:\n{}",
                self.js("return document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    fn text(&self) -> String {
        self.js("return document.body.innerText")
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn screenshot(&self, name: &str) {
        let b64 = self.call("GET", "screenshot", None);
        let png = base64(b64.as_str().unwrap());
        assert_eq!(&png[1..4], b"PNG");
        let dir = root().join("target/board-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(
            &self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

fn base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let v: Vec<u32> = chunk.iter().map(|&c| val(c) as u32).collect();
        let n = v
            .iter()
            .enumerate()
            .fold(0u32, |a, (i, &x)| a | (x << (18 - 6 * i)));
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}

/// The quickstart run with the tiny preset, cut to `steps` optimizer steps, into `dir`.
fn quickstart(dir: &Path, steps: usize) -> Command {
    let mut c = Command::new(bin());
    c.args([
        "run",
        "--config",
        "examples/quickstart/sft-nlirg.toml",
        "--output-dir",
        &s(dir),
        "--max-steps",
        &steps.to_string(),
    ])
    .current_dir(root());
    c
}

#[test]
fn board_refuses_paths_outside_its_folders_and_needs_a_token_off_loopback() {
    let tmp = TempDir::new("board-paths");
    let runs = tmp.path().join("runs");
    std::fs::create_dir_all(runs.join("a")).unwrap();
    std::fs::write(runs.join("a/metrics.jsonl"), "{\"step\":1,\"loss\":2.0}\n").unwrap();
    std::fs::create_dir_all(tmp.path().join("secret")).unwrap();
    std::fs::write(
        tmp.path().join("secret/metrics.jsonl"),
        "{\"step\":1,\"loss\":42.0}\n",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("secret/config.resolved.toml"),
        "secret = 1\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(tmp.path().join("secret"), runs.join("link")).unwrap();
    let (_b, url) = board(&[&runs], &[]);
    let addr = host_of(&url);
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let (status, body) = http(&addr, "GET", "/api/runs", None);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    // The symbolic link is not followed when looking for runs.
    assert_eq!(ids, ["0:a"]);
    for (path, status, needle) in [
        ("/../../../../etc/passwd", 404, "never files by name"),
        ("/%2e%2e/%2e%2e/etc/passwd", 404, "never files by name"),
        ("/assets/../../../etc/passwd", 404, "never files by name"),
        ("/api/run?id=0:..", 400, "`..`"),
        ("/api/run?id=0:a/../..", 400, "`..`"),
        ("/api/run?id=0:%2e%2e%2f%2e%2e", 400, "`..`"),
        ("/api/run?id=0:%2Fetc", 400, "absolute"),
        ("/api/run?id=0:/etc", 400, "absolute"),
        ("/api/run?id=0:link", 403, "leads outside"),
        ("/api/run?id=0:a%00", 400, "NUL"),
        ("/api/run?id=0:gone", 404, "no longer exists"),
        ("/api/tokens?run=0:..&record=0", 400, "`..`"),
        ("/api/run?id=0:%zz", 400, "malformed"),
        ("/api/nothing", 404, "no API"),
    ] {
        let (got, body) = http(&addr, "GET", path, None);
        assert_eq!(got, status, "{path}: {body}");
        let e: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: {body}"));
        assert!(
            e["error"].as_str().unwrap().contains(needle),
            "{path}: {body}"
        );
        assert!(
            !body.contains("42.0") && !body.contains("root:"),
            "{path}: {body}"
        );
    }
    let (got, _) = http(&addr, "POST", "/api/runs", Some(&json!({})));
    assert_eq!(got, 405);
    // A page on another host name (DNS rebinding) gets nothing.
    let mut conn = TcpStream::connect(&addr).unwrap();
    write!(
        conn,
        "GET /api/runs HTTP/1.1\r\nHost: evil.example:80\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 403"), "{raw}");

    // Off loopback: refused without a token, warned about with one, and the token is required.
    let o = ytrainer(&["board", &s(&runs), "--host", "0.0.0.0", "--port", "0"]);
    assert_user_error(
        &o,
        "--host 0.0.0.0: the board would be reachable from other machines; pass --token",
    );
    let mut child = Command::new(bin())
        .args([
            "board",
            &s(&runs),
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--token",
            "s3cret",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut err = String::new();
    let mut stderr = child.stderr.take().unwrap();
    let _guard = Proc(child);
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    assert!(line.trim().ends_with("/?token=s3cret"), "{line}");
    let addr = format!("127.0.0.1:{port}");
    let (got, body) = http(&addr, "GET", "/api/runs", None);
    assert_eq!(got, 403, "{body}");
    assert!(body.contains("missing or wrong token"), "{body}");
    assert_eq!(http(&addr, "GET", "/api/runs?token=nope", None).0, 403);
    assert_eq!(http(&addr, "GET", "/api/runs?token=s3cret", None).0, 200);
    // The page itself (no data) loads without the token.
    assert_eq!(http(&addr, "GET", "/", None).0, 200);
    drop(_guard);
    stderr.read_to_string(&mut err).unwrap();
    assert!(
        err.contains("warning: the board listens on 0.0.0.0"),
        "{err}"
    );
}

#[test]
fn board_in_a_browser() {
    // CI installs the browser (.ci/run) and must run this test; a newcomer's `cargo test` on a machine without
    // Chromium says what it skipped instead of failing.
    if (which("chromedriver").is_none() || which("chromium").is_none())
        && std::env::var("CI").as_deref() != Ok("true")
    {
        eprintln!(
            "board_in_a_browser skipped: no chromium / chromedriver on PATH (install Debian's `chromium` and \
             `chromium-driver`, as .ci/run does; with CI=true this is a failure)"
        );
        return;
    }
    let tmp = TempDir::new("board");
    let runs = tmp.path().join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    let run = runs.join("quickstart");
    let o = quickstart(&run, 4).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // What `ytrainer score` says about record 3 of the training data under the trained model.
    let record = 3;
    let o = ytrainer(&[
        "score",
        "--model",
        &s(&run.join("final")),
        "--data",
        "examples/quickstart/train.jsonl",
        "--max-seq-len",
        "128",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let scored: Value = serde_json::from_str(stdout(&o).lines().nth(record).unwrap()).unwrap();
    let losses: Vec<f64> = scored["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["loss"].as_f64().unwrap())
        .collect();
    // ... and what the nlirg plugin (the run's strategy) gives those losses, through `ytrainer curve`.
    let at = losses
        .iter()
        .map(|l| format!("{l}"))
        .collect::<Vec<_>>()
        .join(",");
    let o = ytrainer(&["curve", "nlirg", "--at", &at, "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let curve: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let weights: Vec<f64> = curve
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["weight"].as_f64().unwrap())
        .collect();

    // A LoRA run: its trained model is the base plus the adapter in final/.
    let lora = runs.join("lora");
    let o = quickstart(&lora, 2)
        .args(["--adapter", "lora"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let score_losses = |args: &[&str]| -> Vec<f64> {
        let mut all = vec![
            "score",
            "--data",
            "examples/quickstart/train.jsonl",
            "--max-seq-len",
            "128",
        ];
        all.extend_from_slice(args);
        let o = ytrainer(&all);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
        v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["loss"].as_f64().unwrap())
            .collect()
    };
    let lora_after = score_losses(&[
        "--model",
        &s(&lora.join("base-model")),
        "--adapter",
        &s(&lora.join("final")),
    ]);
    let lora_before = score_losses(&["--model", &s(&lora.join("base-model"))]);
    assert_ne!(lora_after, lora_before);

    // Bad inputs next to the good run.
    let cut = runs.join("truncated");
    std::fs::create_dir_all(&cut).unwrap();
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    std::fs::write(cut.join("metrics.jsonl"), &metrics[..metrics.len() - 40]).unwrap();
    let bad = runs.join("binary");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("metrics.jsonl"),
        b"{\"step\":1,\"loss\":1.5}\n\xff\xfe\x00garbage\n",
    )
    .unwrap();
    std::fs::write(
        bad.join("config.resolved.toml"),
        b"[loss]\nname = \"\xff\"\n",
    )
    .unwrap();
    let doomed = runs.join("doomed");
    std::fs::create_dir_all(&doomed).unwrap();
    std::fs::write(doomed.join("metrics.jsonl"), "{\"step\":1,\"loss\":3.0}\n").unwrap();
    // A sweep of two finished trials, the first of them the quickstart run's own folder layout.
    let sweep = runs.join("sweep-demo");
    for (id, strategy, gain, forgetting) in
        [("ce-s1", "ce", 1.5, 0.40), ("nlirg-s1", "nlirg", 1.2, 0.15)]
    {
        let d = sweep.join("trials").join(id);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(run.join("metrics.jsonl"), d.join("metrics.jsonl")).unwrap();
        let ev = |loss: f64| {
            json!([{"data": "d.jsonl", "kind": "text", "loss": loss, "perplexity": 1.0,
                                     "token_accuracy": 0.5, "tokens": 10, "samples": 2}])
        };
        let r = json!({"id": id, "strategy": strategy, "seed": 1, "overrides": [format!("loss.name = \"{strategy}\"")],
            "evals": {"learn_before": ev(5.0), "learn_after": ev(5.0 - gain), "retain_before": ev(3.0),
                      "retain_after": ev(3.0 + forgetting), "steps": 4, "seconds": 2.0}});
        std::fs::write(d.join("trial.json"), r.to_string()).unwrap();
    }

    std::fs::create_dir_all(runs.join("data")).unwrap();
    std::fs::copy(
        root().join("examples/quickstart/train.jsonl"),
        runs.join("data/train.jsonl"),
    )
    .unwrap();
    // A run whose training data is not UTF-8: its config points there, its base model is the quickstart's.
    let bad_data = runs.join("bad-data");
    std::fs::create_dir_all(&bad_data).unwrap();
    std::os::unix::fs::symlink(run.join("base-model"), bad_data.join("base-model")).unwrap();
    let latin1 = tmp.path().join("latin1.jsonl");
    std::fs::write(
        &latin1,
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"caf\xe9\"}]}\n",
    )
    .unwrap();
    let config = std::fs::read_to_string(run.join("config.resolved.toml"))
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("train = ") {
                format!("train = {:?}", s(&latin1))
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(bad_data.join("config.resolved.toml"), config).unwrap();

    let (_board, url) = board(&[&runs], &[]);
    let browser = Browser::start();

    // 1. Runs: the quickstart run is listed as finished after 4 steps, with its strategy; damaged files are
    // messages on the page.
    let poll = format!("{url}?poll=300");
    browser.open(&format!("{poll}#runs?select=0:quickstart,0:truncated"));
    browser.wait(
        "the runs list",
        "return document.querySelector('#runs-table tr[data-run=\"0:quickstart\"]')",
        30,
    );
    let row = browser
        .js("return document.querySelector('#runs-table tr[data-run=\"0:quickstart\"]').innerText");
    let row = row.as_str().unwrap();
    assert!(
        row.contains("quickstart") && row.contains("finished") && row.contains("nlirg"),
        "{row}"
    );
    assert!(row.contains("4 / 4"), "{row}");
    browser.wait(
        "the damaged-file messages",
        "return document.querySelector('#runs-messages').innerText.includes('not UTF-8')",
        20,
    );
    let text = browser.text();
    assert!(
        text.contains(
            "truncated: metrics.jsonl line 4: incomplete (the file ends in the middle of a line"
        ),
        "{text}"
    );
    assert!(
        text.contains("binary: metrics.jsonl line 2: not UTF-8 text"),
        "{text}"
    );
    assert!(
        text.contains("binary: config.resolved.toml: not UTF-8 text"),
        "{text}"
    );
    // The curves of the selected runs are drawn from their metrics.
    let loss_points = browser.wait(
        "the loss chart",
        "const c = document.querySelector('#chart-loss'); return c.dataset.points !== '0' && c.querySelector('canvas') ? Number(c.dataset.points) : 0",
        20,
    );
    // 4 steps of the quickstart run and the 3 whole lines of its truncated copy.
    assert_eq!(loss_points.as_f64().unwrap(), 7.0, "{loss_points}");
    browser.screenshot("runs");

    // A run deleted while the page shows it: a message, not a blank page.
    browser.open(&format!("{poll}#runs?select=0:doomed"));
    browser.wait(
        "the doomed run's curve",
        "return document.querySelector('#chart-loss').dataset.points === '1'",
        20,
    );
    std::fs::remove_dir_all(&doomed).unwrap();
    browser.wait(
        "the deleted-run message",
        "return document.querySelector('#runs-messages').innerText.includes('no longer exists')",
        20,
    );
    assert!(
        browser
            .text()
            .contains("run 0:doomed: run `0:doomed` no longer exists"),
        "{}",
        browser.text()
    );
    browser.screenshot("deleted-run");

    // 2. A live run: its curve gains points while it trains.
    let mut live = Proc(
        quickstart(&runs.join("live"), 40)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while !runs.join("live/metrics.jsonl").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the live run wrote no metrics"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    browser.open(&format!("{poll}#runs?select=0:live"));
    let first = browser
        .wait(
            "the live run's first points",
            "return Number(document.querySelector('#chart-loss').dataset.points || 0)",
            30,
        )
        .as_f64()
        .unwrap();
    let later = browser
        .wait(
            "the live run's curve to grow",
            &format!("const n = Number(document.querySelector('#chart-loss').dataset.points || 0); return n > {first} ? n : 0"),
            60,
        )
        .as_f64()
        .unwrap();
    assert!(later > first);
    let status = browser.js(
        "return document.querySelector('#runs-table tr[data-run=\"0:live\"] .status').innerText",
    );
    assert!(
        live.0.try_wait().unwrap().is_none() || status == "finished",
        "{status}"
    );
    if live.0.try_wait().unwrap().is_none() {
        assert_eq!(status, "training");
    }
    browser.screenshot("live-run");
    let _ = live.0.kill();

    // 3. Tokens: record 3 under the trained model, the run's own strategy (nlirg) beside ce.
    browser.open(&format!(
        "{url}#tokens?run=0:quickstart&record={record}&a=after::&b=after:ce:"
    ));
    browser.wait(
        "the tokens of both panels",
        "return ['#panel-a', '#panel-b'].every(p => ['ready', 'error'].includes(document.querySelector(p).dataset.state))",
        120,
    );
    let read = |panel: &str, attr: &str| -> Vec<f64> {
        browser
            .js(&format!(
                "return [...document.querySelectorAll('{panel} .tok.sup')].map(s => Number(s.dataset.{attr}))"
            ))
            .as_array()
            .unwrap_or_else(|| panic!("{}", browser.text()))
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let page_losses = read("#panel-a", "loss");
    assert_eq!(page_losses.len(), losses.len(), "{}", browser.text());
    for (i, (a, b)) in page_losses.iter().zip(&losses).enumerate() {
        assert!(
            (a - b).abs() < 1e-5,
            "token {i}: page loss {a}, ytrainer score {b}"
        );
    }
    let page_weights = read("#panel-a", "weight");
    for (i, (a, b)) in page_weights.iter().zip(&weights).enumerate() {
        assert!(
            (a - b).abs() < 1e-5,
            "token {i}: page weight {a}, plugin {b}"
        );
    }
    assert!(
        page_weights.iter().any(|w| (w - 1.0).abs() > 1e-3),
        "nlirg weights all 1?"
    );
    assert_eq!(read("#panel-b", "loss"), page_losses);
    assert!(read("#panel-b", "weight").iter().all(|&w| w == 1.0));
    let summary = browser.js("return document.querySelector('#panel-a .summary').innerText");
    assert!(summary.as_str().unwrap().contains("nlirg"), "{summary}");
    // A hover names loss, entropy, weight and zone.
    let tip = browser.js("return document.querySelector('#panel-a .tok.sup').title");
    let tip = tip.as_str().unwrap();
    assert!(
        tip.starts_with(&format!("loss {:.4} · entropy ", losses[0]))
            && tip.contains(" · weight ")
            && tip.contains(" · zone "),
        "{tip}"
    );
    browser.js("document.querySelector('#panel-a .tok.sup').dispatchEvent(new MouseEvent('mouseenter')); return 1");
    browser.screenshot("tokens");

    // eaft weighs a token by the normalised entropy of its top-k distribution: the page's weights (k=5,
    // alpha=2) against that entropy computed here from `ytrainer score --top-k 5`.
    let o = ytrainer(&[
        "score",
        "--model",
        &s(&run.join("final")),
        "--data",
        "examples/quickstart/train.jsonl",
        "--max-seq-len",
        "128",
        "--top-k",
        "5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let scored: Value = serde_json::from_str(stdout(&o).lines().nth(record).unwrap()).unwrap();
    let eaft: Vec<f64> = scored["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let lp: Vec<f64> = t["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p[1].as_f64().unwrap())
                .collect();
            let z: f64 = lp.iter().map(|l| l.exp()).sum();
            let h: f64 = lp
                .iter()
                .map(|l| {
                    let q = l.exp() / z;
                    -q * q.ln()
                })
                .sum::<f64>()
                / 5f64.ln();
            h.clamp(0.0, 1.0).powi(2)
        })
        .collect();
    browser.open(&format!(
        "{url}#tokens?run=0:quickstart&record={record}&a=after::&b=after:eaft:k=5,alpha=2"
    ));
    browser.wait(
        "the eaft panel",
        "return document.querySelector('#panel-b').dataset.state === 'ready' && document.querySelector('#panel-b .summary').innerText.includes('eaft')",
        120,
    );
    let page = read("#panel-b", "weight");
    assert_eq!(page.len(), eaft.len());
    for (i, (a, b)) in page.iter().zip(&eaft).enumerate() {
        assert!(
            (a - b).abs() < 1e-5,
            "token {i}: page eaft weight {a}, from the top-5 log-probs {b}"
        );
    }

    // The LoRA run's record 0 after training (base + adapter) beside before training (the base alone).
    browser.open(&format!(
        "{url}#tokens?run=0:lora&record=0&a=after::&b=before::"
    ));
    browser.wait(
        "the LoRA run's tokens",
        "return ['#panel-a', '#panel-b'].every(p => document.querySelector(p).dataset.state === 'ready')",
        120,
    );
    for (panel, want) in [("#panel-a", &lora_after), ("#panel-b", &lora_before)] {
        let got = read(panel, "loss");
        assert_eq!(got.len(), want.len(), "{panel}");
        for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
            assert!(
                (a - b).abs() < 1e-5,
                "{panel} token {i}: page loss {a}, ytrainer score {b}"
            );
        }
    }
    let summary = browser.js("return document.querySelector('#panel-b .summary').innerText");
    assert!(
        summary
            .as_str()
            .unwrap()
            .starts_with("before training · nlirg"),
        "{summary}"
    );
    browser.screenshot("tokens-lora-before-after");

    // rho1 keeps the top 60% of tokens by excess loss over the reference, which for a LoRA run is its base
    // model: the page's weights against that selection made here from the two `ytrainer score` outputs.
    let n = lora_after.len();
    let mut order: Vec<usize> = (0..n).collect();
    let excess: Vec<f32> = lora_after
        .iter()
        .zip(&lora_before)
        .map(|(a, b)| *a as f32 - *b as f32)
        .collect();
    order.sort_by(|&a, &b| excess[b].total_cmp(&excess[a]).then(a.cmp(&b)));
    let mut want = vec![0.0; n];
    for &i in order.iter().take((0.6 * n as f64).ceil() as usize) {
        want[i] = 1.0;
    }
    browser.open(&format!(
        "{url}#tokens?run=0:lora&record=0&a=after:rho1:&b=before::"
    ));
    browser.wait(
        "the rho1 panel",
        "return document.querySelector('#panel-a').dataset.state === 'ready' && document.querySelector('#panel-a .summary').innerText.includes('rho1')",
        120,
    );
    assert_eq!(read("#panel-a", "weight"), want);

    // The same model + adapter picked directly (no run), on a data file inside the folders.
    browser.open(&format!(
        "{url}#tokens?model=0:lora/base-model&adapter=0:lora/final&data=0:data/train.jsonl&record=0&a=after:ce:&b=before:ce:"
    ));
    browser.wait(
        "the model + adapter tokens",
        "return ['#panel-a', '#panel-b'].every(p => document.querySelector(p).dataset.state === 'ready')",
        120,
    );
    assert_eq!(read("#panel-a", "loss").len(), lora_after.len());
    for (panel, want) in [("#panel-a", &lora_after), ("#panel-b", &lora_before)] {
        for (i, (a, b)) in read(panel, "loss").iter().zip(want.iter()).enumerate() {
            assert!(
                (a - b).abs() < 1e-5,
                "{panel} token {i}: page loss {a}, ytrainer score {b}"
            );
        }
    }
    // A model outside the folders is refused.
    browser.open(&format!(
        "{url}#tokens?model=0:../..&data=0:data/train.jsonl&record=0"
    ));
    let err = browser.wait(
        "the refused model",
        "const t = document.querySelector('#panel-a .error').innerText; return t.includes('refused') ? t : ''",
        30,
    );
    assert!(
        err.as_str().unwrap().contains("id `0:../..` refused"),
        "{err}"
    );

    // A data file that is not UTF-8: the loader's message (file and line) in the panel.
    browser.open(&format!(
        "{url}#tokens?run=0:bad-data&record=0&a=before::&b=before:ce:"
    ));
    let err = browser.wait(
        "the non-UTF-8 data message",
        "const t = document.querySelector('#panel-a .error').innerText; return t.includes('latin1') ? t : ''",
        60,
    );
    let err = err.as_str().unwrap();
    assert!(
        err.contains("latin1.jsonl") && err.contains("UTF-8"),
        "{err}"
    );
    browser.screenshot("tokens-non-utf8-data");

    // A record out of range: a message in each panel.
    browser.open(&format!("{url}#tokens?run=0:quickstart&record=100000"));
    let err = browser.wait(
        "the out-of-range message",
        "const t = document.querySelector('#panel-a .error').innerText; return t.includes('out of range') ? t : ''",
        60,
    );
    assert!(
        err.as_str()
            .unwrap()
            .contains("record 100000 is out of range:")
            && err.as_str().unwrap().contains("has 480 samples"),
        "{err}"
    );
    browser.screenshot("tokens-out-of-range");

    // 4. Sweeps: the table, the scatter, and a click through to a trial's run.
    browser.open(&format!("{url}#sweeps"));
    browser.wait(
        "the sweep",
        "return document.querySelector('.sweep .scatter canvas') && document.querySelector('.sweep .scatter').dataset.points === '2'",
        20,
    );
    let text = browser.text();
    assert!(text.contains("sweep sweep-demo"), "{text}");
    assert!(
        text.contains("ce-s1") && text.contains("nlirg-s1") && text.contains("0.1500"),
        "{text}"
    );
    // Sorting by forgetting puts nlirg first.
    browser.js("document.querySelectorAll('.sweep-trials th')[4].click(); return 1");
    let first_row = browser.js("return document.querySelector('.sweep-trials tbody tr').innerText");
    assert!(
        first_row.as_str().unwrap().starts_with("nlirg-s1"),
        "{first_row}"
    );
    browser.screenshot("sweeps");
    // A real mouse click (WebDriver actions) on the scatter's rightmost point (the largest gain: ce-s1) opens
    // that trial's run.
    let at = browser.js("const u = document.querySelector('.sweep .scatter')._u; \
         const i = u.data[0].length - 1; \
         const y = u.data.slice(1).map(s => s[i]).find(v => v != null); \
         const r = u.over.getBoundingClientRect(); \
         return [u.valToPos(u.data[0][i], 'x') - r.width / 2, u.valToPos(y, 'y') - r.height / 2]");
    let over = browser.call(
        "POST",
        "element",
        Some(json!({"using": "css selector", "value": ".sweep .scatter .u-over"})),
    );
    let element = over.as_object().unwrap().values().next().unwrap().clone();
    let (dx, dy) = (
        at[0].as_f64().unwrap().round() as i64,
        at[1].as_f64().unwrap().round() as i64,
    );
    browser.call(
        "POST",
        "actions",
        Some(json!({"actions": [{"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
            "actions": [
                {"type": "pointerMove", "duration": 0, "origin": {"element-6066-11e4-a52e-4f735466cecf": element}, "x": dx, "y": dy},
                {"type": "pointerDown", "button": 0},
                {"type": "pointerUp", "button": 0}
            ]}]})),
    );
    let hash = browser.wait(
        "the click on the point",
        "return location.hash.startsWith('#runs') && location.hash",
        20,
    );
    assert_eq!(hash, "#runs?select=0%3Asweep-demo%2Ftrials%2Fce-s1");
    browser.open(&format!("{url}#sweeps"));
    browser.wait(
        "the sweep again",
        "return document.querySelector('.sweep-trials tbody tr')",
        20,
    );
    browser.js("document.querySelectorAll('.sweep-trials th')[4].click(); return 1");
    browser.js("document.querySelector('.sweep-trials tbody tr').click(); return 1");
    browser.wait(
        "the trial's run",
        "return location.hash === '#runs?select=0%3Asweep-demo%2Ftrials%2Fnlirg-s1' && document.querySelector('#chart-loss').dataset.points === '4'",
        20,
    );

    // 5. Curves: nlirg's weight curve, redrawn when a slider moves.
    browser.open(&format!("{url}#curves?plugin=nlirg"));
    browser.wait(
        "the curve",
        "return document.querySelector('#chart-curve canvas') && document.querySelector('#chart-curve').dataset.points === '402'",
        20,
    );
    let before = browser.js("return document.querySelector('#chart-curve').dataset.params");
    browser.js(
        "const s = document.querySelector('#curve-sliders input[data-param=center]'); s.value = 3; s.dispatchEvent(new Event('input')); return 1",
    );
    let after = browser.wait(
        "the redrawn curve",
        &format!("const p = document.querySelector('#chart-curve').dataset.params; return p !== {before} ? p : ''"),
        20,
    );
    assert!(after.as_str().unwrap().contains("center=3"), "{after}");
    browser.screenshot("curves");

    // An entropy-based plugin against the entropy axis: eaft's weight is h^alpha (alpha = 1 by default).
    browser.open(&format!("{url}#curves?plugin=eaft&vs=entropy"));
    let w = browser.wait(
        "eaft's curve",
        "const c = document.querySelector('#chart-curve'); return c.querySelector('canvas') && c.dataset.params.startsWith('k=') && c.dataset.points === '402' ? c.dataset.weights : ''",
        20,
    );
    let w: Vec<f64> = serde_json::from_str(w.as_str().unwrap()).unwrap();
    for (i, w) in w.iter().enumerate() {
        assert!(
            (w - i as f64 / 200.0).abs() < 1e-6,
            "eaft at h = {}: {w}",
            i as f64 / 200.0
        );
    }
    browser.screenshot("curves-eaft-entropy");
}
