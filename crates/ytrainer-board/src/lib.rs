//! `ytrainer board`: a local, read-only web page over run folders.
//!
//! The page ([`assets`]) is embedded in the binary, with its chart library (uPlot, vendored by
//! `scripts/fetch-uplot.sh`): nothing is downloaded at run time. The server answers `GET` only: the page and its
//! assets from a fixed table, and JSON under `/api/` built from the run folders through the library:
//! [`runs`] (metrics, evaluations, configs), [`tokens`] (per-token losses from `ytrainer_recipes::score` and the
//! weights the strategy's plugin gives them), [`sweeps`] (`ytrainer_sweep` trial results) and [`curve`] (a
//! plugin's weight curve). No request names a file: runs are addressed by an id that [`paths::resolve`] checks
//! stays inside the folders given on the command line, so nothing outside them is ever read for a request.
//!
//! Every bad input (a truncated `metrics.jsonl`, a deleted run, an out-of-range record, a non-UTF-8 file)
//! becomes a message: a warning inside a JSON answer, or a JSON `{"error": ...}` with a 4xx status the page shows.

pub mod assets;
pub mod curve;
pub mod paths;
pub mod runs;
pub mod sweeps;
pub mod tokens;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};

pub use paths::Root;

/// A request that cannot be answered, with the HTTP status the page receives and a message for people.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct BoardError {
    /// 400 (malformed request), 403 (outside the folders, or a missing token), 404 (gone), 422 (the input
    /// exists but cannot be used, e.g. a model that does not load).
    pub status: u16,
    /// What went wrong and what to do.
    pub message: String,
}

impl BoardError {
    /// 400.
    pub fn bad(message: impl Into<String>) -> Self {
        BoardError {
            status: 400,
            message: message.into(),
        }
    }
    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        BoardError {
            status: 403,
            message: message.into(),
        }
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        BoardError {
            status: 404,
            message: message.into(),
        }
    }
    /// 422.
    pub fn unusable(message: impl Into<String>) -> Self {
        BoardError {
            status: 422,
            message: message.into(),
        }
    }
}

/// Result of a board function.
pub type Result<T, E = BoardError> = std::result::Result<T, E>;

/// How the board is served.
#[derive(Debug, Clone)]
pub struct BoardOptions {
    /// The folders whose runs and sweeps are shown (searched a few levels deep).
    pub roots: Vec<PathBuf>,
    /// Address to bind: `127.0.0.1` by default. Anything but a loopback address needs `token`.
    pub host: String,
    /// Port (0: any free port).
    pub port: u16,
    /// Secret every `/api/` request must carry (`?token=` or the `X-Board-Token` header).
    pub token: Option<String>,
    /// External plugin directories (`--plugin-dir`), besides the built-ins.
    pub plugin_dirs: Vec<PathBuf>,
    /// Device the token view scores on (`cpu`, `cuda`, `cuda:N`).
    pub device: String,
}

/// Whether `host` is a loopback address (or `localhost`).
pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The state every request reads.
pub struct Board {
    roots: Vec<Root>,
    token: Option<String>,
    loopback: bool,
    registry: ytrainer_core::loss::Registry,
    scorers: tokens::Cache,
    device: String,
}

/// A bound, not yet serving board.
pub struct Bound {
    server: tiny_http::Server,
    board: Arc<Board>,
    /// The page's address (with `?token=` when a token is set).
    pub url: String,
    /// A warning to print before serving (bound to a non-loopback address).
    pub warning: Option<String>,
}

/// Checks the options, reads the plugin registry and binds the port.
pub fn bind(o: &BoardOptions) -> Result<Bound> {
    let loopback = is_loopback(&o.host);
    let token = o.token.clone().filter(|t| !t.is_empty());
    if !loopback && token.is_none() {
        return Err(BoardError::bad(format!(
            "--host {}: the board would be reachable from other machines; pass --token SECRET as well (the page \
             is then opened as http://{}:{}/?token=SECRET), or keep the default --host 127.0.0.1",
            o.host, o.host, o.port
        )));
    }
    if let Some(t) = &token
        && !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.~".contains(c))
    {
        return Err(BoardError::bad(
            "--token: use letters, digits and - _ . ~ only (it travels in the page's address)",
        ));
    }
    if o.roots.is_empty() {
        return Err(BoardError::bad(
            "name at least one folder of runs, e.g. `ytrainer board runs`",
        ));
    }
    let roots = o
        .roots
        .iter()
        .map(|p| Root::new(p))
        .collect::<Result<Vec<_>>>()?;
    let registry = ytrainer_recipes::run::registry(&o.plugin_dirs, &[])
        .map_err(|e| BoardError::bad(format!("loading loss plugins: {e}")))?;
    let host = if o.host.contains(':') && !o.host.starts_with('[') {
        format!("[{}]", o.host)
    } else {
        o.host.clone()
    };
    let server = tiny_http::Server::http(format!("{host}:{}", o.port)).map_err(|e| {
        BoardError::bad(format!(
            "cannot listen on {host}:{}: {e} (pick another --port, or 0 for any free port)",
            o.port
        ))
    })?;
    let port = server
        .server_addr()
        .to_ip()
        .map(|a| a.port())
        .unwrap_or(o.port);
    let url = match &token {
        Some(t) => format!("http://{host}:{port}/?token={t}"),
        None => format!("http://{host}:{port}/"),
    };
    let warning = (!loopback).then(|| {
        format!(
            "the board listens on {host}:{port}, reachable from other machines: anyone with the token can read \
             every run under the given folders (configs, metrics, data records)"
        )
    });
    Ok(Bound {
        server,
        board: Arc::new(Board {
            roots,
            token,
            loopback,
            registry,
            scorers: tokens::Cache::default(),
            device: o.device.clone(),
        }),
        url,
        warning,
    })
}

impl Bound {
    /// Answers requests until the process ends, each on its own thread (a slow token view does not hold up the
    /// runs list's polling).
    pub fn serve(self) {
        for request in self.server.incoming_requests() {
            let board = Arc::clone(&self.board);
            std::thread::spawn(move || answer(&board, request));
        }
    }
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("ASCII header")
}

fn answer(board: &Board, request: tiny_http::Request) {
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .map(|h| (h.field.as_str().as_str().to_string(), h.value.to_string()))
        .collect();
    let method = request.method().as_str().to_string();
    let url = request.url().to_string();
    let reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        handle(board, &method, &url, &headers)
    }))
    .unwrap_or_else(|_| {
        Reply::error(&BoardError {
            status: 500,
            message: format!(
                "internal error answering {url}: this is a bug in ytrainer board, please report it"
            ),
        })
    });
    let mut response = tiny_http::Response::from_data(reply.body)
        .with_status_code(reply.status)
        .with_header(header("Content-Type", reply.content_type))
        .with_header(header("Cache-Control", "no-store"))
        .with_header(header("X-Content-Type-Options", "nosniff"))
        .with_header(header(
            "Content-Security-Policy",
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
        ));
    if reply.status == 405 {
        response = response.with_header(header("Allow", "GET, HEAD"));
    }
    let _ = request.respond(response);
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
}

impl Reply {
    fn json(v: &Value) -> Reply {
        Reply {
            status: 200,
            content_type: "application/json",
            body: v.to_string().into_bytes(),
        }
    }
    fn error(e: &BoardError) -> Reply {
        Reply {
            status: e.status,
            content_type: "application/json",
            body: json!({ "error": e.message }).to_string().into_bytes(),
        }
    }
}

/// Decodes `%XX` escapes (and `+` as a space in query values); `None` when the result is not UTF-8 or an
/// escape is malformed.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The query string as a map (the last value of a repeated key wins).
pub fn parse_query(q: &str) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = || {
            BoardError::bad(format!(
                "malformed query parameter `{pair}` (bad % escape or not UTF-8)"
            ))
        };
        m.insert(
            percent_decode(k, true).ok_or_else(bad)?,
            percent_decode(v, true).ok_or_else(bad)?,
        );
    }
    Ok(m)
}

/// Answers one request (the whole server minus the socket; unit tests call it directly).
pub fn handle(board: &Board, method: &str, url: &str, headers: &[(String, String)]) -> Reply {
    if method != "GET" && method != "HEAD" {
        return Reply::error(&BoardError {
            status: 405,
            message: format!("{method} is not allowed: the board is read-only (GET only)"),
        });
    }
    // A page elsewhere must not reach a loopback board through a DNS name that resolves to 127.0.0.1.
    if board.loopback {
        let host = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("host"))
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        let name = match host.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
            _ => host,
        };
        if !name.is_empty() && !is_loopback(name) {
            return Reply::error(&BoardError::forbidden(format!(
                "Host `{host}` refused: this board answers only on 127.0.0.1 / localhost"
            )));
        }
    }
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let Some(path) = percent_decode(path, false) else {
        return Reply::error(&BoardError::bad(format!(
            "malformed address {url} (bad % escape or not UTF-8)"
        )));
    };
    if let Some(a) = assets::get(&path) {
        return Reply {
            status: 200,
            content_type: a.content_type,
            body: a.bytes.to_vec(),
        };
    }
    let Some(api) = path.strip_prefix("/api/") else {
        return Reply::error(&BoardError::not_found(format!(
            "no page at {path}: the board serves / and /api/... only (never files by name)"
        )));
    };
    let result = parse_query(query).and_then(|q| {
        if let Some(t) = &board.token {
            let given = q.get("token").cloned().or_else(|| {
                headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("x-board-token"))
                    .map(|(_, v)| v.clone())
            });
            if given.as_deref() != Some(t.as_str()) {
                return Err(BoardError::forbidden(
                    "missing or wrong token: open the address `ytrainer board` printed (it ends in ?token=...)",
                ));
            }
        }
        api_call(board, api, &q)
    });
    match result {
        Ok(v) => Reply::json(&v),
        Err(e) => Reply::error(&e),
    }
}

fn api_call(board: &Board, api: &str, q: &BTreeMap<String, String>) -> Result<Value> {
    let need = |k: &str| {
        q.get(k)
            .map(String::as_str)
            .ok_or_else(|| BoardError::bad(format!("/api/{api}: the `{k}` parameter is missing")))
    };
    match api {
        "roots" => Ok(json!(
            board
                .roots
                .iter()
                .map(|r| r.shown.display().to_string())
                .collect::<Vec<_>>()
        )),
        "runs" => Ok(runs::list(&board.roots)),
        "run" => runs::detail(&board.roots, need("id")?),
        "tokens" => {
            let tq = tokens::TokenQuery::from_query(q)?;
            tokens::view(
                &board.roots,
                &board.registry,
                &board.scorers,
                &board.device,
                &tq,
            )
        }
        "sweeps" => Ok(sweeps::list(&board.roots)),
        "plugins" => Ok(curve::plugins(&board.registry)),
        "curve" => curve::curve(&board.registry, q),
        _ => Err(BoardError::not_found(format!(
            "no API /api/{api} (runs, run, tokens, sweeps, plugins, curve)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_decoded_strictly() {
        assert_eq!(percent_decode("0:%2e%2e%2F..", false).unwrap(), "0:../..");
        assert_eq!(percent_decode("a+b%20c", true).unwrap(), "a b c");
        assert_eq!(percent_decode("a+b", false).unwrap(), "a+b");
        assert_eq!(percent_decode("%zz", false), None);
        assert_eq!(percent_decode("%2", false), None);
        // Decoded bytes that are not UTF-8.
        assert_eq!(percent_decode("%ff%fe", false), None);
        let q = parse_query("run=0%3Aa%2Fb&record=3&&flag").unwrap();
        assert_eq!(q["run"], "0:a/b");
        assert_eq!(q["record"], "3");
        assert_eq!(q["flag"], "");
        let e = parse_query("run=%c3%28").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message.contains("malformed query parameter `run=%c3%28`"),
            "{e}"
        );
    }

    #[test]
    fn only_loopback_addresses_count_as_local() {
        for h in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "localhost",
            "LOCALHOST",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in [
            "0.0.0.0",
            "::",
            "192.168.1.2",
            "example.com",
            "localhost.evil.com",
            "",
        ] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn off_loopback_needs_a_token() {
        let o = BoardOptions {
            roots: vec![std::env::temp_dir()],
            host: "0.0.0.0".into(),
            port: 0,
            token: None,
            plugin_dirs: Vec::new(),
            device: "cpu".into(),
        };
        let e = bind(&o).err().unwrap();
        assert!(
            e.message
                .starts_with("--host 0.0.0.0: the board would be reachable"),
            "{e}"
        );
        let e = bind(&BoardOptions {
            token: Some("a b".into()),
            ..o.clone()
        })
        .err()
        .unwrap();
        assert!(e.message.starts_with("--token: use letters"), "{e}");
        let e = bind(&BoardOptions {
            host: "127.0.0.1".into(),
            roots: vec!["/nonexistent-board-root".into()],
            ..o
        })
        .err()
        .unwrap();
        assert!(
            e.message.starts_with("RUNS_DIR /nonexistent-board-root: "),
            "{e}"
        );
    }
}
