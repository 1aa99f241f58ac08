//! The caller and their personal VM (the seed's `vm.*` procedures).

use super::docs::{Authed, Invalid, Missing, OverQuota, Refused};
use super::{Body, Caller};
use crate::App;
use crate::error::ApiResult;
use crate::views::{ExecView, Items, LogView, MeView, NewTokenView, TokenView, UserView, UserVm};
use axum::Json;
use axum::extract::Path;
use axum::extract::State;
use axum::http::StatusCode;
use hearth_app::service::{ExecInput, SizeRequest};
use hearth_core::JobKind;
use hearth_store::User;
use serde::Deserialize;
use utoipa::ToSchema;

/// The caller: who they are, their quota and what of it they use.
#[utoipa::path(get, path = "/v1/me", tag = "me", responses((status = 200, description = "the caller", body = MeView), Authed))]
pub async fn me(State(app): State<App>, Caller(user): Caller) -> ApiResult<Json<MeView>> {
    let quota = app.store.quota(&user).await?;
    let usage = app.store.usage(&user.id).await?;
    Ok(Json(MeView {
        user: UserView::from(&user),
        quota,
        usage,
        mail_agent: app.mail.as_ref().map(|m| m.config.address.clone()),
    }))
}

/// The caller's API tokens (ids and names; the tokens themselves are shown only when made).
#[utoipa::path(get, path = "/v1/me/tokens", tag = "me", responses((status = 200, description = "the tokens", body = Items<TokenView>), Authed))]
pub async fn tokens(
    State(app): State<App>,
    Caller(user): Caller,
) -> ApiResult<Json<Items<TokenView>>> {
    Ok(Json(Items {
        items: app
            .store
            .list_tokens(&user.id)
            .await?
            .iter()
            .map(TokenView::from)
            .collect(),
    }))
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTokenBody {
    /// What the token is for, e.g. "laptop" or "ci": 1 to 64 characters, no control characters.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]{1,64}$"
    )]
    name: String,
}

/// Another token for the caller (at most 100); the token is in this answer only.
#[utoipa::path(post, path = "/v1/me/tokens", tag = "me", request_body = NewTokenBody,
    responses((status = 201, description = "the token, shown this once", body = NewTokenView), Invalid, Refused, Authed))]
pub async fn create_token(
    State(app): State<App>,
    Caller(user): Caller,
    Body(body): Body<NewTokenBody>,
) -> ApiResult<(StatusCode, Json<NewTokenView>)> {
    let (about, token) = app.create_token(&user, &body.name).await?;
    Ok((
        StatusCode::CREATED,
        Json(NewTokenView {
            about: TokenView::from(&about),
            token,
        }),
    ))
}

/// Revokes one of the caller's tokens; it stops working at once. Revoking the token this
/// request carries is allowed.
#[utoipa::path(delete, path = "/v1/me/tokens/{id}", tag = "me", params(("id" = String, Path, description = "the token's id")),
    responses((status = 204, description = "revoked"), Missing, Authed))]
pub async fn revoke_token(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    app.revoke_token(&user, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's personal VM.
#[utoipa::path(get, path = "/v1/me/vm", tag = "me", responses((status = 200, description = "the VM", body = UserVm), Authed, Missing))]
pub async fn get_vm(State(app): State<App>, Caller(user): Caller) -> ApiResult<Json<UserVm>> {
    Ok(Json(UserVm::from(&app.personal_vm(&user).await?)))
}

/// Sizes for the personal VM; the tier's defaults where left out.
#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvisionBody {
    #[schema(minimum = 1, maximum = 64)]
    vcpus: Option<i64>,
    #[schema(minimum = 256, maximum = 262144)]
    memory_mb: Option<i64>,
    #[schema(minimum = 1, maximum = 2048)]
    disk_gb: Option<i64>,
    /// An OpenSSH public key line, so the caller can SSH in from their own machine.
    ssh_public_key: Option<String>,
}

/// Provisions the caller's personal VM, or returns the one they have.
#[utoipa::path(post, path = "/v1/me/vm", tag = "me", request_body(content = Option<ProvisionBody>, description = "optional sizes; no body means the tier's"),
    responses(
        (status = 202, description = "queued for provisioning", body = UserVm),
        (status = 200, description = "the caller already has one", body = UserVm),
        Invalid, OverQuota, Authed))]
pub async fn provision(
    State(app): State<App>,
    Caller(user): Caller,
    Body(body): Body<ProvisionBody>,
) -> ApiResult<(StatusCode, Json<UserVm>)> {
    let size = SizeRequest {
        vcpus: body.vcpus,
        memory_mb: body.memory_mb,
        disk_gb: body.disk_gb,
    };
    let (created, env) = app
        .provision_personal(&user, size, body.ssh_public_key.as_deref())
        .await?;
    let status = if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(UserVm::from(&env))))
}

async fn control(app: App, user: &User, kind: JobKind) -> ApiResult<(StatusCode, Json<UserVm>)> {
    let env = app.personal_vm(user).await?;
    app.request(&user.id, &env, kind).await?;
    Ok((StatusCode::ACCEPTED, Json(UserVm::from(&env))))
}

/// Starts the personal VM.
#[utoipa::path(post, path = "/v1/me/vm/start", tag = "me",
    responses((status = 202, description = "a start is queued", body = UserVm), Missing, Refused, OverQuota, Authed))]
pub async fn start(
    State(app): State<App>,
    Caller(user): Caller,
) -> ApiResult<(StatusCode, Json<UserVm>)> {
    control(app, &user, JobKind::Start).await
}

/// Stops the personal VM.
#[utoipa::path(post, path = "/v1/me/vm/stop", tag = "me",
    responses((status = 202, description = "a stop is queued", body = UserVm), Missing, Refused, Authed))]
pub async fn stop(
    State(app): State<App>,
    Caller(user): Caller,
) -> ApiResult<(StatusCode, Json<UserVm>)> {
    control(app, &user, JobKind::Stop).await
}

/// Destroys the personal VM.
#[utoipa::path(delete, path = "/v1/me/vm", tag = "me",
    responses((status = 202, description = "a destroy is queued", body = UserVm), Missing, Refused, Authed))]
pub async fn destroy(
    State(app): State<App>,
    Caller(user): Caller,
) -> ApiResult<(StatusCode, Json<UserVm>)> {
    control(app, &user, JobKind::Destroy).await
}

/// A command to run in the guest, by the guest user's login shell.
#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecBody {
    /// Shell text, as `ssh host CODE` would run it; not blank, no NUL.
    #[schema(
        min_length = 1,
        max_length = 65536,
        pattern = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"
    )]
    code: String,
    #[schema(minimum = 1, maximum = 3600)]
    timeout_seconds: Option<i64>,
    /// An absolute path.
    #[schema(max_length = 4096, pattern = "^/[^\\u0000]*$")]
    working_dir: Option<String>,
}

impl From<ExecBody> for ExecInput {
    fn from(b: ExecBody) -> ExecInput {
        ExecInput {
            code: b.code,
            timeout_seconds: b.timeout_seconds,
            working_dir: b.working_dir,
        }
    }
}

/// Runs a command in the personal VM and waits for it.
#[utoipa::path(post, path = "/v1/me/vm/exec", tag = "me", request_body = ExecBody,
    responses((status = 200, description = "the command ran", body = ExecView), Invalid, Missing, Refused, OverQuota, Authed))]
pub async fn exec(
    State(app): State<App>,
    Caller(user): Caller,
    Body(body): Body<ExecBody>,
) -> ApiResult<Json<ExecView>> {
    let input: ExecInput = body.into();
    input.validate()?;
    let env = app.personal_vm(&user).await?;
    Ok(Json(ExecView::from(&app.exec(&user, &env, input).await?)))
}

/// The personal VM's provisioning log: the last 100 lines of the last hour.
#[utoipa::path(get, path = "/v1/me/vm/logs", tag = "me", responses((status = 200, description = "oldest first", body = Items<LogView>), Missing, Authed))]
pub async fn logs(State(app): State<App>, Caller(user): Caller) -> ApiResult<Json<Items<LogView>>> {
    let env = app.personal_vm(&user).await?;
    let items = app
        .store
        .logs(&env.id)
        .await?
        .iter()
        .map(LogView::from)
        .collect();
    Ok(Json(Items { items }))
}

/// The personal VM's live events (server-sent events): `state` and `log`.
#[utoipa::path(get, path = "/v1/me/vm/events", tag = "me",
    params(("Last-Event-ID" = Option<String>, Header, description = "resume after this event")),
    responses((status = 200, description = "a stream of `state` and `log` events", content_type = "text/event-stream", body = String), Missing, Authed))]
pub async fn events(
    State(app): State<App>,
    Caller(user): Caller,
    headers: axum::http::HeaderMap,
) -> ApiResult<axum::response::Response> {
    let env = app.personal_vm(&user).await?;
    Ok(super::environments::event_stream(app, env.id, &headers))
}

/// Runs a command in the personal VM and streams its output (server-sent events).
#[utoipa::path(post, path = "/v1/me/vm/exec/stream", tag = "me", request_body = ExecBody,
    responses((status = 200, description = "`stdout`, `stderr`, then `exit` events", content_type = "text/event-stream", body = String),
        Invalid, Missing, Refused, Authed))]
pub async fn exec_stream(
    State(app): State<App>,
    Caller(user): Caller,
    Body(body): Body<ExecBody>,
) -> ApiResult<axum::response::Response> {
    let input: ExecInput = body.into();
    input.validate()?;
    let env = app.personal_vm(&user).await?;
    let rx = app.exec_stream(&user, &env, input).await?;
    Ok(super::environments::stream_response(rx))
}
