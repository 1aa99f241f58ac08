//! `hearth agent`: start-up. Loads (or makes) the agent's identity, decides the
//! accelerator, opens the VM records (adopting the VMs still running), joins the control
//! plane if it has not yet, then serves until SIGTERM. VMs keep running when the agent
//! stops: they are separate processes, and the next start adopts them.

use crate::firecracker_host::{FirecrackerConfig, FirecrackerHost};
use crate::identity::{self, Joined};
use crate::image::VmImage;
use crate::qemu::{QemuHost, probe_kvm};
use crate::server::{Agent, VERSION, router, serve, tls_config};
use crate::vmm::{Accel, Vmm};
use anyhow::{Context, Result, bail};
use hearth_provider::agent::wire;
use std::path::PathBuf;
use std::sync::Arc;

/// The VMM backend.
#[derive(Debug, Clone)]
pub enum Backend {
    Qemu,
    Firecracker(FirecrackerConfig),
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub backend: Backend,
    pub state_dir: PathBuf,
    pub image_dir: PathBuf,
    /// Where the API listens (`host:port`).
    pub listen: String,
    /// `host:port` the control plane reaches the API at (in the certificate).
    pub advertise: String,
    /// Where guests' SSH ports are forwarded from.
    pub guest_address: String,
    pub capacity: wire::Capacity,
    /// `None`: decide by booting a probe under KVM.
    pub accel: Option<Accel>,
    /// `qemu` backend: new VMs restore a base snapshot of their size (`base_snapshot.rs`).
    pub base_snapshots: bool,
    /// For the first start: the control plane's URL and a join token.
    pub control_plane: Option<String>,
    pub join_token: Option<String>,
}

/// The accelerator: as configured, else what a probe boot proves (remembered per kernel, so
/// it runs once per host and image).
fn accelerator(config: &AgentConfig, image: &VmImage) -> Accel {
    if let Some(a) = config.accel {
        return a;
    }
    let remembered = config
        .state_dir
        .join(format!("accel-{}", image.kernel_version));
    if let Ok(text) = std::fs::read_to_string(&remembered) {
        match text.trim() {
            "kvm" => return Accel::Kvm,
            "tcg" => return Accel::Tcg,
            _ => {}
        }
    }
    let accel = if probe_kvm(image, &config.state_dir) {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    tracing::info!(
        accel = accel.as_str(),
        "decided the accelerator by booting a probe under KVM"
    );
    let _ = std::fs::write(&remembered, accel.as_str());
    accel
}

async fn join(config: &AgentConfig, tls: &identity::Tls) -> Result<Joined> {
    let (Some(url), Some(token)) = (&config.control_plane, &config.join_token) else {
        bail!(
            "this agent has not joined an installation yet: start it with --control-plane URL and --join-token TOKEN \
             (an admin makes one with `hearth admin hosts join-token NAME`)"
        );
    };
    let request = wire::JoinRequest {
        token: token.clone(),
        endpoint: format!("https://{}", config.advertise),
        certificate: tls.ca_pem.clone(),
        guest_address: config.guest_address.clone(),
        capacity: config.capacity.clone(),
        version: VERSION.into(),
    };
    let response = reqwest::Client::new()
        .post(format!("{}/v1/agents/join", url.trim_end_matches('/')))
        .json(&request)
        .timeout(std::time::Duration::from_secs(60))
        .send()
        .await
        .with_context(|| format!("cannot reach the control plane at {url}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("the control plane refused to let this agent join ({status}): {text}");
    }
    let answer: wire::JoinResponse = serde_json::from_str(&text)
        .context("the control plane's answer to the join is unreadable")?;
    let joined = Joined {
        host_id: answer.host_id,
        host_name: answer.host_name,
        credential_sha256: identity::credential_hash(&answer.credential),
    };
    identity::save_joined(&config.state_dir, &joined)?;
    tracing::info!(host = %joined.host_name, id = %joined.host_id, "joined the installation");
    Ok(joined)
}

pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .with_context(|| format!("create {}", config.state_dir.display()))?;
    let image = VmImage::open(&config.image_dir)?;
    let tls = identity::tls(&config.state_dir, &config.advertise)?;
    let vms: Box<dyn Vmm> = match &config.backend {
        Backend::Qemu => {
            let accel = accelerator(&config, &image);
            let runas = match crate::guard::confine() {
                Ok(user) => {
                    tracing::info!(user = %user, "VMs may not open connections to this host (iptables chain HEARTH-VMS)");
                    Some(user)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "VMs run unconfined: they can reach services on this host; run the agent as root");
                    None
                }
            };
            let host = QemuHost::new(
                config.state_dir.clone(),
                image,
                accel,
                &config.guest_address,
            )?
            .run_as(runas);
            Box::new(if config.base_snapshots {
                host.with_base_snapshots(&config.state_dir)?
            } else {
                host
            })
        }
        Backend::Firecracker(fc) => {
            crate::guard::confine_taps()
                .context("the firecracker backend puts each VM on a tap device")?;
            tracing::info!(
                "VMs on tap devices may not open connections to this host or each other (chains HEARTH-TAPS-*)"
            );
            let host = FirecrackerHost::new(
                config.state_dir.clone(),
                image,
                fc.clone(),
                &config.guest_address,
            )?;
            Box::new(if config.base_snapshots {
                host.with_base_snapshots()?
            } else {
                host
            })
        }
    };
    let accel = vms.accel();
    vms.recover().await;
    let adopted = vms.list().await?;
    let running = adopted
        .iter()
        .filter(|(_, s)| *s == crate::vmm::VmStatus::Running)
        .count();
    tracing::info!(
        vms = adopted.len(),
        running,
        accel = accel.as_str(),
        "opened the VM records"
    );
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let server_tls = tls_config(&tls)?;
    // Joining needs the API up: the control plane checks that it answers with its certificate.
    let joined = match identity::load_joined(&config.state_dir)? {
        Some(joined) => joined,
        None => {
            let health = router_for_join();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let pre = listener;
            let tls_for_join = server_tls.clone();
            let serving = tokio::spawn(async move {
                let _ = serve(pre, tls_for_join, health, async {
                    let _ = stopped.await;
                })
                .await;
            });
            let joined = join(&config, &tls).await;
            let _ = stop.send(());
            let _ = serving.await;
            let joined = joined?;
            let listener = tokio::net::TcpListener::bind(&config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            return finish(config, vms, joined, listener, server_tls, shutdown).await;
        }
    };
    finish(config, vms, joined, listener, server_tls, shutdown).await
}

/// Before joining, only `/healthz` answers.
fn router_for_join() -> axum::Router {
    axum::Router::new().route(
        "/healthz",
        axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
    )
}

async fn finish(
    config: AgentConfig,
    vms: Box<dyn Vmm>,
    joined: Joined,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    tracing::info!(address = %listener.local_addr()?, host = %joined.host_name, "the agent is serving");
    let agent = Arc::new(Agent {
        vms,
        capacity: config.capacity.clone(),
        guest_address: config.guest_address.clone(),
        joined,
    });
    serve(listener, tls, router(agent.clone()), shutdown).await?;
    agent.vms.shutdown();
    tracing::info!("stopped; the VMs keep running");
    Ok(())
}
