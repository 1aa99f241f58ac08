//! The database: the truth for users, environments, jobs, audit and executions.
//!
//! One set of queries serves SQLite and PostgreSQL through sqlx's `Any` driver; each backend
//! has its own migration folder. Times are epoch milliseconds computed in Rust, so both
//! backends agree on what "now" is. Write transactions on SQLite start `IMMEDIATE` so the
//! single writer serialises them (DESIGN decision 6); PostgreSQL takes row locks.

/// `$query` (a `sqlx::query_as` and its binds) fetched with `$fetch` through the store's
/// `reads` pool when it has one (PostgreSQL), else through its main pool: one copy of the
/// SQL, whichever driver runs it.
macro_rules! fetch_read {
    ($store:expr, $query:expr, $fetch:ident) => {
        match &$store.reads {
            Some(reads) => $query.$fetch(reads).await,
            None => $query.$fetch(&$store.pool).await,
        }
    };
}

mod bought;
mod capacity;
mod environments;
mod git_credentials;
mod hosts;
mod images;
mod installation;
mod jobs;
mod mail;
mod pools;
mod port_shares;
mod records;
mod retention;
mod sign_in;
mod sim;
mod snapshots;
mod users;

pub use bought::BoughtHost;
pub use capacity::{CapacitySample, SAMPLE_MS};
pub use environments::{
    Environment, EnvironmentSummary, NewEnvironment, PersonalOutcome, new_slug,
};
pub use git_credentials::{GitCredential, MAX_GIT_CREDENTIALS_PER_USER};
pub use hosts::{Host, HostCapacity, HostUpdate, JoinToken, NewHost, Placement};
pub use images::Image;
pub use installation::{Installation, KeyCheck};
pub use jobs::{Job, JobState, MAX_CRASHES, NewJob};
pub use mail::{MAX_REJECTED, Mail, NewMail, REJECTED_KEEP_MS, Stored, mail_job_key};
pub use pools::{MAX_POOL_SIZE, NewPooledVm, PooledAddress, PooledVm, WarmPool};
pub use port_shares::{MAX_SHARES_PER_ENVIRONMENT, PortShare};
pub use records::{AuditEntry, AuditFilter, Execution, ExecutionSummary, LogEntry};
pub use retention::Retention;
pub use sign_in::{MAX_SESSIONS_PER_USER, NewSession};
pub use sim::SimVmRow;
pub use snapshots::Snapshot;
pub use users::{ApiToken, QuotaOverrides, User, generate_token, hash_token};

use hearth_core::Clock;
use sqlx::any::install_default_drivers;
use sqlx::{AnyPool, Executor};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("not found")]
    NotFound,
    /// A conditional write lost to a concurrent one (state or generation moved on).
    #[error("the environment changed while this was being written; reload and retry")]
    Stale,
    #[error("{0}")]
    Quota(hearth_core::QuotaExceeded),
    #[error("{0}")]
    Conflict(String),
    /// No host has room (or the environment's own host has none).
    #[error("{0}")]
    NoCapacity(String),
    /// No host could ever take it (no host in that region, none with such GPUs).
    #[error("{0}")]
    NoSuchHost(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How long anything waits for a database connection before it fails.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// PostgreSQL connections of a node's pool for requests' reads (`Store::reads`), besides
/// the 16 of its main pool. A read holds one for a query, well under a millisecond, so 8
/// keep both cores busy with room to spare.
const READ_CONNECTIONS: u32 = 8;

/// A pooled connection idle for longer than this is pinged before it is handed out, so
/// one the database server dropped meanwhile (a restart, an idle timeout) is replaced
/// rather than failing a request. sqlx's default pings at every acquire: a round trip to
/// PostgreSQL, or a hop to a SQLite connection's thread, before each query. Without those
/// pings PostgreSQL's page of 100 went from 1,142-1,455 to 1,571-1,669 requests a second
/// (BENCHMARKS.md, issue 16, sixth measurements). Under load a connection is idle for
/// microseconds and never pinged.
const PING_AFTER_IDLE: Duration = Duration::from_secs(2);

/// The settings every pool of the store shares: its size, how long a request waits for a
/// connection, and when a connection is checked before use (`PING_AFTER_IDLE`).
fn pool_options<DB: sqlx::Database>(max_connections: u32) -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::new()
        .max_connections(max_connections)
        // A request waits at most this long for the database before it fails (a 503).
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_AFTER_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Environments,
    Jobs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Seals and opens secrets kept at rest (environment variables). The key lives above the
/// store; without one, values are kept as they are (the store's own tests).
pub trait Secrets: Send + Sync + 'static {
    fn seal(&self, plain: &str) -> String;
    fn open(&self, sealed: &str) -> std::result::Result<String, String>;
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// On PostgreSQL, a pool of its own driver for the reads every request makes: a token's
    /// user, an environment, a page. Through `sqlx::Any` every row was converted to
    /// `AnyRow`, each column copied once more and found by name in a map rebuilt per row: a
    /// fifth of the server's CPU on a page of 100 (BENCHMARKS.md, issue 16, fifth
    /// measurements). Writes, transactions and every other read keep `pool`.
    reads: Option<sqlx::PgPool>,
    backend: Backend,
    clock: Arc<dyn Clock>,
    secrets: Option<Arc<dyn Secrets>>,
    /// SQLite has one writer; queueing writers here is far cheaper than letting them
    /// meet SQLite's busy handler, which sleeps in steps of up to 100 ms.
    writer: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// A write transaction. On SQLite it also holds this process's writer lock.
pub struct Tx {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    _writer: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Tx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

impl std::ops::Deref for Tx {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &sqlx::AnyConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut sqlx::AnyConnection {
        &mut self.tx
    }
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

impl Store {
    /// Connects and applies the backend's migrations. `url` is `sqlite://PATH` or
    /// `postgres://...`.
    pub async fn connect(url: &str) -> Result<Store> {
        Self::connect_with_clock(url, hearth_core::clock::system()).await
    }

    /// As `connect`, with every time the store writes or compares read from `clock`.
    pub async fn connect_with_clock(url: &str, clock: Arc<dyn Clock>) -> Result<Store> {
        install_default_drivers();
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(StoreError::Conflict(format!(
                "DATABASE_URL must start with sqlite: or postgres:, got {url:?}"
            )));
        };
        let options = pool_options::<sqlx::Any>(if backend == Backend::Sqlite { 8 } else { 16 });
        let pool = match backend {
            Backend::Sqlite => {
                options
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute("PRAGMA busy_timeout = 30000").await?;
                            conn.execute("PRAGMA foreign_keys = ON").await?;
                            // Every commit reaches the disk before it is acknowledged:
                            // in WAL mode NORMAL keeps commits across a killed process
                            // but may lose the last ones to a power cut.
                            conn.execute("PRAGMA synchronous = FULL").await?;
                            Ok(())
                        })
                    })
                    .connect(url)
                    .await?
            }
            Backend::Postgres => options.connect(url).await?,
        };
        let reads = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                Some(pool_options::<sqlx::Postgres>(READ_CONNECTIONS).connect_lazy(url)?)
            }
        };
        let store = Store {
            pool,
            reads,
            backend,
            clock,
            secrets: None,
            writer: Default::default(),
        };
        match backend {
            Backend::Sqlite => {
                store.pool.execute("PRAGMA journal_mode = WAL").await?;
                SQLITE_MIGRATIONS.run(&store.pool).await?;
            }
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&store.pool).await?,
        }
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The same store, sealing secrets at rest with `secrets` from now on.
    pub fn with_secrets(mut self, secrets: Arc<dyn Secrets>) -> Store {
        self.secrets = Some(secrets);
        self
    }

    /// Now, by the store's clock (epoch milliseconds).
    pub fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A write transaction: `BEGIN IMMEDIATE` on SQLite so two writers never both read
    /// and then collide; plain `BEGIN` on PostgreSQL, where queries lock rows.
    pub async fn begin(&self) -> Result<Tx> {
        Ok(match self.backend {
            Backend::Sqlite => {
                let writer = self.writer.clone().lock_owned().await;
                Tx {
                    tx: self.pool.begin_with("BEGIN IMMEDIATE").await?,
                    _writer: Some(writer),
                }
            }
            Backend::Postgres => Tx {
                tx: self.pool.begin().await?,
                _writer: None,
            },
        })
    }

    /// Runs a `SELECT COUNT(*) AS n ...` written by the caller (tests and diagnostics).
    pub async fn count(&self, sql: &str) -> Result<i64> {
        use sqlx::Row;
        Ok(sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    /// Runs one statement with an integer `$1` and a text `$2` (tests set up states that
    /// are otherwise hours away, such as idleness or expiry).
    pub async fn exec_sql_for_tests(&self, sql: &str, a: i64, b: &str) -> Result<u64> {
        Ok(sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .bind(a)
            .bind(b)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// `(state, count)` of a table's `state` column (environments or jobs), for metrics.
    pub async fn counts_by_state(&self, table: Counted) -> Result<Vec<(String, i64)>> {
        use sqlx::Row;
        let sql = match table {
            Counted::Environments => {
                "SELECT state, CAST(COUNT(*) AS BIGINT) AS n FROM environments GROUP BY state"
            }
            Counted::Jobs => "SELECT state, CAST(COUNT(*) AS BIGINT) AS n FROM jobs GROUP BY state",
        };
        let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
            .collect()
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// `FOR UPDATE` on PostgreSQL, nothing on SQLite (the transaction already holds the
    /// write lock).
    pub(crate) fn for_update(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// `FOR UPDATE OF alias` on PostgreSQL (a join's one table), nothing on SQLite.
    pub(crate) fn for_update_of(&self, alias: &str) -> String {
        match self.backend {
            Backend::Sqlite => String::new(),
            Backend::Postgres => format!(" FOR UPDATE OF {alias}"),
        }
    }

    /// `FOR UPDATE OF alias SKIP LOCKED` on PostgreSQL: concurrent claims pass each other's
    /// rows by instead of queueing on them. Nothing on SQLite.
    pub(crate) fn skip_locked_of(&self, alias: &str) -> String {
        match self.backend {
            Backend::Sqlite => String::new(),
            Backend::Postgres => format!(" FOR UPDATE OF {alias} SKIP LOCKED"),
        }
    }
}

/// Ends a page fetched with `LIMIT limit + 1`: drops the extra row, and returns the
/// cursor of the last kept row when there is more to come.
fn finish_page<T, C>(items: &mut Vec<T>, limit: i64, cursor: impl Fn(&T) -> C) -> Option<C> {
    if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(cursor)
    } else {
        None
    }
}

impl Store {
    /// Runs a `DELETE` of the row its two binds name; `NotFound` when none matched.
    async fn delete_one(&self, sql: &'static str, first: &str, second: &str) -> Result<()> {
        let done = sqlx::query(sql)
            .bind(first)
            .bind(second)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }
}

/// A unique-constraint violation, on either backend.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.code()
                .is_some_and(|c| c == "23505" || c == "2067" || c == "1555")
                || d.message().contains("UNIQUE constraint failed")
        }
        _ => false,
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod testdb;

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite is built as `.cargo/config.toml` says and the benchmarks measured: without
    /// the two process-wide mutexes and with the query planner stability guarantee. A
    /// build that loses `LIBSQLITE3_FLAGS` (a system SQLite, another config) fails here.
    #[tokio::test]
    async fn sqlite_is_built_with_the_flags_it_was_measured_with() {
        use sqlx::Row;
        let (_dir, store) = testdb::sqlite().await;
        let options: Vec<String> = sqlx::query("PRAGMA compile_options")
            .fetch_all(&store.pool)
            .await
            .unwrap()
            .iter()
            .map(|row| row.try_get(0).unwrap())
            .collect();
        for wanted in ["DEFAULT_MEMSTATUS=0", "ENABLE_QPSG", "ENABLE_STMTVTAB"] {
            assert!(
                options.iter().any(|o| o == wanted),
                "{wanted} not in {options:?}"
            );
        }
        assert!(
            !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
            "{options:?}"
        );
    }

    /// A connection the database server dropped while it sat idle in a pool is pinged
    /// before it is handed out again, and replaced: the next request does not fail. (Under
    /// load, connections are never idle long enough to be pinged: `PING_AFTER_IDLE`.)
    #[tokio::test]
    async fn a_connection_postgresql_dropped_while_idle_is_replaced_before_use() {
        use sqlx::Connection;
        let url = testdb::fresh_postgres_url().await;
        let database = url.rsplit('/').next().unwrap().to_string();
        let store = Store::connect(&url).await.unwrap();
        // A read through each pool: the main one, and PostgreSQL's reads'.
        let read_through_both_pools = || async {
            let users = store.count("SELECT COUNT(*) AS n FROM users").await;
            assert_eq!(users.unwrap(), 0);
            let token = store.user_by_token("hearth_a_token_nobody_has").await;
            assert!(token.unwrap().is_none());
        };
        read_through_both_pools().await;
        let mut admin = sqlx::PgConnection::connect(&testdb::postgres_admin_url())
            .await
            .unwrap();
        let dropped: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
        )
        .bind(&database)
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert!(
            dropped.len() >= 2 && dropped.iter().all(|d| *d),
            "{dropped:?}"
        );
        tokio::time::sleep(PING_AFTER_IDLE + Duration::from_millis(200)).await;
        read_through_both_pools().await;
    }
}
