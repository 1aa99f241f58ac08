//! The caller's stored git credentials: kept once, named in creates (`gitCredential`).
//! Secrets go in and never come out.

use super::docs::{Authed, Invalid, Missing, Refused};
use super::{Body, Caller};
use crate::App;
use crate::error::ApiResult;
use crate::views::{GitCredentialView, Items};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use hearth_app::repositories::NewGitCredential;
use serde::Deserialize;
use utoipa::ToSchema;

#[derive(Deserialize, Clone, Copy, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialKind {
    /// A token sent over HTTPS (a GitHub or GitLab personal or deploy token).
    HttpsToken,
    /// An SSH private key without a passphrase (a deploy key).
    SshKey,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewGitCredentialBody {
    /// What creates name it by: letters, digits, `.`, `_`, `-`.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
    )]
    name: String,
    kind: CredentialKind,
    /// Sent with an HTTPS token; `x-access-token` when left out.
    #[schema(min_length = 1, max_length = 255, pattern = "^[A-Za-z0-9._@+-]+$")]
    username: Option<String>,
    /// The token or the private key; sealed with the master key, never shown again.
    #[schema(min_length = 1, max_length = 16384)]
    secret: String,
}

impl Default for NewGitCredentialBody {
    fn default() -> Self {
        NewGitCredentialBody {
            name: String::new(),
            kind: CredentialKind::HttpsToken,
            username: None,
            secret: String::new(),
        }
    }
}

/// The caller's git credentials: names and kinds, never the secrets.
#[utoipa::path(get, path = "/v1/me/git-credentials", tag = "me",
    responses((status = 200, description = "the credentials", body = Items<GitCredentialView>), Authed))]
pub async fn list(
    State(app): State<App>,
    Caller(user): Caller,
) -> ApiResult<Json<Items<GitCredentialView>>> {
    let items = app.git_credentials(&user).await?;
    Ok(Json(Items {
        items: items.iter().map(GitCredentialView::from).collect(),
    }))
}

/// Keeps a git credential (at most 20) for cloning private repositories
/// (`repositoryUrl` with `gitCredential` in a create). A name in use is a 409.
#[utoipa::path(post, path = "/v1/me/git-credentials", tag = "me", request_body = NewGitCredentialBody,
    responses((status = 201, description = "kept (without its secret)", body = GitCredentialView), Invalid, Refused, Authed))]
pub async fn add(
    State(app): State<App>,
    Caller(user): Caller,
    Body(body): Body<NewGitCredentialBody>,
) -> ApiResult<(StatusCode, Json<GitCredentialView>)> {
    let kind = match body.kind {
        CredentialKind::HttpsToken => hearth_app::repositories::HTTPS_TOKEN,
        CredentialKind::SshKey => hearth_app::repositories::SSH_KEY,
    };
    let stored = app
        .add_git_credential(
            &user,
            NewGitCredential {
                name: body.name,
                kind: kind.to_string(),
                username: body.username,
                secret: body.secret,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(GitCredentialView::from(&stored))))
}

/// Forgets one of the caller's git credentials. An environment still to be cloned with
/// it fails its clone, saying so.
#[utoipa::path(delete, path = "/v1/me/git-credentials/{name}", tag = "me",
    params(("name" = String, Path, description = "the credential's name")),
    responses((status = 204, description = "forgotten"), Missing, Authed))]
pub async fn delete(
    State(app): State<App>,
    Caller(user): Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    app.delete_git_credential(&user, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
