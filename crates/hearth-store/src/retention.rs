//! Retention: history does not grow without bound. Old executions, audit entries,
//! finished jobs and what destroyed environments leave behind are removed, a bounded batch
//! per table per call, oldest first.

use crate::{Result, Store};

/// How long each kind of history is kept (milliseconds).
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub executions_ms: i64,
    pub audit_ms: i64,
    /// Succeeded and dead jobs.
    pub jobs_ms: i64,
    /// The provisioning log and simulated VMs of environments destroyed this long ago.
    pub destroyed_ms: i64,
}

/// Rows removed per table per call, so one call never holds the database for long.
pub const PRUNE_BATCH: i64 = 5_000;

impl Store {
    /// Removes history past `r`; returns how many rows went.
    pub async fn prune(&self, r: &Retention) -> Result<u64> {
        let now = self.now();
        let statements: [(&str, i64); 5] = [
            (
                "DELETE FROM executions WHERE id IN (SELECT id FROM executions WHERE started_at < $1 ORDER BY started_at LIMIT $2)",
                now - r.executions_ms,
            ),
            (
                "DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log WHERE at < $1 ORDER BY at LIMIT $2)",
                now - r.audit_ms,
            ),
            (
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state IN ('succeeded', 'dead') AND updated_at < $1 \
                 ORDER BY updated_at LIMIT $2)",
                now - r.jobs_ms,
            ),
            (
                "DELETE FROM provision_logs WHERE id IN (SELECT l.id FROM provision_logs l JOIN environments e ON e.id = l.environment_id \
                 WHERE e.state = 'destroyed' AND e.updated_at < $1 LIMIT $2)",
                now - r.destroyed_ms,
            ),
            (
                "DELETE FROM sim_vms WHERE vm_id IN (SELECT vm_id FROM sim_vms WHERE state = 'destroyed' AND created_at < $1 LIMIT $2)",
                now - r.destroyed_ms,
            ),
        ];
        // Mail that was acted on is history like the audit; rejected mail is kept a week,
        // and never more than `MAX_REJECTED` rows of it, however much arrives.
        let mut removed = sqlx::query(
            "DELETE FROM inbound_mail WHERE id IN (SELECT id FROM inbound_mail WHERE status = 'rejected' \
             AND (received_at < $1 OR id <= (SELECT id FROM inbound_mail WHERE status = 'rejected' ORDER BY id DESC LIMIT 1 OFFSET $2)) \
             ORDER BY id LIMIT $3)",
        )
        .bind(now - crate::REJECTED_KEEP_MS)
        .bind(crate::MAX_REJECTED)
        .bind(PRUNE_BATCH)
        .execute(&self.pool)
        .await?
        .rows_affected();
        removed += sqlx::query(
            "DELETE FROM inbound_mail WHERE id IN (SELECT id FROM inbound_mail WHERE received_at < $1 ORDER BY id LIMIT $2)",
        )
        .bind(now - r.audit_ms)
        .bind(PRUNE_BATCH)
        .execute(&self.pool)
        .await?
        .rows_affected();
        removed += sqlx::query("DELETE FROM port_shares WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
        removed += sqlx::query("DELETE FROM used_tickets WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
        for (sql, before) in statements {
            removed += sqlx::query(sql)
                .bind(before)
                .bind(PRUNE_BATCH)
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdb::each_backend;

    #[tokio::test]
    async fn old_history_goes_and_recent_stays() {
        each_backend(|store| async move {
            let day = 86_400_000;
            for (id, age_days) in [("old", 40), ("new", 1)] {
                let e = crate::Execution {
                    id: id.into(),
                    environment_id: "e".into(),
                    user_id: "u".into(),
                    command: "true".into(),
                    working_dir: None,
                    status: "completed".into(),
                    exit_code: Some(0),
                    stdout: String::new(),
                    stderr: String::new(),
                    truncated: false,
                    started_at: store.now() - age_days * day,
                    finished_at: None,
                    duration_ms: None,
                };
                store.insert_execution(&e).await.unwrap();
            }
            store
                .audit("u", "old", None, "success", None, None)
                .await
                .unwrap();
            store
                .exec_sql_for_tests(
                    "UPDATE audit_log SET at = $1 WHERE action = $2",
                    store.now() - 400 * day,
                    "old",
                )
                .await
                .unwrap();
            store
                .audit("u", "new", None, "success", None, None)
                .await
                .unwrap();
            let r = Retention {
                executions_ms: 30 * day,
                audit_ms: 365 * day,
                jobs_ms: 30 * day,
                destroyed_ms: 30 * day,
            };
            assert_eq!(store.prune(&r).await.unwrap(), 2);
            assert!(matches!(
                store.execution("e", "old").await,
                Err(crate::StoreError::NotFound)
            ));
            assert!(store.execution("e", "new").await.is_ok());
            assert_eq!(
                store
                    .count("SELECT COUNT(*) AS n FROM audit_log")
                    .await
                    .unwrap(),
                1
            );
            assert_eq!(store.prune(&r).await.unwrap(), 0);
        })
        .await;
    }
}
