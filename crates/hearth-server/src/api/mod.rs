//! The HTTP API: routing, authentication and body parsing. Handlers are thin: parse,
//! authorize, call one service function, map the result.

mod admin;
mod environments;
mod hosts;
mod me;
mod ops;
mod terminal;

use crate::App;
use crate::error::ApiError;
use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::routing::{get, patch, post};
use hearth_core::Role;
use hearth_store::User;
use serde::de::DeserializeOwned;

/// Largest accepted request body. Commands may be up to 256 KiB.
pub const BODY_LIMIT: usize = 512 * 1024;

pub fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/openapi.json", get(ops::openapi))
        .route("/metrics", get(ops::metrics))
        .route("/v1/flavors", get(ops::flavors))
        .route("/v1/regions", get(ops::regions))
        .route("/v1/me", get(me::me))
        .route("/v1/me/vm", get(me::get_vm).post(me::provision).delete(me::destroy))
        .route("/v1/me/vm/start", post(me::start))
        .route("/v1/me/vm/stop", post(me::stop))
        .route("/v1/me/vm/exec", post(me::exec))
        .route("/v1/me/vm/logs", get(me::logs))
        .route("/v1/me/vm/events", get(me::events))
        .route("/v1/me/vm/exec/stream", post(me::exec_stream))
        .route("/v1/environments", post(environments::create).get(environments::list))
        .route("/v1/environments/{id}", get(environments::get).delete(environments::destroy))
        .route("/v1/environments/{id}/wait", get(environments::wait))
        .route("/v1/environments/{id}/start", post(environments::start))
        .route("/v1/environments/{id}/stop", post(environments::stop))
        .route("/v1/environments/{id}/exec", post(environments::exec))
        .route("/v1/environments/{id}/executions", get(environments::executions))
        .route("/v1/environments/{id}/audit", get(environments::audit))
        .route("/v1/environments/{id}/logs", get(environments::logs))
        .route("/v1/environments/{id}/activity", get(environments::activity))
        .route("/v1/environments/{id}/keepalive", post(environments::keepalive))
        .route("/v1/environments/{id}/events", get(environments::events))
        .route("/v1/environments/{id}/exec/stream", post(environments::exec_stream))
        .route("/v1/environments/{id}/terminal", get(terminal::terminal))
        .route("/v1/environments/{id}/terminal/ticket", post(terminal::ticket))
        .route("/v1/admin/users", post(admin::create_user).get(admin::list_users))
        .route("/v1/admin/users/{id}", patch(admin::patch_user))
        .route("/v1/admin/vms", get(admin::vms))
        .route("/v1/admin/environments", get(admin::environments))
        .route("/v1/admin/environments/{id}", axum::routing::delete(admin::destroy_environment))
        .route("/v1/admin/jobs", get(admin::jobs))
        .route("/v1/admin/jobs/{id}/retry", post(admin::retry_job))
        .route("/v1/admin/hosts", get(hosts::list).post(hosts::add))
        .route("/v1/admin/hosts/{id}", get(hosts::get).patch(hosts::update).delete(hosts::remove))
        .route("/v1/admin/hosts/{id}/drain", post(hosts::drain))
        .route("/v1/admin/hosts/{id}/ready", post(hosts::ready))
        .route("/v1/admin/audit", get(admin::audit))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app)
}

/// The caller, from `Authorization: Bearer <token>`.
pub struct Caller(pub User);

impl FromRequestParts<App> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Caller, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthenticated("missing Authorization: Bearer <token> header"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::unauthenticated("the Authorization header must be `Bearer <token>`"))?;
        Ok(Caller(app.authenticate(token).await?))
    }
}

/// A caller with the `admin` role.
pub struct Admin(pub User);

impl FromRequestParts<App> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Admin, ApiError> {
        let Caller(user) = Caller::from_request_parts(parts, app).await?;
        if user.role != Role::Admin {
            return Err(ApiError::new(axum::http::StatusCode::FORBIDDEN, "forbidden", "this needs the admin role"));
        }
        Ok(Admin(user))
    }
}

/// Query parameters whose every failure (wrong type, unknown name) is a 400
/// `invalid_input`, like a bad body.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Params<T>, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Params(q.0))
            .map_err(|e| ApiError::invalid(e.body_text()))
    }
}

/// The audit log's cursor: the id of the last entry seen.
pub fn number_cursor(cursor: Option<&str>) -> Result<Option<i64>, ApiError> {
    cursor.map(|c| c.parse::<i64>().map_err(|_| ApiError::invalid("cursor must be a number"))).transpose()
}

/// A JSON body whose every failure (bad JSON, wrong types, unknown fields, too large) is
/// a 400 `invalid_input` that says what was wrong. An empty body means `T::default()`.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Body<T>, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::invalid(format!("could not read the request body (the limit is {} KiB): {e}", BODY_LIMIT / 1024))
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body(T::default()));
        }
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
    }
}
