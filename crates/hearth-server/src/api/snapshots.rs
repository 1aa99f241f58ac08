//! Snapshots: the caller's saved disks of their environments. Every lookup is scoped by
//! the caller, so someone else's snapshot is a 404 like one that does not exist.

use super::docs::{Authed, Invalid, Missing, OverQuota, Refused};
use super::{Body, Caller};
use crate::App;
use crate::error::ApiResult;
use crate::views::{Items, SnapshotView};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;

#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TakeBody {
    /// Unique among the caller's snapshots: 1 to 100 characters, not blank, no control characters.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    name: String,
}

/// Saves the disk of a running or stopped environment (not its memory) under a name, on
/// its host; answers once it is taken. Counts against the tier's snapshots (429 past them).
#[utoipa::path(post, path = "/v1/environments/{id}/snapshots", tag = "snapshots", params(("id" = String, Path, description = "id or slug")),
    request_body = TakeBody,
    responses((status = 201, description = "the snapshot, ready", body = SnapshotView), Invalid, Missing, Refused, OverQuota, Authed))]
pub async fn take(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Body(b): Body<TakeBody>,
) -> ApiResult<(StatusCode, Json<SnapshotView>)> {
    let snapshot = app.take_snapshot(&user, &id, &b.name).await?;
    Ok((StatusCode::CREATED, Json(SnapshotView::from(&snapshot))))
}

/// The caller's snapshots, newest first (at most the tier's count).
#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots",
    responses((status = 200, description = "the snapshots", body = Items<SnapshotView>), Authed))]
pub async fn list(
    State(app): State<App>,
    Caller(user): Caller,
) -> ApiResult<Json<Items<SnapshotView>>> {
    Ok(Json(Items {
        items: app
            .snapshots(&user)
            .await?
            .iter()
            .map(SnapshotView::from)
            .collect(),
    }))
}

/// Removes a snapshot; its place in the quota is free at once. Environments made from it
/// keep running.
#[utoipa::path(delete, path = "/v1/snapshots/{id}", tag = "snapshots", params(("id" = String, Path, description = "id or name")),
    responses((status = 200, description = "the removed snapshot", body = SnapshotView), Missing, Refused, Authed))]
pub async fn delete(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotView>> {
    Ok(Json(SnapshotView::from(
        &app.delete_snapshot(&user, &id).await?,
    )))
}
