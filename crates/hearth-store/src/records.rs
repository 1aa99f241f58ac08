//! Append-only records: the audit log, executions and the provisioning log.

use crate::{Result, Store, Tx};
use hearth_core::EnvState;
use sqlx::Row;

#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub environment_id: Option<String>,
    pub previous_state: Option<String>,
    pub new_state: Option<String>,
    pub outcome: String,
    pub error: Option<String>,
    pub duration_ms: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub environment_id: Option<String>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub outcome: Option<String>,
}

/// An audit page: `$1`..`$4` environment, actor, action, outcome (`''` for any), `$5` the
/// cursor, `$6` how many; `$lead` the indexed condition, then the cursor's side and order.
/// Optional filters written `$n = '' OR col = $n` lead nowhere (no planner can seek with
/// them, so a rare match read the whole log): the one that leads is `$lead`.
macro_rules! audit_page {
    ($lead:literal, $side:literal, $order:literal) => {
        concat!(
            "SELECT id, at, actor, action, environment_id, previous_state, new_state, outcome, error, duration_ms \
             FROM audit_log WHERE ",
            $lead,
            " AND ($1 = '' OR environment_id = $1) AND ($2 = '' OR actor = $2) AND ($3 = '' OR action = $3) \
             AND ($4 = '' OR outcome = $4) AND id ",
            $side,
            " $5 ORDER BY id ",
            $order,
            " LIMIT $6"
        )
    };
}

/// The audit pages led by `$lead`: newest first, and oldest first.
macro_rules! audit_pages {
    ($lead:literal) => {
        (
            audit_page!($lead, "<", "DESC"),
            audit_page!($lead, ">", "ASC"),
        )
    };
}

/// A list's fingerprint: how many environments, and the sum of their generations (which
/// every change of state raises).
macro_rules! fingerprint {
    ($where:literal) => {
        concat!(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n, CAST(COALESCE(SUM(generation), 0) AS BIGINT) AS g \
             FROM environments ",
            $where
        )
    };
}

#[derive(Debug, Clone)]
pub struct Execution {
    pub id: String,
    pub environment_id: String,
    pub user_id: String,
    pub command: String,
    pub working_dir: Option<String>,
    /// `completed`, `failed` (could not run) or `timeout`.
    pub status: String,
    pub exit_code: Option<i64>,
    pub stdout: String,
    pub stderr: String,
    pub truncated: bool,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub duration_ms: Option<i64>,
}

/// An execution in a list: no output bodies, and the command's first
/// `SUMMARY_COMMAND_CHARS` characters, so a page stays small (`GET` one for the rest).
#[derive(Debug, Clone)]
pub struct ExecutionSummary {
    pub id: String,
    pub environment_id: String,
    pub command: String,
    pub command_truncated: bool,
    pub working_dir: Option<String>,
    pub status: String,
    pub exit_code: Option<i64>,
    pub truncated: bool,
    pub stdout_chars: i64,
    pub stderr_chars: i64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub duration_ms: Option<i64>,
}

/// How much of a command a list shows.
pub const SUMMARY_COMMAND_CHARS: i64 = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Increases with every line written, across environments: a resume cursor.
    pub id: i64,
    pub at: i64,
    /// `info`, `success`, `error` or `debug`, as the seed's log had.
    pub level: String,
    pub message: String,
}

/// The provisioning log keeps the last this many entries...
pub const LOG_KEEP: i64 = 100;
/// ...written within this long of the newest one.
pub const LOG_WINDOW_MS: i64 = 3_600_000;
/// How often (in lines written, across environments) old lines are dropped.
const LOG_TRIM_EVERY: i64 = 16;

const SELECT_EXECUTION: &str = "SELECT id, environment_id, user_id, command, working_dir, status, exit_code, stdout, stderr, \
    truncated, started_at, finished_at, duration_ms FROM executions";

fn execution_from_row(r: &sqlx::any::AnyRow) -> Result<Execution> {
    Ok(Execution {
        id: r.try_get("id")?,
        environment_id: r.try_get("environment_id")?,
        user_id: r.try_get("user_id")?,
        command: r.try_get("command")?,
        working_dir: r.try_get("working_dir")?,
        status: r.try_get("status")?,
        exit_code: r.try_get("exit_code")?,
        stdout: r.try_get("stdout")?,
        stderr: r.try_get("stderr")?,
        truncated: r.try_get::<i64, _>("truncated")? != 0,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        duration_ms: r.try_get("duration_ms")?,
    })
}

fn log_from_row(r: &sqlx::any::AnyRow) -> Result<LogEntry> {
    Ok(LogEntry {
        id: r.try_get("id")?,
        at: r.try_get("at")?,
        level: r.try_get("level")?,
        message: r.try_get("message")?,
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn insert_audit(
    tx: &mut Tx,
    now: i64,
    actor: &str,
    action: &str,
    environment_id: Option<&str>,
    previous: Option<EnvState>,
    new: Option<EnvState>,
    outcome: &str,
    error: Option<&str>,
    duration_ms: Option<i64>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (at, actor, action, environment_id, previous_state, new_state, outcome, error, duration_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(now)
    .bind(actor)
    .bind(action)
    .bind(environment_id)
    .bind(previous.map(EnvState::as_str))
    .bind(new.map(EnvState::as_str))
    .bind(outcome)
    .bind(error)
    .bind(duration_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// An environment's first provisioning log line, in the transaction that creates it (a
/// new environment has no lines to trim).
pub(crate) async fn insert_first_log(
    tx: &mut Tx,
    environment_id: &str,
    now: i64,
    message: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO provision_logs (environment_id, at, level, message) VALUES ($1, $2, 'info', $3)",
    )
    .bind(environment_id)
    .bind(now)
    .bind(message)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        environment_id: Option<&str>,
        outcome: &str,
        error: Option<&str>,
        duration_ms: Option<i64>,
    ) -> Result<()> {
        let now = self.now();
        let mut tx = self.begin().await?;
        insert_audit(
            &mut tx,
            now,
            actor,
            action,
            environment_id,
            None,
            None,
            outcome,
            error,
            duration_ms,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn audit_for_environment(&self, environment_id: &str) -> Result<Vec<AuditEntry>> {
        Ok(self
            .audit_page(
                &AuditFilter {
                    environment_id: Some(environment_id.into()),
                    ..Default::default()
                },
                None,
                100_000,
                true,
            )
            .await?
            .0)
    }

    /// A page of audit entries matching `filter`; newest first unless `oldest_first`.
    pub async fn audit_page(
        &self,
        filter: &AuditFilter,
        cursor: Option<i64>,
        limit: i64,
        oldest_first: bool,
    ) -> Result<(Vec<AuditEntry>, Option<i64>)> {
        // The filter that leads picks the index the page walks: `audit_environment`,
        // `audit_actor`, `audit_action`, or the key; the others are checked on the way.
        let given = |f: &Option<String>| f.as_deref().is_some_and(|v| !v.is_empty());
        let (newest_first, oldest_first_sql) = if given(&filter.environment_id) {
            audit_pages!("environment_id = $1")
        } else if given(&filter.actor) {
            audit_pages!("actor = $2")
        } else if given(&filter.action) {
            audit_pages!("action = $3")
        } else {
            audit_pages!("$1 = ''")
        };
        let sql = if oldest_first {
            oldest_first_sql
        } else {
            newest_first
        };
        let start = cursor.unwrap_or(if oldest_first { 0 } else { i64::MAX });
        let rows = sqlx::query(sql)
            .bind(filter.environment_id.as_deref().unwrap_or(""))
            .bind(filter.actor.as_deref().unwrap_or(""))
            .bind(filter.action.as_deref().unwrap_or(""))
            .bind(filter.outcome.as_deref().unwrap_or(""))
            .bind(start)
            .bind(limit + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut items = rows
            .iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    environment_id: r.try_get("environment_id")?,
                    previous_state: r.try_get("previous_state")?,
                    new_state: r.try_get("new_state")?,
                    outcome: r.try_get("outcome")?,
                    error: r.try_get("error")?,
                    duration_ms: r.try_get("duration_ms")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let next = crate::finish_page(&mut items, limit, |a| a.id);
        Ok((items, next))
    }

    pub async fn insert_execution(&self, e: &Execution) -> Result<()> {
        sqlx::query(
            "INSERT INTO executions (id, environment_id, user_id, command, working_dir, status, exit_code, stdout, stderr, \
             truncated, started_at, finished_at, duration_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&e.id)
        .bind(&e.environment_id)
        .bind(&e.user_id)
        .bind(&e.command)
        .bind(&e.working_dir)
        .bind(&e.status)
        .bind(e.exit_code)
        .bind(&e.stdout)
        .bind(&e.stderr)
        .bind(e.truncated as i64)
        .bind(e.started_at)
        .bind(e.finished_at)
        .bind(e.duration_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every execution of an environment with its output (tests and diagnostics).
    pub async fn executions_for_environment(&self, environment_id: &str) -> Result<Vec<Execution>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT_EXECUTION} WHERE environment_id = $1 ORDER BY id"
        )))
        .bind(environment_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(execution_from_row).collect()
    }

    /// One execution of an environment, with its output.
    pub async fn execution(&self, environment_id: &str, id: &str) -> Result<Execution> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT_EXECUTION} WHERE environment_id = $1 AND id = $2"
        )))
        .bind(environment_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(crate::StoreError::NotFound)?;
        execution_from_row(&row)
    }

    /// A page of an environment's executions, oldest first (ids are time-ordered), as
    /// summaries.
    pub async fn executions_page(
        &self,
        environment_id: &str,
        cursor: Option<&str>,
        limit: i64,
    ) -> Result<(Vec<ExecutionSummary>, Option<String>)> {
        let sql = format!(
            "SELECT id, environment_id, SUBSTR(command, 1, {SUMMARY_COMMAND_CHARS}) AS command, \
             CAST(CASE WHEN LENGTH(command) > {SUMMARY_COMMAND_CHARS} THEN 1 ELSE 0 END AS BIGINT) AS command_truncated, \
             working_dir, status, exit_code, truncated, CAST(LENGTH(stdout) AS BIGINT) AS stdout_chars, \
             CAST(LENGTH(stderr) AS BIGINT) AS stderr_chars, started_at, finished_at, duration_ms \
             FROM executions WHERE environment_id = $1 AND id > $2 ORDER BY id LIMIT $3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(environment_id)
            .bind(cursor.unwrap_or(""))
            .bind(limit + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut items = rows
            .iter()
            .map(|r| {
                Ok(ExecutionSummary {
                    id: r.try_get("id")?,
                    environment_id: r.try_get("environment_id")?,
                    command: r.try_get("command")?,
                    command_truncated: r.try_get::<i64, _>("command_truncated")? != 0,
                    working_dir: r.try_get("working_dir")?,
                    status: r.try_get("status")?,
                    exit_code: r.try_get("exit_code")?,
                    truncated: r.try_get::<i64, _>("truncated")? != 0,
                    stdout_chars: r.try_get("stdout_chars")?,
                    stderr_chars: r.try_get("stderr_chars")?,
                    started_at: r.try_get("started_at")?,
                    finished_at: r.try_get("finished_at")?,
                    duration_ms: r.try_get("duration_ms")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let next = crate::finish_page(&mut items, limit, |e| e.id.clone());
        Ok((items, next))
    }

    /// Appends a provisioning log line. Every `LOG_TRIM_EVERY`th line (by id) also trims
    /// the environment's log, as does the end of every job (`trim_log`): readers never see
    /// more than the last `LOG_KEEP`, and a line costs one write instead of two.
    pub async fn append_log(&self, environment_id: &str, level: &str, message: &str) -> Result<()> {
        let now = self.now();
        let id: i64 = sqlx::query(
            "INSERT INTO provision_logs (environment_id, at, level, message) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(environment_id)
        .bind(now)
        .bind(level)
        .bind(message)
        .fetch_one(&self.pool)
        .await?
        .try_get("id")?;
        if id % LOG_TRIM_EVERY == 0 {
            self.trim_log(environment_id).await?;
        }
        Ok(())
    }

    /// Drops the environment's log lines past the last `LOG_KEEP`.
    pub async fn trim_log(&self, environment_id: &str) -> Result<()> {
        sqlx::query(
            "DELETE FROM provision_logs WHERE environment_id = $1 AND id NOT IN \
             (SELECT id FROM provision_logs WHERE environment_id = $1 ORDER BY id DESC LIMIT $2)",
        )
        .bind(environment_id)
        .bind(LOG_KEEP)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The environment's generation and newest log line id: a cheap "anything new?" probe
    /// for live streams. `None` when the environment does not exist.
    pub async fn event_head(&self, environment_id: &str) -> Result<Option<(i64, i64)>> {
        let row = sqlx::query(
            "SELECT generation, (SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM provision_logs WHERE environment_id = $1) AS log_id \
             FROM environments WHERE id = $1",
        )
        .bind(environment_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((r.try_get("generation")?, r.try_get("log_id")?)))
            .transpose()
    }

    /// (environments, sum of their generations) of one user, or of everyone with `None`,
    /// destroyed ones included: any state change raises the sum, any create the count, so
    /// a list stream knows when to say "changed" with one small query.
    pub async fn environments_fingerprint(&self, user_id: Option<&str>) -> Result<(i64, i64)> {
        // A user's walks their rows by `environments_user_id`; everyone's reads them all.
        let row = match user_id {
            Some(user_id) => sqlx::query(fingerprint!("WHERE user_id = $1")).bind(user_id),
            None => sqlx::query(fingerprint!("")),
        }
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get("n")?, row.try_get("g")?))
    }

    /// Lines written after `after_id` (for live streams), oldest first.
    pub async fn logs_after(&self, environment_id: &str, after_id: i64) -> Result<Vec<LogEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, level, message FROM provision_logs WHERE environment_id = $1 AND id > $2 ORDER BY id LIMIT 1000",
        )
        .bind(environment_id)
        .bind(after_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(log_from_row).collect()
    }

    /// The environment's log: at most the last 100 lines, and none once an hour has
    /// passed since the last write (the seed's Redis list with its one-hour TTL).
    pub async fn logs(&self, environment_id: &str) -> Result<Vec<LogEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, level, message FROM provision_logs WHERE environment_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(environment_id)
        .bind(LOG_KEEP)
        .fetch_all(&self.pool)
        .await?;
        let mut entries = rows.iter().map(log_from_row).collect::<Result<Vec<_>>>()?;
        entries.reverse();
        if entries
            .last()
            .is_some_and(|newest| self.now() - newest.at > LOG_WINDOW_MS)
        {
            entries.clear();
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use crate::testdb::each_backend;

    #[tokio::test]
    async fn log_keeps_the_last_hundred_per_environment() {
        each_backend(|store| async move {
            for i in 0..120 {
                store
                    .append_log("env-1", "info", &format!("line {i}"))
                    .await
                    .unwrap();
            }
            store
                .append_log("env-2", "error", "other environment")
                .await
                .unwrap();
            let logs = store.logs("env-1").await.unwrap();
            assert_eq!(logs.len(), 100);
            assert_eq!(logs.first().unwrap().message, "line 20");
            assert_eq!(logs.last().unwrap().message, "line 119");
            assert_eq!(store.logs("env-2").await.unwrap().len(), 1);
            assert!(store.logs("env-3").await.unwrap().is_empty());
        })
        .await;
    }
}

#[cfg(test)]
mod plan_tests {
    /// Each filter an audit page can lead with walks its index from the cursor on, both
    /// ways: a rare action or one environment's entries never read the whole log.
    #[tokio::test]
    async fn audit_pages_seek_an_index() {
        let (_dir, store) = crate::testdb::sqlite().await;
        for (what, lead, newest, oldest) in [
            (
                "one environment's",
                audit_pages!("environment_id = $1"),
                "audit_environment (environment_id=? AND id<?)",
                "audit_environment (environment_id=? AND id>?)",
            ),
            (
                "one actor's",
                audit_pages!("actor = $2"),
                "audit_actor (actor=? AND id<?)",
                "audit_actor (actor=? AND id>?)",
            ),
            (
                "one action's",
                audit_pages!("action = $3"),
                "audit_action (action=? AND id<?)",
                "audit_action (action=? AND id>?)",
            ),
            (
                "everything",
                audit_pages!("$1 = ''"),
                "INTEGER PRIMARY KEY (rowid<?)",
                "INTEGER PRIMARY KEY (rowid>?)",
            ),
        ] {
            for (sql, index) in [(lead.0, newest), (lead.1, oldest)] {
                let plan = store.query_plan(sql, &[]).await;
                crate::testdb::assert_seeks_in_order(what, "audit_log", &plan, index);
            }
        }
    }

    /// A user's list stream probes only that user's rows.
    #[tokio::test]
    async fn a_users_fingerprint_seeks_an_index() {
        let (_dir, store) = crate::testdb::sqlite().await;
        let plan = store
            .query_plan(fingerprint!("WHERE user_id = $1"), &[])
            .await;
        crate::testdb::assert_seeks("a user's fingerprint", "environments", &plan, "(user_id=?)");
    }
}
