//! The HTTP API: routing, authentication and body parsing. Handlers are thin: parse,
//! authorize, call one service function, map the result.

mod admin;
mod auth;
pub mod docs;
mod environments;
mod files;
mod git_credentials;
mod hosts;
mod images;
mod mail;
mod me;
mod ops;
mod ports;
mod previews;
mod shares;
mod snapshots;
mod terminal;
mod trpc;
mod tunnel;

use crate::App;
use crate::error::ApiError;
use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use hearth_core::Role;
use hearth_store::User;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Largest accepted request body. Commands may be up to 65,536 characters (256 KiB).
pub const BODY_LIMIT: usize = 512 * 1024;
/// How long a request body may take to arrive.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The routes and the OpenAPI document, built from the same registrations: a route is
/// served if and only if it is documented.
pub fn routes() -> (axum::Router<App>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(docs::ApiDoc::openapi())
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::openapi))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::flavors))
        .routes(routes!(ops::regions))
        .routes(routes!(auth::sign_in))
        .routes(routes!(auth::sign_out))
        .routes(routes!(auth::session))
        .routes(routes!(auth::set_password))
        .routes(routes!(auth::password_link))
        .routes(routes!(auth::oidc))
        .routes(routes!(auth::oidc_start))
        .routes(routes!(auth::oidc_callback))
        .routes(routes!(me::me))
        .routes(routes!(me::tokens, me::create_token))
        .routes(routes!(me::revoke_token))
        .routes(routes!(git_credentials::list, git_credentials::add))
        .routes(routes!(git_credentials::delete))
        .routes(routes!(me::get_vm, me::provision, me::destroy))
        .routes(routes!(me::start))
        .routes(routes!(me::stop))
        .routes(routes!(me::exec))
        .routes(routes!(me::logs))
        .routes(routes!(me::events))
        .routes(routes!(me::exec_stream))
        .routes(routes!(mail::mail_address))
        .routes(routes!(mail::my_mail))
        .routes(routes!(mail::inbound))
        .routes(routes!(mail::all_mail))
        .routes(routes!(environments::create, environments::list))
        .routes(routes!(environments::fork))
        .routes(routes!(snapshots::take))
        .routes(routes!(snapshots::list))
        .routes(routes!(snapshots::delete))
        .routes(routes!(images::register, images::list))
        .routes(routes!(images::import))
        .routes(routes!(images::delete))
        .routes(routes!(environments::get, environments::destroy))
        .routes(routes!(environments::wait))
        .routes(routes!(environments::start))
        .routes(routes!(environments::stop))
        .routes(routes!(environments::exec))
        .routes(routes!(environments::executions))
        .routes(routes!(environments::execution))
        .routes(routes!(environments::audit))
        .routes(routes!(environments::logs))
        .routes(routes!(environments::activity))
        .routes(routes!(environments::keepalive))
        .routes(routes!(environments::events))
        .routes(routes!(environments::list_events))
        .routes(routes!(environments::exec_stream))
        .routes(routes!(terminal::terminal))
        .routes(routes!(terminal::ticket))
        .routes(routes!(tunnel::tunnel))
        .routes(routes!(shares::share, shares::list))
        .routes(routes!(shares::delete))
        .routes(routes!(files::list, files::remove))
        .routes(routes!(files::download, files::upload))
        .routes(routes!(admin::create_user, admin::list_users))
        .routes(routes!(
            admin::get_user,
            admin::patch_user,
            admin::delete_user
        ))
        .routes(routes!(admin::capacity))
        .routes(routes!(admin::events))
        .routes(routes!(admin::demand_policy, admin::set_demand_policy))
        .routes(routes!(admin::vms))
        .routes(routes!(admin::environments))
        .routes(routes!(admin::destroy_environment))
        .routes(routes!(admin::jobs))
        .routes(routes!(admin::retry_job))
        .routes(routes!(admin::audit))
        .routes(routes!(hosts::add, hosts::list))
        .routes(routes!(hosts::get, hosts::update, hosts::remove))
        .routes(routes!(hosts::drain))
        .routes(routes!(hosts::join_token))
        .routes(routes!(hosts::join))
        .routes(routes!(hosts::buy))
        .routes(routes!(hosts::sell))
        .routes(routes!(hosts::binary))
        .routes(routes!(hosts::ready))
        .routes(routes!(hosts::set_pool))
        .routes(routes!(hosts::pools))
        .split_for_parts()
}

/// The generated OpenAPI document, without what only a running server knows.
pub fn openapi_json() -> String {
    let (_, doc) = routes();
    serde_json::to_string_pretty(&doc).expect("the document serializes")
}

/// The OpenAPI document as served: the generated one, with what the schema attributes
/// cannot say filled in.
pub fn document() -> String {
    let (_, doc) = routes();
    let mut doc = serde_json::to_value(doc).expect("the document serializes");
    // What the schema attributes cannot say about a map (`validate::env_vars` has the rule).
    if let Some(vars) = doc.pointer_mut("/components/schemas/CreateBody/properties/environmentVars")
    {
        vars["maxProperties"] = serde_json::json!(hearth_core::validate::MAX_ENV_VARS);
        vars["propertyNames"] = serde_json::json!({ "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,127}$" });
        vars["additionalProperties"] = serde_json::json!({
            "type": "string", "maxLength": hearth_core::validate::MAX_ENV_VALUE_CHARS, "pattern": "^[^\\u0000]*$"
        });
    }
    doc.to_string()
}

pub fn router(app: App) -> Router {
    let document = Arc::new(document());
    let (routes, _) = routes();
    let guests = ports::GuestClient::new(app.clone());
    routes
        // The seed's tRPC procedures, outside the REST document (see `trpc`).
        .route(
            "/api/trpc/{*paths}",
            axum::routing::get(trpc::handle).post(trpc::handle),
        )
        // Services inside environments, outside the REST document (see `ports`).
        .route(
            "/v1/environments/{id}/ports/{port}",
            axum::routing::any(ports::proxy),
        )
        .route(
            "/v1/environments/{id}/ports/{port}/",
            axum::routing::any(ports::proxy),
        )
        .route(
            "/v1/environments/{id}/ports/{port}/{*path}",
            axum::routing::any(ports::proxy),
        )
        // Browsers on their way to a preview host (see `previews`).
        .route(
            "/v1/previews/sign-in",
            axum::routing::get(previews::sign_in),
        )
        .route("/v1/shared/{token}", axum::routing::any(ports::shared))
        .route("/v1/shared/{token}/", axum::routing::any(ports::shared))
        .route(
            "/v1/shared/{token}/{*path}",
            axum::routing::any(ports::shared),
        )
        .merge(crate::ui::router())
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(axum::Extension(document))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::Extension(guests.clone()))
        // Outermost: a preview host's requests never reach Hearth's own routes.
        .layer(axum::middleware::from_fn_with_state(
            (app.clone(), guests),
            previews::route,
        ))
        .with_state(app)
}

/// The caller, from `Authorization: Bearer <token>` or, for browsers, the session cookie.
/// A call that changes something (any method but GET, HEAD and OPTIONS) with the cookie
/// must also carry the session's CSRF token in `X-CSRF-Token`: a page on another site can
/// make a browser send the cookie, but cannot read the token.
pub struct Caller(pub User);

impl FromRequestParts<App> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Caller, ApiError> {
        let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            return match auth::session_cookie(&parts.headers) {
                Some(session) => {
                    let (user, csrf) = app.session(&session).await?;
                    auth::check_csrf(&parts.method, &parts.headers, &csrf)?;
                    Ok(Caller(user))
                }
                None => Err(ApiError::unauthenticated(
                    "missing Authorization: Bearer <token> header (or a session: POST /v1/auth/sign-in)",
                )),
            };
        };
        let token = bearer(header).ok_or_else(|| {
            ApiError::unauthenticated("the Authorization header must be `Bearer <token>`")
        })?;
        Ok(Caller(app.authenticate(token).await?))
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case, as
/// RFC 9110 has it); `None` for any other shape.
pub fn bearer(header: &axum::http::HeaderValue) -> Option<&str> {
    let (scheme, token) = header.to_str().ok()?.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Whether an `Authorization` header is Hearth's: of the Bearer scheme in any case, or
/// empty or unreadable. Any other scheme (an app's own `Basic` sign-in) is a guest's, which
/// the port proxy and preview hosts pass on.
pub fn hearths_authorization(header: &axum::http::HeaderValue) -> bool {
    header.to_str().map_or(true, |h| {
        h.split_whitespace()
            .next()
            .is_none_or(|scheme| scheme.eq_ignore_ascii_case("bearer"))
    })
}

/// A caller with the `admin` role.
pub struct Admin(pub User);

impl FromRequestParts<App> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Admin, ApiError> {
        let Caller(user) = Caller::from_request_parts(parts, app).await?;
        if user.role != Role::Admin {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "forbidden",
                "this needs the admin role",
            ));
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
    cursor
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<i64>()
                .ok()
                .filter(|_| c.len() <= 18 && c.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| ApiError::invalid("cursor must be a number of at most 18 digits"))
        })
        .transpose()
}

/// A JSON number with no fraction (`6.0`) is an integer, as JSON Schema and JavaScript
/// have it; serde would refuse it for an integer field.
fn integral(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(integral).collect()),
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (k, integral(v))).collect())
        }
        other => other,
    }
}

/// A JSON body whose every failure (bad JSON, wrong types, unknown fields, too large) is
/// a 400 `invalid_input` that says what was wrong. An empty body means `T::default()`.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Body<T>, ApiError> {
        let bytes =
            match tokio::time::timeout(BODY_TIMEOUT, axum::body::Bytes::from_request(req, state))
                .await
            {
                Ok(read) => read.map_err(|e| {
                    ApiError::invalid(format!(
                        "could not read the request body (the limit is {} KiB): {e}",
                        BODY_LIMIT / 1024
                    ))
                })?,
                Err(_) => {
                    return Err(ApiError::new(
                        axum::http::StatusCode::REQUEST_TIMEOUT,
                        "timeout",
                        format!(
                            "the request body did not arrive within {} s",
                            BODY_TIMEOUT.as_secs()
                        ),
                    ));
                }
            };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body(T::default()));
        }
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))?;
        if value.is_null() {
            // `null` is no body, for the routes whose body is optional.
            return Ok(Body(T::default()));
        }
        serde_json::from_value(integral(value))
            .map(Body)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
    }
}
