//! The page and its assets, embedded at build time: nothing is read from disk or downloaded to serve them.
//! `vendor/` holds uPlot (MIT, `vendor/uPlot-LICENSE`), fetched by `scripts/fetch-uplot.sh` at a pinned version.

/// One embedded file.
pub struct Asset {
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The bytes.
    pub bytes: &'static [u8],
}

const TABLE: &[(&str, Asset)] = &[
    (
        "/",
        Asset {
            content_type: "text/html; charset=utf-8",
            bytes: include_bytes!("../assets/index.html"),
        },
    ),
    (
        "/assets/board.js",
        Asset {
            content_type: "text/javascript; charset=utf-8",
            bytes: include_bytes!("../assets/board.js"),
        },
    ),
    (
        "/assets/board.css",
        Asset {
            content_type: "text/css; charset=utf-8",
            bytes: include_bytes!("../assets/board.css"),
        },
    ),
    (
        "/assets/uPlot.iife.min.js",
        Asset {
            content_type: "text/javascript; charset=utf-8",
            bytes: include_bytes!("../assets/vendor/uPlot.iife.min.js"),
        },
    ),
    (
        "/assets/uPlot.min.css",
        Asset {
            content_type: "text/css; charset=utf-8",
            bytes: include_bytes!("../assets/vendor/uPlot.min.css"),
        },
    ),
    (
        "/assets/uPlot-LICENSE.txt",
        Asset {
            content_type: "text/plain; charset=utf-8",
            bytes: include_bytes!("../assets/vendor/uPlot-LICENSE"),
        },
    ),
];

/// The embedded file served at `path` (`/index.html` is `/`).
pub fn get(path: &str) -> Option<&'static Asset> {
    let path = if path == "/index.html" { "/" } else { path };
    TABLE.iter().find(|(p, _)| *p == path).map(|(_, a)| a)
}
