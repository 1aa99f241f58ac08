//! The browser terminal: a WebSocket bridged to an SSH PTY in the guest.
//!
//! Binary frames carry terminal bytes both ways; text frames carry JSON control messages
//! (`{"type":"resize","cols":N,"rows":N}`). Browsers cannot set headers on a WebSocket,
//! so they first get a ticket (`POST .../terminal/ticket`, valid 60 s and for one
//! terminal, sealed with the master key, so any node can check it) and pass it as `?ticket=`; other clients may
//! send the bearer token instead.

use super::{Caller, Params};
use crate::App;
use crate::error::{ApiError, ApiResult};
use axum::Json;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::response::Response;
use hearth_app::AppError;
use hearth_core::EnvState;
use hearth_store::Environment;
use russh::ChannelMsg;
use serde::Deserialize;
use serde_json::Value;

const TICKET_TTL_MS: i64 = 60_000;

fn seal_ticket(app: &App, env_id: &str, user_id: &str) -> String {
    // The nonce makes every ticket distinct, so using one never spends another.
    let nonce = &hearth_store::generate_token()[7..39];
    let sealed = app.master_key.seal(&format!(
        "terminal|{env_id}|{user_id}|{}|{nonce}",
        app.now() + TICKET_TTL_MS
    ));
    hex::encode(sealed)
}

/// What a genuine, unexpired ticket says.
struct Ticket {
    environment_id: String,
    user_id: String,
    expires_at: i64,
}

/// Opens a ticket without looking anything up, so a bad ticket learns nothing about
/// which environments exist.
fn open_ticket(app: &App, ticket: &str) -> Option<Ticket> {
    let sealed = String::from_utf8(hex::decode(ticket).ok()?).ok()?;
    let text = app.master_key.open(&sealed).ok()?;
    let mut parts = text.split('|');
    let (kind, env, user, expiry) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?.parse::<i64>().ok()?,
    );
    (kind == "terminal" && expiry >= app.now()).then(|| Ticket {
        environment_id: env.to_string(),
        user_id: user.to_string(),
        expires_at: expiry,
    })
}

/// A ticket for the terminal WebSocket (browsers cannot send headers there): valid 60 s.
#[utoipa::path(post, path = "/v1/environments/{id}/terminal/ticket", tag = "environments", params(("id" = String, Path, description = "id or slug")),
    responses((status = 200, description = "the ticket", body = crate::views::TicketView), super::docs::Missing, super::docs::Authed))]
pub async fn ticket(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<crate::views::TicketView>> {
    let env = app.owned_environment(&user, &id).await?;
    Ok(Json(crate::views::TicketView {
        ticket: seal_ticket(&app, &env.id, &user.id),
        expires_in_seconds: TICKET_TTL_MS / 1000,
    }))
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
/// Authenticated by a bearer token or `?ticket=` (single use). When the guest cannot be
/// reached, the socket closes at once with code 1011 and the reason.
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
    let (user_id, ticket) = if parts
        .headers
        .contains_key(axum::http::header::AUTHORIZATION)
    {
        (
            Caller::from_request_parts(&mut parts, &app).await?.0.id,
            None,
        )
    } else {
        let raw = q.ticket.as_deref().ok_or_else(|| {
            ApiError::unauthenticated(
                "send a bearer token or ?ticket= from POST .../terminal/ticket",
            )
        })?;
        let ticket = open_ticket(&app, raw)
            .ok_or_else(|| ApiError::unauthenticated("the ticket is invalid or expired"))?;
        (
            ticket.user_id.clone(),
            Some((ticket, hearth_store::hash_token(raw))),
        )
    };
    let env = app
        .store
        .environment_for_user(&user_id, &id)
        .await
        .map_err(|_| AppError::NotFound("environment"))?;
    if let Some((ticket, _)) = &ticket
        && ticket.environment_id != env.id
    {
        return Err(ApiError::unauthenticated(
            "the ticket is for another environment",
        ));
    }
    if env.state != EnvState::Running {
        return Err(AppError::InvalidState(format!(
            "the environment is {}; a terminal needs it running",
            env.state
        ))
        .into());
    }
    let ws = WebSocketUpgrade::from_request_parts(&mut parts, &app)
        .await
        .map_err(|e| ApiError::invalid(format!("this endpoint needs a WebSocket upgrade: {e}")))?;
    // Spent only once everything else held, so a refused attempt does not burn it.
    if let Some((ticket, hash)) = &ticket
        && !app
            .store
            .use_ticket(hash, ticket.expires_at)
            .await
            .map_err(AppError::from)?
    {
        return Err(ApiError::unauthenticated(
            "the ticket was used already; ask for a new one",
        ));
    }
    let (cols, rows) = (
        q.cols.unwrap_or(80).clamp(1, 1000),
        q.rows.unwrap_or(24).clamp(1, 1000),
    );
    let target = app.target(&env)?;
    // The shell opens only once the upgrade is done: a plain GET leaves nothing behind.
    Ok(ws.on_upgrade(move |mut socket| async move {
        match app
            .ssh
            .open_shell(&target, &env.environment_vars, cols, rows)
            .await
        {
            Ok(channel) => bridge(app, env, socket, channel).await,
            Err(e) => {
                tracing::warn!(environment = %env.id, error = %e, "cannot open a terminal");
                let reason = format!("cannot reach the environment: {e}")
                    .chars()
                    .take(120)
                    .collect::<String>();
                let _ = socket
                    .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                        code: 1011,
                        reason: reason.into(),
                    })))
                    .await;
            }
        }
    }))
}

async fn bridge(
    app: App,
    env: Environment,
    mut socket: WebSocket,
    channel: russh::Channel<russh::client::Msg>,
) {
    let (mut from_guest, to_guest) = channel.split();
    let _ = app
        .store
        .touch_activity(&env.id, app.now(), "terminal")
        .await;
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
    let _ = app
        .store
        .touch_activity(&env.id, app.now(), "terminal")
        .await;
}
