//! Hosts (role `admin`): add, list, show, change, drain, make ready, remove.

use super::docs::{AdminOnly, Authed, Invalid, Missing, Refused};
use super::{Admin, Body};
use crate::App;
use crate::error::ApiResult;
use crate::views::{HostView, Items, PoolView};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use hearth_app::hosts::HostInput;
use hearth_core::{HostKind, HostStatus};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

/// A host to add; it must answer before it is added.
#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddBody {
    #[schema(min_length = 1, max_length = 100, pattern = "^[A-Za-z0-9._@:/-]+$")]
    name: String,
    kind: Option<HostKind>,
    /// `unix:///path`, `tcp://host:port` (with `tlsCa`, `tlsCert`, `tlsKey`), `ssh://user@host`;
    /// `sim://...` for a simulated host (the default for one).
    #[schema(max_length = 1000)]
    endpoint: Option<String>,
    /// Where the nodes reach its guests (default 127.0.0.1).
    #[schema(max_length = 253, pattern = "^[A-Za-z0-9.:-]+$")]
    guest_address: Option<String>,
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    region: Option<String>,
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    gpu_model: Option<String>,
    #[schema(minimum = 0, maximum = 128)]
    gpu_count: Option<i64>,
    /// Required but for `ovh` hosts, whose capacity is their project's quota.
    #[schema(minimum = 1, maximum = 100000)]
    max_vcpus: Option<i64>,
    /// Required but for `ovh` hosts.
    #[schema(minimum = 1, maximum = 100000000)]
    max_memory_mb: Option<i64>,
    #[schema(minimum = 1, maximum = 100000)]
    max_environments: Option<i64>,
    tls_ca: Option<String>,
    tls_cert: Option<String>,
    /// Sealed with the master key at once; never shown again.
    tls_key: Option<String>,
    /// A kind's options: a simulated host's latency and faults; a Docker host's
    /// `runtime`, `pidsLimit`, `subnetPool`; an OVH host's `projectId` (required),
    /// `imageName`, `flavorTypes`, `stop` (`shelve` or `shutoff`), `pollMs`.
    #[schema(value_type = Option<Object>)]
    options: Option<Value>,
    /// For `ovh` hosts (whose endpoint is `ovh-eu`, `ovh-ca`, `ovh-us` or a base URL):
    /// sealed with the master key at once, never shown again.
    ovh_credentials: Option<OvhCredentialsBody>,
}

/// An OVH application's key and secret and the consumer key granted to it.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OvhCredentialsBody {
    #[schema(min_length = 1, max_length = 256)]
    application_key: String,
    #[schema(min_length = 1, max_length = 256)]
    application_secret: String,
    #[schema(min_length = 1, max_length = 256)]
    consumer_key: String,
}

/// Adds a host after checking it answers; nothing is added when it does not.
#[utoipa::path(post, path = "/v1/admin/hosts", tag = "hosts", request_body = AddBody,
    responses((status = 201, description = "the host", body = HostView), Invalid, Refused, AdminOnly, Authed))]
pub async fn add(
    State(app): State<App>,
    Admin(admin): Admin,
    Body(b): Body<AddBody>,
) -> ApiResult<(StatusCode, Json<HostView>)> {
    let input = HostInput {
        name: b.name,
        kind: b.kind.unwrap_or(HostKind::Docker).to_string(),
        endpoint: b.endpoint,
        guest_address: b.guest_address,
        region: b.region,
        gpu_model: b.gpu_model,
        gpu_count: b.gpu_count,
        max_vcpus: b.max_vcpus.unwrap_or(0),
        max_memory_mb: b.max_memory_mb.unwrap_or(0),
        max_environments: b.max_environments,
        tls_ca: b.tls_ca,
        tls_cert: b.tls_cert,
        tls_key: b.tls_key,
        options: b.options,
        ovh_credentials: b.ovh_credentials.map(|c| hearth_app::OvhCredentials {
            application_key: c.application_key,
            application_secret: c.application_secret,
            consumer_key: c.consumer_key,
        }),
    };
    let host = app.add_host(&admin, input).await?;
    Ok((StatusCode::CREATED, Json(HostView::from(&host))))
}

/// Every host, with its health and use.
#[utoipa::path(get, path = "/v1/admin/hosts", tag = "hosts", responses((status = 200, description = "the hosts", body = Items<HostView>), AdminOnly, Authed))]
pub async fn list(
    State(app): State<App>,
    Admin(_admin): Admin,
) -> ApiResult<Json<Items<HostView>>> {
    Ok(Json(Items {
        items: app
            .store
            .hosts()
            .await?
            .iter()
            .map(HostView::from)
            .collect(),
    }))
}

/// One host.
#[utoipa::path(get, path = "/v1/admin/hosts/{id}", tag = "hosts", params(("id" = String, Path, description = "host id or name")),
    responses((status = 200, description = "the host", body = HostView), Missing, AdminOnly, Authed))]
pub async fn get(
    State(app): State<App>,
    Admin(_admin): Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<HostView>> {
    Ok(Json(HostView::from(&app.find_host(&id).await?)))
}

/// What to change; what is left out stays.
#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateBody {
    #[schema(minimum = 1, maximum = 100000)]
    max_vcpus: Option<i64>,
    #[schema(minimum = 1, maximum = 100000000)]
    max_memory_mb: Option<i64>,
    #[schema(minimum = 1, maximum = 100000)]
    max_environments: Option<i64>,
    #[schema(value_type = Option<Object>)]
    options: Option<Value>,
}

/// Changes a host's capacity or options.
#[utoipa::path(patch, path = "/v1/admin/hosts/{id}", tag = "hosts", params(("id" = String, Path, description = "host id or name")), request_body(content = Option<UpdateBody>, description = "what to change; what is left out stays"),
    responses((status = 200, description = "the host", body = HostView), Invalid, Missing, AdminOnly, Authed))]
pub async fn update(
    State(app): State<App>,
    Admin(admin): Admin,
    Path(id): Path<String>,
    Body(b): Body<UpdateBody>,
) -> ApiResult<Json<HostView>> {
    let host = app
        .update_host(
            &admin,
            &id,
            (b.max_vcpus, b.max_memory_mb, b.max_environments),
            b.options,
        )
        .await?;
    Ok(Json(HostView::from(&host)))
}

/// Takes no new environments on the host; what it runs stays.
#[utoipa::path(post, path = "/v1/admin/hosts/{id}/drain", tag = "hosts", params(("id" = String, Path, description = "host id or name")),
    responses((status = 200, description = "the host", body = HostView), Missing, AdminOnly, Authed))]
pub async fn drain(
    State(app): State<App>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<HostView>> {
    Ok(Json(HostView::from(
        &app.set_host_status(&admin, &id, HostStatus::Draining)
            .await?,
    )))
}

/// Takes new environments on the host again.
#[utoipa::path(post, path = "/v1/admin/hosts/{id}/ready", tag = "hosts", params(("id" = String, Path, description = "host id or name")),
    responses((status = 200, description = "the host", body = HostView), Missing, AdminOnly, Authed))]
pub async fn ready(
    State(app): State<App>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<HostView>> {
    Ok(Json(HostView::from(
        &app.set_host_status(&admin, &id, HostStatus::Ready).await?,
    )))
}

/// How many VMs of one size the host keeps booted, ready for a create of exactly that size
/// (on this server's image) to claim. 0 empties the pool.
#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolBody {
    #[schema(minimum = 1, maximum = 1024)]
    vcpus: i64,
    #[schema(minimum = 64, maximum = 4194304)]
    memory_mb: i64,
    #[schema(minimum = 1, maximum = 65536)]
    disk_gb: i64,
    #[schema(minimum = 0, maximum = 64)]
    size: i64,
}

/// Sets a warm pool of the host: that many VMs of that size kept booted with no user's
/// key or data, each counting against the host's capacity. A create of exactly that size
/// takes one (still under the user's quota) and the pool refills.
#[utoipa::path(put, path = "/v1/admin/hosts/{id}/pools", tag = "hosts", params(("id" = String, Path, description = "host id or name")),
    request_body = PoolBody,
    responses((status = 200, description = "the pool", body = PoolView), Invalid, Missing, AdminOnly, Authed))]
pub async fn set_pool(
    State(app): State<App>,
    Admin(admin): Admin,
    Path(id): Path<String>,
    Body(b): Body<PoolBody>,
) -> ApiResult<Json<PoolView>> {
    let resources = hearth_core::Resources {
        vcpus: b.vcpus,
        memory_mb: b.memory_mb,
        disk_gb: b.disk_gb,
    };
    let pool = app.set_pool(&admin, &id, resources, b.size).await?;
    Ok(Json(PoolView::from(&pool)))
}

/// Every warm pool, with how many VMs it has filling, ready and draining.
#[utoipa::path(get, path = "/v1/admin/pools", tag = "hosts",
    responses((status = 200, description = "the pools", body = Items<PoolView>), AdminOnly, Authed))]
pub async fn pools(
    State(app): State<App>,
    Admin(_admin): Admin,
) -> ApiResult<Json<Items<PoolView>>> {
    Ok(Json(Items {
        items: app
            .store
            .pools()
            .await?
            .iter()
            .map(PoolView::from)
            .collect(),
    }))
}

/// Removes a host that holds no environment.
#[utoipa::path(delete, path = "/v1/admin/hosts/{id}", tag = "hosts", params(("id" = String, Path, description = "host id or name")),
    responses((status = 200, description = "the removed host", body = HostView), Missing, Refused, AdminOnly, Authed))]
pub async fn remove(
    State(app): State<App>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<HostView>> {
    Ok(Json(HostView::from(&app.remove_host(&admin, &id).await?)))
}

/// A join token for an agent that will become host `name`.
#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinTokenBody {
    #[schema(min_length = 1, max_length = 100, pattern = "^[A-Za-z0-9._@:/-]+$")]
    name: String,
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    region: Option<String>,
    /// How long it may be used (default 3600; 60 to 604800).
    #[schema(minimum = 60, maximum = 604800)]
    ttl_seconds: Option<i64>,
}

#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JoinTokenView {
    /// For `hearth agent --join-token`; shown this once, good for one join.
    token: String,
    host_name: String,
    expires_at: String,
}

/// A one-time token with which a `hearth agent` joins as a new host.
#[utoipa::path(post, path = "/v1/admin/hosts/join-tokens", tag = "hosts", request_body = JoinTokenBody,
    responses((status = 201, description = "the token", body = JoinTokenView), Invalid, Refused, AdminOnly, Authed))]
pub async fn join_token(
    State(app): State<App>,
    Admin(admin): Admin,
    Body(b): Body<JoinTokenBody>,
) -> ApiResult<(StatusCode, Json<JoinTokenView>)> {
    let (token, expires_at) = app
        .create_join_token(&admin, &b.name, b.region.as_deref(), b.ttl_seconds)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(JoinTokenView {
            token,
            host_name: b.name,
            expires_at: crate::views::time(expires_at),
        }),
    ))
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentCapacity {
    #[schema(minimum = 1, maximum = 100000)]
    max_vms: i64,
    #[schema(minimum = 1, maximum = 100000)]
    max_vcpus: i64,
    #[schema(minimum = 1, maximum = 100000000)]
    max_memory_mb: i64,
    #[schema(minimum = 1, maximum = 1000000)]
    max_disk_gb: i64,
}

/// An agent asking to join, with its join token.
#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinBody {
    #[schema(max_length = 200)]
    token: String,
    /// `https://host:port`, where the agent answers with `certificate`.
    #[schema(max_length = 1000, pattern = "^https://[^\\s]+$")]
    endpoint: String,
    /// The agent's certificate authority (PEM), pinned: nothing else is trusted for it.
    #[schema(max_length = 16384, pattern = "BEGIN CERTIFICATE")]
    certificate: String,
    #[schema(max_length = 253, pattern = "^[A-Za-z0-9.:-]+$")]
    guest_address: String,
    capacity: AgentCapacity,
    #[schema(max_length = 100)]
    version: String,
}

#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JoinedView {
    host_id: String,
    host_name: String,
    /// The credential the control plane presents to the agent from now on; shown this once.
    credential: String,
}

/// An agent joins with a join token (no bearer token: the join token is the credential).
#[utoipa::path(post, path = "/v1/agents/join", tag = "hosts", security(()), request_body = JoinBody,
    responses((status = 201, description = "joined", body = JoinedView), Invalid,
        (status = 401, description = "the join token is unknown, used or expired", body = crate::error::ErrorBody),
        (status = 409, description = "a host of that name or machine exists", body = crate::error::ErrorBody),
        (status = 503, description = "the database does not answer", body = crate::error::ErrorBody)))]
pub async fn join(
    State(app): State<App>,
    Body(b): Body<JoinBody>,
) -> ApiResult<(StatusCode, Json<JoinedView>)> {
    use hearth_app::agent_wire as wire;
    let request = wire::JoinRequest {
        token: b.token,
        endpoint: b.endpoint,
        certificate: b.certificate,
        guest_address: b.guest_address,
        capacity: wire::Capacity {
            max_vms: b.capacity.max_vms,
            max_vcpus: b.capacity.max_vcpus,
            max_memory_mb: b.capacity.max_memory_mb,
            max_disk_gb: b.capacity.max_disk_gb,
        },
        version: b.version,
    };
    let (host, credential) = app.join_agent(request).await?;
    Ok((
        StatusCode::CREATED,
        Json(JoinedView {
            host_id: host.id,
            host_name: host.name,
            credential,
        }),
    ))
}

/// An agent host to buy on OVH.
#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BuyBody {
    /// The name the agent joins as.
    #[schema(min_length = 1, max_length = 100, pattern = "^[A-Za-z0-9._@:/-]+$")]
    name: String,
    /// The ovh host (project and region) to buy through; optional when one ovh host
    /// matches `region`.
    #[schema(max_length = 100)]
    via: Option<String>,
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    region: Option<String>,
    /// An OVH flavor name of that region (`b2-15`, ...).
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    flavor: String,
    /// The URL the new host reaches this control plane at.
    #[schema(min_length = 8, max_length = 500)]
    control_plane: String,
}

/// An agent host bought on OVH.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BoughtView {
    name: String,
    via_host_id: String,
    instance_id: String,
    flavor: String,
    created_at: String,
}

/// Buys an agent host on OVH: an instance whose cloud-init installs `hearth agent` and
/// joins it with a join token; the host appears when the agent reports in.
#[utoipa::path(post, path = "/v1/admin/hosts/bought", tag = "hosts", request_body = BuyBody,
    responses((status = 202, description = "the instance is being made", body = BoughtView), Invalid, Refused, AdminOnly, Authed,
        (status = 503, description = "OVH did not make the instance", body = crate::error::ErrorBody)))]
pub async fn buy(
    State(app): State<App>,
    Admin(admin): Admin,
    Body(b): Body<BuyBody>,
) -> ApiResult<(StatusCode, Json<BoughtView>)> {
    let bought = app
        .buy_agent_host(
            &admin,
            &b.name,
            b.via.as_deref(),
            b.region.as_deref(),
            &b.flavor,
            &b.control_plane,
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(BoughtView {
            name: bought.host_name,
            via_host_id: bought.via_host_id,
            instance_id: bought.instance_id,
            flavor: bought.flavor,
            created_at: crate::views::time(bought.created_at),
        }),
    ))
}

/// Sells a bought agent host: while it holds environments it is drained and 409 says how
/// many; once empty its instance is deleted (this waits until OVH says it is gone) and
/// the host removed.
#[utoipa::path(delete, path = "/v1/admin/hosts/bought/{name}", tag = "hosts", params(("name" = String, Path, description = "the host's name")),
    responses((status = 204, description = "sold"), Missing, Refused, AdminOnly, Authed,
        (status = 503, description = "OVH did not delete the instance", body = crate::error::ErrorBody)))]
pub async fn sell(
    State(app): State<App>,
    Admin(admin): Admin,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    app.sell_agent_host(&admin, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// This server's own `hearth` executable, for a host being bought: the join token is the
/// credential (`Authorization: Bearer <join token>`), valid until the agent joins with it.
#[utoipa::path(get, path = "/v1/agents/binary", tag = "hosts", security(()),
    responses((status = 200, description = "the executable", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 401, description = "no valid join token", body = crate::error::ErrorBody)))]
pub async fn binary(
    State(app): State<App>,
    headers: axum::http::HeaderMap,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(super::bearer)
        .unwrap_or_default();
    let valid = !token.is_empty()
        && app
            .store
            .join_token(&hearth_store::hash_token(token))
            .await?
            .is_some();
    if !valid {
        return Err(crate::error::ApiError::unauthenticated(
            "the binary is given for a valid, unused join token only",
        ));
    }
    let path = std::env::current_exe()
        .map_err(|e| hearth_app::AppError::Internal(format!("cannot find this executable: {e}")))?;
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        hearth_app::AppError::Internal(format!("cannot read {}: {e}", path.display()))
    })?;
    // Streamed in 64 KiB pieces: the executable is tens of megabytes.
    let chunks = futures::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    let body = axum::body::Body::from_stream(chunks);
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response())
}
