//! The web UI: the files `make ui` builds into `ui/dist`, inside the binary (read from disk
//! in debug builds). Without them (a plain `cargo build`) every page says how to build
//! them. Pages are under `/`; everything else the UI needs comes from the API.

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

#[derive(rust_embed::Embed)]
#[folder = "../../ui/dist"]
#[allow_missing = true]
struct Assets;

const NOT_BUILT: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Hearth</title></head>\
<body><main><h1>Hearth's web UI is not built into this binary</h1>\
<p>Build it with <code>make ui</code> (it needs Node.js and npm), then <code>cargo build</code> again. \
The API works without it: <a href=\"/openapi.json\">/openapi.json</a>.</p></main></body></html>";

fn asset(path: &str) -> Option<Response> {
    let file = Assets::get(path)?;
    let mime = file.metadata.mimetype().to_string();
    // Hashed names never change; the page itself is always revalidated.
    let cache = if path == "index.html" {
        "no-cache"
    } else {
        "public, max-age=31536000, immutable"
    };
    Some(
        (
            [
                (header::CONTENT_TYPE, mime),
                (header::CACHE_CONTROL, cache.to_string()),
            ],
            file.data.into_owned(),
        )
            .into_response(),
    )
}

async fn page() -> Response {
    asset("index.html").unwrap_or_else(|| (StatusCode::OK, Html(NOT_BUILT)).into_response())
}

async fn file(axum::extract::Path(path): axum::extract::Path<String>) -> Response {
    asset(&format!("assets/{path}")).unwrap_or_else(|| StatusCode::NOT_FOUND.into_response())
}

/// `/` and the UI's own paths serve the page (it routes in the browser); `/assets/*` the files.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(page))
        .route("/ui", get(page))
        .route("/ui/{*rest}", get(page))
        .route("/assets/{*path}", get(file))
}
