//! Warm pools: VMs booted ahead of demand, per host and per (image, size), that a create
//! claims instead of booting one.
//!
//! A pooled VM is made for the environment that will claim it: its id and slug are that
//! environment's id and slug, so its VM's name, labels, network and hostname are right
//! from boot, and a claim renames and relabels nothing. It boots with a key of its own (the
//! pool key); the claiming job replaces it with the environment's keys over SSH.
//!
//! Room: a pooled VM holds its host's room like an environment does, from the moment its
//! row is written (`filling`) until the row is removed. A claim moves that room to the
//! environment in the creating transaction (the pooled row turns `claimed` and stops
//! holding; the environment, reserved, starts), so the host's counters never change and
//! never count it twice. The user's quota is checked as for any create.
//!
//! Bounds: a pool holds at most `MAX_POOL_SIZE` VMs, and only `filling` and `ready` ones
//! count towards its size, under a lock on the pool's row: however many nodes fill it, and
//! whatever crashed meanwhile, a pool never grows past its size.

use crate::hosts::{Placement, release, reserve};
use crate::{Result, Store, StoreError, Tx};
use hearth_core::{HostKind, Resources};
use sqlx::Row;
use sqlx::any::AnyRow;

/// The most VMs one pool may keep: each holds memory on its host while no one uses it.
pub const MAX_POOL_SIZE: i64 = 64;

/// A pool as admins see it: what it keeps and how many it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmPool {
    pub id: String,
    pub host_id: String,
    pub host_name: String,
    pub base_image: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    pub size: i64,
    /// Booting now.
    pub filling: i64,
    /// Claimable now.
    pub ready: i64,
    /// Being removed (surplus after a shrink, or failed).
    pub draining: i64,
    pub last_error: Option<String>,
    /// The pool waits until then before filling again (after a failed fill).
    pub paused_until: Option<i64>,
    pub updated_at: i64,
}

/// One pooled VM, as the filler and a claim need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PooledVm {
    /// The id of the environment that will claim it (and of its VM's name).
    pub id: String,
    pub pool_id: String,
    pub host_id: String,
    pub slug: String,
    pub state: String,
    pub base_image: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    pub ssh_public_key: String,
    pub ssh_private_key_enc: String,
    pub vm_id: Option<String>,
    pub ssh_host: Option<String>,
    pub ssh_port: Option<i64>,
    pub ssh_host_key: Option<String>,
}

/// A pooled VM to be: its future environment's id and slug, and its pool key.
#[derive(Debug, Clone)]
pub struct NewPooledVm {
    pub id: String,
    pub slug: String,
    pub ssh_public_key: String,
    pub ssh_private_key_enc: String,
}

/// Where a ready pooled VM answers, as its first contact found it.
#[derive(Debug, Clone)]
pub struct PooledAddress {
    pub vm_id: Option<String>,
    pub ssh_host: String,
    pub ssh_port: i64,
    pub ssh_host_key: Option<String>,
}

const POOLED_COLUMNS: &str = "v.id AS id, v.pool_id AS pool_id, v.host_id AS host_id, v.slug AS slug, v.state AS state, \
     p.base_image AS base_image, v.vcpus AS vcpus, v.memory_mb AS memory_mb, p.disk_gb AS disk_gb, \
     v.ssh_public_key AS ssh_public_key, v.ssh_private_key_enc AS ssh_private_key_enc, v.vm_id AS vm_id, \
     v.ssh_host AS ssh_host, v.ssh_port AS ssh_port, v.ssh_host_key AS ssh_host_key";

fn pooled_from_row(r: &AnyRow) -> Result<PooledVm> {
    Ok(PooledVm {
        id: r.try_get("id")?,
        pool_id: r.try_get("pool_id")?,
        host_id: r.try_get("host_id")?,
        slug: r.try_get("slug")?,
        state: r.try_get("state")?,
        base_image: r.try_get("base_image")?,
        vcpus: r.try_get("vcpus")?,
        memory_mb: r.try_get("memory_mb")?,
        disk_gb: r.try_get("disk_gb")?,
        ssh_public_key: r.try_get("ssh_public_key")?,
        ssh_private_key_enc: r.try_get("ssh_private_key_enc")?,
        vm_id: r.try_get("vm_id")?,
        ssh_host: r.try_get("ssh_host")?,
        ssh_port: r.try_get("ssh_port")?,
        ssh_host_key: r.try_get("ssh_host_key")?,
    })
}

fn pool_from_row(r: &AnyRow) -> Result<WarmPool> {
    Ok(WarmPool {
        id: r.try_get("id")?,
        host_id: r.try_get("host_id")?,
        host_name: r.try_get("host_name")?,
        base_image: r.try_get("base_image")?,
        vcpus: r.try_get("vcpus")?,
        memory_mb: r.try_get("memory_mb")?,
        disk_gb: r.try_get("disk_gb")?,
        size: r.try_get("size")?,
        filling: r.try_get("filling")?,
        ready: r.try_get("ready")?,
        draining: r.try_get("draining")?,
        last_error: r.try_get("last_error")?,
        paused_until: r.try_get("paused_until")?,
        updated_at: r.try_get("updated_at")?,
    })
}

const SELECT_POOLS: &str = "SELECT p.id AS id, p.host_id AS host_id, h.name AS host_name, p.base_image AS base_image, \
     p.vcpus AS vcpus, p.memory_mb AS memory_mb, p.disk_gb AS disk_gb, p.size AS size, p.last_error AS last_error, \
     p.paused_until AS paused_until, p.updated_at AS updated_at, \
     CAST((SELECT COUNT(*) FROM pooled_vms v WHERE v.pool_id = p.id AND v.state = 'filling') AS BIGINT) AS filling, \
     CAST((SELECT COUNT(*) FROM pooled_vms v WHERE v.pool_id = p.id AND v.state = 'ready') AS BIGINT) AS ready, \
     CAST((SELECT COUNT(*) FROM pooled_vms v WHERE v.pool_id = p.id AND v.state = 'draining') AS BIGINT) AS draining \
     FROM warm_pools p JOIN hosts h ON h.id = p.host_id";

impl Store {
    /// Sets how many VMs of `base_image` and `resources` the host keeps warm (0: none; the
    /// ones it has are drained). Refuses kinds that bill while idle and sizes past the host.
    pub async fn set_pool(
        &self,
        host_id: &str,
        base_image: &str,
        resources: &Resources,
        size: i64,
    ) -> Result<WarmPool> {
        if !(0..=MAX_POOL_SIZE).contains(&size) {
            return Err(StoreError::Conflict(format!(
                "a pool keeps 0 to {MAX_POOL_SIZE} VMs, not {size}"
            )));
        }
        let host = self.host(host_id).await?;
        match host.kind {
            HostKind::Docker | HostKind::Sim | HostKind::Agent => {}
            HostKind::Ovh => {
                return Err(StoreError::Conflict(
                    "OVH hosts have no warm pools: an idle cloud instance is billed by the hour"
                        .into(),
                ));
            }
        }
        if resources.vcpus > host.capacity.max_vcpus
            || resources.memory_mb > host.capacity.max_memory_mb
            || size > host.capacity.max_environments
        {
            return Err(StoreError::Conflict(format!(
                "host {} cannot hold {size} VMs of {} vCPUs and {} MB (it holds {} vCPUs, {} MB and {} VMs in all)",
                host.name,
                resources.vcpus,
                resources.memory_mb,
                host.capacity.max_vcpus,
                host.capacity.max_memory_mb,
                host.capacity.max_environments
            )));
        }
        // Warm VMs may hold at most half of a host: the rest stays for environments made
        // cold (a host filled with warm VMs of one size would refuse every other create).
        let others: Vec<WarmPool> = self
            .pools()
            .await?
            .into_iter()
            .filter(|p| {
                p.host_id == host_id
                    && !(p.base_image == base_image
                        && (p.vcpus, p.memory_mb, p.disk_gb)
                            == (resources.vcpus, resources.memory_mb, resources.disk_gb))
            })
            .collect();
        let held = |f: &dyn Fn(&WarmPool) -> i64| others.iter().map(|p| p.size * f(p)).sum::<i64>();
        let (vcpus, memory, count) = (
            held(&|p| p.vcpus) + size * resources.vcpus,
            held(&|p| p.memory_mb) + size * resources.memory_mb,
            held(&|_| 1) + size,
        );
        if 2 * vcpus > host.capacity.max_vcpus
            || 2 * memory > host.capacity.max_memory_mb
            || 2 * count > host.capacity.max_environments
        {
            return Err(StoreError::Conflict(format!(
                "host {}'s warm pools would hold {vcpus} vCPUs, {memory} MB and {count} VMs: at most half of the host \
                 ({} vCPUs, {} MB, {} VMs) may be kept warm",
                host.name,
                host.capacity.max_vcpus,
                host.capacity.max_memory_mb,
                host.capacity.max_environments
            )));
        }
        let now = self.now();
        let mut tx = self.begin().await?;
        let updated = sqlx::query(
            "UPDATE warm_pools SET size = $1, updated_at = $2, paused_until = NULL, last_error = NULL \
             WHERE host_id = $3 AND base_image = $4 AND vcpus = $5 AND memory_mb = $6 AND disk_gb = $7",
        )
        .bind(size)
        .bind(now)
        .bind(host_id)
        .bind(base_image)
        .bind(resources.vcpus)
        .bind(resources.memory_mb)
        .bind(resources.disk_gb)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            sqlx::query(
                "INSERT INTO warm_pools (id, host_id, base_image, vcpus, memory_mb, disk_gb, size, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
            )
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(host_id)
            .bind(base_image)
            .bind(resources.vcpus)
            .bind(resources.memory_mb)
            .bind(resources.disk_gb)
            .bind(size)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.pools()
            .await?
            .into_iter()
            .find(|p| {
                p.host_id == host_id
                    && p.base_image == base_image
                    && (p.vcpus, p.memory_mb, p.disk_gb)
                        == (resources.vcpus, resources.memory_mb, resources.disk_gb)
            })
            .ok_or(StoreError::NotFound)
    }

    /// Every pool, with what it has now.
    pub async fn pools(&self) -> Result<Vec<WarmPool>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT_POOLS} ORDER BY h.name, p.vcpus, p.memory_mb"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(pool_from_row).collect()
    }

    /// Adds pooled VMs (from `candidates`, in order) until the pool has its size, each
    /// taking its host's room; stops early when the host is full, draining or unhealthy,
    /// or the pool waits after a failure. Returns how many were added, to be filled.
    pub async fn grow_pool(&self, pool_id: &str, candidates: &[NewPooledVm]) -> Result<usize> {
        let now = self.now();
        let mut tx = self.begin().await?;
        // The pool's row is the lock: two nodes growing one pool take turns.
        let lock = format!(
            "SELECT p.host_id AS host_id, p.size AS size, p.paused_until AS paused_until, p.vcpus AS vcpus, \
             p.memory_mb AS memory_mb, p.disk_gb AS disk_gb, h.kind AS kind FROM warm_pools p \
             JOIN hosts h ON h.id = p.host_id WHERE p.id = $1{}",
            self.for_update_of("p")
        );
        let Some(pool) = sqlx::query(sqlx::AssertSqlSafe(lock))
            .bind(pool_id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(0);
        };
        let paused_until: Option<i64> = pool.try_get("paused_until")?;
        if paused_until.is_some_and(|t| t > now) {
            return Ok(0);
        }
        let size: i64 = pool.try_get("size")?;
        let have: i64 = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM pooled_vms WHERE pool_id = $1 AND state IN ('filling', 'ready')",
        )
        .bind(pool_id)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        let host_id: String = pool.try_get("host_id")?;
        let kind: String = pool.try_get("kind")?;
        let need = Placement {
            kind: HostKind::parse(&kind).unwrap_or(HostKind::Docker),
            resources: Resources {
                vcpus: pool.try_get("vcpus")?,
                memory_mb: pool.try_get("memory_mb")?,
                disk_gb: pool.try_get("disk_gb")?,
            },
            gpus: 0,
            gpu_model: None,
            region: None,
        };
        let missing = usize::try_from(size - have).unwrap_or(0);
        let mut added = 0;
        for new in candidates.iter().take(missing) {
            if !reserve(&mut tx, &host_id, &need).await? {
                break;
            }
            sqlx::query(
                "INSERT INTO pooled_vms (id, pool_id, host_id, slug, state, vcpus, memory_mb, ssh_public_key, \
                 ssh_private_key_enc, created_at, updated_at) VALUES ($1, $2, $3, $4, 'filling', $5, $6, $7, $8, $9, $9)",
            )
            .bind(&new.id)
            .bind(pool_id)
            .bind(&host_id)
            .bind(&new.slug)
            .bind(need.resources.vcpus)
            .bind(need.resources.memory_mb)
            .bind(&new.ssh_public_key)
            .bind(&new.ssh_private_key_enc)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            added += 1;
        }
        tx.commit().await?;
        Ok(added)
    }

    /// Marks the ready VMs past their pool's size as draining (the newest first), so the
    /// filler removes them. Returns how many.
    pub async fn shrink_pools(&self) -> Result<u64> {
        let now = self.now();
        let mut shrunk = 0;
        for pool in self.pools().await? {
            let surplus = pool.filling + pool.ready - pool.size;
            if surplus <= 0 || pool.ready == 0 {
                continue;
            }
            let ids: Vec<String> = sqlx::query(
                "SELECT id FROM pooled_vms WHERE pool_id = $1 AND state = 'ready' ORDER BY created_at DESC LIMIT $2",
            )
            .bind(&pool.id)
            .bind(surplus.min(pool.ready))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<std::result::Result<_, _>>()?;
            for id in ids {
                shrunk += sqlx::query(
                    "UPDATE pooled_vms SET state = 'draining', lease_owner = NULL, lease_until = NULL, updated_at = $1 \
                     WHERE id = $2 AND state = 'ready'",
                )
                .bind(now)
                .bind(&id)
                .execute(&self.pool)
                .await?
                .rows_affected();
            }
        }
        Ok(shrunk)
    }

    /// Takes up to `limit` pooled VMs that need work (filling or draining) and that no
    /// live lease holds, for `lease_ms`. A node that dies leaves them to the next.
    pub async fn lease_pooled(
        &self,
        owner: &str,
        lease_ms: i64,
        limit: i64,
    ) -> Result<Vec<PooledVm>> {
        let now = self.now();
        let candidates = sqlx::query(
            "SELECT id FROM pooled_vms WHERE state IN ('filling', 'draining') AND (lease_until IS NULL OR lease_until < $1) \
             ORDER BY updated_at LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut leased = Vec::new();
        for row in candidates {
            let id: String = row.try_get("id")?;
            let taken = sqlx::query(
                "UPDATE pooled_vms SET lease_owner = $1, lease_until = $2 WHERE id = $3 \
                 AND state IN ('filling', 'draining') AND (lease_until IS NULL OR lease_until < $4)",
            )
            .bind(owner)
            .bind(now + lease_ms)
            .bind(&id)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected()
                == 1;
            if taken && let Some(vm) = self.pooled_vm(&id).await? {
                leased.push(vm);
            }
        }
        Ok(leased)
    }

    /// Extends `owner`'s lease on a pooled VM it is still working on; false when the lease
    /// was lost (it lapsed and another node took the VM over).
    pub async fn renew_pooled_lease(&self, id: &str, owner: &str, lease_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE pooled_vms SET lease_until = $1 WHERE id = $2 AND lease_owner = $3",
        )
        .bind(self.now() + lease_ms)
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The ids of every pooled VM (a claimed one's row lasts until its claim finishes).
    pub async fn pooled_ids(&self) -> Result<std::collections::HashSet<String>> {
        let rows = sqlx::query("SELECT id FROM pooled_vms")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get("id").map_err(Into::into))
            .collect()
    }

    pub async fn pooled_vm(&self, id: &str) -> Result<Option<PooledVm>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {POOLED_COLUMNS} FROM pooled_vms v JOIN warm_pools p ON p.id = v.pool_id WHERE v.id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(pooled_from_row).transpose()
    }

    /// The pooled VMs on a host, whatever their state (for the reconciler).
    pub async fn pooled_on_host(&self, host_id: &str) -> Result<Vec<PooledVm>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {POOLED_COLUMNS} FROM pooled_vms v JOIN warm_pools p ON p.id = v.pool_id WHERE v.host_id = $1"
        )))
        .bind(host_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(pooled_from_row).collect()
    }

    /// A filled VM answers: it becomes claimable. Only under `owner`'s lease, and only
    /// while it is still filling (a shrink or a failure may have moved it on).
    pub async fn pooled_ready(&self, id: &str, owner: &str, at: &PooledAddress) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE pooled_vms SET state = 'ready', vm_id = $1, ssh_host = $2, ssh_port = $3, ssh_host_key = $4, \
             lease_owner = NULL, lease_until = NULL, updated_at = $5 WHERE id = $6 AND lease_owner = $7 AND state = 'filling'",
        )
        .bind(&at.vm_id)
        .bind(&at.ssh_host)
        .bind(at.ssh_port)
        .bind(&at.ssh_host_key)
        .bind(self.now())
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A fill failed: the VM is drained (the filler removes whatever was made) and its pool
    /// waits `pause_ms` before filling again, so a broken image does not loop.
    pub async fn pooled_failed(
        &self,
        vm: &PooledVm,
        owner: &str,
        error: &str,
        pause_ms: i64,
    ) -> Result<()> {
        let now = self.now();
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE pooled_vms SET state = 'draining', lease_owner = NULL, lease_until = NULL, updated_at = $1 \
             WHERE id = $2 AND lease_owner = $3 AND state = 'filling'",
        )
        .bind(now)
        .bind(&vm.id)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE warm_pools SET last_error = $1, paused_until = $2, updated_at = $3 WHERE id = $4")
            .bind(error)
            .bind(now + pause_ms)
            .bind(now)
            .bind(&vm.pool_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A ready VM is gone or unusable (the reconciler found it vanished): it is drained.
    pub async fn drain_pooled(&self, id: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE pooled_vms SET state = 'draining', lease_owner = NULL, lease_until = NULL, updated_at = $1 \
             WHERE id = $2 AND state = 'ready'",
        )
        .bind(self.now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A drained VM is gone from its host: its row goes and its room returns. Only under
    /// `owner`'s lease.
    pub async fn remove_pooled(&self, vm: &PooledVm, owner: &str) -> Result<bool> {
        let mut tx = self.begin().await?;
        let gone = sqlx::query(
            "DELETE FROM pooled_vms WHERE id = $1 AND lease_owner = $2 AND state = 'draining'",
        )
        .bind(&vm.id)
        .bind(owner)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if gone {
            let r = Resources {
                vcpus: vm.vcpus,
                memory_mb: vm.memory_mb,
                disk_gb: vm.disk_gb,
            };
            release(&mut tx, &vm.host_id, &r, 0).await?;
        }
        tx.commit().await?;
        Ok(gone)
    }

    /// Inside a create's transaction: takes a ready pooled VM that fits `need` exactly, if
    /// any, on a host that takes new VMs. The VM turns `claimed` and its room passes to
    /// the environment (the caller inserts it reserved on that host, without reserving
    /// again). Two creates never get one VM: the update is conditional on `ready`.
    pub(crate) async fn claim_pooled(
        &self,
        tx: &mut Tx,
        need: &Placement,
        base_image: &str,
    ) -> Result<Option<PooledVm>> {
        if need.gpus > 0 {
            return Ok(None);
        }
        for _ in 0..4 {
            let pick = format!(
                "SELECT v.id AS id FROM pooled_vms v JOIN warm_pools p ON p.id = v.pool_id JOIN hosts h ON h.id = v.host_id \
                 WHERE v.state = 'ready' AND p.base_image = $1 AND p.vcpus = $2 AND p.memory_mb = $3 AND p.disk_gb = $4 \
                 AND h.kind = $5 AND h.status = 'ready' AND h.health = 'healthy' AND ($6 = '' OR h.region = $6) \
                 ORDER BY v.updated_at LIMIT 1{}",
                self.skip_locked_of("v")
            );
            let Some(row) = sqlx::query(sqlx::AssertSqlSafe(pick))
                .bind(base_image)
                .bind(need.resources.vcpus)
                .bind(need.resources.memory_mb)
                .bind(need.resources.disk_gb)
                .bind(need.kind.as_str())
                .bind(need.region.as_deref().unwrap_or(""))
                .fetch_optional(&mut **tx)
                .await?
            else {
                return Ok(None);
            };
            let id: String = row.try_get("id")?;
            let claimed = sqlx::query(
                "UPDATE pooled_vms SET state = 'claimed', updated_at = $1 WHERE id = $2 AND state = 'ready'",
            )
            .bind(self.now())
            .bind(&id)
            .execute(&mut **tx)
            .await?
            .rows_affected()
                == 1;
            if claimed {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {POOLED_COLUMNS} FROM pooled_vms v JOIN warm_pools p ON p.id = v.pool_id WHERE v.id = $1"
                )))
                .bind(&id)
                .fetch_one(&mut **tx)
                .await?;
                return pooled_from_row(&row).map(Some);
            }
        }
        Ok(None)
    }

    /// The pooled VM an environment claimed and has not finished taking over.
    pub async fn claimed_pooled(&self, environment_id: &str) -> Result<Option<PooledVm>> {
        Ok(self
            .pooled_vm(environment_id)
            .await?
            .filter(|v| v.state == "claimed"))
    }

    /// The environment has taken its pooled VM over (or given up on it): the row goes.
    /// Its room is the environment's already.
    pub async fn finish_claim(&self, environment_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM pooled_vms WHERE id = $1 AND state = 'claimed'")
            .bind(environment_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Pooled VMs of a host that are not claimed, for a host's removal.
    pub(crate) async fn count_pooled_on_host(&self, tx: &mut Tx, host_id: &str) -> Result<i64> {
        Ok(sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM pooled_vms WHERE host_id = $1 AND state <> 'claimed'",
        )
        .bind(host_id)
        .fetch_one(&mut **tx)
        .await?
        .try_get("n")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::environments::tests::{provision_job, sample};
    use crate::hosts::tests::host;
    use crate::testdb::each_backend;
    use hearth_core::{Role, Tier};

    fn candidates(n: usize) -> Vec<NewPooledVm> {
        (0..n)
            .map(|_| NewPooledVm {
                id: uuid::Uuid::now_v7().to_string(),
                slug: crate::new_slug(),
                ssh_public_key: "ssh-ed25519 POOL".into(),
                ssh_private_key_enc: "sealed".into(),
            })
            .collect()
    }

    /// Fills every leased VM of the store at once, as the filler would.
    async fn fill_all(store: &Store) -> Vec<String> {
        let mut ready = Vec::new();
        for vm in store.lease_pooled("filler", 60_000, 100).await.unwrap() {
            let at = PooledAddress {
                vm_id: Some(format!("c-{}", vm.id)),
                ssh_host: "127.0.0.1".into(),
                ssh_port: 2222,
                ssh_host_key: Some("ssh-ed25519 HOSTKEY".into()),
            };
            assert!(store.pooled_ready(&vm.id, "filler", &at).await.unwrap());
            ready.push(vm.id);
        }
        ready
    }

    fn used(h: &crate::Host) -> (i64, i64, i64) {
        (h.used_vcpus, h.used_memory_mb, h.used_environments)
    }

    #[tokio::test]
    async fn a_pool_grows_to_its_size_and_never_past_it() {
        each_backend(|store| async move {
            let h = store
                .add_host(&host("warm", HostKind::Docker, 16, 32768))
                .await
                .unwrap();
            let shape = Tier::Free.default_resources();
            let pool = store
                .set_pool(&h.id, "hearth/base:latest", &shape, 3)
                .await
                .unwrap();
            assert_eq!(store.grow_pool(&pool.id, &candidates(5)).await.unwrap(), 3);
            assert_eq!(
                store.grow_pool(&pool.id, &candidates(5)).await.unwrap(),
                0,
                "full already"
            );
            let held = store.host(&h.id).await.unwrap();
            assert_eq!(used(&held), (3 * shape.vcpus, 3 * shape.memory_mb, 3));
            assert_eq!(
                store.resum_hosts().await.unwrap(),
                Vec::<String>::new(),
                "counters match the pooled VMs"
            );
            // A second filler finds nothing to lease while the first holds them.
            assert_eq!(fill_all(&store).await.len(), 3);
            assert!(
                store
                    .lease_pooled("other", 60_000, 100)
                    .await
                    .unwrap()
                    .is_empty()
            );
            let seen = &store.pools().await.unwrap()[0];
            assert_eq!(
                (seen.size, seen.filling, seen.ready, seen.draining),
                (3, 0, 3, 0)
            );

            // Shrinking drains the surplus; removing a drained VM gives its room back.
            store
                .set_pool(&h.id, "hearth/base:latest", &shape, 1)
                .await
                .unwrap();
            assert_eq!(store.shrink_pools().await.unwrap(), 2);
            assert_eq!(store.grow_pool(&pool.id, &candidates(5)).await.unwrap(), 0);
            let draining = store.lease_pooled("filler", 60_000, 100).await.unwrap();
            assert_eq!(draining.len(), 2);
            for vm in &draining {
                assert!(
                    !store.remove_pooled(vm, "someone else").await.unwrap(),
                    "only under the lease"
                );
                assert!(store.remove_pooled(vm, "filler").await.unwrap());
            }
            assert_eq!(
                used(&store.host(&h.id).await.unwrap()),
                (shape.vcpus, shape.memory_mb, 1)
            );
            // A host with warm VMs cannot be removed; its pools must drain first.
            let err = store.remove_host(&h.id).await.unwrap_err();
            assert!(
                matches!(err, StoreError::Conflict(ref m) if m.contains("warm VMs")),
                "{err}"
            );
            // Pools past their bound, or past half of the host, are refused.
            assert!(
                store
                    .set_pool(&h.id, "hearth/base:latest", &shape, MAX_POOL_SIZE + 1)
                    .await
                    .is_err()
            );
            let err = store
                .set_pool(&h.id, "hearth/base:latest", &shape, 5)
                .await
                .unwrap_err();
            assert!(
                matches!(err, StoreError::Conflict(ref m) if m.contains("at most half")),
                "{err}"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_grow_stops_at_the_hosts_room() {
        each_backend(|store| async move {
            let shape = Tier::Free.default_resources();
            let h = store
                .add_host(&host("tight", HostKind::Docker, 4 * shape.vcpus, 65536))
                .await
                .unwrap();
            let pool = store
                .set_pool(&h.id, "hearth/base:latest", &shape, 2)
                .await
                .unwrap();
            // Environments take three quarters of the room first.
            let (user, _) = store
                .create_user("u@example.com", Role::User, Tier::Unlimited)
                .await
                .unwrap();
            for _ in 0..3 {
                store
                    .create_environment(&user, sample(false), provision_job(&user.id))
                    .await
                    .unwrap();
            }
            assert_eq!(store.grow_pool(&pool.id, &candidates(2)).await.unwrap(), 1);
            assert_eq!(store.resum_hosts().await.unwrap(), Vec::<String>::new());
        })
        .await;
    }

    #[tokio::test]
    async fn a_create_claims_a_ready_vm_of_its_shape_and_its_room_moves_with_it() {
        each_backend(|store| async move {
            let h = store
                .add_host(&host("warm", HostKind::Docker, 64, 65536))
                .await
                .unwrap();
            let shape = Tier::Free.default_resources();
            let pool = store
                .set_pool(&h.id, "hearth/base:latest", &shape, 2)
                .await
                .unwrap();
            store.grow_pool(&pool.id, &candidates(2)).await.unwrap();
            // Filling VMs are not claimable.
            let (user, _) = store
                .create_user("u@example.com", Role::User, Tier::Unlimited)
                .await
                .unwrap();
            let cold = store
                .create_environment(&user, sample(false), provision_job(&user.id))
                .await
                .unwrap();
            let ready = fill_all(&store).await;
            assert!(!ready.contains(&cold.id));
            let before = used(&store.host(&h.id).await.unwrap());

            let mut claimed = Vec::new();
            for _ in 0..2 {
                let env = store
                    .create_environment(&user, sample(false), provision_job(&user.id))
                    .await
                    .unwrap();
                let vm = store
                    .claimed_pooled(&env.id)
                    .await
                    .unwrap()
                    .expect("claimed from the pool");
                assert_eq!(
                    (env.slug.as_str(), env.vm_id.as_deref()),
                    (vm.slug.as_str(), Some(format!("c-{}", vm.id).as_str()))
                );
                assert_eq!(env.host_id.as_deref(), Some(h.id.as_str()));
                claimed.push(env.id);
            }
            claimed.sort();
            let mut expected = ready.clone();
            expected.sort();
            assert_eq!(claimed, expected, "each ready VM claimed once");
            assert_eq!(
                used(&store.host(&h.id).await.unwrap()),
                before,
                "the room moved, it was not taken twice"
            );
            assert_eq!(store.resum_hosts().await.unwrap(), Vec::<String>::new());

            // Another shape, or an empty pool: a normal create.
            let env = store
                .create_environment(&user, sample(false), provision_job(&user.id))
                .await
                .unwrap();
            assert!(store.claimed_pooled(&env.id).await.unwrap().is_none());
            // Finishing a claim removes the row; the room stays the environment's.
            for id in &claimed {
                store.finish_claim(id).await.unwrap();
                assert!(store.pooled_vm(id).await.unwrap().is_none());
            }
            assert_eq!(store.resum_hosts().await.unwrap(), Vec::<String>::new());
        })
        .await;
    }

    #[tokio::test]
    async fn concurrent_creates_never_share_a_warm_vm() {
        each_backend(|store| async move {
            let mut roomy = host("warm", HostKind::Docker, 1000, 1_000_000);
            roomy.capacity.max_environments = 100;
            let h = store.add_host(&roomy).await.unwrap();
            let shape = Tier::Free.default_resources();
            let pool = store
                .set_pool(&h.id, "hearth/base:latest", &shape, 5)
                .await
                .unwrap();
            store.grow_pool(&pool.id, &candidates(5)).await.unwrap();
            let ready = fill_all(&store).await;
            let mut tasks = Vec::new();
            for i in 0..20 {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    // Two users, so PostgreSQL's per-user lock does not serialise them all.
                    let (user, _) = store
                        .create_user(&format!("u{i}@example.com"), Role::User, Tier::Unlimited)
                        .await
                        .unwrap();
                    store
                        .create_environment(&user, sample(false), provision_job(&user.id))
                        .await
                        .unwrap()
                        .id
                }));
            }
            let mut ids = Vec::new();
            for t in tasks {
                ids.push(t.await.unwrap());
            }
            let from_pool = ids.iter().filter(|id| ready.contains(id)).count();
            assert_eq!(
                from_pool, 5,
                "exactly the pool's VMs were claimed, each once"
            );
            let unique: std::collections::HashSet<_> = ids.iter().collect();
            assert_eq!(unique.len(), 20);
            assert_eq!(store.resum_hosts().await.unwrap(), Vec::<String>::new());
        })
        .await;
    }
}
