//! Environments: several per user, under quota. Every lookup is scoped by the caller, so
//! someone else's id is a 404 like an id that does not exist.

use super::docs::{Authed, Invalid, Missing, OverQuota, Refused};
use super::{Body, Caller, Params};
use crate::App;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::views::{
    ActivityView, AuditView, EnvironmentView, ExecView, ExecutionSummaryView, ExecutionView, Items,
    LogView, Page,
};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use hearth_app::service::{CreateInput, ExecInput, SizeRequest, StreamEvent};
use hearth_core::{EnvState, HostKind, JobKind};
use hearth_store::AuditFilter;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use utoipa::{IntoParams, ToSchema};

/// What to create; sizes default to the caller's tier.
#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateBody {
    /// 1 to 100 characters, not blank, no control characters.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    name: String,
    #[schema(minimum = 1, maximum = 64)]
    vcpus: Option<i64>,
    #[schema(minimum = 256, maximum = 262144)]
    memory_mb: Option<i64>,
    #[schema(minimum = 1, maximum = 2048)]
    disk_gb: Option<i64>,
    /// How long it may live; at most the caller's `maxDurationHours` (else 429).
    #[schema(minimum = 1, maximum = 8760)]
    duration_hours: Option<i64>,
    /// The server's image (the default), or the name of an image of `GET /v1/images`
    /// (the environment goes on the host that built it).
    #[schema(min_length = 1, max_length = 200)]
    base_image: Option<String>,
    /// Runs once, as the guest user, after SSH answers; a non-zero exit fails the environment.
    #[schema(
        min_length = 1,
        max_length = 65536,
        pattern = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"
    )]
    init_script: Option<String>,
    /// Handed to the VM as data: at most 64, names of `[A-Za-z_][A-Za-z0-9_]*` (at most 128
    /// characters; those starting with `HEARTH_` are reserved).
    #[serde(default)]
    environment_vars: BTreeMap<String, String>,
    /// Cloned into the `dev` user's home (`~/<last path segment, less .git>`) after SSH
    /// answers, before the init script: `https://`, `http://`, `git://`, `ssh://` or
    /// `user@host:path`, with no user or password in it (see `gitCredential`). A clone that
    /// fails puts the environment in `error`, with git's reason.
    #[schema(min_length = 1, max_length = 2048)]
    repository_url: Option<String>,
    /// The branch or tag to clone; the remote's default branch when left out.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = "^[A-Za-z0-9_][A-Za-z0-9._/-]*$"
    )]
    repository_ref: Option<String>,
    /// The name of one of the caller's git credentials (`GET /v1/me/git-credentials`) to
    /// clone with: an `https-token` for an HTTPS URL, an `ssh-key` for an SSH one.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
    )]
    git_credential: Option<String>,
    /// An OpenSSH public key line, so the caller can SSH in too.
    ssh_public_key: Option<String>,
    /// The kind of host; the installation's default when left out.
    provider: Option<HostKind>,
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    region: Option<String>,
    #[schema(minimum = 0, maximum = 16)]
    gpus: Option<i64>,
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    gpu_model: Option<String>,
    /// One of the caller's snapshots (id or name): the environment starts with its disk,
    /// on the host that keeps it.
    #[schema(min_length = 1, max_length = 100)]
    snapshot: Option<String>,
}

impl From<CreateBody> for CreateInput {
    fn from(b: CreateBody) -> CreateInput {
        CreateInput {
            name: b.name,
            size: SizeRequest {
                vcpus: b.vcpus,
                memory_mb: b.memory_mb,
                disk_gb: b.disk_gb,
            },
            duration_hours: b.duration_hours,
            base_image: b.base_image,
            init_script: b.init_script,
            environment_vars: b.environment_vars,
            repository_url: b.repository_url,
            repository_ref: b.repository_ref,
            git_credential: b.git_credential,
            ssh_public_key: b.ssh_public_key,
            provider: b.provider.map(|k| k.to_string()),
            region: b.region,
            gpus: b.gpus,
            gpu_model: b.gpu_model,
            for_mail: None,
            snapshot: b.snapshot,
        }
    }
}

/// Creates an environment, placed on a host and queued for provisioning.
#[utoipa::path(post, path = "/v1/environments", tag = "environments", request_body = CreateBody,
    responses((status = 202, description = "queued for provisioning", body = EnvironmentView),
        Invalid, OverQuota, Authed))]
pub async fn create(
    State(app): State<App>,
    Caller(user): Caller,
    Body(b): Body<CreateBody>,
) -> ApiResult<(StatusCode, Json<EnvironmentView>)> {
    let input = CreateInput::from(b);
    let env = app.create_environment(&user, input).await?;
    Ok((StatusCode::ACCEPTED, Json(EnvironmentView::from(&env))))
}

/// A new environment with the disk of this one as it is now: a snapshot of it (kept and
/// listed like any, named `fork-<slug>-<time>`) and an environment made from that, on the
/// same host, of the same size unless the body asks for another.
#[utoipa::path(post, path = "/v1/environments/{id}/fork", tag = "environments", params(("id" = String, Path, description = "id or slug")),
    request_body = CreateBody,
    responses((status = 202, description = "the new environment, queued for provisioning", body = EnvironmentView),
        Invalid, Missing, Refused, OverQuota, Authed))]
pub async fn fork(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Body(b): Body<CreateBody>,
) -> ApiResult<(StatusCode, Json<EnvironmentView>)> {
    if b.snapshot.is_some() {
        return Err(ApiError::invalid(
            "a fork makes its own snapshot; leave `snapshot` out",
        ));
    }
    let (_, env) = app
        .fork_environment(&user, &id, CreateInput::from(b))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(EnvironmentView::from(&env))))
}

#[derive(Deserialize, Default, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct ListQuery {
    /// `nextCursor` of the page before.
    cursor: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    state: Option<EnvState>,
    #[serde(default)]
    include_destroyed: bool,
}

pub fn page_limit(limit: Option<i64>) -> ApiResult<i64> {
    match limit {
        None => Ok(100),
        Some(n) if (1..=1000).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(format!(
            "limit must be between 1 and 1000, got {n}"
        ))),
    }
}

/// The caller's environments, newest first.
#[utoipa::path(get, path = "/v1/environments", tag = "environments", params(ListQuery),
    responses((status = 200, description = "a page", body = Page<EnvironmentView>), Invalid, Authed))]
pub async fn list(
    State(app): State<App>,
    Caller(user): Caller,
    Params(q): Params<ListQuery>,
) -> ApiResult<Json<Page<EnvironmentView>>> {
    let cursor = q.cursor.as_deref().filter(|c| !c.is_empty());
    let (items, next_cursor) = app
        .store
        .list_environments(
            Some(&user.id),
            q.state,
            q.include_destroyed,
            cursor,
            page_limit(q.limit)?,
        )
        .await?;
    Ok(Json(Page {
        items: items.into_iter().map(EnvironmentView::from).collect(),
        next_cursor,
    }))
}

/// One of the caller's environments.
#[utoipa::path(get, path = "/v1/environments/{id}", tag = "environments", params(("id" = String, Path, description = "id or slug")),
    responses((status = 200, description = "the environment", body = EnvironmentView), Missing, Authed))]
pub async fn get(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<EnvironmentView>> {
    Ok(Json(EnvironmentView::from(
        &app.owned_environment(&user, &id).await?,
    )))
}

#[derive(Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct WaitQuery {
    state: EnvState,
    #[param(minimum = 1, maximum = 600)]
    timeout_seconds: Option<u64>,
}

/// Returns once the environment is in `state`.
#[utoipa::path(get, path = "/v1/environments/{id}/wait", tag = "environments",
    params(("id" = String, Path, description = "id or slug"), WaitQuery),
    responses(
        (status = 200, description = "it is in that state", body = EnvironmentView),
        (status = 408, description = "not yet, after `timeoutSeconds`", body = ErrorBody),
        (status = 409, description = "it settled in `error` or `destroyed` instead", body = ErrorBody),
        Invalid, Missing, Authed))]
pub async fn wait(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Params(q): Params<WaitQuery>,
) -> ApiResult<Json<EnvironmentView>> {
    let timeout = q.timeout_seconds.unwrap_or(60);
    if !(1..=600).contains(&timeout) {
        return Err(ApiError::invalid(
            "timeoutSeconds must be between 1 and 600",
        ));
    }
    let env = app.owned_environment(&user, &id).await?;
    let env = app
        .wait_for_state(env, q.state, Duration::from_secs(timeout))
        .await?;
    Ok(Json(EnvironmentView::from(&env)))
}

async fn control(
    app: App,
    user: &hearth_store::User,
    id: &str,
    kind: JobKind,
) -> ApiResult<(StatusCode, Json<EnvironmentView>)> {
    let env = app.owned_environment(user, id).await?;
    app.request(&user.id, &env, kind).await?;
    Ok((StatusCode::ACCEPTED, Json(EnvironmentView::from(&env))))
}

/// Starts an environment (provisions it anew if its VM is gone).
#[utoipa::path(post, path = "/v1/environments/{id}/start", tag = "environments", params(("id" = String, Path, description = "id or slug")),
    responses((status = 202, description = "a start is queued", body = EnvironmentView), Missing, Refused, OverQuota, Authed))]
pub async fn start(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<EnvironmentView>)> {
    control(app, &user, &id, JobKind::Start).await
}

/// Stops an environment.
#[utoipa::path(post, path = "/v1/environments/{id}/stop", tag = "environments", params(("id" = String, Path, description = "id or slug")),
    responses((status = 202, description = "a stop is queued", body = EnvironmentView), Missing, Refused, Authed))]
pub async fn stop(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<EnvironmentView>)> {
    control(app, &user, &id, JobKind::Stop).await
}

/// Destroys an environment; always possible, whatever its quota or host.
#[utoipa::path(delete, path = "/v1/environments/{id}", tag = "environments", params(("id" = String, Path, description = "id or slug")),
    responses((status = 202, description = "a destroy is queued", body = EnvironmentView), Missing, Refused, Authed))]
pub async fn destroy(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<EnvironmentView>)> {
    control(app, &user, &id, JobKind::Destroy).await
}

/// Runs a command in a running environment and waits for it.
#[utoipa::path(post, path = "/v1/environments/{id}/exec", tag = "environments", params(("id" = String, Path, description = "id or slug")),
    request_body = super::me::ExecBody,
    responses((status = 200, description = "the command ran", body = ExecView), Invalid, Missing, Refused, OverQuota, Authed))]
pub async fn exec(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Body(body): Body<super::me::ExecBody>,
) -> ApiResult<Json<ExecView>> {
    let input: ExecInput = body.into();
    input.validate()?;
    let env = app.owned_environment(&user, &id).await?;
    Ok(Json(ExecView::from(&app.exec(&user, &env, input).await?)))
}

#[derive(Deserialize, Default, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct PageQuery {
    /// `nextCursor` of the page before.
    cursor: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// The commands run in an environment, oldest first, without their output.
#[utoipa::path(get, path = "/v1/environments/{id}/executions", tag = "environments",
    params(("id" = String, Path, description = "id or slug"), PageQuery),
    responses((status = 200, description = "a page of at most `limit` executions and 1 MiB", body = Page<ExecutionSummaryView>), Invalid, Missing, Authed))]
pub async fn executions(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Params(q): Params<PageQuery>,
) -> ApiResult<Json<Page<ExecutionSummaryView>>> {
    let env = app.owned_environment(&user, &id).await?;
    let cursor = q.cursor.as_deref().filter(|c| !c.is_empty());
    let (items, next_cursor) = app
        .store
        .executions_page(&env.id, cursor, page_limit(q.limit)?)
        .await?;
    let views: Vec<ExecutionSummaryView> = items.iter().map(ExecutionSummaryView::from).collect();
    Ok(Json(within_bytes(views, next_cursor, |e| e.id.clone())))
}

/// Most bytes a page of executions holds (the rest is on the next page).
pub const PAGE_BYTES: usize = 1024 * 1024;

/// Cuts a page to `PAGE_BYTES` of JSON (always keeping one item); the next page starts
/// after the last item kept.
fn within_bytes<T: serde::Serialize + utoipa::ToSchema>(
    items: Vec<T>,
    next_cursor: Option<String>,
    cursor_of: impl Fn(&T) -> String,
) -> Page<T> {
    let mut used = 0;
    let mut kept = Vec::with_capacity(items.len());
    let total = items.len();
    for item in items {
        let size = serde_json::to_vec(&item).map(|b| b.len() + 1).unwrap_or(0);
        if !kept.is_empty() && used + size > PAGE_BYTES {
            break;
        }
        used += size;
        kept.push(item);
    }
    let next_cursor = if kept.len() < total {
        kept.last().map(&cursor_of)
    } else {
        next_cursor
    };
    Page {
        items: kept,
        next_cursor,
    }
}

/// One command run in an environment, with its stored output (64 KiB per stream).
#[utoipa::path(get, path = "/v1/environments/{id}/executions/{execution}", tag = "environments",
    params(("id" = String, Path, description = "id or slug"), ("execution" = String, Path, description = "execution id")),
    responses((status = 200, description = "the execution", body = ExecutionView), Missing, Authed))]
pub async fn execution(
    State(app): State<App>,
    Caller(user): Caller,
    Path((id, execution)): Path<(String, String)>,
) -> ApiResult<Json<ExecutionView>> {
    Ok(Json(ExecutionView::from(
        &app.execution(&user, &id, &execution).await?,
    )))
}

#[derive(Deserialize, Default, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct AuditPageQuery {
    /// `nextCursor` of the page before (a number; empty means the first page).
    #[param(pattern = "^[0-9]{0,18}$")]
    cursor: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// An environment's audit log, oldest first.
#[utoipa::path(get, path = "/v1/environments/{id}/audit", tag = "environments",
    params(("id" = String, Path, description = "id or slug"), AuditPageQuery),
    responses((status = 200, description = "a page; the cursor is a number", body = Page<AuditView>), Invalid, Missing, Authed))]
pub async fn audit(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Params(q): Params<AuditPageQuery>,
) -> ApiResult<Json<Page<AuditView>>> {
    let env = app.owned_environment(&user, &id).await?;
    let cursor = super::number_cursor(q.cursor.as_deref())?;
    let filter = AuditFilter {
        environment_id: Some(env.id.clone()),
        ..Default::default()
    };
    let (items, next) = app
        .store
        .audit_page(&filter, cursor, page_limit(q.limit)?, true)
        .await?;
    Ok(Json(Page {
        items: items.iter().map(AuditView::from).collect(),
        next_cursor: next.map(|n| n.to_string()),
    }))
}

/// An environment's provisioning log: the last 100 lines of the last hour.
#[utoipa::path(get, path = "/v1/environments/{id}/logs", tag = "environments", params(("id" = String, Path, description = "id or slug")),
    responses((status = 200, description = "oldest first", body = Items<LogView>), Missing, Authed))]
pub async fn logs(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Items<LogView>>> {
    let env = app.owned_environment(&user, &id).await?;
    Ok(Json(Items {
        items: app
            .store
            .logs(&env.id)
            .await?
            .iter()
            .map(LogView::from)
            .collect(),
    }))
}

/// Why the environment is (or is not) kept alive: last activity, its source, and when the
/// reaper will stop or destroy it.
#[utoipa::path(get, path = "/v1/environments/{id}/activity", tag = "environments", params(("id" = String, Path, description = "id or slug")),
    responses((status = 200, description = "its activity", body = ActivityView), Missing, Authed))]
pub async fn activity(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ActivityView>> {
    Ok(Json(ActivityView::from(
        &app.owned_environment(&user, &id).await?,
    )))
}

/// An explicit keep-alive: counts as activity for auto-stop.
#[utoipa::path(post, path = "/v1/environments/{id}/keepalive", tag = "environments", params(("id" = String, Path, description = "id or slug")),
    responses((status = 200, description = "its activity now", body = ActivityView), Missing, Refused, Authed))]
pub async fn keepalive(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ActivityView>> {
    Ok(Json(ActivityView::from(&app.keep_alive(&user, &id).await?)))
}

/// Live events (server-sent events): the current state and recent log, then changes.
#[utoipa::path(get, path = "/v1/environments/{id}/events", tag = "environments",
    params(("id" = String, Path, description = "id or slug"), ("Last-Event-ID" = Option<String>, Header, description = "resume after this event")),
    responses((status = 200, description = "a stream of `state` and `log` events", content_type = "text/event-stream", body = String), Missing, Authed))]
pub async fn events(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> ApiResult<axum::response::Response> {
    let env = app.owned_environment(&user, &id).await?;
    Ok(event_stream(app, env.id, &headers))
}

/// Runs a command and streams its output (server-sent events): `stdout` and `stderr` as
/// produced, then `exit`. Closing the connection kills the remote process.
#[utoipa::path(post, path = "/v1/environments/{id}/exec/stream", tag = "environments",
    params(("id" = String, Path, description = "id or slug")), request_body = super::me::ExecBody,
    responses((status = 200, description = "`stdout`, `stderr`, then `exit` events", content_type = "text/event-stream", body = String),
        Invalid, Missing, Refused, OverQuota, Authed))]
pub async fn exec_stream(
    State(app): State<App>,
    Caller(user): Caller,
    Path(id): Path<String>,
    Body(body): Body<super::me::ExecBody>,
) -> ApiResult<axum::response::Response> {
    let input: ExecInput = body.into();
    input.validate()?;
    let env = app.owned_environment(&user, &id).await?;
    let rx = app.exec_stream(&user, &env, input).await?;
    Ok(stream_response(rx))
}

/// The environment's live events as server-sent events, resuming after `Last-Event-ID`.
pub fn event_stream(
    app: App,
    environment_id: String,
    headers: &axum::http::HeaderMap,
) -> axum::response::Response {
    let resume = hearth_app::events::parse_cursor(
        headers.get("last-event-id").and_then(|v| v.to_str().ok()),
    );
    live_response(hearth_app::events::stream(app, environment_id, resume))
}

/// Live events as server-sent events, with a `ping` comment every 15 s.
pub fn live_response(
    events: impl futures::Stream<Item = hearth_app::events::LiveEvent> + Send + 'static,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures::StreamExt;
    let events = events.map(|e| {
        Ok::<_, std::convert::Infallible>(
            Event::default()
                .event(e.kind)
                .id(e.id)
                .data(e.data.to_string()),
        )
    });
    Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("ping"),
        )
        .into_response()
}

/// Live changes to the caller's list of environments (server-sent events): `changed` at
/// once, then whenever one of them is created, changes state or goes. Re-read the list
/// then.
#[utoipa::path(get, path = "/v1/environments/events", tag = "environments",
    responses((status = 200, description = "a stream of `changed` events", content_type = "text/event-stream", body = String), Authed))]
pub async fn list_events(State(app): State<App>, Caller(user): Caller) -> axum::response::Response {
    live_response(hearth_app::events::list_stream(app, Some(user.id)))
}

pub fn stream_response(rx: tokio::sync::mpsc::Receiver<StreamEvent>) -> axum::response::Response {
    use axum::response::IntoResponse;
    use axum::response::sse::{Event, KeepAlive, Sse};
    let events = futures::stream::unfold(rx, |mut rx| async move {
        let e = rx.recv().await?;
        Some((
            Ok::<_, std::convert::Infallible>(
                Event::default().event(e.kind).data(e.data.to_string()),
            ),
            rx,
        ))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
