//! Signing in from a browser: a password for a session cookie, and one-time links to set
//! a password (`hearth_app::sign_in` has the rules and bounds).
//!
//! The cookie `hearth_session` is HTTP-only and `SameSite=Lax` (and `Secure` with
//! `HEARTH_SECURE_COOKIES=1`). Calls that change something with it need `X-CSRF-Token`
//! (from the sign-in answer or `GET /v1/auth/session`). The terminal WebSocket never takes
//! the cookie: it takes a ticket from a POST, which needs that token.

use super::docs::{AdminOnly, Authed, Invalid, Missing};
use super::{Admin, Body};
use crate::App;
use crate::error::{ApiError, ApiResult};
use crate::views::UserView;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub const COOKIE: &str = "hearth_session";

/// The value of cookie `name` in the request's `Cookie` headers, if any.
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    cookie_values(headers, name)
        .next()
        .map(str::to_string)
        .filter(|v| !v.is_empty())
}

/// Every value the request's `Cookie` headers give cookie `name`, in order.
pub(crate) fn cookie_values<'a>(
    headers: &'a HeaderMap,
    name: &'a str,
) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(move |(n, _)| *n == name)
        .map(|(_, value)| value)
}

/// `Set-Cookie` for an HttpOnly, `SameSite=Lax` cookie on `path` (`Secure` when the
/// server is reached over HTTPS); `None` when `value` cannot be a header's.
pub(crate) fn set_cookie(
    app: &App,
    name: &str,
    value: &str,
    path: &str,
    max_age_seconds: u64,
) -> Option<HeaderValue> {
    let secure = if app.config.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path={path}; HttpOnly; SameSite=Lax; Max-Age={max_age_seconds}{secure}"
    ))
    .ok()
}

/// The session id from the request's `Cookie` headers, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    cookie_value(headers, COOKIE)
}

/// Refuses a changing call whose `X-CSRF-Token` is not the session's.
pub fn check_csrf(method: &Method, headers: &HeaderMap, csrf: &str) -> Result<(), ApiError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let sent = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !hearth_app::sign_in::same_secret(sent, csrf) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "csrf",
            "a call with the session cookie must send its CSRF token in X-CSRF-Token (GET /v1/auth/session has it)",
        ));
    }
    Ok(())
}

fn cookie(app: &App, value: &str, max_age_seconds: u64) -> HeaderValue {
    set_cookie(app, COOKIE, value, "/", max_age_seconds).expect("a token is a valid header value")
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignInBody {
    #[schema(max_length = 254)]
    email: String,
    #[schema(max_length = 256)]
    password: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    user: UserView,
    /// Send it back in `X-CSRF-Token` on every call that changes something.
    csrf_token: String,
}

/// Signs in with an email and password: sets the session cookie.
#[utoipa::path(post, path = "/v1/auth/sign-in", tag = "auth", security(()), request_body = SignInBody,
    responses((status = 200, description = "signed in; the cookie is set", body = SessionView), Invalid,
        (status = 401, description = "wrong email or password", body = crate::error::ErrorBody),
        (status = 429, description = "too many failed sign-ins for this email lately", body = crate::error::ErrorBody)))]
pub async fn sign_in(State(app): State<App>, Body(b): Body<SignInBody>) -> ApiResult<Response> {
    let (user, session) = app.sign_in(&b.email, &b.password).await?;
    let mut response = Json(SessionView {
        user: UserView::from(&user),
        csrf_token: session.csrf,
    })
    .into_response();
    let max_age = hearth_app::sign_in::SESSION_LIFETIME.as_secs();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie(&app, &session.id, max_age));
    Ok(response)
}

/// Ends the session of the cookie and clears it.
#[utoipa::path(post, path = "/v1/auth/sign-out", tag = "auth", security(()), responses((status = 204, description = "signed out")))]
pub async fn sign_out(State(app): State<App>, headers: HeaderMap) -> ApiResult<Response> {
    if let Some(session) = session_cookie(&headers) {
        // Only a page holding the CSRF token may end a session (no cross-site sign-outs).
        if let Ok((_, csrf)) = app.session(&session).await {
            check_csrf(&Method::POST, &headers, &csrf)?;
            app.sign_out(&session).await?;
        }
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie(&app, "", 0));
    Ok(response)
}

/// The signed-in user and the session's CSRF token (for a page that was reloaded).
#[utoipa::path(get, path = "/v1/auth/session", tag = "auth", security(()),
    responses((status = 200, description = "the session", body = SessionView),
        (status = 401, description = "no session, or it ended", body = crate::error::ErrorBody)))]
pub async fn session(State(app): State<App>, headers: HeaderMap) -> ApiResult<Json<SessionView>> {
    let id = session_cookie(&headers).ok_or_else(|| ApiError::unauthenticated("not signed in"))?;
    let (user, csrf_token) = app.session(&id).await?;
    Ok(Json(SessionView {
        user: UserView::from(&user),
        csrf_token,
    }))
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetPasswordBody {
    /// The token of the link an admin made (`POST /v1/admin/users/{id}/password-link`).
    #[schema(max_length = 200)]
    token: String,
    /// 12 to 256 characters.
    #[schema(min_length = 12, max_length = 256)]
    password: String,
}

/// Sets a password with a one-time link (an invitation or a reset); ends the user's sessions.
#[utoipa::path(post, path = "/v1/auth/password", tag = "auth", security(()), request_body = SetPasswordBody,
    responses((status = 200, description = "the password is set; sign in with it", body = UserView), Invalid,
        (status = 401, description = "the link is unknown, used or expired", body = crate::error::ErrorBody)))]
pub async fn set_password(
    State(app): State<App>,
    Body(b): Body<SetPasswordBody>,
) -> ApiResult<Json<UserView>> {
    let user = app.set_password(&b.token, &b.password).await?;
    Ok(Json(UserView::from(&user)))
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PasswordLinkBody {
    /// `invite` (valid 7 days) or `reset` (1 hour).
    #[schema(pattern = "^(invite|reset)$")]
    purpose: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PasswordLinkView {
    /// For `POST /v1/auth/password`; shown this once. An earlier link of the user stops working.
    token: String,
    expires_at: String,
}

/// A one-time link with which a user sets their password.
#[utoipa::path(post, path = "/v1/admin/users/{id}/password-link", tag = "admin", params(("id" = String, Path, description = "the user's id")),
    request_body = PasswordLinkBody,
    responses((status = 201, description = "the link's token", body = PasswordLinkView), Invalid, Missing, AdminOnly, Authed))]
pub async fn password_link(
    State(app): State<App>,
    Admin(admin): Admin,
    Path(id): Path<String>,
    Body(b): Body<PasswordLinkBody>,
) -> ApiResult<(StatusCode, Json<PasswordLinkView>)> {
    let (token, expires_at) = app.password_link(&admin, &id, &b.purpose).await?;
    Ok((
        StatusCode::CREATED,
        Json(PasswordLinkView {
            token,
            expires_at: crate::views::time(expires_at),
        }),
    ))
}

const FLOW_COOKIE: &str = "hearth_oidc";

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OidcView {
    /// Whether this installation signs people in with an OpenID provider.
    enabled: bool,
    /// The provider's name for the button, when enabled.
    name: Option<String>,
}

/// Whether OpenID Connect sign-in is configured (for the sign-in page).
#[utoipa::path(get, path = "/v1/auth/oidc", tag = "auth", security(()), responses((status = 200, description = "whether it is on", body = OidcView)))]
pub async fn oidc(State(app): State<App>) -> Json<OidcView> {
    Json(OidcView {
        enabled: app.config.oidc.is_some(),
        name: app.config.oidc.as_ref().map(|c| c.name.clone()),
    })
}

fn redirect(to: &str, cookies: &[HeaderValue]) -> Response {
    let mut response =
        (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response();
    for c in cookies {
        response.headers_mut().append(header::SET_COOKIE, c.clone());
    }
    response
}

fn flow_cookie(app: &App, value: &str, max_age_seconds: u64) -> HeaderValue {
    set_cookie(app, FLOW_COOKIE, value, "/v1/auth/oidc", max_age_seconds)
        .expect("hex is a valid header value")
}

/// Sends the browser to the OpenID provider (authorization code flow with PKCE).
#[utoipa::path(get, path = "/v1/auth/oidc/start", tag = "auth", security(()),
    responses((status = 303, description = "to the provider; the flow cookie is set"),
        (status = 404, description = "OpenID Connect is not configured", body = crate::error::ErrorBody),
        (status = 503, description = "the provider's discovery failed", body = crate::error::ErrorBody)))]
pub async fn oidc_start(State(app): State<App>) -> ApiResult<Response> {
    let (url, sealed) = app.oidc_start().await?;
    Ok(redirect(
        &url,
        &[flow_cookie(
            &app,
            &sealed,
            hearth_app::oidc::FLOW_LIFETIME.as_secs(),
        )],
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    /// Set by the provider when the user or the provider refused.
    error: Option<String>,
}

/// Where the provider sends the browser back: signs in and goes to `/`, or goes to
/// `/?error=...` with the reason (the flow cookie is cleared either way).
#[utoipa::path(get, path = "/v1/auth/oidc/callback", tag = "auth", security(()), params(CallbackQuery),
    responses((status = 303, description = "to `/` signed in, or to `/?error=...`")))]
pub async fn oidc_callback(
    State(app): State<App>,
    headers: HeaderMap,
    super::Params(q): super::Params<CallbackQuery>,
) -> Response {
    let flow = cookie_value(&headers, FLOW_COOKIE);
    let clear = flow_cookie(&app, "", 0);
    let outcome = match (q.error, q.code, q.state) {
        (Some(e), _, _) => Err(hearth_app::AppError::Unauthenticated(format!(
            "the provider said: {}",
            e.chars().take(200).collect::<String>()
        ))),
        (None, Some(code), Some(state)) => app.oidc_finish(flow.as_deref(), &state, &code).await,
        _ => Err(hearth_app::AppError::Invalid(
            "the provider's answer has no code or state".into(),
        )),
    };
    match outcome {
        Ok((_, session)) => redirect(
            "/",
            &[
                clear,
                cookie(
                    &app,
                    &session.id,
                    hearth_app::sign_in::SESSION_LIFETIME.as_secs(),
                ),
            ],
        ),
        Err(e) => {
            tracing::info!(error = %e, "an OpenID sign-in was refused");
            let message: String = percent_encode(&e.to_string());
            redirect(&format!("/?error={message}"), &[clear])
        }
    }
}

/// Percent-encodes all but unreserved characters, for a query value.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
