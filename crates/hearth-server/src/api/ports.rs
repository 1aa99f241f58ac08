//! The port proxy: HTTP to a service listening inside an environment, through the API
//! (`/v1/environments/{id}/ports/{port}/...`), over a kept connection to the guest: straight
//! to a local container's address, else a tunnel through its sshd (see
//! `hearth_app::tunnels`).
//!
//! It is outside the REST document: what it serves is the guest's own API. The
//! environment's owner gets through (a bearer token, or the browser session for reads);
//! so does anyone when the owner shared the port with everyone, and whoever holds a share
//! token at `/v1/shared/{token}/...` (see `hearth_app::shares`).
//! Hearth's credentials never reach the guest: `Authorization: Bearer`, the session cookie
//! and the CSRF header are removed. An `Authorization` of any other scheme (a guest app's
//! own `Basic` sign-in) is the guest's: it passes through, and Hearth then takes the
//! caller from the session cookie or the port's public share. Answers carry
//! `Content-Security-Policy: sandbox`, so a page from the guest runs in an origin of its
//! own in a browser and cannot act with the visitor's Hearth session. WebSocket and other upgrades, and streamed bodies, pass
//! through.

use super::Caller;
use crate::App;
use crate::error::{ApiError, ApiResult};
use axum::Extension;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::Response;
use hearth_app::tunnels::{PortConnection, PortUse};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_util::either::Either;

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
pub fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
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
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
}

/// The headers the guest gets: the client's, less one-hop ones and Hearth's credentials.
fn guest_headers(from: &HeaderMap, port: u16, via: Via<'_>) -> HeaderMap {
    let upgrade = is_upgrade(from);
    let mut headers = HeaderMap::new();
    for (name, value) in from {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || (n == "authorization" && super::hearths_authorization(value))
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
    match via {
        Via::Path(prefix) => {
            if let Ok(p) = HeaderValue::from_str(prefix) {
                headers.insert(HeaderName::from_static("x-forwarded-prefix"), p);
            }
        }
        Via::Preview { host, scheme } => {
            if let Ok(h) = HeaderValue::from_str(host) {
                headers.insert(HeaderName::from_static("x-forwarded-host"), h);
            }
            if let Ok(p) = HeaderValue::from_str(scheme) {
                headers.insert(HeaderName::from_static("x-forwarded-proto"), p);
            }
        }
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

/// Kept HTTP/1 connections to services in guests, each over a tunnel of its own, reused
/// by later requests to the same port of the same environment: a request then costs no
/// channel to open and no connection for the guest to accept. At most
/// `MAX_IDLE_PER_PORT` idle connections are kept per port, each closed after
/// `IDLE_TIMEOUT` unused, and 256 in all per environment (in use or idle, see
/// `hearth_app::tunnels`). A VM that stops ends them when its SSH connection ends.
#[derive(Clone)]
pub struct GuestClient(Client<GuestConnector, Body>);

/// Idle connections kept to one port of one environment.
pub const MAX_IDLE_PER_PORT: usize = 8;
/// How long an idle connection to a guest is kept.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl GuestClient {
    pub fn new(app: App) -> GuestClient {
        GuestClient(
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(IDLE_TIMEOUT)
                .pool_max_idle_per_host(MAX_IDLE_PER_PORT)
                .pool_timer(TokioTimer::new())
                .set_host(false)
                .build(GuestConnector(app)),
        )
    }
}

/// Opens a connection for the pool: `http://<environment id>:<port>` names its far end.
/// Whose the environment is was checked by the `PortUse` of the request that needs it.
#[derive(Clone)]
pub struct GuestConnector(App);

/// Why no connection could be opened, as the API says it.
#[derive(Debug)]
struct ConnectFailed(ApiError);

impl std::fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl std::error::Error for ConnectFailed {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for GuestConnector {
    type Response = GuestStream;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<GuestStream, BoxError>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let app = self.0.clone();
        Box::pin(async move {
            let (Some(id), Some(port)) = (uri.host(), uri.port_u16()) else {
                return Err(format!("not a guest address: {uri}").into());
            };
            let (connection, permit) = app
                .port_connection(id, port)
                .await
                .map_err(|e| Box::new(ConnectFailed(e.into())) as BoxError)?;
            let io = match connection {
                PortConnection::Direct(stream) => Either::Left(stream),
                PortConnection::Tunnel(channel) => Either::Right(channel.into_stream()),
            };
            Ok(GuestStream {
                io: TokioIo::new(io),
                _permit: permit,
            })
        })
    }
}

/// One connection to a port in a guest, holding its place among the environment's: a
/// socket straight to the guest, or a `direct-tcpip` channel through its sshd (see
/// `App::port_connection`).
pub struct GuestStream {
    io: TokioIo<Either<tokio::net::TcpStream, russh::ChannelStream<russh::client::Msg>>>,
    _permit: hearth_app::tunnels::Permit,
}

impl Connection for GuestStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for GuestStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for GuestStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Any method on `/v1/environments/{id}/ports/{port}` and below.
pub async fn proxy(
    State(app): State<App>,
    Extension(client): Extension<GuestClient>,
    req: Request,
) -> ApiResult<Response> {
    let (id, port, path) = split_path(req.uri())?;
    let (mut parts, body) = req.into_parts();
    // Another scheme than Bearer is the guest's own: set aside while Hearth finds the caller.
    let guests = parts
        .headers
        .get(header::AUTHORIZATION)
        .filter(|h| !super::hearths_authorization(h))
        .cloned();
    if guests.is_some() {
        parts.headers.remove(header::AUTHORIZATION);
    }
    let credentials = parts.headers.contains_key(header::AUTHORIZATION)
        || super::auth::session_cookie(&parts.headers).is_some();
    let usage = match Caller::from_request_parts(&mut parts, &app).await {
        Ok(Caller(user)) => {
            if is_upgrade(&parts.headers) && !parts.headers.contains_key(header::AUTHORIZATION) {
                same_origin(&parts.headers)?;
            }
            app.use_port(&user, &id, port).await?
        }
        // No credentials at all: a port shared with everyone is anyone's.
        Err(refused) => match app.use_public_port(&id, port).await? {
            Some(usage) if !credentials => usage,
            _ => return Err(refused),
        },
    };
    if let Some(guests) = guests {
        parts.headers.insert(header::AUTHORIZATION, guests);
    }
    let prefix = format!("/v1/environments/{id}/ports/{port}");
    forward(
        &client,
        usage,
        Request::from_parts(parts, body),
        &path,
        Via::Path(&prefix),
    )
    .await
}

/// Any method on `/v1/shared/{token}` and below: the port a share token opens, for
/// whoever holds the token (no other credentials).
pub async fn shared(
    State(app): State<App>,
    Extension(client): Extension<GuestClient>,
    req: Request,
) -> ApiResult<Response> {
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
    let usage = app.shared_by_token(&token).await?;
    forward(
        &client,
        usage,
        req,
        &path,
        Via::Path(&format!("/v1/shared/{token}")),
    )
    .await
}

/// How the client reached the port.
#[derive(Clone, Copy)]
pub enum Via<'a> {
    /// Under a path of Hearth's origin (the prefix the guest's paths are under): answers
    /// are sandboxed, since a page there would share Hearth's origin.
    Path(&'a str),
    /// At a preview host of its own (`previews`), over `scheme`: an origin of its own.
    Preview { host: &'a str, scheme: &'a str },
}

/// Passes `req` to the service `usage` reaches as `path`, and its answer back.
pub async fn forward(
    client: &GuestClient,
    usage: PortUse,
    mut req: Request,
    path: &str,
    via: Via<'_>,
) -> ApiResult<Response> {
    let port = usage.port;
    let activity = usage.activity;
    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let mut out = axum::http::Request::builder()
        .method(parts.method)
        .uri(format!("http://{}:{port}{path}", usage.environment_id))
        .body(Body::new(http_body_util::Limited::new(
            body,
            MAX_PROXY_BODY,
        )))
        .map_err(|e| ApiError::invalid(format!("cannot pass this request on: {e}")))?;
    *out.headers_mut() = guest_headers(&parts.headers, port, via);

    let mut answer = client
        .0
        .request(out)
        .await
        .map_err(|e| unanswered(port, &e))?;
    activity.mark().await;

    if answer.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let guest_upgrade = hyper::upgrade::on(&mut answer);
        let activity = activity.clone();
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
    if let Via::Path(_) = via {
        parts.headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(SANDBOX),
        );
    }
    // The request holds its place among the user's connections until its answer's body
    // is over (the closure owns `activity` as long as the body lives).
    let body = Body::new(body.map_err(move |e| {
        let _held = &activity;
        axum::Error::new(e)
    }));
    Ok(Response::from_parts(parts, body))
}

/// Why the guest gave no answer: the connector's own reason (nothing listens, the
/// environment stopped), or what broke on the way.
fn unanswered(port: u16, e: &hyper_util::client::legacy::Error) -> ApiError {
    let mut source = std::error::Error::source(e);
    let mut chain = String::new();
    while let Some(cause) = source {
        if let Some(ConnectFailed(failed)) = cause.downcast_ref::<ConnectFailed>() {
            return ApiError::new(failed.status, failed.code, failed.message.clone());
        }
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    bad_gateway(format!(
        "the service on port {port} gave no answer: {e}{chain}"
    ))
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
        let out = guest_headers(&h, 3000, Via::Path("/v1/environments/e/ports/3000"));
        assert!(out.get(header::AUTHORIZATION).is_none());
        // Bearer in any case, or nothing readable, is Hearth's; another scheme the app's.
        for (value, hearths) in [
            ("Bearer hearth_secret", true),
            ("bearer hearth_secret", true),
            ("BEARER", true),
            ("", true),
            ("Basic dXNlcjpwdw==", false),
            ("Digest username=\"u\"", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            let out = guest_headers(&h, 3000, Via::Path("/v1/environments/e/ports/3000"));
            assert_eq!(
                out.get(header::AUTHORIZATION).is_none(),
                hearths,
                "{value:?}"
            );
        }
        let unreadable = HeaderValue::from_bytes(b"Basic \xff").unwrap();
        assert!(super::super::hearths_authorization(&unreadable));
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
            guest_headers(&only_ours, 1, Via::Path("/"))
                .get(header::COOKIE)
                .is_none()
        );
    }
}
