//! Keeps the warm pools full (see hearth-store's `pools` for what a pooled VM is and how
//! a create claims one), on every node with workers.
//!
//! Each pass: surplus ready VMs are marked for draining, each pool short of its size gets
//! new rows (under its row's lock, each taking its host's room), then the pooled VMs that
//! need work are leased and worked on at once: a `filling` one is created by name (a retry,
//! or another node after a crash, finds the VM an earlier try made), waited for until SSH
//! accepts its pool key, and turns `ready`; a `draining` one is removed and its room
//! returned. A fill that fails drains its VM and pauses its pool for `FILL_PAUSE`, so a
//! broken image does not loop; the pause and its reason show in the admin's pool list.

use crate::App;
use crate::error::{AppError, AppResult};
use hearth_core::{HostKind, Resources};
use hearth_guest::Target;
use hearth_guest::keys::KeyPair;
use hearth_provider::{VmRef, VmSpec, VmState};
use hearth_store::{NewPooledVm, PooledAddress, PooledVm, WarmPool};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often a node looks at the pools when nothing wakes it sooner.
const PASS_EVERY: Duration = Duration::from_secs(1);
/// How long a fill or drain is one node's without renewal: a node that dies mid-fill leaves
/// its VM to another within this. A live filler renews it every `RENEW_EVERY`.
const LEASE: Duration = Duration::from_secs(30);
const RENEW_EVERY: Duration = Duration::from_secs(10);
/// Pooled VMs worked on at once by one node.
const AT_ONCE: i64 = 8;
/// How long a pool waits after a failed fill before filling again.
pub const FILL_PAUSE: Duration = Duration::from_secs(30);
/// The label that marks a pooled VM's pool, for people looking at the host.
pub const LABEL_POOL: &str = "hearth.pool";

pub async fn run(app: App, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Err(e) = pass(&app).await {
            tracing::warn!(error = %e, "warm pool pass failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(PASS_EVERY) => {}
            _ = app.pools_wake.notified() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// One pass: shrink, grow, then fill and drain what this node leased.
pub async fn pass(app: &App) -> anyhow::Result<()> {
    // A warm VM's connection (`pool:<id>`) lives while its row does: once a claim finished
    // (on another node; the claiming node made it the environment's) or a drain removed
    // it, the pool key's session must not outlive it.
    let live = app.store.pooled_ids().await?;
    app.ssh
        .forget_where(|key| {
            key.strip_prefix("pool:")
                .is_some_and(|id| !live.contains(id))
        })
        .await;
    app.store.shrink_pools().await?;
    for pool in app.store.pools().await? {
        let missing = pool.size - pool.filling - pool.ready;
        if missing <= 0 || pool.paused_until.is_some_and(|t| t > app.now()) {
            continue;
        }
        let candidates: Vec<NewPooledVm> = (0..missing).map(|_| app.new_pooled()).collect();
        let added = app.store.grow_pool(&pool.id, &candidates).await?;
        if added > 0 {
            tracing::info!(host = %pool.host_name, pool = %pool.id, added, "filling a warm pool");
        }
    }
    let owner = app.queue.owner().to_string();
    let leased = app
        .store
        .lease_pooled(&owner, LEASE.as_millis() as i64, AT_ONCE)
        .await?;
    let work = leased.into_iter().map(|vm| {
        let owner = owner.clone();
        async move {
            let outcome = if vm.state == "draining" {
                drain(app, &vm, &owner).await
            } else {
                fill(app, &vm, &owner).await
            };
            if let Err(e) = outcome {
                tracing::warn!(pooled = %vm.id, state = %vm.state, error = %e, "warm VM work failed");
                if vm.state == "filling" {
                    let error = format!("filling a warm VM failed: {e}");
                    let _ = app
                        .store
                        .pooled_failed(&vm, &owner, &error, FILL_PAUSE.as_millis() as i64)
                        .await;
                }
            }
        }
    });
    futures::future::join_all(work).await;
    Ok(())
}

impl App {
    /// A pooled VM to be: the id and slug its environment will have, and a pool key of
    /// its own (so no two pooled VMs, and no environment, ever share one).
    fn new_pooled(&self) -> NewPooledVm {
        let keys = KeyPair::generate();
        NewPooledVm {
            id: uuid::Uuid::now_v7().to_string(),
            slug: hearth_store::new_slug(),
            ssh_public_key: keys.public_openssh.clone(),
            ssh_private_key_enc: self.master_key.seal(&keys.private_openssh),
        }
    }

    /// Sets a host's pool of `resources` (on this server's image) to `size` VMs.
    pub async fn set_pool(
        &self,
        actor: &hearth_store::User,
        host: &str,
        resources: Resources,
        size: i64,
    ) -> AppResult<WarmPool> {
        let host = self.find_host(host).await?;
        if !(1..=1024).contains(&resources.vcpus)
            || !(64..=4_194_304).contains(&resources.memory_mb)
            || !(1..=65_536).contains(&resources.disk_gb)
        {
            return Err(AppError::Invalid(
                "a pool's VMs have 1 to 1024 vCPUs, 64 to 4194304 MB of memory and 1 to 65536 GB of disk".into(),
            ));
        }
        let pool = self
            .store
            .set_pool(&host.id, &self.config.image, &resources, size)
            .await
            .map_err(|e| match e {
                hearth_store::StoreError::Conflict(m) => AppError::Invalid(m),
                e => e.into(),
            })?;
        let detail = format!(
            "{} VMs of {} vCPUs, {} MB, {} GB on {}",
            size, resources.vcpus, resources.memory_mb, resources.disk_gb, host.name
        );
        let _ = self
            .store
            .audit(&actor.id, "pool_set", None, "success", Some(&detail), None)
            .await;
        self.pools_wake.notify_one();
        Ok(pool)
    }
}

/// Creates the VM (or finds it), waits for it to run and for SSH to take its pool key,
/// and makes it claimable.
async fn fill(app: &App, vm: &PooledVm, owner: &str) -> anyhow::Result<()> {
    let host = app.store.host(&vm.host_id).await?;
    let host_ref = app.host_ref(&host)?;
    let provider = app.providers.get(host.kind)?;
    let mut labels = BTreeMap::from([(LABEL_POOL.to_string(), vm.pool_id.clone())]);
    if let Some(name) = &app.config.instance_name {
        labels.insert("hearth.instance".to_string(), name.clone());
    }
    let spec = VmSpec {
        environment_id: vm.id.clone(),
        name: hearth_provider::vm_name(&vm.id),
        hostname: vm.slug.replace('_', "-"),
        image: vm.base_image.clone(),
        vcpus: vm.vcpus,
        memory_mb: vm.memory_mb,
        disk_gb: vm.disk_gb,
        gpus: 0,
        env: BTreeMap::new(),
        authorized_key: vm.ssh_public_key.clone(),
        labels,
    };
    let made = provider.ensure_created(&host_ref, &spec).await?;
    let budget = app.config.ssh_wait;
    let started = Instant::now();
    let mut renewed = Instant::now();
    let mut keep_lease = async || -> anyhow::Result<()> {
        if renewed.elapsed() > RENEW_EVERY {
            renewed = Instant::now();
            if !app
                .store
                .renew_pooled_lease(&vm.id, owner, LEASE.as_millis() as i64)
                .await?
            {
                anyhow::bail!(
                    "lost the lease on warm VM {}; another node took it over",
                    vm.id
                );
            }
        }
        Ok(())
    };
    let info = loop {
        keep_lease().await?;
        match provider.inspect(&host_ref, &made).await? {
            Some(info) if info.state == VmState::Running && info.ssh_port.is_some() => break info,
            Some(_) => {}
            None => anyhow::bail!("the VM {} disappeared while booting", made.name),
        }
        if started.elapsed() > budget {
            anyhow::bail!(
                "the VM did not report running within {} s",
                budget.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (ssh_host, ssh_port) = (
        info.ssh_host.clone().unwrap_or_default(),
        info.ssh_port.unwrap_or_default(),
    );
    let host_key = if host.kind == HostKind::Sim {
        app.sim.probe(&host_ref, &info.vm).await?;
        None
    } else {
        let target = pool_target(app, vm, &ssh_host, ssh_port, None)?;
        let key = loop {
            keep_lease().await?;
            match app.ssh.probe(&target, Duration::from_millis(750)).await {
                Ok(key) => break key,
                Err(e @ hearth_guest::GuestError::HostKey(..)) => return Err(e.into()),
                Err(e) if started.elapsed() > budget => {
                    anyhow::bail!(
                        "SSH did not take the pool key within {} s: {e}",
                        budget.as_secs()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        // The connection stays open: the claim that takes this VM runs its first
        // command on it instead of logging in again (see `jobs::adopt`).
        Some(key)
    };
    let at = PooledAddress {
        vm_id: info.vm.id.clone(),
        ssh_host,
        ssh_port,
        ssh_host_key: host_key,
    };
    if app.store.pooled_ready(&vm.id, owner, &at).await? {
        tracing::info!(host = %host.name, pooled = %vm.id, took_ms = started.elapsed().as_millis() as u64, "a warm VM is ready");
    }
    Ok(())
}

/// Removes the VM (gone already counts) and gives its room back.
async fn drain(app: &App, vm: &PooledVm, owner: &str) -> anyhow::Result<()> {
    let host = app.store.host(&vm.host_id).await?;
    let host_ref = app.host_ref(&host)?;
    let provider = app.providers.get(host.kind)?;
    let made = VmRef {
        name: hearth_provider::vm_name(&vm.id),
        id: vm.vm_id.clone(),
    };
    app.ssh.forget(&format!("pool:{}", vm.id)).await;
    provider.destroy(&host_ref, &made).await?;
    app.store.remove_pooled(vm, owner).await?;
    Ok(())
}

/// The way into a pooled VM with its pool key. Its SSH connection is kept apart from any
/// environment's (`pool:<id>`) until a claim makes it the environment's.
pub(crate) fn pool_target(
    app: &App,
    vm: &PooledVm,
    ssh_host: &str,
    ssh_port: i64,
    host_key: Option<String>,
) -> anyhow::Result<Target> {
    let private_key_openssh = app
        .master_key
        .open(&vm.ssh_private_key_enc)
        .map_err(|e| anyhow::anyhow!("{e}; was HEARTH_MASTER_KEY changed?"))?;
    Ok(Target {
        environment_id: format!("pool:{}", vm.id),
        host: ssh_host.to_string(),
        port: u16::try_from(ssh_port)?,
        user: "dev".into(),
        private_key_openssh,
        host_key,
    })
}
