//! Snapshots of environments' disks, kept by their users (see migration 0012). The row is
//! written (`taking`) before the host is asked, under the tier's count in the same
//! transaction, so a snapshot is never made that the quota does not hold; the reaper
//! settles rows whose taker died (`Store::stale_snapshots`).

use crate::{Result, Store, StoreError, User};
use sqlx::Row;
use sqlx::any::AnyRow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub user_id: String,
    /// The environment it was taken of (which may be gone since).
    pub environment_id: String,
    pub host_id: String,
    pub name: String,
    pub state: String,
    /// The host's reference to it (a Docker image), once taken.
    pub image: Option<String>,
    pub size_bytes: Option<i64>,
    /// The part of `size_bytes` that is the VM's saved memory (0: the disk only).
    pub memory_bytes: Option<i64>,
    /// The size of the environment it was taken of: what a new one from it asks for.
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

const COLUMNS: &str = "id, user_id, environment_id, host_id, name, state, image, size_bytes, memory_bytes, vcpus, memory_mb, disk_gb, \
     created_at, updated_at";

fn from_row(r: &AnyRow) -> Result<Snapshot> {
    Ok(Snapshot {
        id: r.try_get("id")?,
        user_id: r.try_get("user_id")?,
        environment_id: r.try_get("environment_id")?,
        host_id: r.try_get("host_id")?,
        name: r.try_get("name")?,
        state: r.try_get("state")?,
        image: r.try_get("image")?,
        size_bytes: r.try_get("size_bytes")?,
        memory_bytes: r.try_get("memory_bytes")?,
        vcpus: r.try_get("vcpus")?,
        memory_mb: r.try_get("memory_mb")?,
        disk_gb: r.try_get("disk_gb")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// The most a snapshot of an environment of these sizes can take on its host: its whole
/// disk and its whole memory (`begin_snapshot`'s SQL says the same).
fn most_bytes(disk_gb: i64, memory_mb: i64) -> i64 {
    disk_gb.saturating_mul(1 << 30) + memory_mb.saturating_mul(1 << 20)
}

impl Store {
    /// Records a snapshot about to be taken of `env`, if the user's tier allows one more
    /// and the name is free. `Quota`-like refusals are `Conflict`s with the reason.
    pub async fn begin_snapshot(
        &self,
        user: &User,
        env: &crate::Environment,
        name: &str,
    ) -> Result<Snapshot> {
        let Some(host_id) = env.host_id.clone() else {
            return Err(StoreError::Conflict("the environment has no host".into()));
        };
        let now = self.now();
        let snapshot = Snapshot {
            id: uuid::Uuid::now_v7().to_string(),
            user_id: user.id.clone(),
            environment_id: env.id.clone(),
            host_id,
            name: name.to_string(),
            state: "taking".into(),
            image: None,
            size_bytes: None,
            memory_bytes: None,
            vcpus: env.vcpus,
            memory_mb: env.memory_mb,
            disk_gb: env.disk_gb,
            created_at: now,
            updated_at: now,
        };
        let mut tx = self.begin().await?;
        let lock = format!("SELECT id FROM users WHERE id = $1{}", self.for_update());
        sqlx::query(sqlx::AssertSqlSafe(lock))
            .bind(&user.id)
            .fetch_one(&mut *tx)
            .await?;
        let held: i64 =
            sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM snapshots WHERE user_id = $1")
                .bind(&user.id)
                .fetch_one(&mut *tx)
                .await?
                .try_get("n")?;
        let max = user.tier.max_snapshots();
        if held >= max {
            return Err(StoreError::Quota(hearth_core::QuotaExceeded {
                limit: "maxSnapshots",
                max,
                used: held,
                requested: 1,
            }));
        }
        // Bytes: what each snapshot took, or for one being taken the most it can take.
        let used: i64 = sqlx::query(
            "SELECT CAST(COALESCE(SUM(CASE WHEN size_bytes IS NULL \
             THEN disk_gb * 1073741824 + memory_mb * 1048576 ELSE size_bytes END), 0) AS BIGINT) AS n \
             FROM snapshots WHERE user_id = $1",
        )
        .bind(&user.id)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        let requested = most_bytes(env.disk_gb, env.memory_mb);
        let max = user.tier.max_snapshot_bytes();
        if used + requested > max {
            return Err(StoreError::Quota(hearth_core::QuotaExceeded {
                limit: "maxSnapshotBytes",
                max,
                used,
                requested,
            }));
        }
        let inserted = sqlx::query(
            "INSERT INTO snapshots (id, user_id, environment_id, host_id, name, state, vcpus, memory_mb, disk_gb, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, $5, 'taking', $6, $7, $8, $9, $9)",
        )
        .bind(&snapshot.id)
        .bind(&snapshot.user_id)
        .bind(&snapshot.environment_id)
        .bind(&snapshot.host_id)
        .bind(&snapshot.name)
        .bind(snapshot.vcpus)
        .bind(snapshot.memory_mb)
        .bind(snapshot.disk_gb)
        .bind(now)
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::Conflict(format!(
                    "you have a snapshot named {name:?} already"
                )));
            }
            other => {
                other?;
            }
        }
        tx.commit().await?;
        Ok(snapshot)
    }

    /// The host made it: ready, with its reference and size.
    /// Records snapshot `id` as taken: its host's reference, its size and the part of it
    /// that is saved memory.
    pub async fn snapshot_taken(
        &self,
        id: &str,
        image: &str,
        size_bytes: i64,
        memory_bytes: i64,
    ) -> Result<Snapshot> {
        sqlx::query(
            "UPDATE snapshots SET state = 'ready', image = $1, size_bytes = $2, memory_bytes = $3, updated_at = $4 WHERE id = $5 AND state = 'taking'",
        )
        .bind(image)
        .bind(size_bytes)
        .bind(memory_bytes)
        .bind(self.now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        self.snapshot(id).await
    }

    pub async fn snapshot(&self, id: &str) -> Result<Snapshot> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM snapshots WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound)?;
        from_row(&row)
    }

    /// The user's snapshot by id or name; someone else's is `NotFound`.
    pub async fn snapshot_for_user(&self, user_id: &str, id_or_name: &str) -> Result<Snapshot> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM snapshots WHERE user_id = $1 AND (id = $2 OR name = $2)"
        )))
        .bind(user_id)
        .bind(id_or_name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound)?;
        from_row(&row)
    }

    /// The user's snapshots, newest first (at most the tier's count, so no paging).
    pub async fn snapshots_of(&self, user_id: &str) -> Result<Vec<Snapshot>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM snapshots WHERE user_id = $1 ORDER BY created_at DESC, id DESC"
        )))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Marks a snapshot for removal (the caller then removes its image and the row).
    pub async fn snapshot_deleting(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE snapshots SET state = 'deleting', updated_at = $1 WHERE id = $2")
            .bind(self.now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The snapshot is gone from its host (or never was made): its row goes, and with it
    /// its place in the quota.
    pub async fn forget_snapshot(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM snapshots WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Snapshots left `taking` for longer than `older_than_ms` (their taker died), and
    /// every `deleting` one, for the reaper to settle.
    pub async fn stale_snapshots(&self, older_than_ms: i64) -> Result<Vec<Snapshot>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM snapshots WHERE (state = 'taking' AND updated_at < $1) OR state = 'deleting' LIMIT 100"
        )))
        .bind(self.now() - older_than_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::StoreError;
    use crate::testdb::each_backend;

    /// A tier's snapshot bytes: one being taken counts as its environment's whole disk and
    /// memory, one taken as what its host said it took; past the tier's bytes a snapshot is
    /// refused with the numbers, and nothing is recorded.
    #[tokio::test]
    async fn snapshot_bytes_hold_the_most_a_take_can_write_until_it_is_taken() {
        each_backend(|store| async move {
            let (user, _) = store
                .create_user(
                    "bytes@example.com",
                    hearth_core::Role::User,
                    hearth_core::Tier::Pro,
                )
                .await
                .unwrap();
            let host = crate::environments::tests::roomy_host(&store).await;
            store
                .insert_running_for_tests(&user.id, &[(host.id.clone(), 1)])
                .await
                .unwrap();
            let listed = store
                .list_environments(Some(&user.id), None, false, None, 1)
                .await
                .unwrap()
                .0
                .remove(0);
            let mut env = store.environment(&listed.id).await.unwrap();
            // 250 GiB and 24 GiB: 274 GiB each while taken; pro keeps 640 GiB.
            env.disk_gb = 250;
            env.memory_mb = 24_576;
            let first = store.begin_snapshot(&user, &env, "one").await.unwrap();
            store.begin_snapshot(&user, &env, "two").await.unwrap();
            let refused = store.begin_snapshot(&user, &env, "three").await;
            let Err(StoreError::Quota(q)) = refused else {
                panic!("{refused:?}")
            };
            assert_eq!(q.limit, "maxSnapshotBytes");
            assert_eq!(q.max, 640 << 30);
            assert_eq!(q.used, 548 << 30);
            assert_eq!(q.requested, 274 << 30);
            assert_eq!(store.snapshots_of(&user.id).await.unwrap().len(), 2);
            // Taken at 3 GiB, 1 of it memory: 277 GiB held, room for one more.
            let taken = store
                .snapshot_taken(&first.id, "img", 3 << 30, 1 << 30)
                .await
                .unwrap();
            assert_eq!(
                (taken.state.as_str(), taken.size_bytes, taken.memory_bytes),
                ("ready", Some(3 << 30), Some(1 << 30))
            );
            store.begin_snapshot(&user, &env, "three").await.unwrap();
        })
        .await;
    }
}
