//! Users' snapshots of their environments' disks, new environments made from them, and
//! forks (a snapshot and a new environment from it, in one call).
//!
//! A snapshot is taken while the caller waits (a Docker commit, or on an agent host a copy
//! of the VM's disk: seconds per GB), recorded
//! first as `taking` under the tier's count, so the quota never misses one. A node that
//! dies mid-take leaves the row to the reaper (`settle_snapshots`): the host has the image
//! (the commit finished) and it becomes ready, or it has none and the row goes. Deleting
//! marks the row first, removes the image, then the row; a failure in between is finished
//! by the reaper too. Memory is not kept: an environment made from a snapshot boots anew,
//! with an identity of its own (host key, authorized keys; see the guest's start-up).
//!
//! A running VM's guest keeps written data in its memory for a while: before its disk is
//! copied, the guest is asked to `sync` (a container's writes are the host's already).

use crate::App;
use crate::error::{AppError, AppResult};
use hearth_core::{EnvState, HostKind, validate};
use hearth_provider::{ProviderError, VmRef};
use hearth_store::{Environment, Snapshot, StoreError, User};
use std::time::Duration;

/// How long taking one snapshot may take (a commit of a large disk). The taker-lost time
/// (`HEARTH_SNAPSHOT_TAKER_LOST_MS`, 15 minutes) must be longer.
const TAKE_LIMIT: Duration = Duration::from_secs(600);
/// How long a guest's `sync` before a snapshot may take.
const SYNC_LIMIT: Duration = Duration::from_secs(60);

impl App {
    /// Saves the disk of the caller's environment (running or stopped) as snapshot `name`.
    pub async fn take_snapshot(
        &self,
        user: &User,
        id_or_slug: &str,
        name: &str,
    ) -> AppResult<Snapshot> {
        validate::name(name).map_err(AppError::Invalid)?;
        let env = self.owned_environment(user, id_or_slug).await?;
        if !matches!(env.state, EnvState::Running | EnvState::Stopped) {
            return Err(AppError::InvalidState(format!(
                "a snapshot is taken of a running or stopped environment; this one is {}",
                env.state
            )));
        }
        let host = self
            .store
            .host(env.host_id.as_deref().unwrap_or_default())
            .await?;
        let host_ref = self.host_ref(&host)?;
        let provider = self
            .providers
            .get(host.kind)
            .map_err(|e| AppError::Invalid(e.to_string()))?;
        let snapshot = self
            .store
            .begin_snapshot(user, &env, name)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => AppError::Conflict(m),
                e => e.into(),
            })?;
        let vm = VmRef {
            name: hearth_provider::vm_name(&env.id),
            id: env.vm_id.clone(),
        };
        if env.state == EnvState::Running
            && host.kind != HostKind::Docker
            && let Err(e) = self.sync_guest(&env, SYNC_LIMIT).await
        {
            tracing::warn!(environment = %env.id, error = %e, "could not sync the guest before its snapshot");
        }
        let taken =
            tokio::time::timeout(TAKE_LIMIT, provider.snapshot(&host_ref, &vm, &snapshot.id))
                .await
                .unwrap_or_else(|_| {
                    Err(ProviderError::Unavailable(format!(
                        "the snapshot took longer than {} s",
                        TAKE_LIMIT.as_secs()
                    )))
                });
        let made = match taken {
            Ok(made) => made,
            Err(e) => {
                // Nothing was made (a commit is whole or absent); a commit that finishes
                // after a timeout is found and removed by the reaper.
                match &e {
                    ProviderError::Unavailable(_) => {}
                    _ => self.store.forget_snapshot(&snapshot.id).await?,
                }
                return Err(match e {
                    ProviderError::Unsupported(m) => AppError::Invalid(m),
                    ProviderError::NotFound(_) => {
                        AppError::InvalidState("the environment's VM is gone".into())
                    }
                    e => AppError::Unavailable(format!("taking the snapshot failed: {e}")),
                });
            }
        };
        let snapshot = self
            .store
            .snapshot_taken(
                &snapshot.id,
                &made.image,
                made.size_bytes,
                made.memory_bytes,
            )
            .await?;
        self.log(
            &env,
            "info",
            &if made.memory_bytes > 0 {
                format!(
                    "snapshot {name} taken ({} MB, {} MB of it the VM's memory)",
                    made.size_bytes / 1_000_000,
                    made.memory_bytes / 1_000_000
                )
            } else {
                format!("snapshot {name} taken ({} MB)", made.size_bytes / 1_000_000)
            },
        )
        .await;
        let _ = self
            .store
            .audit(
                &user.id,
                "snapshot",
                Some(&env.id),
                "success",
                Some(name),
                None,
            )
            .await;
        Ok(snapshot)
    }

    /// Has the guest write what it holds in memory to its disk, so a copy of the disk (or
    /// the disk after a power-off) has it, within `limit` all told (connecting included).
    /// The error says why not; the disk then has what reached it.
    pub(crate) async fn sync_guest(
        &self,
        env: &Environment,
        limit: Duration,
    ) -> Result<(), String> {
        let request = hearth_guest::ExecRequest {
            code: "sync".into(),
            code_on_stdin: false,
            working_dir: None,
            env: Default::default(),
            stdin: Vec::new(),
            timeout: limit,
            max_output: 4096,
        };
        let target = self.target(env).map_err(|e| e.to_string())?;
        match tokio::time::timeout(limit, self.ssh.exec(&target, &request)).await {
            Ok(Ok(out)) if out.exit_code == Some(0) => Ok(()),
            Ok(Ok(out)) => Err(format!(
                "sync in the guest ended with {:?}{}",
                out.exit_code,
                if out.timed_out { " (timed out)" } else { "" }
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "the guest did not sync within {} s",
                limit.as_secs()
            )),
        }
    }

    /// The caller's snapshots, newest first.
    pub async fn snapshots(&self, user: &User) -> AppResult<Vec<Snapshot>> {
        Ok(self.store.snapshots_of(&user.id).await?)
    }

    /// The caller's ready snapshot by id or name (a create from it names it so).
    pub(crate) async fn ready_snapshot(
        &self,
        user: &User,
        id_or_name: &str,
    ) -> AppResult<Snapshot> {
        let snapshot = self
            .store
            .snapshot_for_user(&user.id, id_or_name)
            .await
            .map_err(|e| match e {
                StoreError::NotFound => {
                    AppError::Invalid(format!("you have no snapshot {id_or_name:?}"))
                }
                e => e.into(),
            })?;
        if snapshot.state != "ready" || snapshot.image.is_none() {
            return Err(AppError::InvalidState(format!(
                "snapshot {} is {}, not ready",
                snapshot.name, snapshot.state
            )));
        }
        Ok(snapshot)
    }

    /// Removes the caller's snapshot: its place in the quota is free at once.
    /// Environments made from it keep running.
    pub async fn delete_snapshot(&self, user: &User, id_or_name: &str) -> AppResult<Snapshot> {
        let snapshot = self.store.snapshot_for_user(&user.id, id_or_name).await?;
        if snapshot.state == "taking" {
            return Err(AppError::InvalidState(
                "the snapshot is still being taken; delete it once it is ready".into(),
            ));
        }
        self.store.snapshot_deleting(&snapshot.id).await?;
        self.remove_snapshot(&snapshot).await?;
        let _ = self
            .store
            .audit(
                &user.id,
                "snapshot_delete",
                Some(&snapshot.environment_id),
                "success",
                Some(&snapshot.name),
                None,
            )
            .await;
        Ok(snapshot)
    }

    async fn remove_snapshot(&self, snapshot: &Snapshot) -> AppResult<()> {
        match self.store.host(&snapshot.host_id).await {
            Ok(host) => {
                let host_ref = self.host_ref(&host)?;
                self.providers
                    .get(host.kind)
                    .map_err(|e| AppError::Invalid(e.to_string()))?
                    .remove_snapshot(&host_ref, &snapshot.id)
                    .await
                    .map_err(|e| {
                        AppError::Unavailable(format!("removing the snapshot failed: {e}"))
                    })?;
            }
            // Its host was removed, and its images with it.
            Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        self.store.forget_snapshot(&snapshot.id).await?;
        Ok(())
    }

    /// A new environment with the disk of the caller's environment as it is now: a
    /// snapshot (named `fork-<its slug>-<time>`, kept and listed like any) and an
    /// environment from it, on the same host, of the same size unless asked otherwise.
    pub async fn fork_environment(
        &self,
        user: &User,
        id_or_slug: &str,
        mut input: crate::service::CreateInput,
    ) -> AppResult<(Snapshot, Environment)> {
        let env = self.owned_environment(user, id_or_slug).await?;
        let name = format!("fork-{}-{}", env.slug, self.now());
        let snapshot = self.take_snapshot(user, &env.id, &name).await?;
        input.snapshot = Some(snapshot.id.clone());
        let size = &mut input.size;
        if size.vcpus.is_none() && size.memory_mb.is_none() && size.disk_gb.is_none() {
            size.vcpus = Some(env.vcpus);
            size.memory_mb = Some(env.memory_mb);
            size.disk_gb = Some(env.disk_gb);
        }
        match self.create_environment(user, input).await {
            Ok(created) => Ok((snapshot, created)),
            Err(e) => {
                // The fork did not happen: its snapshot does not stay to hold the quota.
                self.store.snapshot_deleting(&snapshot.id).await?;
                if let Err(removing) = self.remove_snapshot(&snapshot).await {
                    tracing::warn!(snapshot = %snapshot.id, error = %removing, "a failed fork's snapshot is left to the reaper");
                }
                Err(e)
            }
        }
    }

    /// The reaper's part: snapshots whose taker died become ready (the host finished
    /// them) or go; deletions cut short are finished; a snapshot a host keeps with no
    /// record (its commit finished after its record was dropped) is removed.
    pub async fn settle_snapshots(&self, sweep: bool) -> anyhow::Result<()> {
        if sweep {
            self.remove_unrecorded_images(hearth_provider::docker::LABEL_SNAPSHOT)
                .await?;
        }
        let lost = self.config.snapshot_taker_lost.as_millis() as i64;
        for snapshot in self.store.stale_snapshots(lost).await? {
            if let Err(e) = self.settle_snapshot(&snapshot).await {
                tracing::warn!(snapshot = %snapshot.id, error = %e, "could not settle a snapshot; trying again next pass");
            }
        }
        Ok(())
    }

    async fn settle_snapshot(&self, snapshot: &Snapshot) -> anyhow::Result<()> {
        if snapshot.state == "deleting" {
            self.remove_snapshot(snapshot).await?;
            return Ok(());
        }
        let host = match self.store.host(&snapshot.host_id).await {
            Ok(host) => host,
            Err(StoreError::NotFound) => {
                self.store.forget_snapshot(&snapshot.id).await?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let host_ref = self.host_ref(&host)?;
        let provider = self.providers.get(host.kind)?;
        match provider.find_snapshot(&host_ref, &snapshot.id).await? {
            Some(made) => {
                self.store
                    .snapshot_taken(
                        &snapshot.id,
                        &made.image,
                        made.size_bytes,
                        made.memory_bytes,
                    )
                    .await?;
                tracing::info!(snapshot = %snapshot.id, "a snapshot whose taker died was finished on its host");
            }
            None => {
                self.store.forget_snapshot(&snapshot.id).await?;
                tracing::info!(snapshot = %snapshot.id, "a snapshot whose taker died was never made; dropped");
            }
        }
        Ok(())
    }

    /// Removes this installation's images labelled `label` (snapshots, custom images)
    /// that no record names any more: one finished after its record was dropped, or one
    /// untagged at a delete while a VM still used it (removed once no VM does). Hosts that
    /// do not answer are left for a later pass.
    pub(crate) async fn remove_unrecorded_images(&self, label: &str) -> anyhow::Result<()> {
        for host in self.store.hosts().await? {
            if host.health != hearth_core::HostHealth::Healthy {
                continue;
            }
            let (Ok(host_ref), Ok(provider)) =
                (self.host_ref(&host), self.providers.get(host.kind))
            else {
                continue;
            };
            let Ok(kept) = provider.labelled_images(&host_ref, label).await else {
                continue;
            };
            for (id, image_id) in kept {
                if let Some(of) = id.strip_suffix(crate::images::VM_BUILD_SUFFIX) {
                    // A VM image's build on a Docker host, kept only while it is made. Its
                    // export's container (a node died mid-way) holds it: both go, by name.
                    match self.store.image_named(of).await {
                        Ok(image) if image.state == "building" => {}
                        Ok(_) | Err(StoreError::NotFound) => {
                            let staged =
                                format!("{}:{id}", hearth_provider::docker::IMAGE_REPOSITORY);
                            match provider.remove_image(&host_ref, &staged).await {
                                Ok(()) => {
                                    tracing::info!(host = %host.name, image = %staged, "removed a VM image's build left behind")
                                }
                                Err(e) => {
                                    tracing::warn!(host = %host.name, image = %staged, error = %e, "could not remove a VM image's build left behind")
                                }
                            }
                        }
                        Err(e) => return Err(e.into()),
                    }
                    continue;
                }
                let recorded = if label == hearth_provider::docker::LABEL_SNAPSHOT {
                    self.store.snapshot(&id).await.map(|_| ())
                } else {
                    self.store.image_named(&id).await.map(|_| ())
                };
                match recorded {
                    Err(StoreError::NotFound) => {
                        match provider.remove_unused_image(&host_ref, &image_id).await {
                            Ok(true) => {
                                tracing::info!(host = %host.name, %label, id = %id, "removed an image no record names")
                            }
                            Ok(false) => {
                                tracing::debug!(host = %host.name, %label, id = %id, "an image no record names is still in use")
                            }
                            Err(e) => {
                                tracing::warn!(host = %host.name, %label, id = %id, error = %e, "could not remove an image no record names")
                            }
                        }
                    }
                    Err(e) => return Err(e.into()),
                    Ok(()) => {}
                }
            }
        }
        Ok(())
    }
}
