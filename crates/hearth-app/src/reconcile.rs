//! The reconciler (actor `system:reconciler`): compares what hosts report with what the
//! database says, host by host, and only ever looks at this installation's VMs.
//!
//! - A transition stuck past its deadline with no job behind it is rolled back.
//! - Host counters are re-summed from the environments that hold room.
//! - On each healthy host: an environment that should have a VM and has none is marked
//!   vanished; one Hearth thinks running whose VM stopped is marked stopped; a VM that
//!   runs for an environment at rest (stopped, failed) is stopped, since only what holds
//!   quota may run; a VM that belongs to no live environment (or is a leftover of one that
//!   lives elsewhere) is removed. A warm pool's VMs are left to the pools; a ready one
//!   that vanished is drained so its pool refills.
//!
//! It judges only on facts observed after the state they are compared with: the
//! environments are read before the host is listed, every suspect is read again and its
//! VM inspected directly, and it acts only on what it found the same way on two passes in a
//! row (the same environment generation, the same finding), with every write conditional
//! on that generation. Environments with a job queued or running are the job's business
//! and are skipped. Unhealthy hosts, and hosts whose listing fails, are not judged at all.

use crate::App;
use hearth_core::{EnvState, HostHealth, HostKind, JobKind};
use hearth_provider::{VmInfo, VmRef, VmState};
use hearth_store::{Environment, Host, StoreError};
use std::collections::HashMap;
use std::sync::Mutex;

pub const RECONCILER: &str = "system:reconciler";

/// What the last pass found and did not act on yet: `key -> what exactly`. A finding is
/// acted on when the next pass finds it again, unchanged.
#[derive(Default)]
pub struct Suspects(Mutex<HashMap<String, String>>);

/// One pass's findings, checked against the previous pass's.
struct Pass<'a> {
    previous: &'a HashMap<String, String>,
    seen: HashMap<String, String>,
}

impl Pass<'_> {
    /// Records a finding; true when the previous pass found exactly the same.
    fn confirmed(&mut self, key: String, what: String) -> bool {
        let again = self.previous.get(&key) == Some(&what);
        self.seen.insert(key, what);
        again
    }
}

pub async fn reconcile(app: &App) -> anyhow::Result<()> {
    roll_back_stuck(app).await?;
    for host in app.store.resum_hosts().await? {
        tracing::warn!(host = %host, "host capacity counters had drifted from its environments; re-summed");
    }
    let previous = std::mem::take(&mut *app.suspects.0.lock().unwrap());
    let mut pass = Pass {
        previous: &previous,
        seen: HashMap::new(),
    };
    for host in app.store.hosts().await? {
        // Not answering, or (a Docker engine) not yet known to be one machine registered
        // once: its VMs are not judged.
        if host.health != HostHealth::Healthy
            || (host.kind == HostKind::Docker && host.identity.is_none())
        {
            continue;
        }
        if let Err(e) = reconcile_host(app, &host, &mut pass).await {
            tracing::warn!(host = %host.name, error = %e, "reconciler skipped a host it could not ask");
        }
    }
    *app.suspects.0.lock().unwrap() = pass.seen;
    Ok(())
}

async fn roll_back_stuck(app: &App) -> anyhow::Result<()> {
    let deadline = app.config.transition_deadline.as_millis() as i64;
    for env in app.store.transitional_for(deadline).await? {
        // The query leaves out those a job owns; one may have been queued since.
        if app.store.has_outstanding_job(&env.id).await? {
            continue;
        }
        let msg = format!(
            "stuck in {} for over {} s with no job to finish it; rolled back",
            env.state,
            deadline / 1000
        );
        if env.state == EnvState::Destroying {
            app.log(
                &env,
                "error",
                "stuck in destroying; queueing the destroy again",
            )
            .await;
            app.request(RECONCILER, &env, JobKind::Destroy).await?;
        } else if let Ok(next) = env.moved_to(EnvState::Error, Some(msg.clone()), app.now()) {
            app.log(&env, "error", &msg).await;
            let _ = app.store.save_transition(&env, next, RECONCILER).await;
        }
    }
    Ok(())
}

/// What the reconciler found about one environment, before confirming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finding {
    Vanished,
    StoppedBehindOurBack,
    RunsWhileAtRest,
}

fn judge(env: &Environment, vm: Option<&VmInfo>) -> Option<Finding> {
    match (env.state, vm.map(|v| v.state)) {
        (EnvState::Running, None) => Some(Finding::Vanished),
        (EnvState::Running, Some(VmState::Stopped | VmState::Other)) => {
            Some(Finding::StoppedBehindOurBack)
        }
        (EnvState::Stopped, None) if env.vm_id.is_some() => Some(Finding::Vanished),
        (EnvState::Stopped | EnvState::Error, Some(VmState::Running)) if !env.reserved => {
            Some(Finding::RunsWhileAtRest)
        }
        _ => None,
    }
}

async fn reconcile_host(app: &App, host: &Host, pass: &mut Pass<'_>) -> anyhow::Result<()> {
    let provider = app.providers.get(host.kind)?;
    let host_ref = app.host_ref(host)?;
    // Read before listing: a change after this read is newer than the listing can show.
    let envs = app.store.environments_on_host(&host.id).await?;
    let pooled = app.store.pooled_on_host(&host.id).await?;
    let vms = provider.list(&host_ref).await?;
    let by_env: HashMap<&str, &VmInfo> =
        vms.iter().map(|v| (v.environment_id.as_str(), v)).collect();

    for env in &envs {
        let Some(finding) = judge(env, by_env.get(env.id.as_str()).copied()) else {
            continue;
        };
        // Confirm on fresh facts: the row unchanged, no job, and the VM as suspected.
        let Ok(now) = app.store.environment(&env.id).await else {
            continue;
        };
        if now.generation != env.generation || app.store.has_outstanding_job(&env.id).await? {
            continue;
        }
        let vm = VmRef {
            name: hearth_provider::vm_name(&env.id),
            id: env.vm_id.clone(),
        };
        let fresh = provider.inspect(&host_ref, &vm).await?;
        if judge(&now, fresh.as_ref()) != Some(finding) {
            continue;
        }
        if pass.confirmed(
            format!("env:{}", env.id),
            format!("{}:{finding:?}", now.generation),
        ) {
            act(app, &now, finding, &host_ref, provider.as_ref(), &vm).await;
        }
    }

    // A warm VM that stopped or vanished (an engine restart, a reboot) is drained: its row
    // goes, its room returns, the pool refills. The filler and claims own the rest of a
    // pooled VM's life.
    for vm in pooled.iter().filter(|p| p.state == "ready") {
        if by_env
            .get(vm.id.as_str())
            .is_some_and(|v| v.state == VmState::Running)
        {
            continue;
        }
        let made = VmRef {
            name: hearth_provider::vm_name(&vm.id),
            id: vm.vm_id.clone(),
        };
        if provider
            .inspect(&host_ref, &made)
            .await?
            .is_some_and(|v| v.state == VmState::Running)
        {
            continue;
        }
        if pass.confirmed(format!("pooled:{}", vm.id), "not running".into())
            && app.store.drain_pooled(&vm.id).await?
        {
            tracing::warn!(host = %host.name, pooled = %vm.id, "a warm VM stopped or vanished outside Hearth; drained, its pool refills");
        }
    }

    for vm in &vms {
        if pooled.iter().any(|p| p.id == vm.environment_id)
            || app.store.pooled_vm(&vm.environment_id).await?.is_some()
        {
            continue; // a warm VM: the pools' business
        }
        if crate::images::is_fresh_check(&vm.environment_id, app.now()) {
            continue; // an image check under way: it removes its VM itself
        }
        let owner = match app.store.environment(&vm.environment_id).await {
            Ok(env) => Some(env),
            Err(StoreError::NotFound) => None,
            Err(e) => return Err(e.into()),
        };
        let leftover = match &owner {
            None => true,
            Some(env) if env.state == EnvState::Destroyed => true,
            // Its environment lives on another host now, or has another VM here.
            Some(env) => {
                env.host_id.as_deref() != Some(host.id.as_str())
                    || env
                        .vm_id
                        .as_ref()
                        .is_some_and(|id| Some(id) != vm.vm.id.as_ref())
            }
        };
        if !leftover {
            continue;
        }
        if let Some(env) = &owner
            && app.store.has_outstanding_job(&env.id).await?
        {
            continue;
        }
        // Still there? A job may have removed it since the listing.
        if provider.inspect(&host_ref, &vm.vm).await?.is_none() {
            continue;
        }
        let owner_generation = owner.as_ref().map(|e| e.generation).unwrap_or(-1);
        if !pass.confirmed(
            format!("vm:{}:{}", host.id, vm.vm.key()),
            owner_generation.to_string(),
        ) {
            continue;
        }
        tracing::warn!(host = %host.name, environment = %vm.environment_id, vm = %vm.vm.key(), "removing a VM that belongs to no live environment");
        let outcome = match provider.destroy(&host_ref, &vm.vm).await {
            Ok(()) => ("success", None),
            Err(e) => ("failed", Some(e.to_string())),
        };
        let _ = app
            .store
            .audit(
                RECONCILER,
                "orphan_removed",
                Some(&vm.environment_id),
                outcome.0,
                outcome.1.as_deref(),
                None,
            )
            .await;
    }
    Ok(())
}

async fn act(
    app: &App,
    env: &Environment,
    finding: Finding,
    host: &hearth_provider::HostRef,
    provider: &dyn hearth_provider::Provider,
    vm: &VmRef,
) {
    let now = app.now();
    match finding {
        Finding::Vanished => {
            let msg =
                "the VM vanished outside Hearth; start the environment to provision a new one"
                    .to_string();
            if let Ok(mut next) = env.moved_to(EnvState::Error, Some(msg.clone()), now) {
                next.vm_id = None;
                next.ssh_port = None;
                app.log(env, "error", &msg).await;
                if app
                    .store
                    .save_transition(env, next, RECONCILER)
                    .await
                    .is_ok()
                {
                    app.notify_changed(&env.id);
                }
            }
            app.ssh.forget(&env.id).await;
        }
        Finding::StoppedBehindOurBack => {
            // Stopped behind Hearth's back (engine restart, OOM kill): record it.
            app.log(
                env,
                "error",
                "the VM stopped outside Hearth; marking it stopped",
            )
            .await;
            let message = Some("stopped outside Hearth".to_string());
            if let Ok(stopping) = env.moved_to(EnvState::Stopping, message.clone(), now)
                && let Ok(stopping) = app.store.save_transition(env, stopping, RECONCILER).await
                && let Ok(mut stopped) = stopping.moved_to(EnvState::Stopped, message, now)
            {
                stopped.ssh_port = None;
                let _ = app
                    .store
                    .save_transition(&stopping, stopped, RECONCILER)
                    .await;
            }
            app.ssh.forget(&env.id).await;
            app.notify_changed(&env.id);
        }
        Finding::RunsWhileAtRest => {
            // Only what holds quota and host room may run.
            let outcome = match provider.stop(host, vm).await {
                Ok(()) | Err(hearth_provider::ProviderError::NotFound(_)) => ("success", None),
                Err(e) => ("failed", Some(e.to_string())),
            };
            app.log(
                env,
                "info",
                &format!(
                    "its VM was running while the environment is {}; stopped it",
                    env.state
                ),
            )
            .await;
            let _ = app
                .store
                .audit(
                    RECONCILER,
                    "vm_stopped",
                    Some(&env.id),
                    outcome.0,
                    outcome.1.as_deref(),
                    None,
                )
                .await;
        }
    }
}
