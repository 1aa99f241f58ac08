//! Mail received for commands, and users' sub-address secrets. A message accepted for work
//! is written with its job in one transaction, so a crash after the sender was told "250
//! accepted" loses nothing; a second delivery of the same message by the same user finds
//! the first and does nothing.

use crate::jobs::insert_job;
use crate::records::insert_audit;
use crate::users::user_from_row;
use crate::{NewJob, Result, Store, StoreError, User};
use sqlx::Row;
use sqlx::any::AnyRow;

/// Rejected mail is kept this long, and at most `MAX_REJECTED` rows of it, whatever arrives.
pub const REJECTED_KEEP_MS: i64 = 7 * 86_400_000;
pub const MAX_REJECTED: i64 = 10_000;

/// A message as received, before it is stored.
#[derive(Debug, Clone)]
pub struct NewMail {
    pub message_id: String,
    /// `smtp` or `webhook`.
    pub via: String,
    pub sender: String,
    pub recipient: String,
    pub subject: String,
    pub body: String,
    /// The user it proved to come from; `None` for rejected mail.
    pub user_id: Option<String>,
    /// `sub-address` or `dkim`; `None` for rejected mail.
    pub proof: Option<String>,
    pub command: Option<String>,
    /// `queued` (with a job) or `rejected`.
    pub status: String,
    pub outcome: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    pub id: i64,
    pub message_id: String,
    pub via: String,
    pub sender: String,
    pub recipient: String,
    pub subject: String,
    pub body: String,
    pub user_id: Option<String>,
    pub proof: Option<String>,
    pub command: Option<String>,
    /// `rejected`, `queued`, `done` or `failed`.
    pub status: String,
    pub outcome: Option<String>,
    pub environment_id: Option<String>,
    /// When `execute` began running its command (so a retry after a crash never runs it twice).
    pub exec_started_at: Option<i64>,
    /// The answer's subject, stored with the answer (in `outcome`) before it is sent.
    pub reply_subject: Option<String>,
    pub reply_message_id: Option<String>,
    pub replied_at: Option<i64>,
    pub received_at: i64,
    pub updated_at: i64,
}

/// What storing a message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    New(i64),
    /// The same sender's message with this Message-ID was stored before (its id).
    Duplicate(i64),
}

const COLUMNS: &str = "id, message_id, via, sender, recipient, subject, body, user_id, proof, command, status, \
     outcome, environment_id, exec_started_at, reply_subject, reply_message_id, replied_at, received_at, updated_at";

fn mail_from_row(row: &AnyRow) -> Result<Mail> {
    Ok(Mail {
        id: row.try_get("id")?,
        message_id: row.try_get("message_id")?,
        via: row.try_get("via")?,
        sender: row.try_get("sender")?,
        recipient: row.try_get("recipient")?,
        subject: row.try_get("subject")?,
        body: row.try_get("body")?,
        user_id: row.try_get("user_id")?,
        proof: row.try_get("proof")?,
        command: row.try_get("command")?,
        status: row.try_get("status")?,
        outcome: row.try_get("outcome")?,
        environment_id: row.try_get("environment_id")?,
        exec_started_at: row.try_get("exec_started_at")?,
        reply_subject: row.try_get("reply_subject")?,
        reply_message_id: row.try_get("reply_message_id")?,
        replied_at: row.try_get("replied_at")?,
        received_at: row.try_get("received_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// The job key of a mail's job (jobs name what they work on; a mail is not an environment).
pub fn mail_job_key(id: i64) -> String {
    format!("mail:{id}")
}

/// A page of received mail, newest first: `$1` the user (`''` for everyone's), `$2` the
/// cursor, `$3` how many. One user's walks `inbound_mail_user` from the cursor on.
fn mail_page_sql(one_user: bool) -> String {
    let lead = if one_user { "user_id = $1" } else { "$1 = ''" };
    format!("SELECT {COLUMNS} FROM inbound_mail WHERE {lead} AND id < $2 ORDER BY id DESC LIMIT $3")
}

impl Store {
    /// Stores a message; with `job`, queues it for work in the same transaction and audits
    /// its acceptance, else audits its rejection (`actor` names the sender either way).
    pub async fn insert_mail(
        &self,
        mail: &NewMail,
        job: Option<NewJob>,
        actor: &str,
    ) -> Result<Stored> {
        let now = self.now();
        if let Some(user_id) = &mail.user_id {
            let existing =
                sqlx::query("SELECT id FROM inbound_mail WHERE user_id = $1 AND message_id = $2")
                    .bind(user_id)
                    .bind(&mail.message_id)
                    .fetch_optional(&self.pool)
                    .await?;
            if let Some(row) = existing {
                return Ok(Stored::Duplicate(row.try_get("id")?));
            }
        }
        let mut tx = self.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO inbound_mail (message_id, via, sender, recipient, subject, body, user_id, proof, command, status, \
             outcome, received_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12) RETURNING id",
        )
        .bind(&mail.message_id)
        .bind(&mail.via)
        .bind(&mail.sender)
        .bind(&mail.recipient)
        .bind(&mail.subject)
        .bind(&mail.body)
        .bind(&mail.user_id)
        .bind(&mail.proof)
        .bind(&mail.command)
        .bind(&mail.status)
        .bind(&mail.outcome)
        .bind(now)
        .fetch_one(&mut *tx)
        .await;
        let id: i64 = match inserted {
            Ok(row) => row.try_get("id")?,
            Err(e) if crate::is_unique_violation(&e) => {
                // Delivered twice at the same moment: the other delivery won.
                drop(tx);
                let row = sqlx::query(
                    "SELECT id FROM inbound_mail WHERE user_id = $1 AND message_id = $2",
                )
                .bind(&mail.user_id)
                .bind(&mail.message_id)
                .fetch_one(&self.pool)
                .await?;
                return Ok(Stored::Duplicate(row.try_get("id")?));
            }
            Err(e) => return Err(e.into()),
        };
        let (action, outcome) = match &job {
            Some(_) => ("mail.accept", "queued"),
            None => ("mail.reject", "refused"),
        };
        if let Some(mut job) = job {
            job.environment_id = mail_job_key(id);
            insert_job(&mut tx, &job, now).await?;
        }
        insert_audit(
            &mut tx,
            now,
            actor,
            action,
            None,
            None,
            None,
            outcome,
            mail.outcome.as_deref(),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(Stored::New(id))
    }

    pub async fn mail(&self, id: i64) -> Result<Mail> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM inbound_mail WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound)?;
        mail_from_row(&row)
    }

    /// The newest mail first, `limit` of it, before `before_id` when given; one user's (by
    /// `inbound_mail_user`) or all (by the key).
    pub async fn mail_page(
        &self,
        user_id: Option<&str>,
        before_id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Mail>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(mail_page_sql(user_id.is_some())))
            .bind(user_id.unwrap_or(""))
            .bind(before_id.unwrap_or(i64::MAX))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(mail_from_row).collect()
    }

    /// How much mail a user sent for work since `since` (their rate limit counts it).
    pub async fn mail_count_since(&self, user_id: &str, since: i64) -> Result<i64> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM inbound_mail WHERE user_id = $1 AND received_at >= $2",
        )
        .bind(user_id)
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }

    /// Notes the environment a mail made or acted on.
    pub async fn set_mail_environment(&self, id: i64, environment_id: &str) -> Result<()> {
        sqlx::query("UPDATE inbound_mail SET environment_id = $1, updated_at = $2 WHERE id = $3")
            .bind(environment_id)
            .bind(self.now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks `execute` as begun, while the job `(job_id, owner)` still holds its lease;
    /// false when it had begun already (a retry after a crash) or the lease is gone.
    pub async fn begin_mail_exec(&self, id: i64, job_id: i64, owner: &str) -> Result<bool> {
        let now = self.now();
        let done = sqlx::query(
            "UPDATE inbound_mail SET exec_started_at = $1, updated_at = $1 WHERE id = $2 AND exec_started_at IS NULL \
             AND EXISTS (SELECT 1 FROM jobs WHERE id = $3 AND lease_owner = $4 AND state = 'running')",
        )
        .bind(now)
        .bind(id)
        .bind(job_id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records what came of a mail (`done` or `failed`): the answer's text and subject,
    /// kept so a retry sends the same answer. Only the first answer is kept, and only from
    /// the job `(job_id, owner)` while it holds its lease: false otherwise (send the stored
    /// one).
    pub async fn answer_mail(
        &self,
        id: i64,
        status: &str,
        outcome: &str,
        reply_subject: &str,
        job_id: i64,
        owner: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE inbound_mail SET status = $1, outcome = $2, reply_subject = $3, updated_at = $4 \
             WHERE id = $5 AND status = 'queued' \
             AND EXISTS (SELECT 1 FROM jobs WHERE id = $6 AND lease_owner = $7 AND state = 'running')",
        )
        .bind(status)
        .bind(outcome)
        .bind(reply_subject)
        .bind(self.now())
        .bind(id)
        .bind(job_id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Notes that the answer went out, under this Message-ID.
    pub async fn mark_mail_replied(&self, id: i64, reply_message_id: &str) -> Result<()> {
        let now = self.now();
        sqlx::query("UPDATE inbound_mail SET reply_message_id = $1, replied_at = $2, updated_at = $2 WHERE id = $3")
            .bind(reply_message_id)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The environment whose creation was audited with this actor (a mail's own actor).
    pub async fn environment_created_by(&self, actor: &str) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT environment_id FROM audit_log WHERE actor = $1 AND action = 'create' ORDER BY id LIMIT 1",
        )
        .bind(actor)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row
            .map(|r| r.try_get("environment_id"))
            .transpose()?
            .flatten())
    }

    /// The user with this address, compared without (ASCII) case as mail does; `None`
    /// when no user, or several users whose addresses differ only in case, have it.
    pub async fn user_by_email(&self, email: &str) -> Result<Option<User>> {
        let rows = sqlx::query(
            "SELECT id, email, role, tier, created_at FROM users WHERE LOWER(email) = $1 LIMIT 2",
        )
        .bind(email.to_ascii_lowercase())
        .fetch_all(&self.pool)
        .await?;
        match rows.as_slice() {
            [one] => Ok(Some(user_from_row(one)?)),
            _ => Ok(None),
        }
    }

    /// Rejected messages recorded since `since` (the recording is capped per hour).
    pub async fn rejected_mail_since(&self, since: i64) -> Result<i64> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM inbound_mail WHERE status = 'rejected' AND received_at >= $1",
        )
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }

    /// The hash of the user's sub-address secret, if they made one.
    pub async fn mail_token_hash(&self, user_id: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT mail_token_hash FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(row.try_get("mail_token_hash")?)
    }

    /// Replaces the user's sub-address secret (the old one stops working at once).
    pub async fn set_mail_token_hash(&self, user_id: &str, hash: &str) -> Result<()> {
        let done = sqlx::query("UPDATE users SET mail_token_hash = $1 WHERE id = $2")
            .bind(hash)
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// A page of one user's mail seeks their rows, however much mail the node received.
    #[tokio::test]
    async fn mail_pages_seek_an_index() {
        let (_dir, store) = crate::testdb::sqlite().await;
        for (one_user, index) in [
            (true, "inbound_mail_user (user_id=? AND id<?)"),
            (false, "INTEGER PRIMARY KEY (rowid<?)"),
        ] {
            let plan = store.query_plan(&super::mail_page_sql(one_user), &[]).await;
            crate::testdb::assert_seeks_in_order("a page of mail", "inbound_mail", &plan, index);
        }
    }

    use super::*;
    use crate::testdb::each_backend;
    use hearth_core::{Role, Tier};

    fn new_mail(user: Option<&str>, message_id: &str) -> NewMail {
        NewMail {
            message_id: message_id.into(),
            via: "smtp".into(),
            sender: "a@example.com".into(),
            recipient: "agent@hearth.test".into(),
            subject: "list".into(),
            body: String::new(),
            user_id: user.map(String::from),
            proof: user.map(|_| "dkim".into()),
            command: Some("list".into()),
            status: if user.is_some() { "queued" } else { "rejected" }.into(),
            outcome: None,
        }
    }

    fn job() -> NewJob {
        NewJob {
            queue: "mail".into(),
            kind: "mail".into(),
            environment_id: String::new(),
            max_attempts: 3,
            actor: "mail:a@example.com".into(),
        }
    }

    #[tokio::test]
    async fn a_message_is_stored_once_per_sender_with_its_job() {
        each_backend(|store| async move {
            let (user, _) = store
                .create_user("A@Example.com", Role::User, Tier::Free)
                .await
                .unwrap();
            assert_eq!(
                store.user_by_email("a@example.COM").await.unwrap(),
                Some(user.clone())
            );
            let Stored::New(id) = store
                .insert_mail(&new_mail(Some(&user.id), "m1"), Some(job()), "mail:a")
                .await
                .unwrap()
            else {
                panic!("not new")
            };
            assert_eq!(
                store
                    .insert_mail(&new_mail(Some(&user.id), "m1"), Some(job()), "mail:a")
                    .await
                    .unwrap(),
                Stored::Duplicate(id)
            );
            let jobs = store.list_jobs(None, None, 1000).await.unwrap().0;
            assert_eq!(jobs.len(), 1, "one job: {jobs:?}");
            assert_eq!(jobs[0].environment_id, mail_job_key(id));
            // Rejected mail with the same id from nobody is only a record, and has no job.
            assert!(matches!(
                store
                    .insert_mail(&new_mail(None, "m1"), None, "mail:x")
                    .await
                    .unwrap(),
                Stored::New(_)
            ));
            assert_eq!(store.list_jobs(None, None, 1000).await.unwrap().0.len(), 1);
            let job = store.list_jobs(None, None, 1000).await.unwrap().0[0].id;
            assert!(
                !store.begin_mail_exec(id, job, "w1").await.unwrap(),
                "no lease, no exec"
            );
            let claimed = store.claim("mail", "w1", 60_000).await.unwrap().unwrap();
            assert_eq!(claimed.id, job);
            assert!(
                !store.begin_mail_exec(id, job, "w2").await.unwrap(),
                "another's lease"
            );
            assert!(store.begin_mail_exec(id, job, "w1").await.unwrap());
            assert!(
                !store.begin_mail_exec(id, job, "w1").await.unwrap(),
                "an exec begins once"
            );
            assert!(
                !store
                    .answer_mail(id, "done", "other", "Re: list", job, "w2")
                    .await
                    .unwrap()
            );
            assert!(
                store
                    .answer_mail(id, "done", "listed", "Re: list", job, "w1")
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .answer_mail(id, "failed", "again", "Re: list", job, "w1")
                    .await
                    .unwrap(),
                "the first answer stays"
            );
            let m = store.mail(id).await.unwrap();
            assert_eq!(
                (m.status.as_str(), m.outcome.as_deref(), m.replied_at),
                ("done", Some("listed"), None)
            );
            store.mark_mail_replied(id, "r@hearth").await.unwrap();
            let m = store.mail(id).await.unwrap();
            assert_eq!(m.reply_message_id.as_deref(), Some("r@hearth"));
            assert!(m.replied_at.is_some());
            assert_eq!(store.environment_created_by("nobody").await.unwrap(), None);
            assert_eq!(store.mail_count_since(&user.id, 0).await.unwrap(), 1);
            assert_eq!(
                store
                    .mail_page(Some(&user.id), None, 10)
                    .await
                    .unwrap()
                    .len(),
                1
            );
            assert_eq!(store.mail_page(None, None, 10).await.unwrap().len(), 2);
            assert_eq!(store.mail_token_hash(&user.id).await.unwrap(), None);
            assert_eq!(store.rejected_mail_since(0).await.unwrap(), 1);
            // Two users whose addresses differ only in case: mail names neither.
            store
                .create_user("a@example.com", Role::User, Tier::Free)
                .await
                .unwrap();
            assert_eq!(store.user_by_email("a@example.com").await.unwrap(), None);
            store.set_mail_token_hash(&user.id, "h").await.unwrap();
            assert_eq!(
                store.mail_token_hash(&user.id).await.unwrap().as_deref(),
                Some("h")
            );
        })
        .await;
    }

    #[tokio::test]
    async fn rejected_mail_is_pruned_by_age_and_count() {
        each_backend(|store| async move {
            let day = 86_400_000;
            for i in 0..5 {
                store
                    .insert_mail(&new_mail(None, &format!("r{i}")), None, "mail:x")
                    .await
                    .unwrap();
            }
            store
                .exec_sql_for_tests(
                    "UPDATE inbound_mail SET received_at = $1 WHERE message_id = $2",
                    store.now() - 8 * day,
                    "r0",
                )
                .await
                .unwrap();
            let r = crate::Retention {
                executions_ms: 30 * day,
                audit_ms: 365 * day,
                jobs_ms: 30 * day,
                destroyed_ms: 30 * day,
            };
            store.prune(&r).await.unwrap();
            let left: Vec<String> = store
                .mail_page(None, None, 10)
                .await
                .unwrap()
                .into_iter()
                .map(|m| m.message_id)
                .collect();
            assert_eq!(left, ["r4", "r3", "r2", "r1"], "a week-old rejection goes");
        })
        .await;
    }
}
