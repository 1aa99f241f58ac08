//! Background upkeep, on every node (state writes are conditional, so two nodes doing it
//! at once is harmless):
//! - the reaper stops idle environments and destroys expired ones (actor `system:reaper`);
//! - the reconciler (actor `system:reconciler`) compares the database with the provider:
//!   it rolls back transitions stuck past their deadline with no job to finish them,
//!   marks VMs that vanished or stopped behind Hearth's back, and removes labelled VMs
//!   that belong to no live environment.

use crate::App;
use crate::service::JobKind;
use hearth_core::EnvState;
use hearth_provider::VmState;
use hearth_store::{Environment, now_ms};
use std::collections::HashMap;
use tokio::sync::watch;

pub const REAPER: &str = "system:reaper";
pub const RECONCILER: &str = "system:reconciler";

pub async fn run(app: App, mut shutdown: watch::Receiver<bool>) {
    let every = app.config.reaper_interval;
    loop {
        if let Err(e) = reap(&app).await {
            tracing::warn!(error = %e, "reaper pass failed");
        }
        if let Err(e) = reconcile(&app).await {
            tracing::warn!(error = %e, "reconciler pass failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

async fn log(app: &App, env: &Environment, level: &str, message: &str) {
    tracing::info!(environment = %env.id, "{message}");
    let _ = app.store.append_log(&env.id, level, message).await;
}

pub async fn reap(app: &App) -> anyhow::Result<()> {
    let now = now_ms();
    for env in app.store.idle_environments(now).await? {
        if app.store.has_pending_job(&env.id, JobKind::Stop.as_str()).await? {
            continue;
        }
        let idle = (now - env.last_activity_at.or(env.started_at).unwrap_or(env.created_at)) / 60_000;
        log(app, &env, "info", &format!("idle for {idle} minutes (auto-stop after {}); stopping", env.auto_stop_minutes.unwrap_or(0))).await;
        if let Err(e) = app.request(REAPER, &env, JobKind::Stop).await {
            tracing::warn!(environment = %env.id, error = %e.message, "reaper could not queue a stop");
        }
    }
    for env in app.store.expired_environments(now).await? {
        if app.store.has_pending_job(&env.id, JobKind::Destroy.as_str()).await? {
            continue;
        }
        log(app, &env, "info", "past its expiry time; destroying").await;
        if let Err(e) = app.request(REAPER, &env, JobKind::Destroy).await {
            tracing::warn!(environment = %env.id, error = %e.message, "reaper could not queue a destroy");
        }
    }
    Ok(())
}

pub async fn reconcile(app: &App) -> anyhow::Result<()> {
    let now = now_ms();
    let deadline = app.config.transition_deadline.as_millis() as i64;
    for env in app.store.transitional_since(now - deadline).await? {
        if app.store.has_outstanding_job(&env.id).await? {
            continue; // a job owns it (perhaps waiting for a retry); leave it be
        }
        let msg = format!("stuck in {} for over {} s with no job to finish it; rolled back", env.state, deadline / 1000);
        if env.state == EnvState::Destroying {
            log(app, &env, "error", "stuck in destroying; queueing the destroy again").await;
            app.request(RECONCILER, &env, JobKind::Destroy).await.map_err(|e| anyhow::anyhow!(e.message))?;
        } else if let Ok(next) = env.moved_to(EnvState::Error, Some(msg.clone()), now) {
            log(app, &env, "error", &msg).await;
            let _ = app.store.save_transition(&env, next, RECONCILER).await;
        }
    }

    for host in app.store.resum_hosts().await? {
        tracing::warn!(host = %host, "host capacity counters had drifted from its environments; re-summed");
    }

    let vms = match app.provider.list().await {
        Ok(vms) => vms,
        Err(e) => {
            tracing::debug!(error = %e, "reconciler skipped the provider pass");
            return Ok(());
        }
    };
    let by_env: HashMap<&str, VmState> = vms.iter().map(|v| (v.environment_id.as_str(), v.state)).collect();
    // VMs with no live environment: removed.
    for vm in &vms {
        let owner = app.store.environment(&vm.environment_id).await;
        let orphan = match &owner {
            Err(hearth_store::StoreError::NotFound) => true,
            Ok(env) => env.state == EnvState::Destroyed,
            Err(_) => false,
        };
        if orphan {
            tracing::warn!(environment = %vm.environment_id, vm = %vm.vm_id, "removing a VM that belongs to no live environment");
            let outcome = match app.provider.destroy(&vm.environment_id).await {
                Ok(()) => ("success", None),
                Err(e) => ("failed", Some(e.to_string())),
            };
            let _ = app.store.audit(RECONCILER, "orphan_removed", Some(&vm.environment_id), outcome.0, outcome.1.as_deref(), None).await;
        }
    }
    // Environments Hearth thinks are running whose VM vanished or stopped.
    let (running, _) = app.store.list_environments(None, Some(EnvState::Running), false, None, 10_000).await?;
    for env in running.into_iter().filter(|e| e.provider == app.provider.name()) {
        if app.store.has_outstanding_job(&env.id).await? {
            continue;
        }
        match by_env.get(env.id.as_str()) {
            Some(VmState::Running) => {}
            None => {
                let msg = "the VM vanished outside Hearth".to_string();
                if let Ok(next) = env.moved_to(EnvState::Error, Some(msg.clone()), now) {
                    log(app, &env, "error", &msg).await;
                    let _ = app.store.save_transition(&env, next, RECONCILER).await;
                }
            }
            Some(_) => {
                // Stopped behind Hearth's back (engine restart, OOM kill): record it.
                log(app, &env, "error", "the VM stopped outside Hearth; marking it stopped").await;
                if let Ok(stopping) = env.moved_to(EnvState::Stopping, Some("stopped outside Hearth".into()), now) {
                    if let Ok(stopping) = app.store.save_transition(&env, stopping, RECONCILER).await {
                        if let Ok(mut stopped) = stopping.moved_to(EnvState::Stopped, Some("stopped outside Hearth".into()), now) {
                            stopped.ssh_port = None;
                            let _ = app.store.save_transition(&stopping, stopped, RECONCILER).await;
                        }
                    }
                }
                app.ssh.forget(&env.id).await;
            }
        }
    }
    Ok(())
}

