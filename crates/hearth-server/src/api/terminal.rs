//! The browser terminal: a WebSocket bridged to an SSH PTY in the guest.
//!
//! Binary frames carry terminal bytes both ways; text frames carry JSON control messages
//! (`{"type":"resize","cols":N,"rows":N}`). Browsers cannot set headers on a WebSocket,
//! so they first get a ticket (`POST .../terminal/ticket`, valid 60 s, sealed with the
//! master key, so any node can check it) and pass it as `?ticket=`; other clients may
//! send the bearer token instead.

use super::{Caller, Params};
use crate::App;
use crate::error::{ApiError, ApiResult};
use hearth_app::AppError;
use axum::Json;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::response::Response;
use hearth_core::EnvState;
use hearth_store::Environment;
use russh::ChannelMsg;
use serde::Deserialize;
use serde_json::Value;

const TICKET_TTL_MS: i64 = 60_000;

fn seal_ticket(app: &App, env_id: &str, user_id: &str) -> String {
    let sealed = app.master_key.seal(&format!("terminal|{env_id}|{user_id}|{}", app.now() + TICKET_TTL_MS));
    hex::encode(sealed)
}

/// The user the ticket was issued to, if it is genuine, unexpired and for this environment.
fn open_ticket(app: &App, ticket: &str, env_id: &str) -> Option<String> {
    let sealed = String::from_utf8(hex::decode(ticket).ok()?).ok()?;
    let text = app.master_key.open(&sealed).ok()?;
    let mut parts = text.split('|');
    let (kind, env, user, expiry) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?.parse::<i64>().ok()?);
    (kind == "terminal" && env == env_id && expiry >= app.now()).then(|| user.to_string())
}

/// A ticket for the terminal WebSocket (browsers cannot send headers there): valid 60 s.
#[utoipa::path(post, path = "/v1/environments/{id}/terminal/ticket", tag = "environments", params(("id" = String, Path, description = "id or slug")),
    responses((status = 200, description = "the ticket", body = crate::views::TicketView), super::docs::Missing, super::docs::Authed))]
pub async fn ticket(State(app): State<App>, Caller(user): Caller, Path(id): Path<String>) -> ApiResult<Json<crate::views::TicketView>> {
    let env = app.owned_environment(&user, &id).await?;
    Ok(Json(crate::views::TicketView { ticket: seal_ticket(&app, &env.id, &user.id), expires_in_seconds: TICKET_TTL_MS / 1000 }))
}

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TerminalQuery {
    /// From `POST .../terminal/ticket`, for clients that cannot send headers.
    ticket: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    cols: Option<u32>,
    #[param(minimum = 1, maximum = 1000)]
    rows: Option<u32>,
}

/// A WebSocket to an interactive shell on a PTY: binary frames carry terminal bytes both
/// ways, text frames JSON control messages (`{"type":"resize","cols":N,"rows":N}`).
/// Authenticated by a bearer token or `?ticket=`.
#[utoipa::path(get, path = "/v1/environments/{id}/terminal", tag = "environments",
    params(("id" = String, Path, description = "id or slug"), TerminalQuery),
    responses(
        (status = 101, description = "switched to the WebSocket protocol"),
        (status = 400, description = "not a WebSocket upgrade", body = crate::error::ErrorBody),
        super::docs::Missing, super::docs::Refused, super::docs::Authed))]
pub async fn terminal(
    State(app): State<App>,
    Path(id): Path<String>,
    Params(q): Params<TerminalQuery>,
    mut parts: Parts,
) -> ApiResult<Response> {
    let user_id = if parts.headers.contains_key(axum::http::header::AUTHORIZATION) {
        Caller::from_request_parts(&mut parts, &app).await?.0.id
    } else {
        let ticket = q.ticket.as_deref().ok_or_else(|| {
            ApiError::unauthenticated("send a bearer token or ?ticket= from POST .../terminal/ticket")
        })?;
        let env = app.store.environment_for_user_any(&id).await.map_err(|_| AppError::NotFound("environment"))?;
        open_ticket(&app, ticket, &env.id)
            .ok_or_else(|| ApiError::unauthenticated("the ticket is invalid or expired"))?
    };
    let env = app.store.environment_for_user(&user_id, &id).await.map_err(|_| AppError::NotFound("environment"))?;
    if env.state != EnvState::Running {
        return Err(AppError::InvalidState(format!("the environment is {}; a terminal needs it running", env.state)).into());
    }
    let (cols, rows) = (q.cols.unwrap_or(80).clamp(1, 1000), q.rows.unwrap_or(24).clamp(1, 1000));
    let target = app.target(&env)?;
    let channel = app.ssh.open_shell(&target, &env.environment_vars, cols, rows).await.map_err(|e| AppError::Unavailable(e.to_string()))?;
    let ws = WebSocketUpgrade::from_request_parts(&mut parts, &app)
        .await
        .map_err(|e| ApiError::invalid(format!("this endpoint needs a WebSocket upgrade: {e}")))?;
    Ok(ws.on_upgrade(move |socket| bridge(app, env, socket, channel)))
}

async fn bridge(app: App, env: Environment, mut socket: WebSocket, channel: russh::Channel<russh::client::Msg>) {
    let (mut from_guest, to_guest) = channel.split();
    let _ = app.store.touch_activity(&env.id, app.now(), "terminal").await;
    let mut last_touch = app.now();
    loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(bytes))) => {
                    if to_guest.data_bytes(bytes).await.is_err() { break; }
                    if app.now() - last_touch > 30_000 {
                        last_touch = app.now();
                        let _ = app.store.touch_activity(&env.id, last_touch, "terminal").await;
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    let Ok(control) = serde_json::from_str::<Value>(&text) else { continue };
                    if control["type"] == "resize" {
                        let cols = control["cols"].as_u64().unwrap_or(80).clamp(1, 1000) as u32;
                        let rows = control["rows"].as_u64().unwrap_or(24).clamp(1, 1000) as u32;
                        let _ = to_guest.window_change(cols, rows, 0, 0).await;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            msg = from_guest.wait() => match msg {
                Some(ChannelMsg::Data { data }) | Some(ChannelMsg::ExtendedData { data, .. }) => {
                    if socket.send(Message::Binary(data.to_vec().into())).await.is_err() { break; }
                }
                Some(ChannelMsg::ExitStatus { .. }) | Some(ChannelMsg::Eof) | Some(ChannelMsg::Close) | None => break,
                Some(_) => {}
            },
        }
    }
    let _ = to_guest.close().await;
    let _ = socket.send(Message::Close(None)).await;
    let _ = app.store.touch_activity(&env.id, app.now(), "terminal").await;
}
