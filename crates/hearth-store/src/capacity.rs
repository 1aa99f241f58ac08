//! Capacity samples: what the fleet ran and what its hosts held, kept for the admin's chart
//! of the last day. One row per `SAMPLE_MS` bucket; any node may write it, the first wins,
//! so a fleet of nodes keeps one row per bucket without coordinating.

use crate::{Result, Store};
use sqlx::Row;

/// The width of a bucket: 5 minutes.
pub const SAMPLE_MS: i64 = 5 * 60_000;
/// How long samples are kept: 7 days, so at most 2,016 rows.
pub const SAMPLE_RETENTION_MS: i64 = 7 * 24 * 3_600_000;

/// The fleet at one moment: running environments and their size, and the hosts' held and
/// total capacity (every host, whatever its health or status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacitySample {
    pub at: i64,
    pub running_vms: i64,
    pub running_vcpus: i64,
    pub running_memory_mb: i64,
    pub used_vcpus: i64,
    pub max_vcpus: i64,
    pub used_memory_mb: i64,
    pub max_memory_mb: i64,
}

impl Store {
    /// The fleet now (not stored); `at` is now.
    pub async fn capacity_now(&self) -> Result<CapacitySample> {
        let running = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n, CAST(COALESCE(SUM(vcpus), 0) AS BIGINT) AS vcpus, \
             CAST(COALESCE(SUM(memory_mb), 0) AS BIGINT) AS memory_mb FROM environments WHERE state = 'running'",
        )
        .fetch_one(&self.pool)
        .await?;
        let hosts = sqlx::query(
            "SELECT CAST(COALESCE(SUM(used_vcpus), 0) AS BIGINT) AS used_vcpus, \
             CAST(COALESCE(SUM(max_vcpus), 0) AS BIGINT) AS max_vcpus, \
             CAST(COALESCE(SUM(used_memory_mb), 0) AS BIGINT) AS used_memory_mb, \
             CAST(COALESCE(SUM(max_memory_mb), 0) AS BIGINT) AS max_memory_mb FROM hosts",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(CapacitySample {
            at: self.now(),
            running_vms: running.try_get("n")?,
            running_vcpus: running.try_get("vcpus")?,
            running_memory_mb: running.try_get("memory_mb")?,
            used_vcpus: hosts.try_get("used_vcpus")?,
            max_vcpus: hosts.try_get("max_vcpus")?,
            used_memory_mb: hosts.try_get("used_memory_mb")?,
            max_memory_mb: hosts.try_get("max_memory_mb")?,
        })
    }

    /// Stores the fleet now as the current bucket's sample, unless the bucket has one;
    /// drops samples past `SAMPLE_RETENTION_MS`. Returns whether this call wrote the row.
    pub async fn sample_capacity(&self) -> Result<bool> {
        let mut s = self.capacity_now().await?;
        s.at -= s.at.rem_euclid(SAMPLE_MS);
        let written = sqlx::query(
            "INSERT INTO capacity_samples (at, running_vms, running_vcpus, running_memory_mb, used_vcpus, \
             max_vcpus, used_memory_mb, max_memory_mb) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (at) DO NOTHING",
        )
        .bind(s.at)
        .bind(s.running_vms)
        .bind(s.running_vcpus)
        .bind(s.running_memory_mb)
        .bind(s.used_vcpus)
        .bind(s.max_vcpus)
        .bind(s.used_memory_mb)
        .bind(s.max_memory_mb)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1;
        sqlx::query("DELETE FROM capacity_samples WHERE at < $1")
            .bind(s.at - SAMPLE_RETENTION_MS)
            .execute(&self.pool)
            .await?;
        Ok(written)
    }

    /// Stored samples from `since` on, oldest first.
    pub async fn capacity_samples(&self, since: i64) -> Result<Vec<CapacitySample>> {
        let rows = sqlx::query(
            "SELECT at, running_vms, running_vcpus, running_memory_mb, used_vcpus, max_vcpus, used_memory_mb, \
             max_memory_mb FROM capacity_samples WHERE at >= $1 ORDER BY at",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CapacitySample {
                    at: r.try_get("at")?,
                    running_vms: r.try_get("running_vms")?,
                    running_vcpus: r.try_get("running_vcpus")?,
                    running_memory_mb: r.try_get("running_memory_mb")?,
                    used_vcpus: r.try_get("used_vcpus")?,
                    max_vcpus: r.try_get("max_vcpus")?,
                    used_memory_mb: r.try_get("used_memory_mb")?,
                    max_memory_mb: r.try_get("max_memory_mb")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::tests::host;
    use crate::testdb::each_backend;
    use hearth_core::{HostKind, Role, Tier};

    #[tokio::test]
    async fn one_sample_per_bucket_and_none_past_retention() {
        each_backend(|store| async move {
            let h = store
                .add_host(&host("h", HostKind::Sim, 8, 8192))
                .await
                .unwrap();
            let (user, _) = store
                .create_user("c@example.com", Role::User, Tier::Unlimited)
                .await
                .unwrap();
            store
                .insert_running_for_tests(&user.id, &[(h.id.clone(), 3)])
                .await
                .unwrap();
            let now = store.capacity_now().await.unwrap();
            assert_eq!(
                (
                    now.running_vms,
                    now.running_vcpus,
                    now.running_memory_mb,
                    now.used_vcpus,
                    now.max_vcpus,
                    now.max_memory_mb
                ),
                (3, 3, 768, 3, 8, 8192)
            );

            // A sample from 8 days ago goes when the next one is written.
            let old = now.at - now.at.rem_euclid(SAMPLE_MS) - SAMPLE_RETENTION_MS - SAMPLE_MS;
            store
                .execute_for_tests(&format!(
                    "INSERT INTO capacity_samples VALUES ({old}, 1, 1, 1, 1, 1, 1, 1)"
                ))
                .await;
            assert!(
                store.sample_capacity().await.unwrap(),
                "the bucket's first sample is written"
            );
            assert!(
                !store.sample_capacity().await.unwrap(),
                "a second one in the bucket is not"
            );
            let kept = store.capacity_samples(0).await.unwrap();
            assert_eq!(kept.len(), 1, "{kept:?}");
            assert_eq!(kept[0].at % SAMPLE_MS, 0);
            assert_eq!((kept[0].running_vms, kept[0].max_vcpus), (3, 8));
        })
        .await;
    }
}
