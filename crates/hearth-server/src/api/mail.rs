//! Commands by mail over HTTP: SendGrid's Inbound Parse webhook, the caller's secret
//! sub-address, and the record of what arrived (see `hearth_app::mail`).

use super::docs::{AdminOnly, Authed, Invalid, Missing};
use super::{Admin, Caller, Params};
use crate::App;
use crate::error::{ApiError, ApiResult};
use crate::views::Page;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hearth_app::AppError;
use hearth_app::mail::{Arrival, Receipt};
use hearth_store::Mail;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// The most a webhook post may be, attachments included (the message itself is read up to
/// `hearth_mail::MAX_MESSAGE_BYTES`); larger gets 413.
pub const WEBHOOK_LIMIT: usize = 4 * 1024 * 1024;

/// The fields of SendGrid's Inbound Parse post ("raw" mode off); others (attachments) are
/// read past and ignored.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct InboundForm {
    from: Option<String>,
    to: Option<String>,
    subject: Option<String>,
    text: Option<String>,
    html: Option<String>,
    /// JSON: `{"to": ["agent@..."], "from": "..."}`.
    envelope: Option<String>,
    /// The original header block.
    headers: Option<String>,
    /// `{@example.com : pass}`.
    dkim: Option<String>,
    #[schema(rename = "SPF")]
    spf: Option<String>,
}

#[derive(Deserialize, Default, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SecretQuery {
    /// `HEARTH_MAIL_WEBHOOK_SECRET`, when it is not sent as the password of HTTP Basic
    /// authentication (`https://any:<secret>@host/v1/mail/inbound` in SendGrid's settings).
    #[param(max_length = 256)]
    secret: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct InboundView {
    /// `queued`, `duplicate` (this sender's Message-ID was taken before) or `rejected`.
    result: &'static str,
}

/// SendGrid Inbound Parse: one received message. The caller proves it is the webhook with
/// the secret; the message's sender then proves who they are (see the mail guide).
#[utoipa::path(post, path = "/v1/mail/inbound", tag = "mail", security(()), params(SecretQuery),
    request_body(content = InboundForm, content_type = "multipart/form-data"),
    responses((status = 200, description = "taken in (or recorded as rejected)", body = InboundView),
        (status = 401, description = "no or a wrong secret", body = crate::error::ErrorBody),
        (status = 413, description = "over 4 MiB", body = crate::error::ErrorBody),
        (status = 503, description = "the message could not be stored; post it again", body = crate::error::ErrorBody),
        Invalid, Missing))]
pub async fn inbound(
    state: State<App>,
    query: Params<SecretQuery>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match take_in(state, query, headers, body).await {
        Ok(view) => view.into_response(),
        Err(e) => {
            // Say how to authenticate, so clients that wait for the challenge send the secret.
            let challenge = e.status == StatusCode::UNAUTHORIZED;
            let mut response = e.into_response();
            if challenge {
                response.headers_mut().insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Basic realm=\"hearth mail webhook\""),
                );
            }
            response
        }
    }
}

async fn take_in(
    State(app): State<App>,
    Params(query): Params<SecretQuery>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<InboundView>> {
    let secret = app
        .mail
        .as_ref()
        .ok_or(AppError::NotFound(
            "mail commands (HEARTH_MAIL_ADDRESS is not set)",
        ))?
        .config
        .webhook_secret
        .clone()
        .ok_or(AppError::NotFound(
            "the mail webhook (HEARTH_MAIL_WEBHOOK_SECRET is not set)",
        ))?;
    let given = query.secret.or_else(|| basic_password(&headers));
    if !given.is_some_and(|g| hearth_app::sign_in::same_secret(&g, &secret)) {
        return Err(ApiError::unauthenticated(
            "the webhook needs its secret: HTTP Basic authentication's password, or ?secret=",
        ));
    }
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let boundary = multer::parse_boundary(content_type)
        .map_err(|_| ApiError::invalid("the body must be multipart/form-data"))?;
    let bytes = axum::body::to_bytes(body, WEBHOOK_LIMIT)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the post is over {} MiB", WEBHOOK_LIMIT / 1024 / 1024),
            )
        })?;
    let stream = futures::stream::once(async move { Ok::<_, std::convert::Infallible>(bytes) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut fields = std::collections::HashMap::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::invalid(format!("the form is unreadable: {e}")))?
    {
        let name = field.name().unwrap_or("").to_string();
        let wanted = matches!(
            name.as_str(),
            "from" | "to" | "subject" | "text" | "html" | "envelope" | "headers" | "dkim"
        );
        let value = field
            .text()
            .await
            .map_err(|e| ApiError::invalid(format!("field {name:?} is unreadable: {e}")))?;
        if wanted {
            fields.insert(name, value);
        }
    }
    let get = |k: &str| fields.get(k).map(String::as_str);
    let mut recipients: Vec<String> = get("envelope")
        .and_then(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .and_then(|e| e["to"].as_array().cloned())
        .map(|to| {
            to.iter()
                .filter_map(|t| t.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if recipients.is_empty()
        && let Some(to) = get("to")
    {
        recipients = to.split(',').filter_map(hearth_mail::address_in).collect();
    }
    recipients.truncate(16);
    let inbound = hearth_mail::parse_webhook(
        get("headers").unwrap_or(""),
        get("from"),
        get("subject"),
        get("text"),
        get("html"),
    )
    .map_err(ApiError::invalid)?;
    let receipt = app
        .receive(Arrival::Webhook {
            inbound,
            recipients: &recipients,
            dkim: get("dkim").unwrap_or(""),
        })
        .await?;
    Ok(Json(InboundView {
        result: match receipt {
            Receipt::Queued(_) => "queued",
            Receipt::Duplicate(_) => "duplicate",
            Receipt::Rejected(_) => "rejected",
        },
    }))
}

fn basic_password(headers: &HeaderMap) -> Option<String> {
    use base64::Engine;
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(text.split_once(':')?.1.to_string())
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailAddressView {
    /// Send commands here; it proves they are yours. Shown this once; a new one replaces it.
    address: String,
}

/// Makes the caller's secret sub-address (`agent+<secret>@domain`), replacing any before.
#[utoipa::path(post, path = "/v1/me/mail-address", tag = "mail",
    responses((status = 201, description = "the address, shown this once", body = MailAddressView), Missing, Authed))]
pub async fn mail_address(
    State(app): State<App>,
    Caller(user): Caller,
) -> ApiResult<(StatusCode, Json<MailAddressView>)> {
    let address = app.rotate_mail_address(&user).await?;
    Ok((StatusCode::CREATED, Json(MailAddressView { address })))
}

/// A received message and what came of it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailView {
    id: i64,
    message_id: String,
    /// `smtp` or `webhook`.
    via: String,
    sender: String,
    subject: String,
    /// `sub-address` or `dkim`; none when rejected.
    proof: Option<String>,
    command: Option<String>,
    /// `rejected`, `queued`, `done` or `failed`.
    status: String,
    /// Why it was rejected, or the answer sent.
    outcome: Option<String>,
    environment_id: Option<String>,
    received_at: String,
    replied_at: Option<String>,
}

impl From<&Mail> for MailView {
    fn from(m: &Mail) -> Self {
        MailView {
            id: m.id,
            message_id: m.message_id.clone(),
            via: m.via.clone(),
            sender: m.sender.clone(),
            subject: m.subject.clone(),
            proof: m.proof.clone(),
            command: m.command.clone(),
            status: m.status.clone(),
            outcome: m.outcome.clone(),
            environment_id: m.environment_id.clone(),
            received_at: hearth_app::events::time(m.received_at),
            replied_at: m.replied_at.map(hearth_app::events::time),
        }
    }
}

#[derive(Deserialize, Default, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct MailQuery {
    /// `nextCursor` of the page before (a number; empty means the first page).
    #[param(pattern = "^[0-9]{0,18}$")]
    cursor: Option<String>,
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
}

fn page(items: Vec<Mail>, limit: i64) -> Page<MailView> {
    let next_cursor = (items.len() as i64 == limit)
        .then(|| items.last().map(|m| m.id.to_string()))
        .flatten();
    Page {
        items: items.iter().map(MailView::from).collect(),
        next_cursor,
    }
}

fn limit_of(q: &MailQuery) -> Result<i64, ApiError> {
    match q.limit {
        None => Ok(50),
        Some(n) if (1..=200).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(format!(
            "limit must be 1 to 200, got {n}"
        ))),
    }
}

/// The caller's mail commands, newest first.
#[utoipa::path(get, path = "/v1/me/mail", tag = "mail", params(MailQuery),
    responses((status = 200, description = "a page", body = Page<MailView>), Invalid, Authed))]
pub async fn my_mail(
    State(app): State<App>,
    Caller(user): Caller,
    Params(q): Params<MailQuery>,
) -> ApiResult<Json<Page<MailView>>> {
    let limit = limit_of(&q)?;
    let before = super::number_cursor(q.cursor.as_deref())?;
    let items = app
        .store
        .mail_page(Some(&user.id), before, limit)
        .await
        .map_err(AppError::from)?;
    Ok(Json(page(items, limit)))
}

/// All mail received, rejected included, newest first.
#[utoipa::path(get, path = "/v1/admin/mail", tag = "admin", params(MailQuery),
    responses((status = 200, description = "a page", body = Page<MailView>), Invalid, Authed, AdminOnly))]
pub async fn all_mail(
    State(app): State<App>,
    Admin(_admin): Admin,
    Params(q): Params<MailQuery>,
) -> ApiResult<Json<Page<MailView>>> {
    let limit = limit_of(&q)?;
    let before = super::number_cursor(q.cursor.as_deref())?;
    let items = app
        .store
        .mail_page(None, before, limit)
        .await
        .map_err(AppError::from)?;
    Ok(Json(page(items, limit)))
}
