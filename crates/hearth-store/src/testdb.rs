//! Runs a test body against a fresh SQLite file and a fresh PostgreSQL database.

use crate::Store;
use std::future::Future;

/// Where the test PostgreSQL server is; `make test` sets it. Tests refuse to pass
/// silently on one backend only.
pub fn postgres_admin_url() -> String {
    std::env::var("HEARTH_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!("HEARTH_TEST_POSTGRES_URL is not set: run the tests with `make test`, which starts PostgreSQL")
    })
}

/// A new, empty PostgreSQL database; returns its URL.
pub async fn fresh_postgres_url() -> String {
    use sqlx::Executor;
    sqlx::any::install_default_drivers();
    let admin = postgres_admin_url();
    let name = format!("hearth_t_{}", uuid::Uuid::new_v4().simple());
    let pool = sqlx::AnyPool::connect(&admin)
        .await
        .expect("connect to test PostgreSQL");
    pool.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .unwrap();
    pool.close().await;
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}")
}

pub async fn fresh_postgres() -> Store {
    Store::connect(&fresh_postgres_url().await).await.unwrap()
}

/// Runs `body` with the URL of a fresh SQLite database, then of a fresh PostgreSQL one.
pub async fn each_backend_url<F, Fut>(body: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    body(format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("t.db").display()
    ))
    .await;
    body(fresh_postgres_url().await).await;
}

pub async fn each_backend<F, Fut>(body: F)
where
    F: Fn(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    body(Store::connect(&url).await.unwrap()).await;
    body(fresh_postgres().await).await;
}

impl Store {
    /// Test setup at scale: `count` running environments of `user_id` on each listed host,
    /// written in large batches, then the host counters re-summed. Bypasses quota and
    /// placement on purpose: it builds a fleet, it does not exercise creation.
    pub async fn insert_running_for_tests(
        &self,
        user_id: &str,
        hosts: &[(String, i64)],
    ) -> crate::Result<()> {
        const PER_BATCH: usize = 200;
        let now = self.now();
        let rows: Vec<(&str, String)> = hosts
            .iter()
            .flat_map(|(h, n)| (0..*n).map(move |_| (h.as_str(), uuid::Uuid::now_v7().to_string())))
            .collect();
        let mut tx = self.begin().await?;
        for batch in rows.chunks(PER_BATCH) {
            let mut sql = String::from(
                "INSERT INTO environments (id, slug, name, user_id, personal, state, generation, provider, host_id, ssh_user, \
                 vcpus, memory_mb, disk_gb, base_image, environment_vars, ssh_public_key, ssh_private_key_enc, created_at, \
                 updated_at, reserved) VALUES ",
            );
            for i in 0..batch.len() {
                let b = i * 5;
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!(
                    "(${}, ${}, 'bulk', ${}, 0, 'running', 1, 'sim', ${}, 'dev', 1, 256, 1, 'none', '{{}}', '', '', ${}, ${}, 1)",
                    b + 1, b + 2, b + 3, b + 4, b + 5, b + 5
                ));
            }
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (host, id) in batch {
                q = q
                    .bind(id.clone())
                    .bind(format!("env_{}", &id[id.len() - 12..]))
                    .bind(user_id)
                    .bind(*host)
                    .bind(now);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        self.resum_hosts().await?;
        Ok(())
    }
}

impl Store {
    /// Benchmarks: how long placing `need` takes (the placement query and the conditional
    /// reservation, in a transaction that is then rolled back, so the fleet stays as it is).
    pub async fn time_placement(
        &self,
        need: &crate::Placement,
    ) -> crate::Result<std::time::Duration> {
        let mut tx = self.begin().await?;
        let started = std::time::Instant::now();
        let placed = self.place_in(&mut tx, need, None).await;
        let took = started.elapsed();
        tx.rollback().await?;
        placed.map(|_| took)
    }
}

impl Store {
    /// Tests: runs a statement as is (to age a token, say).
    pub async fn execute_for_tests(&self, sql: &str) {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&self.pool)
            .await
            .expect("test statement");
    }

    /// Tests: the text column `v` of the first row of `sql`.
    pub async fn count_text(&self, sql: &str) -> String {
        let row = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&self.pool)
            .await
            .expect("test query");
        sqlx::Row::try_get(&row, "v").expect("a text column v")
    }
}
