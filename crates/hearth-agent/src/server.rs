//! The agent's HTTPS API, for the control plane only. Every route but `/healthz` needs the
//! credential the control plane received when this agent joined (compared by SHA-256 with
//! the one kept in `joined.json`); another host's credential, or none, is refused.
//!
//! - `GET /healthz`: alive (also before joining: the control plane checks it at join).
//! - `GET /v1/status`: version, accelerator, capacity, VM counts.
//! - `GET /v1/vms`, `POST /v1/vms` (create and start, or find: never two VMs for a name),
//!   `GET /v1/vms/{name}`, `POST /v1/vms/{name}/{start|stop|pause|resume}`,
//!   `DELETE /v1/vms/{name}`.
//! - `GET /v1/snapshots`, `POST /v1/snapshots` (save a VM's disk under the control plane's
//!   id, or find the one saved before under it), `GET /v1/snapshots/{id}`,
//!   `DELETE /v1/snapshots/{id}`.
//! - `GET /v1/images`, `PUT /v1/images/{id}` (a custom image from a file system's tarball,
//!   `images.rs`; or the one made before under the id), `GET /v1/images/{id}`,
//!   `DELETE /v1/images/{id}`.
//! - `GET /metrics`: Prometheus text.

use crate::identity::{self, Joined};
use crate::vmm::{VmSpec, VmStatus, Vmm, VmmError};
use anyhow::{Context, Result};
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hearth_provider::agent::wire;
use serde_json::json;
use std::sync::Arc;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Requests a connection may carry at once, and connections held: the control plane is the
/// only client.
const MAX_CONNECTIONS: usize = 256;

pub struct Agent {
    pub vms: Box<dyn Vmm>,
    pub capacity: wire::Capacity,
    pub guest_address: String,
    pub joined: Joined,
}

type Shared = Arc<Agent>;

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({"error": {"code": self.0.as_u16(), "message": self.1}})),
        )
            .into_response()
    }
}

impl From<VmmError> for ApiError {
    fn from(e: VmmError) -> ApiError {
        match e {
            VmmError::NotFound(name) => ApiError(StatusCode::NOT_FOUND, format!("no VM {name}")),
            VmmError::Failed(m) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, m),
        }
    }
}

async fn authorize(State(agent): State<Shared>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(identity::credential_hash);
    if presented.as_deref() != Some(agent.joined.credential_sha256.as_str()) {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "this agent answers only the control plane it joined".into(),
        )
        .into_response();
    }
    next.run(request).await
}

fn view(agent: &Agent, record: &crate::vmm::VmRecord, status: VmStatus) -> wire::Vm {
    wire::Vm {
        name: record.spec.name.clone(),
        environment_id: record.spec.environment_id.clone(),
        state: match status {
            VmStatus::Running => "running",
            VmStatus::Paused => "paused",
            VmStatus::Stopped => "stopped",
        }
        .into(),
        ssh_host: agent.guest_address.clone(),
        ssh_port: record.ssh_port,
    }
}

async fn one(agent: &Agent, name: &str) -> Result<wire::Vm, ApiError> {
    let record = agent
        .vms
        .record(name)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no VM {name}")))?;
    let status = agent.vms.status(name).await?.unwrap_or(VmStatus::Stopped);
    Ok(view(agent, &record, status))
}

async fn status(State(agent): State<Shared>) -> Result<Json<wire::Status>, ApiError> {
    let vms = agent.vms.list().await?;
    Ok(Json(wire::Status {
        version: VERSION.into(),
        backend: agent.vms.backend().into(),
        accel: agent.vms.accel().as_str().into(),
        capacity: agent.capacity.clone(),
        vms: vms.len() as i64,
        running: vms.iter().filter(|(_, s)| *s == VmStatus::Running).count() as i64,
    }))
}

async fn list(State(agent): State<Shared>) -> Result<Json<wire::Vms>, ApiError> {
    let items = agent
        .vms
        .list()
        .await?
        .iter()
        .map(|(r, s)| view(&agent, r, *s))
        .collect();
    Ok(Json(wire::Vms { items }))
}

async fn create(
    State(agent): State<Shared>,
    Json(body): Json<wire::CreateVm>,
) -> Result<Json<wire::Vm>, ApiError> {
    if agent.vms.record(&body.name)?.is_none() {
        let held = agent.vms.list().await?.len() as i64;
        if held >= agent.capacity.max_vms {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("this host holds {held} VMs, its limit"),
            ));
        }
        if body.disk_gb > agent.capacity.max_disk_gb {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "a disk of {} GB is more than this host offers",
                    body.disk_gb
                ),
            ));
        }
    }
    let spec = VmSpec {
        name: body.name,
        environment_id: body.environment_id,
        hostname: body.hostname,
        vcpus: body.vcpus,
        memory_mb: body.memory_mb,
        disk_gb: body.disk_gb,
        authorized_keys: body.authorized_keys,
        labels: body.labels,
        snapshot: body.snapshot,
        image: body.image,
    };
    let record = agent.vms.create(&spec).await?;
    Ok(Json(view(&agent, &record, VmStatus::Running)))
}

async fn get_vm(
    State(agent): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<wire::Vm>, ApiError> {
    Ok(Json(one(&agent, &name).await?))
}

async fn act(
    State(agent): State<Shared>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Json<wire::Vm>, ApiError> {
    match action.as_str() {
        "start" => agent.vms.start(&name).await?,
        "stop" => agent.vms.stop(&name).await?,
        "pause" => agent.vms.pause(&name).await?,
        "resume" => agent.vms.resume(&name).await?,
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no action {other:?}: start, stop, pause or resume"),
            ));
        }
    }
    Ok(Json(one(&agent, &name).await?))
}

async fn destroy(
    State(agent): State<Shared>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    agent.vms.destroy(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn take_snapshot(
    State(agent): State<Shared>,
    Json(body): Json<wire::TakeSnapshot>,
) -> Result<Json<wire::Snapshot>, ApiError> {
    Ok(Json(agent.vms.snapshot(&body.vm, &body.id).await?))
}

async fn list_snapshots(State(agent): State<Shared>) -> Result<Json<wire::Snapshots>, ApiError> {
    let items = match agent.vms.snapshots() {
        Some(snapshots) => snapshots.list()?,
        None => Vec::new(),
    };
    Ok(Json(wire::Snapshots { items }))
}

async fn get_snapshot(
    State(agent): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<wire::Snapshot>, ApiError> {
    agent
        .vms
        .snapshots()
        .map(|s| s.find(&id))
        .transpose()?
        .flatten()
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no snapshot {id}")))
}

async fn remove_snapshot(
    State(agent): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<wire::SnapshotRemoved>, ApiError> {
    let removed = agent.vms.remove_snapshot(&id).await?;
    Ok(Json(wire::SnapshotRemoved { removed }))
}

/// Images imported at once: each one's unpacked tree and file system take disk and a core.
const IMPORTS_AT_ONCE: usize = 2;
static IMPORTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(IMPORTS_AT_ONCE);
/// How long an image's upload may send nothing.
const IMPORT_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// The ids of images being imported (two imports of one id would share their work).
static IMPORTING: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// One id's import under way; it ends when dropped.
struct Importing(String);

impl Importing {
    fn begin(id: &str) -> Option<Importing> {
        let mut importing = IMPORTING.lock().expect("not poisoned");
        if importing.iter().any(|i| i == id) {
            return None;
        }
        importing.push(id.to_string());
        Some(Importing(id.to_string()))
    }
}

impl Drop for Importing {
    fn drop(&mut self) {
        IMPORTING
            .lock()
            .expect("not poisoned")
            .retain(|i| *i != self.0);
    }
}

fn images(agent: &Agent) -> Result<&Arc<crate::snapshots::Snapshots>, ApiError> {
    agent.vms.images().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_IMPLEMENTED,
            format!("the {} backend takes no images", agent.vms.backend()),
        )
    })
}

/// `PUT /v1/images/{id}`: the body is the image's file system as a tarball, its length
/// announced (at most `images::MAX_TARBALL_BYTES`).
async fn import_image(
    State(agent): State<Shared>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Json<wire::Snapshot>, ApiError> {
    use futures::StreamExt;
    let images = images(&agent)?.clone();
    images
        .work_dir(&id)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    if let Some(found) = images.find(&id)? {
        return Ok(Json(found));
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError(
                StatusCode::LENGTH_REQUIRED,
                "announce the tarball's length (Content-Length)".into(),
            )
        })?;
    if length > crate::images::MAX_TARBALL_BYTES {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "an image's tarball may have at most {} bytes",
                crate::images::MAX_TARBALL_BYTES
            ),
        ));
    }
    let permit = IMPORTS.try_acquire().map_err(|_| {
        ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{IMPORTS_AT_ONCE} images are being imported on this host; try again later"),
        )
    })?;
    let importing = Importing::begin(&id).ok_or_else(|| {
        ApiError(
            StatusCode::CONFLICT,
            format!("image {id} is being imported already"),
        )
    })?;
    let promised = images
        .promise(crate::images::room_needed(length))
        .map_err(|e| ApiError(StatusCode::INSUFFICIENT_STORAGE, e.to_string()))?;
    let chunks = futures::stream::unfold(body.into_data_stream(), |mut body| async move {
        match tokio::time::timeout(IMPORT_STALL, body.next()).await {
            Ok(Some(chunk)) => Some((chunk.map_err(std::io::Error::other), body)),
            Ok(None) => None,
            Err(_) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("nothing came for {} s", IMPORT_STALL.as_secs()),
                )),
                body,
            )),
        }
    });
    let reader = tokio_util::io::StreamReader::new(Box::pin(chunks));
    // The import goes on if the caller gives up: what it holds goes with it.
    let made = tokio::task::spawn_blocking(move || {
        let _held = (permit, importing, promised);
        crate::images::import(
            &images,
            &id,
            tokio_util::io::SyncIoBridge::new(reader),
            length,
        )
    })
    .await
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the import failed: {e}"),
        )
    })?
    .map_err(|e| match e {
        VmmError::Failed(m) => ApiError(StatusCode::UNPROCESSABLE_ENTITY, m),
        e => e.into(),
    })?;
    Ok(Json(made))
}

async fn list_images(State(agent): State<Shared>) -> Result<Json<wire::Snapshots>, ApiError> {
    let items = match agent.vms.images() {
        Some(images) => images.list()?,
        None => Vec::new(),
    };
    Ok(Json(wire::Snapshots { items }))
}

async fn get_image(
    State(agent): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<wire::Snapshot>, ApiError> {
    images(&agent)?
        .find(&id)?
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no image {id}")))
}

async fn remove_image(
    State(agent): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<wire::SnapshotRemoved>, ApiError> {
    let removed = agent.vms.remove_image(&id).await?;
    Ok(Json(wire::SnapshotRemoved { removed }))
}

async fn metrics(State(agent): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    use std::fmt::Write;
    let vms = agent.vms.list().await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP hearth_agent_vms VMs by state.\n# TYPE hearth_agent_vms gauge"
    );
    for (state, s) in [
        ("running", VmStatus::Running),
        ("paused", VmStatus::Paused),
        ("stopped", VmStatus::Stopped),
    ] {
        let _ = writeln!(
            out,
            "hearth_agent_vms{{state=\"{state}\"}} {}",
            vms.iter().filter(|(_, st)| *st == s).count()
        );
    }
    let c = &agent.capacity;
    let _ = writeln!(
        out,
        "# HELP hearth_agent_capacity What this host offers.\n# TYPE hearth_agent_capacity gauge"
    );
    let _ = writeln!(
        out,
        "hearth_agent_capacity{{resource=\"vms\"}} {}",
        c.max_vms
    );
    let _ = writeln!(
        out,
        "hearth_agent_capacity{{resource=\"vcpus\"}} {}",
        c.max_vcpus
    );
    let _ = writeln!(
        out,
        "hearth_agent_capacity{{resource=\"memory_mb\"}} {}",
        c.max_memory_mb
    );
    let _ = writeln!(
        out,
        "hearth_agent_info{{version=\"{VERSION}\",accel=\"{}\",host=\"{}\"}} 1",
        agent.vms.accel().as_str(),
        agent.joined.host_name
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// The routes: `/healthz` open, the rest behind the credential.
pub fn router(agent: Shared) -> Router {
    let guarded = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{name}", get(get_vm).delete(destroy))
        .route("/v1/vms/{name}/{action}", post(act))
        .route("/v1/snapshots", get(list_snapshots).post(take_snapshot))
        .route(
            "/v1/snapshots/{id}",
            get(get_snapshot).delete(remove_snapshot),
        )
        .route("/v1/images", get(list_images))
        .route(
            "/v1/images/{id}",
            get(get_image).put(import_image).delete(remove_image),
        )
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            agent.clone(),
            authorize,
        ))
        .with_state(agent);
    Router::new().route("/healthz", get(healthz)).merge(guarded)
}

/// The TLS settings for the agent's certificate (its chain ends at the pinned authority).
pub fn tls_config(tls: &identity::Tls) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = vec![
        CertificateDer::from_pem_slice(tls.cert_pem.as_bytes())
            .context("the agent's certificate")?,
        CertificateDer::from_pem_slice(tls.ca_pem.as_bytes()).context("the agent's authority")?,
    ];
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).context("the agent's key")?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves; then its connections
/// are closed too. (They used to live on: a connection the control plane opened while the
/// agent served only `/healthz` for its join stayed in its client's pool, and every call
/// that later took it got that router's 404, read as "no such VM".)
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10));
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept; pausing 100 ms");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => {
                connections.abort_all();
                while connections.join_next().await.is_some() {}
                return Ok(());
            }
        };
        while connections.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (acceptor, builder, router) = (acceptor.clone(), builder.clone(), router.clone());
        connections.spawn(async move {
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                    .await;
            if let Ok(Ok(stream)) = handshake {
                let _ = builder
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router))
                    .await;
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection opened to a server stays with that server: once it stops, the
    /// connection is closed, never answered by a router that has gone.
    #[tokio::test]
    async fn a_stopped_server_closes_its_connections() {
        let state = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let tls = identity::tls(state.path(), &address.to_string()).unwrap();
        let only_health = Router::new().route("/healthz", get(healthz));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(serve(
            listener,
            tls_config(&tls).unwrap(),
            only_health,
            async {
                let _ = stopped.await;
            },
        ));
        let client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(tls.ca_pem.as_bytes()).unwrap())
            .build()
            .unwrap();
        let base = format!("https://{address}");
        let answered = client.get(format!("{base}/healthz")).send().await.unwrap();
        assert!(answered.status().is_success());
        answered.bytes().await.unwrap();
        // The pooled connection to the stopped server must not answer any more.
        stop.send(()).unwrap();
        serving.await.unwrap().unwrap();
        let after = client.get(format!("{base}/v1/status")).send().await;
        assert!(
            after.is_err(),
            "the stopped server still answered: {after:?}"
        );
    }
}
