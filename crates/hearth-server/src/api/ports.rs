//! The port proxy: HTTP to a service listening inside an environment, through the API
//! (`/v1/environments/{id}/ports/{port}/...`), over a tunnel (see `hearth_app::tunnels`).
//!
//! It is outside the REST document: what it serves is the guest's own API. The
//! environment's owner gets through (a bearer token, or the browser session for reads);
//! so does anyone when the owner shared the port with everyone, and whoever holds a share
//! token at `/v1/shared/{token}/...` (see `hearth_app::shares`).
//! Hearth's credentials never reach the guest: `Authorization`, the session cookie and
//! the CSRF header are removed. Answers carry `Content-Security-Policy: sandbox`, so a
//! page from the guest runs in an origin of its own in a browser and cannot act with the
//! visitor's Hearth session. WebSocket and other upgrades, and streamed bodies, pass
//! through.

use super::Caller;
use crate::App;
use crate::error::{ApiError, ApiResult};
use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
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

/// A WebSocket opened with the browser's session must come from a page of Hearth's own
/// origin: another site's page could otherwise open it with the visitor's cookie
/// (cross-site WebSocket hijacking; `SameSite=Lax` lets sibling sites through).
fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let origin_host = headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .and_then(|o| o.split_once("://"))
        .map(|(_, host)| host);
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (origin_host, host) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a WebSocket with the browser's session must come from this server's own pages; other clients send a bearer token",
        )),
    }
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

/// What a guest may not do to a browser on Hearth's origin: set or clear Hearth's own
/// cookies (which could sign the visitor in as someone else), or wipe the origin's data.
fn guest_answer_headers(headers: &mut HeaderMap) {
    let cookies: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|c| {
            let name = c.to_str().unwrap_or("").trim_start();
            !name.to_ascii_lowercase().starts_with(HEARTH_COOKIES)
        })
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for c in cookies {
        headers.append(header::SET_COOKIE, c);
    }
    headers.remove(HeaderName::from_static("clear-site-data"));
}

fn bad_gateway(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "bad_gateway", message)
}

/// Any method on `/v1/environments/{id}/ports/{port}` and below.
pub async fn proxy(State(app): State<App>, req: Request) -> ApiResult<Response> {
    let (id, port, path) = split_path(req.uri())?;
    let (mut parts, body) = req.into_parts();
    let credentials = parts.headers.contains_key(header::AUTHORIZATION)
        || super::auth::session_cookie(&parts.headers).is_some();
    let tunnel = match Caller::from_request_parts(&mut parts, &app).await {
        Ok(Caller(user)) => {
            if is_upgrade(&parts.headers) && !parts.headers.contains_key(header::AUTHORIZATION) {
                same_origin(&parts.headers)?;
            }
            app.open_tunnel(&user, &id, port, "port").await?
        }
        // No credentials at all: a port shared with everyone is anyone's.
        Err(refused) => match app.public_tunnel(&id, port).await? {
            Some(tunnel) if !credentials => tunnel,
            _ => return Err(refused),
        },
    };
    let prefix = format!("/v1/environments/{id}/ports/{port}");
    forward(
        tunnel,
        Request::from_parts(parts, body),
        port,
        &path,
        &prefix,
    )
    .await
}

/// Any method on `/v1/shared/{token}` and below: the port a share token opens, for
/// whoever holds the token (no other credentials).
pub async fn shared(State(app): State<App>, req: Request) -> ApiResult<Response> {
    let mut segments = req.uri().path().splitn(5, '/');
    let (Some(""), Some("v1"), Some("shared"), Some(token)) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(ApiError::invalid("expected /v1/shared/{token}/..."));
    };
    let mut path = format!("/{}", segments.next().unwrap_or(""));
    if let Some(query) = req.uri().query() {
        path.push('?');
        path.push_str(query);
    }
    let token = token.to_string();
    let tunnel = app.shared_by_token(&token).await?;
    let port = tunnel.port;
    forward(tunnel, req, port, &path, &format!("/v1/shared/{token}")).await
}

/// Passes `req` to the service at the far end of `tunnel` as `path`, and its answer back.
async fn forward(
    tunnel: hearth_app::tunnels::Tunnel,
    mut req: Request,
    port: u16,
    path: &str,
    prefix: &str,
) -> ApiResult<Response> {
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
        .uri(path)
        .body(Body::new(http_body_util::Limited::new(
            body,
            MAX_PROXY_BODY,
        )))
        .map_err(|e| ApiError::invalid(format!("cannot pass this request on: {e}")))?;
    *out.headers_mut() = guest_headers(&parts.headers, port, prefix);

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
            let (mut client, mut guest) = (TokioIo::new(client), TokioIo::new(guest));
            // An open upgraded connection (a notebook's WebSocket) is use: it keeps the
            // environment from idle-stopping.
            let mut every = tokio::time::interval(std::time::Duration::from_secs(30));
            let copy = tokio::io::copy_bidirectional(&mut client, &mut guest);
            tokio::pin!(copy);
            loop {
                tokio::select! {
                    _ = &mut copy => break,
                    _ = every.tick() => activity.mark().await,
                }
            }
        });
    }

    let (mut parts, body) = answer.into_parts();
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    for name in HOP_BY_HOP {
        if !(switching && name == "connection") {
            parts.headers.remove(name);
        }
    }
    if !switching {
        parts.headers.remove(header::UPGRADE);
    }
    guest_answer_headers(&mut parts.headers);
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
    fn a_cookie_websocket_must_come_from_our_own_pages() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("hearth.example.com"));
        assert!(same_origin(&h).is_err(), "no Origin");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example.com"),
        );
        assert!(same_origin(&h).is_err());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://hearth.example.com"),
        );
        assert!(same_origin(&h).is_ok());
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
        let mut answer = HeaderMap::new();
        answer.append(
            header::SET_COOKIE,
            HeaderValue::from_static("hearth_session=evil; Path=/"),
        );
        answer.append(
            header::SET_COOKIE,
            HeaderValue::from_static("Hearth_Session=evil"),
        );
        answer.append(
            header::SET_COOKIE,
            HeaderValue::from_static("app=1; Path=/"),
        );
        answer.insert("clear-site-data", HeaderValue::from_static("\"cookies\""));
        guest_answer_headers(&mut answer);
        let set: Vec<_> = answer.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(set, ["app=1; Path=/"]);
        assert!(answer.get("clear-site-data").is_none());
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
