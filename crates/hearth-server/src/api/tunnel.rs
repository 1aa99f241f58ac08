//! The tunnel WebSocket: a TCP connection to a port inside an environment, carried over
//! the API (`hearth ssh --stdio`, `hearth port-forward`, and an SSH client's
//! `ProxyCommand` stand on it).
//!
//! Binary frames carry the connection's bytes both ways. A text frame
//! `{"type":"eof"}` says that side will send no more (TCP's half-close); the connection
//! ends when either side closes the socket. Each direction runs on its own, so a side
//! that stops reading stalls only what it is sent (SSH's window back-pressures the
//! guest; the socket back-pressures the client), never the other direction.

use super::Caller;
use crate::App;
use crate::error::{ApiError, ApiResult};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use hearth_app::tunnels::Tunnel;
use russh::ChannelMsg;
use std::time::Duration;

/// The largest binary frame accepted from a client (the guest's side is cut to SSH's
/// packets, 32 KiB).
const MAX_FRAME: usize = 256 * 1024;
/// How long the client has to close its side once the guest's side has closed.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// The server pings the client this often; a client that sends nothing at all (pongs
/// included) for SILENT_LIMIT is taken for gone (a laptop asleep), and its tunnel closed.
const PING_EVERY: Duration = Duration::from_secs(30);
const SILENT_LIMIT: Duration = Duration::from_secs(90);

/// A WebSocket carrying one TCP connection to `127.0.0.1:{port}` inside the caller's
/// running environment, made by the guest's sshd on Hearth's SSH connection (no guest port
/// is published). Binary frames carry bytes both ways; a text frame `{"type":"eof"}`
/// half-closes that side. A bearer token only (no browser session). Counts as activity. Refused (before the upgrade) when nothing
/// listens on the port, with 503 and the reason.
#[utoipa::path(get, path = "/v1/environments/{id}/tunnel/{port}", tag = "environments",
    params(("id" = String, Path, description = "id or slug"),
           ("port" = u16, Path, description = "a TCP port inside the environment, 1 to 65535", minimum = 1, maximum = 65535)),
    responses(
        (status = 101, description = "switched to the WebSocket protocol"),
        (status = 400, description = "not a WebSocket upgrade, or a bad port", body = crate::error::ErrorBody),
        (status = 429, description = "too many tunnels open", body = crate::error::ErrorBody),
        (status = 503, description = "nothing accepted the connection in the environment, or it cannot be reached", body = crate::error::ErrorBody),
        super::docs::Missing, super::docs::Refused, super::docs::Authed))]
pub async fn tunnel(
    State(app): State<App>,
    Path((id, port)): Path<(String, String)>,
    mut parts: Parts,
) -> ApiResult<Response> {
    // A bearer token only, never the browser's cookie: a page on a sibling site could
    // make the browser open this WebSocket with it (SameSite=Lax allows that), and reach
    // any port of the victim's environment.
    if !parts
        .headers
        .contains_key(axum::http::header::AUTHORIZATION)
    {
        return Err(ApiError::unauthenticated(
            "a tunnel needs an Authorization: Bearer <token> header",
        ));
    }
    let Caller(user) = Caller::from_request_parts(&mut parts, &app).await?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::invalid("port must be a number from 1 to 65535"))?;
    let ws = WebSocketUpgrade::from_request_parts(&mut parts, &app)
        .await
        .map_err(|e| ApiError::invalid(format!("this endpoint needs a WebSocket upgrade: {e}")))?;
    let tunnel = app.open_tunnel(&user, &id, port).await?;
    Ok(ws
        .max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        .on_upgrade(move |socket| bridge(socket, tunnel)))
}

fn eof_message() -> Message {
    Message::Text(r#"{"type":"eof"}"#.into())
}

async fn bridge(socket: WebSocket, tunnel: Tunnel) {
    let Tunnel {
        environment,
        channel,
        activity,
        ..
    } = tunnel;
    let (mut from_guest, to_guest) = channel.split();
    let to_guest = &to_guest;
    let (mut to_client, mut from_client) = socket.split();
    let up_activity = activity.clone();
    // Client to guest: ends when the client closes, goes away, or answers nothing (not
    // even the pings below) for SILENT_LIMIT.
    let up = async move {
        let mut guest_open = true;
        loop {
            let msg = match tokio::time::timeout(SILENT_LIMIT, from_client.next()).await {
                Ok(Some(msg)) => msg,
                Ok(None) | Err(_) => break,
            };
            match msg {
                Ok(Message::Binary(bytes)) if guest_open => {
                    // Once the guest's side is gone the client's bytes are read and
                    // dropped until it closes, so nothing it still receives is cut off.
                    guest_open = to_guest.data_bytes(bytes).await.is_ok();
                    up_activity.mark().await;
                }
                Ok(Message::Text(text)) => {
                    if serde_json::from_str::<serde_json::Value>(&text)
                        .is_ok_and(|v| v["type"] == "eof")
                    {
                        let _ = to_guest.eof().await;
                    }
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    // Guest to client, with a ping every PING_EVERY: ends when the guest's side closes.
    let down = async move {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = from_guest.wait() => match msg {
                    Some(ChannelMsg::Data { data }) => {
                        if to_client.send(Message::Binary(data.to_vec().into())).await.is_err() {
                            return;
                        }
                        activity.mark().await;
                    }
                    Some(ChannelMsg::Eof) => {
                        if to_client.send(eof_message()).await.is_err() {
                            return;
                        }
                    }
                    Some(ChannelMsg::Close) | None => break,
                    Some(_) => {}
                },
                _ = ping.tick() => {
                    if to_client.send(Message::Ping(Default::default())).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = to_client.send(Message::Close(None)).await;
    };
    tokio::pin!(up, down);
    tokio::select! {
        () = &mut up => {}
        () = &mut down => {
            // The guest closed: let the client close its side, within a grace period.
            let _ = tokio::time::timeout(CLOSE_GRACE, up).await;
        }
    }
    // The channel's halves do not close it when dropped.
    let _ = to_guest.close().await;
    tracing::debug!(environment = %environment.id, "tunnel closed");
}
