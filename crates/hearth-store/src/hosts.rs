//! Hosts and placement. A host's `used_*` counters change only inside the transactions
//! that move its environments into or out of an active state (reserve on create or
//! start, release on stop, failure or destroy), under a row lock, so two requests can
//! never together overfill a host. `resum_hosts` recomputes them from the environments,
//! for the reconciler to catch drift.

use crate::{Result, Store, StoreError, Tx, now_ms};
use hearth_core::Resources;
use hearth_core::placement::{HostRoom, place};
use sqlx::Row;
use sqlx::any::AnyRow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub id: String,
    pub name: String,
    pub provider: String,
    /// `ready` or `draining` (takes no new environments).
    pub status: String,
    pub room: HostRoom,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Capacity a host announces.
#[derive(Debug, Clone)]
pub struct HostCapacity {
    pub max_vcpus: i64,
    pub max_memory_mb: i64,
    pub max_environments: i64,
}

const SELECT_HOST: &str = "SELECT id, name, provider, status, max_vcpus, max_memory_mb, max_environments, \
    used_vcpus, used_memory_mb, used_environments, created_at, updated_at FROM hosts";

/// The states that hold a host's capacity (and a user's quota).
const ACTIVE_STATES: &str = "('requested', 'provisioning', 'starting', 'running', 'stopping', 'destroying')";

fn host_from_row(r: &AnyRow) -> Result<Host> {
    Ok(Host {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        provider: r.try_get("provider")?,
        status: r.try_get("status")?,
        room: HostRoom {
            id: r.try_get("id")?,
            max_vcpus: r.try_get("max_vcpus")?,
            max_memory_mb: r.try_get("max_memory_mb")?,
            max_environments: r.try_get("max_environments")?,
            used_vcpus: r.try_get("used_vcpus")?,
            used_memory_mb: r.try_get("used_memory_mb")?,
            used_environments: r.try_get("used_environments")?,
        },
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

impl Store {
    /// Registers a host by name, or updates its capacity (a restart may change it). A
    /// draining host stays draining.
    pub async fn upsert_host(&self, name: &str, provider: &str, cap: &HostCapacity) -> Result<Host> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        let existing = sqlx::query("SELECT id FROM hosts WHERE name = $1").bind(name).fetch_optional(&mut *tx).await?;
        match existing {
            Some(row) => {
                let id: String = row.try_get("id")?;
                sqlx::query(
                    "UPDATE hosts SET provider = $1, max_vcpus = $2, max_memory_mb = $3, max_environments = $4, \
                     updated_at = $5 WHERE id = $6",
                )
                .bind(provider)
                .bind(cap.max_vcpus)
                .bind(cap.max_memory_mb)
                .bind(cap.max_environments)
                .bind(now)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query(
                    "INSERT INTO hosts (id, name, provider, status, max_vcpus, max_memory_mb, max_environments, \
                     created_at, updated_at) VALUES ($1, $2, $3, 'ready', $4, $5, $6, $7, $7)",
                )
                .bind(uuid::Uuid::now_v7().to_string())
                .bind(name)
                .bind(provider)
                .bind(cap.max_vcpus)
                .bind(cap.max_memory_mb)
                .bind(cap.max_environments)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        self.hosts().await?.into_iter().find(|h| h.name == name).ok_or(StoreError::NotFound)
    }

    pub async fn hosts(&self) -> Result<Vec<Host>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT_HOST} ORDER BY name"))).fetch_all(&self.pool).await?;
        rows.iter().map(host_from_row).collect()
    }

    pub async fn host(&self, id: &str) -> Result<Host> {
        self.hosts().await?.into_iter().find(|h| h.id == id).ok_or(StoreError::NotFound)
    }

    /// `draining` hosts take no new environments; `ready` undoes it.
    pub async fn set_host_status(&self, id: &str, status: &str) -> Result<Host> {
        let done = sqlx::query("UPDATE hosts SET status = $1, updated_at = $2 WHERE id = $3")
            .bind(status)
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        self.host(id).await
    }

    /// Picks (or, with `pinned`, checks) a host for `need` inside the caller's transaction,
    /// holding the provider's host rows locked until it commits. `Ok(None)`: the provider
    /// has no hosts (a cloud), so there is nothing to reserve.
    pub(crate) async fn place_in(
        &self,
        tx: &mut Tx,
        provider: &str,
        need: &Resources,
        pinned: Option<&str>,
    ) -> Result<Option<String>> {
        let sql = format!("{SELECT_HOST} WHERE provider = $1 ORDER BY name{}", self.for_update());
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(provider).fetch_all(&mut **tx).await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let hosts = rows.iter().map(host_from_row).collect::<Result<Vec<_>>>()?;
        let describe = |h: &Host| {
            format!(
                "{} has {} of {} vCPUs and {} of {} MB in use ({})",
                h.name, h.room.used_vcpus, h.room.max_vcpus, h.room.used_memory_mb, h.room.max_memory_mb, h.status
            )
        };
        let wanted = format!("{} vCPUs and {} MB", need.vcpus, need.memory_mb);
        if let Some(id) = pinned {
            let Some(h) = hosts.iter().find(|h| h.id == id) else {
                return Err(StoreError::NoCapacity(format!("the environment's host {id} is no longer registered")));
            };
            if h.status != "ready" || !h.room.fits(need) {
                return Err(StoreError::NoCapacity(format!("no room for {wanted} on its host: {}", describe(h))));
            }
            adjust(tx, &h.id, need, 1).await?;
            return Ok(Some(h.id.clone()));
        }
        let ready: Vec<HostRoom> = hosts.iter().filter(|h| h.status == "ready").map(|h| h.room.clone()).collect();
        match place(&ready, need) {
            Some(h) => {
                adjust(tx, &h.id, need, 1).await?;
                Ok(Some(h.id.clone()))
            }
            None => {
                let all: Vec<String> = hosts.iter().map(describe).collect();
                Err(StoreError::NoCapacity(format!("no host has room for {wanted}: {}", all.join("; "))))
            }
        }
    }
}

/// Adds (`sign` 1) or takes back (`sign` -1) one environment of size `r` on a host.
pub(crate) async fn adjust(tx: &mut Tx, host_id: &str, r: &Resources, sign: i64) -> Result<()> {
    sqlx::query(
        "UPDATE hosts SET used_vcpus = used_vcpus + $1, used_memory_mb = used_memory_mb + $2, \
         used_environments = used_environments + $3 WHERE id = $4",
    )
    .bind(sign * r.vcpus)
    .bind(sign * r.memory_mb)
    .bind(sign)
    .bind(host_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// Recomputes every host's counters from its active environments; returns the names
    /// of hosts whose counters had drifted (a bug worth a log line).
    pub async fn resum_hosts(&self) -> Result<Vec<String>> {
        let mut tx = self.begin().await?;
        let lock = format!("{SELECT_HOST}{}", self.for_update());
        let hosts = sqlx::query(sqlx::AssertSqlSafe(lock)).fetch_all(&mut *tx).await?;
        let mut drifted = Vec::new();
        for row in &hosts {
            let h = host_from_row(row)?;
            let sum = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT CAST(COALESCE(SUM(vcpus), 0) AS BIGINT) AS v, CAST(COALESCE(SUM(memory_mb), 0) AS BIGINT) AS m, \
                 CAST(COUNT(*) AS BIGINT) AS n FROM environments WHERE host_id = $1 AND state IN {ACTIVE_STATES}"
            )))
            .bind(&h.id)
            .fetch_one(&mut *tx)
            .await?;
            let (v, m, n): (i64, i64, i64) = (sum.try_get("v")?, sum.try_get("m")?, sum.try_get("n")?);
            if (v, m, n) != (h.room.used_vcpus, h.room.used_memory_mb, h.room.used_environments) {
                sqlx::query("UPDATE hosts SET used_vcpus = $1, used_memory_mb = $2, used_environments = $3 WHERE id = $4")
                    .bind(v)
                    .bind(m)
                    .bind(n)
                    .bind(&h.id)
                    .execute(&mut *tx)
                    .await?;
                drifted.push(h.name.clone());
            }
        }
        tx.commit().await?;
        Ok(drifted)
    }
}

#[cfg(test)]
mod tests {
    use crate::environments::tests::{provision_job, sample};
    use crate::testdb::each_backend;
    use crate::{HostCapacity, StoreError, now_ms};
    use hearth_core::{EnvState, Role, Tier};

    #[tokio::test]
    async fn environments_go_where_they_fit_and_capacity_returns() {
        each_backend(|store| async move {
            let small = store
                .upsert_host("small", "docker", &HostCapacity { max_vcpus: 2, max_memory_mb: 4096, max_environments: 10 })
                .await
                .unwrap();
            let big = store
                .upsert_host("big", "docker", &HostCapacity { max_vcpus: 4, max_memory_mb: 8192, max_environments: 10 })
                .await
                .unwrap();
            let (user, _) = store.create_user("p@example.com", Role::User, Tier::Unlimited).await.unwrap();
            let mut placed = Vec::new();
            // 2 vCPUs each: big (room 4) takes the first, then the two tie and big wins by room,
            // then small, then nothing fits.
            for _ in 0..3 {
                let env = store.create_environment(&user, sample(false), provision_job(&user.id)).await.unwrap();
                placed.push(env.host_id.clone().unwrap());
            }
            assert_eq!(placed, vec![big.id.clone(), big.id.clone(), small.id.clone()]);
            let err = store.create_environment(&user, sample(false), provision_job(&user.id)).await.unwrap_err();
            assert!(matches!(err, StoreError::NoCapacity(ref m) if m.contains("no host has room")), "{err}");
            let hosts = store.hosts().await.unwrap();
            let b = hosts.iter().find(|h| h.name == "big").unwrap();
            assert_eq!((b.room.used_vcpus, b.room.used_environments), (4, 2));

            // Destroying one on the big host frees its room for the next.
            let on_big = store.live_environments().await.unwrap().into_iter().find(|e| e.host_id.as_deref() == Some(&big.id)).unwrap();
            let destroying = store.save_transition(&on_big, on_big.moved_to(EnvState::Destroying, None, now_ms()).unwrap(), "t").await.unwrap();
            store.save_transition(&destroying, destroying.moved_to(EnvState::Destroyed, None, now_ms()).unwrap(), "t").await.unwrap();
            let env = store.create_environment(&user, sample(false), provision_job(&user.id)).await.unwrap();
            assert_eq!(env.host_id.as_deref(), Some(big.id.as_str()));

            // A draining host takes nothing new.
            store.set_host_status(&big.id, "draining").await.unwrap();
            store.set_host_status(&small.id, "draining").await.unwrap();
            let err = store.create_environment(&user, sample(false), provision_job(&user.id)).await.unwrap_err();
            assert!(matches!(err, StoreError::NoCapacity(_)));
        })
        .await;
    }

    #[tokio::test]
    async fn restarting_needs_room_on_its_own_host() {
        each_backend(|store| async move {
            let host = store
                .upsert_host("one", "docker", &HostCapacity { max_vcpus: 2, max_memory_mb: 4096, max_environments: 10 })
                .await
                .unwrap();
            let (user, _) = store.create_user("r@example.com", Role::User, Tier::Unlimited).await.unwrap();
            let a = store.create_environment(&user, sample(false), provision_job(&user.id)).await.unwrap();
            // a fails (releases its room), b takes the host, a cannot come back.
            let a_err = store.save_transition(&a, a.moved_to(EnvState::Error, Some("x".into()), now_ms()).unwrap(), "t").await.unwrap();
            let b = store.create_environment(&user, sample(false), provision_job(&user.id)).await.unwrap();
            assert_eq!(b.host_id.as_deref(), Some(host.id.as_str()));
            let retry = a_err.moved_to(EnvState::Provisioning, None, now_ms()).unwrap();
            let err = store.save_transition(&a_err, retry, "t").await.unwrap_err();
            assert!(matches!(err, StoreError::NoCapacity(_)), "{err}");
            assert_eq!(store.environment(&a.id).await.unwrap().state, EnvState::Error);
        })
        .await;
    }

    #[tokio::test]
    async fn counters_match_the_environments_and_drift_is_repaired() {
        each_backend(|store| async move {
            let host = store
                .upsert_host("h", "docker", &HostCapacity { max_vcpus: 64, max_memory_mb: 65536, max_environments: 10 })
                .await
                .unwrap();
            let (user, _) = store.create_user("d@example.com", Role::User, Tier::Unlimited).await.unwrap();
            let a = store.create_environment(&user, sample(false), provision_job(&user.id)).await.unwrap();
            store.create_environment(&user, sample(false), provision_job(&user.id)).await.unwrap();
            let stopped = store.save_transition(&a, a.moved_to(EnvState::Error, None, now_ms()).unwrap(), "t").await.unwrap();
            assert!(store.resum_hosts().await.unwrap().is_empty(), "counters kept in step");
            let h = store.host(&host.id).await.unwrap();
            assert_eq!((h.room.used_vcpus, h.room.used_environments), (2, 1));
            store.exec_sql_for_tests("UPDATE hosts SET used_vcpus = $1 WHERE id = $2", 99, &host.id).await.unwrap();
            assert_eq!(store.resum_hosts().await.unwrap(), vec!["h".to_string()]);
            assert_eq!(store.host(&host.id).await.unwrap().room.used_vcpus, 2);
            let _ = stopped;
        })
        .await;
    }

    #[tokio::test]
    async fn providers_without_hosts_need_none() {
        each_backend(|store| async move {
            let (user, _) = store.create_user("c@example.com", Role::User, Tier::Unlimited).await.unwrap();
            let mut new = sample(false);
            new.provider = "ovh".into();
            let env = store.create_environment(&user, new, provision_job(&user.id)).await.unwrap();
            assert_eq!(env.host_id, None);
        })
        .await;
    }
}
