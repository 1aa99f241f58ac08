//! The port proxy: HTTP to a service listening inside an environment, through the API
//! (`/v1/environments/{id}/ports/{port}/...`), over a tunnel (see `hearth_app::tunnels`).
//!
//! It is outside the REST document: what it serves is the guest's own API. Only the
//! environment's owner gets through (a bearer token, or the browser session for reads).
//! Hearth's credentials never reach the guest: `Authorization`, the session cookie and
//! the CSRF header are removed. Answers carry `Content-Security-Policy: sandbox`, so a
//! page from the guest runs in an origin of its own in a browser and cannot act with the
//! visitor's Hearth session. WebSocket and other upgrades, and streamed bodies, pass
//! through.

use super::Caller;
use crate::App;
use crate::error::{ApiError, ApiResult};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

/// Largest request body passed to the guest.
pub const MAX_PROXY_BODY: usize = 64 * 1024 * 1024;

/// Headers that belong to one hop (RFC 9110, 7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Hearth's own cookies (the session, the OpenID flow) start so.
const HEARTH_COOKIES: &str = "hearth_";

/// What a proxied page may do in a browser: everything but share Hearth's origin.
const SANDBOX: &str = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads";

/// The environment, the port, and the guest's path with its query, taken from the raw
/// request path so the guest sees exactly what the client sent.
fn split_path(uri: &axum::http::Uri) -> Result<(String, u16, String), ApiError> {
    let mut segments = uri.path().splitn(7, '/');
    let (Some(""), Some("v1"), Some("environments"), Some(id), Some("ports"), Some(port)) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(ApiError::invalid(
            "expected /v1/environments/{id}/ports/{port}/...",
        ));
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::invalid("port must be a number from 1 to 65535"))?;
    let mut path = format!("/{}", segments.next().unwrap_or(""));
    if let Some(query) = uri.query() {
        path.push('?');
        path.push_str(query);
    }
    Ok((id.to_string(), port, path))
}

/// Whether the request asks to switch protocols (a WebSocket).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
}

/// The headers the guest gets: the client's, less one-hop ones and Hearth's credentials.
fn guest_headers(from: &HeaderMap, port: u16, prefix: &str) -> HeaderMap {
    let upgrade = is_upgrade(from);
    let mut headers = HeaderMap::new();
    for (name, value) in from {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || n == "authorization"
            || n == "x-csrf-token"
            || n == "host"
            || (n == "upgrade" && !upgrade)
        {
            continue;
        }
        if n == "cookie" {
            // The guest's own cookies pass; Hearth's session does not.
            let kept: Vec<&str> = value
                .to_str()
                .unwrap_or("")
                .split(';')
                .map(str::trim)
                .filter(|c| !c.is_empty() && !c.starts_with(HEARTH_COOKIES))
                .collect();
            if let Ok(v) = HeaderValue::from_str(&kept.join("; "))
                && !kept.is_empty()
            {
                headers.append(header::COOKIE, v);
            }
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if let Ok(host) = HeaderValue::from_str(&format!("localhost:{port}")) {
        headers.insert(header::HOST, host);
    }
    if let Ok(p) = HeaderValue::from_str(prefix) {
        headers.insert(HeaderName::from_static("x-forwarded-prefix"), p);
    }
    headers
}

fn bad_gateway(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "bad_gateway", message)
}

/// Any method on `/v1/environments/{id}/ports/{port}` and below.
pub async fn proxy(
    State(app): State<App>,
    Caller(user): Caller,
    mut req: Request,
) -> ApiResult<Response> {
    let (id, port, path) = split_path(req.uri())?;
    let prefix = format!("/v1/environments/{id}/ports/{port}");
    let tunnel = app.open_tunnel(&user, &id, port, "port").await?;
    let activity = tunnel.activity.clone();
    let io = TokioIo::new(tunnel.channel.into_stream());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| {
            bad_gateway(format!(
                "the service on port {port} did not speak HTTP/1: {e}"
            ))
        })?;
    // The connection lives as long as the exchange (and an upgraded stream) does; the
    // tunnel's permit with it.
    let conn_activity = activity.clone();
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
        drop(conn_activity);
    });

    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let mut out = axum::http::Request::builder()
        .method(parts.method)
        .uri(&path)
        .body(Body::new(http_body_util::Limited::new(
            body,
            MAX_PROXY_BODY,
        )))
        .map_err(|e| ApiError::invalid(format!("cannot pass this request on: {e}")))?;
    *out.headers_mut() = guest_headers(&parts.headers, port, &prefix);

    let mut answer = sender
        .send_request(out)
        .await
        .map_err(|e| bad_gateway(format!("the service on port {port} gave no answer: {e}")))?;
    activity.mark().await;

    if answer.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let guest_upgrade = hyper::upgrade::on(&mut answer);
        tokio::spawn(async move {
            let (Ok(client), Ok(guest)) = (client_upgrade.await, guest_upgrade.await) else {
                return;
            };
            let _ =
                tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(guest))
                    .await;
            drop(activity);
        });
    }

    let (mut parts, body) = answer.into_parts();
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    for name in HOP_BY_HOP {
        if !(switching && name == "connection") {
            parts.headers.remove(name);
        }
    }
    parts.headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(SANDBOX),
    );
    let body = Body::new(body.map_err(axum::Error::new));
    Ok(Response::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_path_is_the_raw_rest_with_its_query() {
        let uri: axum::http::Uri = "/v1/environments/env-1/ports/8000/a%20b/c?x=1&y=%2F"
            .parse()
            .unwrap();
        let (id, port, path) = split_path(&uri).unwrap();
        assert_eq!(
            (id.as_str(), port, path.as_str()),
            ("env-1", 8000, "/a%20b/c?x=1&y=%2F")
        );
        let (_, _, path) = split_path(&"/v1/environments/e/ports/80".parse().unwrap()).unwrap();
        assert_eq!(path, "/");
        for bad in [
            "/v1/environments/e/ports/0/",
            "/v1/environments/e/ports/70000/",
            "/v1/environments/e/ports/x/",
        ] {
            assert!(split_path(&bad.parse().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn hearths_credentials_never_reach_the_guest() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer hearth_secret"),
        );
        h.insert("x-csrf-token", HeaderValue::from_static("csrf"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("hearth_session=abc; app=1; theme=dark"),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        let out = guest_headers(&h, 3000, "/v1/environments/e/ports/3000");
        assert!(out.get(header::AUTHORIZATION).is_none());
        assert!(out.get("x-csrf-token").is_none());
        assert_eq!(out.get(header::COOKIE).unwrap(), "app=1; theme=dark");
        assert!(out.get(header::CONNECTION).is_none());
        assert_eq!(out.get("x-app").unwrap(), "kept");
        assert_eq!(out.get(header::HOST).unwrap(), "localhost:3000");
        let mut only_ours = HeaderMap::new();
        only_ours.insert(
            header::COOKIE,
            HeaderValue::from_static("hearth_session=abc"),
        );
        assert!(
            guest_headers(&only_ours, 1, "/")
                .get(header::COOKIE)
                .is_none()
        );
    }
}
