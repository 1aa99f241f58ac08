//! Files in an environment, through the API: listed, downloaded, uploaded and removed
//! (SFTP on the environment's streams connection, as the `dev` user; see
//! `hearth_app::files`). Bodies stream both ways.

use super::docs::{Authed, Invalid, Missing, Refused, TooLarge};
use super::{Caller, Params};
use crate::App;
use crate::error::ApiResult;
use crate::views::{FileView, ListingView};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use hearth_app::files::Listing;
use serde::Deserialize;

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PathQuery {
    /// The guest's path: relative to the home directory, or absolute. Read and written
    /// as the `dev` user; symbolic links are followed.
    #[param(min_length = 1, max_length = 4096, pattern = "^[^\\u0000]+$")]
    path: String,
}

/// What is at `path`: a directory's entries by name (at most 10,000; `leftOut` counts
/// the rest), or a file's own entry.
#[utoipa::path(get, path = "/v1/environments/{id}/files", tag = "files",
    params(("id" = String, Path, description = "id or slug"), PathQuery),
    responses((status = 200, description = "the listing", body = ListingView),
        Invalid, Missing, Refused, super::docs::Forbidden, super::docs::Busy, Authed))]
pub async fn list(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Params(q): Params<PathQuery>,
) -> ApiResult<Json<ListingView>> {
    let files = app.open_files(&user, &id).await?;
    let view = match files.list(&q.path).await? {
        Listing::File(e) => ListingView {
            path: q.path,
            directory: false,
            entries: vec![FileView::from(&e)],
            left_out: 0,
        },
        Listing::Directory { entries, left_out } => ListingView {
            path: q.path,
            directory: true,
            entries: entries.iter().map(FileView::from).collect(),
            left_out: left_out as u64,
        },
    };
    Ok(Json(view))
}

/// A file's bytes, streamed (`Content-Length` is its size when the download began).
#[utoipa::path(get, path = "/v1/environments/{id}/files/content", tag = "files",
    params(("id" = String, Path, description = "id or slug"), PathQuery),
    responses((status = 200, description = "the file's bytes", content_type = "application/octet-stream", body = Vec<u8>),
        Invalid, Missing, Refused, super::docs::Forbidden, super::docs::Busy, Authed))]
pub async fn download(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Params(q): Params<PathQuery>,
) -> ApiResult<Response> {
    let files = app.open_files(&user, &id).await?;
    let download = files.read(&q.path).await?;
    let size = download.size;
    let name = q
        .path
        .rsplit('/')
        .next()
        .unwrap_or("file")
        .replace(['"', '\\'], "_");
    let mut response = Response::new(Body::from_stream(download.into_stream()));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if size > 0 {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

/// Writes the request's body to `path`, whole or not at all (a temporary file beside it,
/// renamed over it once complete). At most the tier's upload size (free 100 MiB, pro
/// 2 GiB, unlimited 20 GiB: 413 past it); an upload that sends nothing for 60 s ends (408).
#[utoipa::path(put, path = "/v1/environments/{id}/files/content", tag = "files",
    params(("id" = String, Path, description = "id or slug"), PathQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the file's bytes"),
    responses((status = 201, description = "written (made, or replaced)", body = FileView),
        (status = 408, description = "the upload stalled", body = crate::error::ErrorBody),
        Invalid, Missing, Refused, TooLarge, super::docs::Forbidden, super::docs::Busy, Authed))]
pub async fn upload(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Params(q): Params<PathQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<FileView>)> {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let limit = user.tier.max_upload_bytes();
    // Its own task: a client that goes away mid-upload must not skip removing the
    // temporary file.
    let written = tokio::spawn(async move {
        let files = app.open_files(&user, &id).await?;
        files
            .write(&q.path, announced, limit, body.into_data_stream())
            .await
    })
    .await
    .map_err(|e| hearth_app::AppError::Internal(format!("the upload failed: {e}")))??;
    Ok((StatusCode::CREATED, Json(FileView::from(&written))))
}

/// Removes a file, a link, or an empty directory.
#[utoipa::path(delete, path = "/v1/environments/{id}/files", tag = "files",
    params(("id" = String, Path, description = "id or slug"), PathQuery),
    responses((status = 204, description = "removed"), Invalid, Missing, Refused, super::docs::Forbidden, super::docs::Busy, Authed))]
pub async fn remove(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Params(q): Params<PathQuery>,
) -> ApiResult<StatusCode> {
    app.open_files(&user, &id).await?.remove(&q.path).await?;
    Ok(StatusCode::NO_CONTENT)
}
