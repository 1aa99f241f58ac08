//! Preview URLs (`<port>-<slug>.<domain>`, see `hearth_app::previews`): every request
//! whose `Host` is under the preview domain is a guest's, never Hearth's own API or UI.
//!
//! Who gets through: a bearer token (for programs; an `Authorization` of another scheme is
//! the guest app's own and passes to it), the browser's `hearth_preview` cookie
//! for that host (set by the sign-in round trip through Hearth's own origin), or anyone
//! when the port is shared with everyone. A share token is taken only at
//! `/v1/shared/{token}/`. A request with the cookie must come from the preview's own pages
//! or be a plain navigation to it (Fetch Metadata): previews are sibling hosts, so one
//! guest's pages are same-site with another's and `SameSite=Lax` alone would let them send
//! requests with the other's cookie.

use super::ports::{GuestClient, Via, forward, is_upgrade, same_origin};
use crate::App;
use crate::error::{ApiError, ApiResult};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hearth_app::AppError;
use hearth_app::previews::{CALLBACK_PATH, GRANT_LIFETIME, PreviewHost, local_path};
use serde::Deserialize;

/// The browser's preview cookie (host-only: each preview host has its own).
const COOKIE: &str = "hearth_preview";

/// Takes every request for a preview host; passes the others on to Hearth's routes.
pub async fn route(
    State((app, client)): State<(App, GuestClient)>,
    req: Request,
    next: Next,
) -> Response {
    let Some(config) = app.config.previews.as_ref() else {
        return next.run(req).await;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("")
        .to_string();
    if !config.is_under(&host) {
        return next.run(req).await;
    }
    let Some(preview) = config.parse_host(&host) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "{host} is not a preview: previews are at <port>-<environment slug, env-...>.{}",
                config.domain
            ),
        )
        .into_response();
    };
    let scheme = config.scheme().to_string();
    serve(app, client, preview, &scheme, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn serve(
    app: App,
    client: GuestClient,
    preview: PreviewHost,
    scheme: &str,
    req: Request,
) -> ApiResult<Response> {
    if req.uri().path() == CALLBACK_PATH {
        return callback(&app, &preview, req).await;
    }
    let headers = req.headers();
    let hearths = headers
        .get(header::AUTHORIZATION)
        .filter(|h| super::hearths_authorization(h));
    let usage = if let Some(authorization) = hearths {
        let token = super::bearer(authorization).ok_or_else(|| {
            ApiError::unauthenticated("the Authorization header must be `Bearer <token>`")
        })?;
        let user = app.authenticate(token).await?;
        app.use_port(&user, &preview.slug, preview.port).await?
    } else if let Some(user) = cookie_user(&app, &preview, headers).await {
        from_the_preview_itself(req.method(), headers)?;
        if is_upgrade(headers) {
            same_origin(headers)?;
        }
        app.use_port(&user, &preview.slug, preview.port).await?
    } else if let Some(usage) = app.use_public_port(&preview.slug, preview.port).await? {
        usage
    } else if is_navigation(req.method(), headers) {
        let config = app.config.previews.as_ref().expect("checked by route");
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        return Ok(redirect(&config.sign_in_url(&preview, path)));
    } else {
        return Err(ApiError::unauthenticated(
            "open this preview in a browser signed in to Hearth, or send Authorization: Bearer <token>",
        ));
    };
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    forward(
        &client,
        usage,
        req,
        &path,
        Via::Preview {
            host: &preview.host,
            scheme,
        },
    )
    .await
}

/// The user a `hearth_preview` cookie signs in at `preview`, if one holds. Every cookie of
/// that name is tried: a guest's page may have set some for the whole preview domain.
async fn cookie_user(
    app: &App,
    preview: &PreviewHost,
    headers: &HeaderMap,
) -> Option<hearth_store::User> {
    app.preview_user(preview, super::auth::cookie_values(headers, COOKIE))
        .await
}

/// Fetch Metadata's resource isolation policy: a request with the cookie comes from the
/// preview's own pages, from no page (typed in, a bookmark), or is a plain top-level
/// navigation (not a frame: another preview's page could frame this one to trick clicks).
/// Browsers that send no `Sec-Fetch-Site` are let through.
fn from_the_preview_itself(method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let allowed = match get("sec-fetch-site") {
        None | Some("same-origin") | Some("none") => true,
        Some(_) => {
            get("sec-fetch-mode") == Some("navigate")
                && matches!(*method, Method::GET | Method::HEAD)
                && get("sec-fetch-dest") == Some("document")
        }
    };
    if allowed {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a request with the preview's cookie must come from the preview's own pages",
        ))
    }
}

/// A browser opening a page (as opposed to a script's fetch): it may be sent to sign in.
fn is_navigation(method: &Method, headers: &HeaderMap) -> bool {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    matches!(*method, Method::GET | Method::HEAD)
        && match get("sec-fetch-mode") {
            Some(mode) => mode == "navigate",
            None => get("accept").is_some_and(|a| a.contains("text/html")),
        }
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: String,
    path: Option<String>,
}

/// `/__hearth/preview?code=...&path=...` on the preview host: the code from Hearth's
/// origin becomes this host's cookie.
async fn callback(app: &App, preview: &PreviewHost, req: Request) -> ApiResult<Response> {
    let Query(q) = Query::<CallbackQuery>::try_from_uri(req.uri())
        .map_err(|e| ApiError::invalid(e.body_text()))?;
    let grant = app.preview_grant(preview, &q.code).await?;
    let cookie = super::auth::set_cookie(app, COOKIE, &grant, "/", GRANT_LIFETIME.as_secs())
        .ok_or_else(|| ApiError::invalid("the grant is not a cookie's value"))?;
    let mut response = redirect(local_path(q.path.as_deref().unwrap_or("/")));
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

fn redirect(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(l) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, l);
    }
    response
}

#[derive(Deserialize)]
pub struct SignInQuery {
    host: String,
    path: Option<String>,
}

/// `GET /v1/previews/sign-in?host=...&path=...` on Hearth's own origin: with the browser's
/// session, sends it to the preview host with a code for it (when the environment is the
/// caller's). Without a session it goes to Hearth's sign-in page first.
pub async fn sign_in(
    State(app): State<App>,
    headers: HeaderMap,
    Query(q): Query<SignInQuery>,
) -> ApiResult<Response> {
    const SIGN_IN_FIRST: &str =
        "/?error=Sign%20in%20to%20Hearth%2C%20then%20open%20the%20preview%20again";
    let Some(session) = super::auth::session_cookie(&headers) else {
        return Ok(redirect(SIGN_IN_FIRST));
    };
    match app
        .preview_sign_in(&session, &q.host, q.path.as_deref().unwrap_or("/"))
        .await
    {
        Ok(location) => Ok(redirect(&location)),
        Err(AppError::Unauthenticated(_)) => Ok(redirect(SIGN_IN_FIRST)),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_the_previews_own_pages_use_its_cookie() {
        let ok = |m: Method, h: &[(&'static str, &'static str)]| {
            from_the_preview_itself(&m, &headers(h)).is_ok()
        };
        assert!(ok(Method::POST, &[]), "no Fetch Metadata: an older browser");
        assert!(ok(Method::POST, &[("sec-fetch-site", "same-origin")]));
        assert!(ok(Method::GET, &[("sec-fetch-site", "none")]));
        assert!(ok(
            Method::GET,
            &[
                ("sec-fetch-site", "cross-site"),
                ("sec-fetch-mode", "navigate"),
                ("sec-fetch-dest", "document")
            ]
        ));
        // Another preview's page framing this one.
        assert!(!ok(
            Method::GET,
            &[
                ("sec-fetch-site", "same-site"),
                ("sec-fetch-mode", "navigate"),
                ("sec-fetch-dest", "iframe")
            ]
        ));
        // Another preview's page (same-site) posting, fetching or embedding.
        assert!(!ok(
            Method::POST,
            &[
                ("sec-fetch-site", "same-site"),
                ("sec-fetch-mode", "navigate")
            ]
        ));
        assert!(!ok(
            Method::GET,
            &[("sec-fetch-site", "same-site"), ("sec-fetch-mode", "cors")]
        ));
        assert!(!ok(
            Method::GET,
            &[
                ("sec-fetch-site", "cross-site"),
                ("sec-fetch-mode", "navigate"),
                ("sec-fetch-dest", "embed")
            ]
        ));
    }

    #[test]
    fn only_a_browser_opening_a_page_is_sent_to_sign_in() {
        assert!(is_navigation(
            &Method::GET,
            &headers(&[("sec-fetch-mode", "navigate")])
        ));
        assert!(is_navigation(
            &Method::GET,
            &headers(&[("accept", "text/html,application/xhtml+xml")])
        ));
        assert!(!is_navigation(
            &Method::GET,
            &headers(&[("sec-fetch-mode", "cors"), ("accept", "text/html")])
        ));
        assert!(!is_navigation(&Method::GET, &headers(&[("accept", "*/*")])));
        assert!(!is_navigation(
            &Method::POST,
            &headers(&[("sec-fetch-mode", "navigate")])
        ));
    }
}
