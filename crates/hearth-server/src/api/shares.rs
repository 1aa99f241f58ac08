//! Sharing a port of an environment beyond its owner (see `hearth_app::shares`).

use super::docs::{Authed, Invalid, Missing, Refused};
use super::{Body, Caller};
use crate::App;
use crate::error::ApiResult;
use crate::views::{Items, PortShareView};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;

#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShareBody {
    /// The port in the environment to share.
    #[schema(minimum = 1, maximum = 65535)]
    port: u16,
    /// With everyone (its proxy URL then needs no credentials); else with whoever holds
    /// the token in the answer.
    #[serde(default)]
    public: bool,
    /// How long the share lasts: 24 hours when left out, a week at most.
    #[schema(minimum = 1, maximum = 168)]
    expires_in_hours: Option<i64>,
}

/// Shares a port of the caller's environment through the port proxy: with everyone
/// (`public`), or with whoever holds the token shown in this answer only (at
/// `/v1/shared/{token}/`). At most 20 shares an environment; each expires.
#[utoipa::path(post, path = "/v1/environments/{id}/shares", tag = "environments",
    params(("id" = String, Path, description = "id or slug")), request_body = ShareBody,
    responses((status = 201, description = "shared (the token is shown this once)", body = PortShareView),
        Invalid, Missing, Refused, Authed))]
pub async fn share(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Body(b): Body<ShareBody>,
) -> ApiResult<(StatusCode, Json<PortShareView>)> {
    let (share, token) = app
        .share_port(&user, &id, b.port, b.public, b.expires_in_hours)
        .await?;
    Ok((StatusCode::CREATED, Json(PortShareView::new(&share, token))))
}

/// The environment's shares that have not expired (without their tokens).
#[utoipa::path(get, path = "/v1/environments/{id}/shares", tag = "environments",
    params(("id" = String, Path, description = "id or slug")),
    responses((status = 200, description = "the shares", body = Items<PortShareView>), Missing, Authed))]
pub async fn list(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Items<PortShareView>>> {
    let shares = app.port_shares(&user, &id).await?;
    Ok(Json(Items {
        items: shares.iter().map(|s| PortShareView::new(s, None)).collect(),
    }))
}

/// Ends a share at once.
#[utoipa::path(delete, path = "/v1/environments/{id}/shares/{share_id}", tag = "environments",
    params(("id" = String, Path, description = "id or slug"), ("share_id" = String, Path, description = "the share's id")),
    responses((status = 204, description = "ended"), Missing, Authed))]
pub async fn delete(
    State(app): State<App>,
    Caller(user): Caller,
    Path((id, share_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    app.unshare_port(&user, &id, &share_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
