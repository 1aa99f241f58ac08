//! Host health: every node asks every host, every `HEARTH_HOST_CHECK_INTERVAL_MS`, whether
//! it answers. A host that has not answered for `HEARTH_HOST_UNHEALTHY_AFTER_MS` turns
//! `unhealthy`: placement skips it and the reconciler leaves its VMs alone, so nothing is
//! declared vanished on a host that cannot be asked. With the defaults (5 s, 15 s, and a
//! check given at most 5 s) a host that stops answering is unhealthy within 25 s, and one
//! that answers again is healthy after its next check.
//!
//! What a host says of itself (an agent's version, accelerator and VMs) is kept when it
//! changes, for the admin views.
//!
//! Several nodes checking at once is harmless: they write the same facts.

use crate::App;
use futures::StreamExt;
use hearth_core::HostHealth;
use hearth_store::Host;
use std::time::Duration;
use tokio::sync::watch;

/// Longest one check may take before it counts as unanswered.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Hosts checked at once.
const CHECKS_AT_ONCE: usize = 32;

pub async fn run(app: App, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Err(e) = check_hosts(&app).await {
            tracing::warn!(error = %e, "host health pass failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(app.config.host_check_interval) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

async fn check_one(app: &App, host: &Host) -> Result<(), String> {
    let provider = app.providers.get(host.kind).map_err(|e| e.to_string())?;
    let host_ref = app.host_ref(host).map_err(|e| e.to_string())?;
    let timeout = CHECK_TIMEOUT.min(
        app.config
            .host_check_interval
            .max(Duration::from_millis(500)),
    );
    let facts = match tokio::time::timeout(timeout, provider.check(&host_ref)).await {
        Ok(result) => result.map_err(|e| e.to_string())?,
        Err(_) => return Err(format!("no answer within {} ms", timeout.as_millis())),
    };
    if let Some(report) = facts.report.as_ref()
        && facts.report != host.report
        && let Err(e) = app.store.record_report(&host.id, report).await
    {
        tracing::warn!(host = %host.name, error = %e, "could not keep what the host reported");
    }
    if let Some(c) = facts.capacity {
        // A host that states its capacity (an OVH project's quota) is taken at its word,
        // within the bounds any host has.
        let stated = hearth_store::HostCapacity {
            max_vcpus: c.vcpus.clamp(1, crate::hosts::MAX_HOST_VCPUS),
            max_memory_mb: c.memory_mb.clamp(1, crate::hosts::MAX_HOST_MEMORY_MB),
            max_environments: c.environments.clamp(1, crate::hosts::MAX_HOST_ENVIRONMENTS),
        };
        if stated != host.capacity {
            let update = hearth_store::HostUpdate {
                capacity: Some(stated),
                options: None,
            };
            match app.store.update_host(&host.id, &update).await {
                Ok(_) => {
                    tracing::info!(host = %host.name, vcpus = stated.max_vcpus, memory_mb = stated.max_memory_mb,
                    environments = stated.max_environments, "the host stated a new capacity")
                }
                Err(e) => {
                    tracing::warn!(host = %host.name, error = %e, "could not keep the capacity the host stated")
                }
            }
        }
    }
    if let (None, Some(identity)) = (&host.identity, &facts.identity)
        && let Err(e) = app.store.record_identity(&host.id, identity).await
    {
        tracing::error!(host = %host.name, error = %e, "a host is registered twice; the reconciler leaves it alone");
    }
    Ok(())
}

/// One round: asks every host and records what it found.
pub async fn check_hosts(app: &App) -> anyhow::Result<()> {
    let hosts = app.store.hosts().await?;
    let results: Vec<(Host, Result<(), String>)> = futures::stream::iter(hosts)
        .map(|h| async move {
            let r = check_one(app, &h).await;
            (h, r)
        })
        .buffer_unordered(CHECKS_AT_ONCE)
        .collect()
        .await;
    let mut answered = Vec::new();
    let mut failed = Vec::new();
    for (host, result) in results {
        match result {
            Ok(()) => answered.push(host.id),
            Err(why) => failed.push((host.id, why)),
        }
    }
    let after = app.config.host_unhealthy_after.as_millis() as i64;
    for host in app.store.record_health(&answered, &failed, after).await? {
        match host.health {
            HostHealth::Unhealthy => tracing::warn!(
                host = %host.name,
                why = host.health_message.as_deref().unwrap_or(""),
                "host is unhealthy: placement skips it and its VMs are left alone until it answers"
            ),
            HostHealth::Healthy => tracing::info!(host = %host.name, "host answers again"),
        }
    }
    Ok(())
}
