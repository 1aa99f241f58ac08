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
///
/// Its name carries the test process's pid (`hearth_t_<pid>_<uuid>`). A test cannot be
/// trusted to drop its own database (it may panic or be killed), so each call first drops
/// the test databases whose process is gone: the server never holds more than the live
/// tests' databases plus one run's leftovers. (Left alone, 2,389 of them, 21 GB, made a
/// crashed server's restart outlast `pg_ctl`'s 60 s.)
pub async fn fresh_postgres_url() -> String {
    use sqlx::Executor;
    sqlx::any::install_default_drivers();
    let admin = postgres_admin_url();
    let name = format!(
        "{TEST_DATABASE_PREFIX}{}_{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let pool = sqlx::AnyPool::connect(&admin)
        .await
        .expect("connect to test PostgreSQL");
    drop_orphaned_databases(&pool).await;
    pool.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .unwrap();
    pool.close().await;
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}")
}

const TEST_DATABASE_PREFIX: &str = "hearth_t_";

/// Drops the test databases whose test process no longer runs on this machine. One process
/// sweeps at a time (an advisory lock; the others go on at once); a database another
/// sweeper dropped first is not an error.
async fn drop_orphaned_databases(pool: &sqlx::AnyPool) {
    use sqlx::Row;
    const SWEEP_LOCK: i64 = 0x6865_6172_7468; // "hearth"
    let mut conn = pool.acquire().await.expect("a test PostgreSQL connection");
    let locked: bool = sqlx::query("SELECT pg_try_advisory_lock($1) AS v")
        .bind(SWEEP_LOCK)
        .fetch_one(&mut *conn)
        .await
        .and_then(|row| row.try_get("v"))
        .expect("take the test-database sweep lock");
    if !locked {
        return;
    }
    let names: Vec<String> = sqlx::query(
        "SELECT datname::text AS v FROM pg_database WHERE datname LIKE 'hearth\\_t\\_%'",
    )
    .fetch_all(&mut *conn)
    .await
    .and_then(|rows| rows.iter().map(|r| r.try_get("v")).collect())
    .expect("list the test databases");
    for name in names.iter().filter(|n| is_orphan(n)) {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut *conn)
        .await;
    }
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(SWEEP_LOCK)
        .execute(&mut *conn)
        .await;
}

/// A test database is orphaned when the process named in it is gone (or, for names from
/// before the pid was part of them, always).
fn is_orphan(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(TEST_DATABASE_PREFIX) else {
        return false;
    };
    match rest
        .split_once('_')
        .and_then(|(pid, _)| pid.parse::<u32>().ok())
    {
        Some(pid) => {
            pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        }
        None => true,
    }
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

/// A fresh SQLite database, with the directory that holds it.
pub async fn sqlite() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    let store = Store::connect(&url).await.unwrap();
    (dir, store)
}

/// That SQLite's `plan` reads `table` once, by seeking `index` (the end of its line: the
/// index and the columns it is sought by), never by reading the table whole.
pub fn assert_seeks(what: &str, table: &str, plan: &[String], index: &str) {
    let reads: Vec<&String> = plan
        .iter()
        .filter(|l| l.contains(&format!(" {table} ")))
        .collect();
    assert!(
        reads.len() == 1
            && reads[0].starts_with(&format!("SEARCH {table} "))
            && reads[0].ends_with(index),
        "{what} must seek {index}, not read {table} whole; its plan: {plan:#?}"
    );
}

/// `assert_seeks`, and the rows come in the index's order: nothing is sorted after reading.
pub fn assert_seeks_in_order(what: &str, table: &str, plan: &[String], index: &str) {
    assert_seeks(what, table, plan, index);
    assert!(
        !plan.iter().any(|l| l.contains("TEMP B-TREE")),
        "{what} is sorted after reading; its plan: {plan:#?}"
    );
}

/// One environment of `insert_environments_for_tests`.
#[derive(Debug, Clone)]
pub struct BulkEnvironment {
    pub id: String,
    pub user_id: String,
    pub host_id: String,
    pub state: &'static str,
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
        let rows: Vec<BulkEnvironment> = hosts
            .iter()
            .flat_map(|(h, n)| {
                (0..*n).map(move |_| BulkEnvironment {
                    id: uuid::Uuid::now_v7().to_string(),
                    user_id: user_id.to_string(),
                    host_id: h.clone(),
                    state: "running",
                })
            })
            .collect();
        self.insert_environments_for_tests(&rows).await
    }

    /// Test setup at scale: environments as given, in large batches, then the host counters
    /// re-summed (a row that is not destroyed holds its host's room, as `reserved` says).
    pub async fn insert_environments_for_tests(
        &self,
        rows: &[BulkEnvironment],
    ) -> crate::Result<()> {
        const PER_BATCH: usize = 200;
        let now = self.now();
        let mut tx = self.begin().await?;
        for batch in rows.chunks(PER_BATCH) {
            let mut sql = String::from(
                "INSERT INTO environments (id, slug, name, user_id, personal, state, generation, provider, host_id, ssh_user, \
                 vcpus, memory_mb, disk_gb, base_image, environment_vars, ssh_public_key, ssh_private_key_enc, created_at, \
                 updated_at, reserved) VALUES ",
            );
            for i in 0..batch.len() {
                let b = i * 7;
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!(
                    "(${}, ${}, 'bulk', ${}, 0, ${}, 1, 'sim', ${}, 'dev', 1, 256, 1, 'none', '{{}}', '', '', ${}, ${}, ${})",
                    b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 6, b + 7
                ));
            }
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for row in batch {
                q = q
                    .bind(row.id.clone())
                    .bind(format!("env_{}", &row.id[row.id.len() - 12..]))
                    .bind(row.user_id.clone())
                    .bind(row.state)
                    .bind(row.host_id.clone())
                    .bind(now)
                    .bind(i64::from(row.state != "destroyed"));
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

    /// Tests: how the database would run `sql`, a line per step. SQLite says it without
    /// values (`EXPLAIN QUERY PLAN`); PostgreSQL plans it for `args`, SQL literals for `$1`…
    /// (`PREPARE`, then `EXPLAIN EXECUTE`), with the statistics of the rows it holds.
    pub async fn query_plan(&self, sql: &str, args: &[&str]) -> Vec<String> {
        use sqlx::{Executor, Row};
        let mut conn = self.pool.acquire().await.expect("a connection");
        let lines: Vec<String> = match self.backend {
            crate::Backend::Sqlite => conn
                .fetch_all(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                .await
                .expect("explain")
                .iter()
                .map(|r| r.try_get::<String, _>("detail").expect("detail"))
                .collect(),
            crate::Backend::Postgres => {
                conn.execute(sqlx::AssertSqlSafe(format!("PREPARE hearth_plan AS {sql}")))
                    .await
                    .expect("prepare");
                let plan = conn
                    .fetch_all(sqlx::AssertSqlSafe(format!(
                        "EXPLAIN EXECUTE hearth_plan({})",
                        args.join(", ")
                    )))
                    .await
                    .expect("explain")
                    .iter()
                    .map(|r| r.try_get::<String, _>(0).expect("a plan line"))
                    .collect();
                conn.execute("DEALLOCATE hearth_plan")
                    .await
                    .expect("deallocate");
                plan
            }
        };
        lines
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_database_is_orphaned_when_its_process_is_gone() {
        let mine = format!("hearth_t_{}_0123abcd", std::process::id());
        assert!(!is_orphan(&mine));
        assert!(!is_orphan("hearth_t_1_0123abcd"), "pid 1 runs");
        assert!(is_orphan("hearth_t_999999999_0123abcd"), "past any pid_max");
        assert!(
            is_orphan("hearth_t_0123456789abcdef0123456789abcdef"),
            "from before pids"
        );
        assert!(!is_orphan("hearth"));
        assert!(!is_orphan("hearth_bench_sim"));
    }

    #[tokio::test]
    async fn a_new_test_database_sweeps_the_orphaned_ones() {
        use sqlx::Executor;
        sqlx::any::install_default_drivers();
        let admin = sqlx::AnyPool::connect(&postgres_admin_url()).await.unwrap();
        let orphan = "hearth_t_999999999_sweepme";
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {orphan}"
            )))
            .await
            .unwrap();
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {orphan}")))
            .await
            .unwrap();
        let exists = |name: String| {
            let admin = admin.clone();
            async move {
                sqlx::query("SELECT count(*) AS v FROM pg_database WHERE datname = $1")
                    .bind(name)
                    .fetch_one(&admin)
                    .await
                    .and_then(|row| sqlx::Row::try_get::<i64, _>(&row, "v"))
                    .unwrap()
                    == 1
            }
        };
        assert!(exists(orphan.to_string()).await);
        // Another sweeper may hold the lock right now; one of the next few sweeps is ours.
        let mut swept = false;
        for _ in 0..50 {
            let url = fresh_postgres_url().await;
            let mine = url.rsplit_once('/').unwrap().1.to_string();
            assert!(exists(mine).await, "the new database is kept");
            if !exists(orphan.to_string()).await {
                swept = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(swept, "{orphan} outlived 50 sweeps");
    }
}
