//! The jobs table: durable work items with leases and saved progress.
//!
//! A job is claimed by setting a lease; a worker that dies stops renewing it and the
//! sweeper hands the job back. Jobs of one environment run strictly in id order: a job
//! is claimable only when no earlier job of its environment is queued or running.
//!
//! A job's `progress` is what its saga steps produced so far, written by the lease owner
//! only, so a retry (or another node, after a crash) resumes after the last finished step.
//! A worker's death refunds the attempt it was on and counts a crash instead: attempts
//! measure the job's own failures, and `MAX_CRASHES` bounds the rest.

use crate::records::insert_audit;
use crate::{Result, Store, StoreError, Tx};
use sqlx::Row;
use sqlx::any::AnyRow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    /// Out of attempts; an admin may retry it.
    Dead,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Dead,
        ]
        .into_iter()
        .find(|j| j.as_str() == s)
    }
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub queue: String,
    pub kind: String,
    pub environment_id: String,
    pub max_attempts: i64,
    /// Who asked: a user id or `system:...`; the audit log names it.
    pub actor: String,
}

impl NewJob {
    pub fn for_environment(&self, id: &str) -> NewJob {
        NewJob {
            environment_id: id.to_string(),
            ..self.clone()
        }
    }
}

/// Worker deaths one job may suffer before it is run once more only to wind down (undo
/// and settle its environment).
pub const MAX_CRASHES: i64 = 5;

#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    pub environment_id: String,
    pub state: JobState,
    /// Claims so far, this one included.
    pub attempts: i64,
    pub max_attempts: i64,
    pub run_after: i64,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub last_error: Option<String>,
    pub actor: String,
    /// What the saga's finished steps produced (JSON object).
    pub progress: serde_json::Value,
    /// Claims that ended with the worker's death.
    pub crashes: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Job {
    /// Too many workers died running it: the handler must only wind down.
    pub fn exhausted(&self) -> bool {
        self.crashes > MAX_CRASHES || self.attempts > self.max_attempts
    }

    pub fn is_last_attempt(&self) -> bool {
        self.attempts >= self.max_attempts
    }
}

const SELECT_JOB: &str = "SELECT id, queue, kind, environment_id, state, attempts, max_attempts, run_after, \
    lease_owner, lease_expires_at, last_error, actor, progress, crashes, created_at, updated_at FROM jobs";

fn job_from_row(row: &AnyRow) -> Result<Job> {
    let state: String = row.try_get("state")?;
    let progress: String = row.try_get("progress")?;
    Ok(Job {
        id: row.try_get("id")?,
        queue: row.try_get("queue")?,
        kind: row.try_get("kind")?,
        environment_id: row.try_get("environment_id")?,
        state: JobState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("job state {state}")))?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        run_after: row.try_get("run_after")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        last_error: row.try_get("last_error")?,
        actor: row.try_get("actor")?,
        progress: serde_json::from_str(&progress)
            .map_err(|_| StoreError::Corrupt(format!("job progress {progress:?}")))?,
        crashes: row.try_get("crashes")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub(crate) async fn insert_job(tx: &mut Tx, job: &NewJob, now: i64) -> Result<i64> {
    let row = sqlx::query(
        "INSERT INTO jobs (queue, kind, environment_id, state, attempts, max_attempts, run_after, actor, created_at, updated_at) \
         VALUES ($1, $2, $3, 'queued', 0, $4, $5, $6, $7, $7) RETURNING id",
    )
    .bind(&job.queue)
    .bind(&job.kind)
    .bind(&job.environment_id)
    .bind(job.max_attempts)
    .bind(now)
    .bind(&job.actor)
    .bind(now)
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.try_get("id")?)
}

/// The admin's list: jobs newest first, in state `$1` when `in_state` (else `$1` is
/// `''`), below the cursor `$2`, at most `$3`.
fn newest_jobs(in_state: bool) -> String {
    let lead = if in_state { "state = $1" } else { "$1 = ''" };
    format!("{SELECT_JOB} WHERE {lead} AND id < $2 ORDER BY id DESC LIMIT $3")
}

impl Store {
    /// Queues a job and writes the audit line for the request that asked for it.
    pub async fn enqueue(&self, job: &NewJob, action: &str) -> Result<i64> {
        let now = self.now();
        let mut tx = self.begin().await?;
        let id = insert_job(&mut tx, job, now).await?;
        insert_audit(
            &mut tx,
            now,
            &job.actor,
            action,
            Some(&job.environment_id),
            None,
            None,
            "queued",
            None,
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Queues a start, stop or destroy, keeping at most one that has not begun per
    /// environment: a later request replaces an earlier one that never ran, and a destroy
    /// replaces every job that never ran (a provision that never began included). Jobs
    /// that have begun (claimed once, or holding progress) are never dropped. A start or
    /// stop behind a pending destroy is refused.
    pub async fn enqueue_control(&self, job: &NewJob, action: &str) -> Result<i64> {
        let now = self.now();
        let mut tx = self.begin().await?;
        // One request per environment at a time on PostgreSQL (SQLite has one writer).
        let lock = format!(
            "SELECT id FROM environments WHERE id = $1{}",
            self.for_update()
        );
        sqlx::query(sqlx::AssertSqlSafe(lock))
            .bind(&job.environment_id)
            .fetch_optional(&mut *tx)
            .await?;
        if job.kind != "destroy" {
            let destroying: i64 = sqlx::query(
                "SELECT COUNT(*) AS n FROM jobs WHERE environment_id = $1 AND kind = 'destroy' AND state IN ('queued', 'running')",
            )
            .bind(&job.environment_id)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
            if destroying > 0 {
                return Err(StoreError::Conflict(
                    "a destroy of this environment is queued".into(),
                ));
            }
        }
        let superseded = if job.kind == "destroy" {
            "('provision', 'start', 'stop', 'destroy')"
        } else {
            "('start', 'stop')"
        };
        let dropped = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM jobs WHERE environment_id = $1 AND state = 'queued' AND attempts = 0 AND crashes = 0 \
             AND progress = '{{}}' AND kind IN {superseded}"
        )))
        .bind(&job.environment_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let id = insert_job(&mut tx, job, now).await?;
        let note =
            (dropped > 0).then(|| format!("replaced {dropped} request(s) that had not begun"));
        insert_audit(
            &mut tx,
            now,
            &job.actor,
            action,
            Some(&job.environment_id),
            None,
            None,
            "queued",
            note.as_deref(),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Whether a destroy of the environment is queued (and so waits for its running job).
    pub async fn destroy_queued(&self, environment_id: &str) -> Result<bool> {
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM jobs WHERE environment_id = $1 AND kind = 'destroy' AND state = 'queued'")
            .bind(environment_id)
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        Ok(n > 0)
    }

    /// Claims a ready job of `queue` whose environment has nothing earlier outstanding,
    /// leasing it to `owner` for `lease_ms`. Fair between users: the job of the user with
    /// the fewest jobs running in this queue goes first, oldest first among equals, so
    /// one user's many requests cannot hold every worker while another user waits.
    pub async fn claim(&self, queue: &str, owner: &str, lease_ms: i64) -> Result<Option<Job>> {
        for _ in 0..5 {
            let now = self.now();
            let mut tx = self.begin().await?;
            let candidate = sqlx::query(
                "SELECT j.id FROM jobs j WHERE j.queue = $1 AND j.state = 'queued' AND j.run_after <= $2 \
                 AND NOT EXISTS (SELECT 1 FROM jobs k WHERE k.environment_id = j.environment_id \
                   AND k.id < j.id AND k.state IN ('queued', 'running')) \
                 ORDER BY (SELECT COUNT(*) FROM jobs r JOIN environments re ON re.id = r.environment_id \
                   WHERE r.queue = j.queue AND r.state = 'running' \
                   AND re.user_id = (SELECT e.user_id FROM environments e WHERE e.id = j.environment_id)), j.id LIMIT 1",
            )
            .bind(queue)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(candidate) = candidate else {
                return Ok(None);
            };
            let id: i64 = candidate.try_get("id")?;
            let claimed = sqlx::query(
                "UPDATE jobs SET state = 'running', lease_owner = $1, lease_expires_at = $2, \
                 attempts = attempts + 1, updated_at = $3 WHERE id = $4 AND state = 'queued'",
            )
            .bind(owner)
            .bind(now + lease_ms)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            if claimed.rows_affected() == 1 {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT_JOB} WHERE id = $1")))
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                return Ok(Some(job_from_row(&row)?));
            }
            tx.rollback().await?;
        }
        Ok(None)
    }

    /// Saves what the job's steps produced so far; false when the job is no longer ours
    /// (its lease ran out and it was handed to another worker).
    pub async fn save_progress(
        &self,
        id: i64,
        owner: &str,
        progress: &serde_json::Value,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE jobs SET progress = $1, updated_at = $2 WHERE id = $3 AND lease_owner = $4 AND state = 'running'",
        )
        .bind(progress.to_string())
        .bind(self.now())
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Extends the lease; false when the job is no longer ours (it was swept and re-run).
    pub async fn renew_lease(&self, id: i64, owner: &str, lease_ms: i64) -> Result<bool> {
        let now = self.now();
        let done = sqlx::query(
            "UPDATE jobs SET lease_expires_at = $1, updated_at = $2 WHERE id = $3 AND lease_owner = $4 AND state = 'running'",
        )
        .bind(now + lease_ms)
        .bind(now)
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn succeed(&self, id: i64, owner: &str) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET state = 'succeeded', lease_owner = NULL, lease_expires_at = NULL, updated_at = $1 \
             WHERE id = $2 AND lease_owner = $3",
        )
        .bind(self.now())
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a failed attempt: back to `queued` at `retry_at`, or `dead` when `None`.
    pub async fn fail(
        &self,
        id: i64,
        owner: &str,
        error: &str,
        retry_at: Option<i64>,
    ) -> Result<()> {
        let now = self.now();
        let state = if retry_at.is_some() { "queued" } else { "dead" };
        sqlx::query(
            "UPDATE jobs SET state = $1, run_after = $2, last_error = $3, lease_owner = NULL, lease_expires_at = NULL, \
             updated_at = $4 WHERE id = $5 AND lease_owner = $6",
        )
        .bind(state)
        .bind(retry_at.unwrap_or(now))
        .bind(error)
        .bind(now)
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Puts the job back to run at `run_at` without spending an attempt: it is waiting
    /// for something outside it (an undo that needs the host back, say), not failing.
    pub async fn postpone(&self, id: i64, owner: &str, note: &str, run_at: i64) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET state = 'queued', run_after = $1, last_error = $2, attempts = attempts - 1, \
             lease_owner = NULL, lease_expires_at = NULL, updated_at = $3 WHERE id = $4 AND lease_owner = $5",
        )
        .bind(run_at)
        .bind(note)
        .bind(self.now())
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Hands back jobs whose lease ran out (their worker died), refunding the attempt and
    /// counting a crash. Returns how many.
    pub async fn requeue_expired(&self) -> Result<u64> {
        let now = self.now();
        let done = sqlx::query(
            "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, run_after = $1, \
             attempts = attempts - 1, crashes = crashes + 1, \
             last_error = 'the worker running it stopped renewing its lease', updated_at = $1 \
             WHERE state = 'running' AND lease_expires_at < $1",
        )
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn job(&self, id: i64) -> Result<Job> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT_JOB} WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        job_from_row(&row)
    }

    pub async fn jobs_for_environment(&self, environment_id: &str) -> Result<Vec<Job>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT_JOB} WHERE environment_id = $1 ORDER BY id"
        )))
        .bind(environment_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// True when a job of `kind` for the environment is queued or running.
    pub async fn has_pending_job(&self, environment_id: &str, kind: &str) -> Result<bool> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM jobs WHERE environment_id = $1 AND kind = $2 AND state IN ('queued', 'running')",
        )
        .bind(environment_id)
        .bind(kind)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    /// True when any job for the environment is queued or running.
    pub async fn has_outstanding_job(&self, environment_id: &str) -> Result<bool> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM jobs WHERE environment_id = $1 AND state IN ('queued', 'running')")
            .bind(environment_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    /// A page of jobs, newest first, all or those in `state` (walking `jobs_state_id`);
    /// `cursor` is the last id of the page before.
    pub async fn list_jobs(
        &self,
        state: Option<JobState>,
        cursor: Option<i64>,
        limit: i64,
    ) -> Result<(Vec<Job>, Option<i64>)> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(newest_jobs(state.is_some())))
            .bind(state.map(JobState::as_str).unwrap_or(""))
            .bind(cursor.unwrap_or(i64::MAX))
            .bind(limit + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut items = rows.iter().map(job_from_row).collect::<Result<Vec<_>>>()?;
        let next = crate::finish_page(&mut items, limit, |j| j.id);
        Ok((items, next))
    }

    /// Puts a dead job back in the queue with fresh attempts. Its saga starts afresh: a
    /// job dies only after undoing what it did.
    pub async fn retry_dead(&self, id: i64, actor: &str) -> Result<Job> {
        let now = self.now();
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE jobs SET state = 'queued', attempts = 0, crashes = 0, progress = '{}', run_after = $1, \
             updated_at = $1, actor = $2 WHERE id = $3 AND state = 'dead'",
        )
        .bind(now)
        .bind(actor)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return match self.job(id).await {
                Ok(j) => Err(StoreError::Conflict(format!(
                    "job {id} is {}, not dead",
                    j.state.as_str()
                ))),
                Err(e) => Err(e),
            };
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT_JOB} WHERE id = $1")))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let job = job_from_row(&row)?;
        insert_audit(
            &mut tx,
            now,
            actor,
            "job_retry",
            Some(&job.environment_id),
            None,
            None,
            "queued",
            None,
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(job)
    }

    /// Earliest `run_after` of a queued job, so a worker knows how long it may sleep.
    pub async fn next_run_after(&self, queue: &str) -> Result<Option<i64>> {
        let row = sqlx::query(
            "SELECT MIN(run_after) AS t FROM jobs WHERE queue = $1 AND state = 'queued'",
        )
        .bind(queue)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("t")?)
    }
}

#[cfg(test)]
mod tests {
    /// The admin's pages of jobs walk an index from the cursor on, however many jobs there are.
    #[tokio::test]
    async fn the_newest_jobs_seek_an_index() {
        let (_dir, store) = crate::testdb::sqlite().await;
        for (in_state, index) in [
            (true, "jobs_state_id (state=? AND id<?)"),
            (false, "INTEGER PRIMARY KEY (rowid<?)"),
        ] {
            let plan = store.query_plan(&super::newest_jobs(in_state), &[]).await;
            crate::testdb::assert_seeks_in_order("the newest jobs", "jobs", &plan, index);
        }
    }

    use super::*;
    use crate::testdb::each_backend;

    fn job(env: &str, kind: &str) -> NewJob {
        NewJob {
            queue: "control".into(),
            kind: kind.into(),
            environment_id: env.into(),
            max_attempts: 2,
            actor: "system:test".into(),
        }
    }

    /// Pages of jobs, all or in one state, come newest first and meet without a gap or a
    /// job twice, on both backends.
    #[tokio::test]
    async fn jobs_are_paged_newest_first() {
        each_backend(|store| async move {
            let mut made = Vec::new();
            for i in 0..7 {
                made.push(
                    store
                        .enqueue(&job(&format!("env-{i}"), "start"), "start")
                        .await
                        .unwrap(),
                );
            }
            let claimed = store.claim("control", "w", 10_000).await.unwrap().unwrap();
            made.reverse();
            for (state, want) in [
                (None, made.clone()),
                (
                    Some(JobState::Queued),
                    made.iter()
                        .copied()
                        .filter(|id| *id != claimed.id)
                        .collect(),
                ),
                (Some(JobState::Running), vec![claimed.id]),
                (Some(JobState::Dead), vec![]),
            ] {
                let mut seen = Vec::new();
                let mut cursor = None;
                loop {
                    let (page, next) = store.list_jobs(state, cursor, 3).await.unwrap();
                    assert!(page.len() <= 3);
                    seen.extend(page.iter().map(|j| j.id));
                    match next {
                        Some(n) => cursor = Some(n),
                        None => break,
                    }
                }
                assert_eq!(seen, want, "{state:?}");
            }
        })
        .await;
    }

    #[tokio::test]
    async fn one_job_at_a_time_per_environment_in_order() {
        each_backend(|store| async move {
            let a = store
                .enqueue(&job("env-a", "start"), "start")
                .await
                .unwrap();
            let b = store.enqueue(&job("env-a", "stop"), "stop").await.unwrap();
            let c = store
                .enqueue(&job("env-b", "start"), "start")
                .await
                .unwrap();
            let first = store.claim("control", "w1", 10_000).await.unwrap().unwrap();
            assert_eq!(first.id, a);
            // env-a's second job waits for the first; env-b's is free.
            let second = store.claim("control", "w2", 10_000).await.unwrap().unwrap();
            assert_eq!(second.id, c);
            assert!(
                store
                    .claim("control", "w3", 10_000)
                    .await
                    .unwrap()
                    .is_none()
            );
            store.succeed(a, "w1").await.unwrap();
            let third = store.claim("control", "w3", 10_000).await.unwrap().unwrap();
            assert_eq!(third.id, b);
            assert_eq!(third.attempts, 1);
        })
        .await;
    }

    #[tokio::test]
    async fn users_take_turns_for_workers() {
        each_backend(|store| async move {
            let (a, _) = store.create_user("a@example.com", hearth_core::Role::User, hearth_core::Tier::Pro).await.unwrap();
            let (b, _) = store.create_user("b@example.com", hearth_core::Role::User, hearth_core::Tier::Pro).await.unwrap();
            for (env, user) in [("a1", &a.id), ("a2", &a.id), ("a3", &a.id), ("b1", &b.id)] {
                sqlx::query(
                    "INSERT INTO environments (id, slug, name, user_id, personal, state, generation, provider, ssh_user, vcpus, \
                     memory_mb, disk_gb, base_image, environment_vars, ssh_public_key, ssh_private_key_enc, created_at, updated_at) \
                     VALUES ($1, $1, $1, $2, 0, 'requested', 1, 'sim', 'dev', 1, 256, 1, 'none', '{}', '', '', 0, 0)",
                )
                .bind(env)
                .bind(user)
                .execute(&store.pool)
                .await
                .unwrap();
            }
            let provision = |env: &str| NewJob { queue: "provision".into(), kind: "provision".into(), environment_id: env.into(), max_attempts: 2, actor: "t".into() };
            let mut ids = Vec::new();
            for env in ["a1", "a2", "a3", "b1"] {
                ids.push(store.enqueue(&provision(env), "provision").await.unwrap());
            }
            let order: Vec<String> = {
                let mut order = Vec::new();
                for w in 0..4 {
                    order.push(store.claim("provision", &format!("w{w}"), 10_000).await.unwrap().unwrap().environment_id);
                }
                order
            };
            // A asked first, but once A holds a worker, B's only request goes next.
            assert_eq!(order, ["a1", "b1", "a2", "a3"]);
        })
        .await;
    }

    #[tokio::test]
    async fn expired_leases_are_handed_back_and_stale_owners_lose() {
        each_backend(|store| async move {
            let id = store
                .enqueue(&job("env-c", "start"), "start")
                .await
                .unwrap();
            let j = store
                .claim("control", "dead-worker", 1)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(j.id, id);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert_eq!(store.requeue_expired().await.unwrap(), 1);
            let again = store.claim("control", "w2", 10_000).await.unwrap().unwrap();
            // The dead worker's attempt was refunded and counted as a crash.
            assert_eq!((again.id, again.attempts, again.crashes), (id, 1, 1));
            // Progress is the lease owner's alone to write.
            assert!(
                !store
                    .save_progress(id, "dead-worker", &serde_json::json!({"done": ["a"]}))
                    .await
                    .unwrap()
            );
            assert!(
                store
                    .save_progress(id, "w2", &serde_json::json!({"done": ["a"]}))
                    .await
                    .unwrap()
            );
            assert_eq!(store.job(id).await.unwrap().progress["done"][0], "a");
            assert!(!store.renew_lease(id, "dead-worker", 10_000).await.unwrap());
            assert!(store.renew_lease(id, "w2", 10_000).await.unwrap());
            // The old owner's late verdict is ignored.
            store.succeed(id, "dead-worker").await.unwrap();
            assert_eq!(store.job(id).await.unwrap().state, JobState::Running);
            store.fail(id, "w2", "boom", None).await.unwrap();
            let dead = store.job(id).await.unwrap();
            assert_eq!(
                (dead.state, dead.last_error.as_deref()),
                (JobState::Dead, Some("boom"))
            );
        })
        .await;
    }

    #[tokio::test]
    async fn dead_jobs_can_be_retried_once_dead() {
        each_backend(|store| async move {
            let id = store
                .enqueue(&job("env-r", "start"), "start")
                .await
                .unwrap();
            store.claim("control", "w", 10_000).await.unwrap().unwrap();
            assert!(
                matches!(
                    store.retry_dead(id, "admin").await,
                    Err(StoreError::Conflict(_))
                ),
                "a running job is not dead"
            );
            store.fail(id, "w", "gave up", None).await.unwrap();
            let again = store.retry_dead(id, "admin").await.unwrap();
            assert_eq!(
                (again.state, again.attempts, again.actor.as_str()),
                (JobState::Queued, 0, "admin")
            );
            assert_eq!(
                store
                    .claim("control", "w2", 10_000)
                    .await
                    .unwrap()
                    .unwrap()
                    .id,
                id
            );
            assert!(matches!(
                store.retry_dead(999_999, "admin").await,
                Err(StoreError::NotFound)
            ));
        })
        .await;
    }

    #[tokio::test]
    async fn control_requests_coalesce_and_destroy_supersedes() {
        each_backend(|store| async move {
            let env = "env-co";
            let job = |kind: &str| NewJob {
                queue: "control".into(),
                kind: kind.into(),
                environment_id: env.into(),
                max_attempts: 2,
                actor: "u".into(),
            };
            let first = store
                .enqueue_control(&job("start"), "start_requested")
                .await
                .unwrap();
            // It begins; later requests queue behind it, one at a time.
            assert_eq!(
                store
                    .claim("control", "w", 60_000)
                    .await
                    .unwrap()
                    .unwrap()
                    .id,
                first
            );
            for i in 0..50 {
                let kind = if i % 2 == 0 { "stop" } else { "start" };
                store.enqueue_control(&job(kind), "x").await.unwrap();
            }
            let pending: Vec<Job> = store
                .jobs_for_environment(env)
                .await
                .unwrap()
                .into_iter()
                .filter(|j| j.state == JobState::Queued)
                .collect();
            assert_eq!(pending.len(), 1, "one request waits, the last one");
            assert_eq!(pending[0].kind, "start");
            // A destroy replaces it; nothing else may queue behind a destroy.
            store
                .enqueue_control(&job("destroy"), "destroy_requested")
                .await
                .unwrap();
            let pending: Vec<Job> = store
                .jobs_for_environment(env)
                .await
                .unwrap()
                .into_iter()
                .filter(|j| j.state == JobState::Queued)
                .collect();
            assert_eq!(
                pending.iter().map(|j| j.kind.as_str()).collect::<Vec<_>>(),
                vec!["destroy"]
            );
            assert!(matches!(
                store.enqueue_control(&job("start"), "x").await,
                Err(StoreError::Conflict(_))
            ));
            // The running job was never dropped.
            assert_eq!(store.job(first).await.unwrap().state, JobState::Running);
        })
        .await;
    }

    #[tokio::test]
    async fn backoff_delays_the_retry() {
        each_backend(|store| async move {
            let id = store
                .enqueue(&job("env-d", "start"), "start")
                .await
                .unwrap();
            store.claim("control", "w", 10_000).await.unwrap().unwrap();
            store
                .fail(id, "w", "try later", Some(store.now() + 60_000))
                .await
                .unwrap();
            assert!(store.claim("control", "w", 10_000).await.unwrap().is_none());
            assert!(store.next_run_after("control").await.unwrap().unwrap() > store.now());
        })
        .await;
    }
}
