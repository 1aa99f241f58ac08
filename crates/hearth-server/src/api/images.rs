//! Custom images: built from a Dockerfile or loaded from a `docker save` tarball, checked
//! against the guest contract, offered to their owner (private) or to everyone (admins
//! only).

use super::docs::{AdminOnly, Authed, Invalid, Missing, OverQuota, Refused, TooLarge};
use super::{Body, Caller, Params};
use crate::App;
use crate::error::ApiResult;
use crate::views::{ImageView, Items};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterBody {
    /// What creates will name in `baseImage`: 1 to 63 of a-z, 0-9, '-', '.', '_'.
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9._-]*$")]
    name: String,
    /// Built with nothing else in its context (no `COPY` of local files). Start from the
    /// server's image (`FROM hearth/base:latest`) to keep the guest contract.
    #[schema(min_length = 1, max_length = 65536)]
    dockerfile: String,
    /// `private` (the default) or `everyone` (admins only).
    visibility: Option<Visibility>,
    /// The kind of host environments of it run on: `docker` (the default) or `agent`. An
    /// image for agent hosts is built on a Docker host too; its file system becomes the
    /// root file system of VMs on an agent host (it must come `FROM hearth/base:latest`).
    #[schema(example = "agent")]
    provider: Option<String>,
}

#[derive(Deserialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    Private,
    Everyone,
}

/// Builds an image on a Docker host and checks it against the guest contract (a VM of it
/// must let user `dev` in over SSH with the key Hearth hands it); answers once it is
/// offered, or with a 400 that says what broke. Counts against the tier's images.
#[utoipa::path(post, path = "/v1/images", tag = "images", request_body = RegisterBody,
    responses((status = 201, description = "the image, ready", body = ImageView), Invalid, Refused, OverQuota, AdminOnly, Authed))]
pub async fn register(
    State(app): State<App>,
    Caller(user): Caller,
    Body(b): Body<RegisterBody>,
) -> ApiResult<(StatusCode, Json<ImageView>)> {
    let everyone = b.visibility == Some(Visibility::Everyone);
    let image = app
        .register_image(
            &user,
            &b.name,
            &b.dockerfile,
            everyone,
            b.provider.as_deref(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(ImageView::from(&image))))
}

#[derive(Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct ImportQuery {
    /// What creates will name in `baseImage`: 1 to 63 of a-z, 0-9, '-', '.', '_'.
    #[param(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9._-]*$")]
    name: String,
    /// `private` (the default) or `everyone` (admins only).
    visibility: Option<Visibility>,
    /// The kind of host environments of it run on: `docker` (the default) or `agent` (its
    /// file system becomes VMs' root file system on an agent host, as for a built image).
    provider: Option<String>,
}

/// Loads an image from a tarball as `docker save IMAGE` writes it (the request's body,
/// streamed to the server's disk; at most `HEARTH_IMAGE_UPLOAD_MAX_BYTES`, 10 GB by
/// default), checks it against the guest contract as a built image is, and offers it under
/// `name`. The names the tarball carries are ignored. Counts against the tier's images.
#[utoipa::path(post, path = "/v1/images/import", tag = "images", params(ImportQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "what `docker save IMAGE` writes: one image (any content type is read as such)"),
    responses((status = 201, description = "the image, ready", body = ImageView), Invalid, Refused, OverQuota, TooLarge, AdminOnly, Authed))]
pub async fn import(
    State(app): State<App>,
    Caller(user): Caller,
    Params(q): Params<ImportQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> ApiResult<(StatusCode, Json<ImageView>)> {
    let everyone = q.visibility == Some(Visibility::Everyone);
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    // Its own task: a client that goes away mid-upload must not skip the clean-up.
    let image = tokio::spawn(async move {
        app.import_image(
            &user,
            &q.name,
            everyone,
            q.provider.as_deref(),
            declared,
            body.into_data_stream(),
        )
        .await
    })
    .await
    .map_err(|e| hearth_app::AppError::Internal(format!("the import failed: {e}")))??;
    Ok((StatusCode::CREATED, Json(ImageView::from(&image))))
}

/// The images the caller may create environments of: their own and everyone's.
#[utoipa::path(get, path = "/v1/images", tag = "images",
    responses((status = 200, description = "the images", body = Items<ImageView>), Authed))]
pub async fn list(
    State(app): State<App>,
    Caller(user): Caller,
) -> ApiResult<Json<Items<ImageView>>> {
    Ok(Json(Items {
        items: app
            .images(&user)
            .await?
            .iter()
            .map(ImageView::from)
            .collect(),
    }))
}

/// Removes an image (the caller's, or any for an admin). Environments made from it keep
/// running.
#[utoipa::path(delete, path = "/v1/images/{id}", tag = "images", params(("id" = String, Path, description = "id or name")),
    responses((status = 200, description = "the removed image", body = ImageView), Missing, Refused, Authed))]
pub async fn delete(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ImageView>> {
    Ok(Json(ImageView::from(&app.delete_image(&user, &id).await?)))
}
