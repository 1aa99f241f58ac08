//! Passwords, browser sessions and one-time password links. The store keeps only hashes
//! of what it hands out (session ids, link tokens) and never sees a password: callers pass
//! its argon2id hash.

use crate::users::{SessionRow, user_from_row};
use crate::{Result, Store, StoreError, User, generate_token, hash_token};
use sqlx::Row;

/// Sessions one user may hold; signing in once more ends the oldest.
pub const MAX_SESSIONS_PER_USER: i64 = 20;

/// A session that was just made: its id goes into the cookie, its CSRF token to the page.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub id: String,
    pub csrf: String,
    pub expires_at: i64,
}

const USER_COLUMNS: &str = "u.id, u.email, u.role, u.tier, u.created_at";

impl Store {
    /// The user with this email and their password hash (`None` when they have none yet).
    pub async fn user_with_password(&self, email: &str) -> Result<Option<(User, Option<String>)>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS}, u.password_hash FROM users u WHERE u.email = $1"
        )))
        .bind(email)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok(Some((user_from_row(&r)?, r.try_get("password_hash")?))),
            None => Ok(None),
        }
    }

    /// Makes a session for the user, ending their oldest beyond `MAX_SESSIONS_PER_USER`.
    pub async fn create_session(&self, user_id: &str, lifetime_ms: i64) -> Result<NewSession> {
        let now = self.now();
        let session = NewSession {
            id: generate_token(),
            csrf: generate_token(),
            expires_at: now + lifetime_ms,
        };
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO sessions (id_hash, user_id, csrf, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(hash_token(&session.id))
            .bind(user_id)
            .bind(&session.csrf)
            .bind(now)
            .bind(session.expires_at)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM sessions WHERE user_id = $1 AND (expires_at <= $2 OR id_hash NOT IN \
             (SELECT id_hash FROM sessions WHERE user_id = $1 ORDER BY created_at DESC, id_hash LIMIT $3))",
        )
        .bind(user_id)
        .bind(now)
        .bind(MAX_SESSIONS_PER_USER)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(session)
    }

    /// The user of a live session, with the session's CSRF token.
    /// Every request of a signed-in browser reads this: on PostgreSQL through `reads`.
    pub async fn session_user(&self, session_id: &str) -> Result<Option<(User, String)>> {
        const SQL: &str = "SELECT u.id, u.email, u.role, u.tier, u.created_at, s.csrf \
                           FROM sessions s JOIN users u ON u.id = s.user_id \
                           WHERE s.id_hash = $1 AND s.expires_at > $2";
        let (hash, now) = (hash_token(session_id), self.now());
        let row: Option<SessionRow> = fetch_read!(
            self,
            sqlx::query_as(SQL).bind(&hash).bind(now),
            fetch_optional
        )?;
        row.map(|r| Ok((r.user.into_user()?, r.csrf))).transpose()
    }

    pub async fn end_session(&self, session_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE id_hash = $1")
            .bind(hash_token(session_id))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A one-time link token for the user (`invite` or `reset`); an earlier unused link of
    /// theirs stops working.
    pub async fn create_password_link(
        &self,
        user_id: &str,
        purpose: &str,
        lifetime_ms: i64,
    ) -> Result<(String, i64)> {
        let token = generate_token();
        let now = self.now();
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM password_links WHERE user_id = $1 OR expires_at <= $2")
            .bind(user_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO password_links (token_hash, user_id, purpose, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(hash_token(&token))
            .bind(user_id)
            .bind(purpose)
            .bind(now)
            .bind(now + lifetime_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((token, now + lifetime_ms))
    }

    /// Spends a link and sets the password it was for, ending every session of the user;
    /// `NotFound` when the link is unknown, used or expired. One transaction: a link sets
    /// one password, once.
    pub async fn use_password_link(&self, token: &str, password_hash: &str) -> Result<User> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "SELECT user_id FROM password_links WHERE token_hash = $1 AND expires_at > $2",
        )
        .bind(hash_token(token))
        .bind(self.now())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        let user_id: String = row.try_get("user_id")?;
        let spent = sqlx::query("DELETE FROM password_links WHERE token_hash = $1")
            .bind(hash_token(token))
            .execute(&mut *tx)
            .await?;
        if spent.rows_affected() != 1 {
            return Err(StoreError::NotFound);
        }
        sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
            .bind(password_hash)
            .bind(&user_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM sessions WHERE user_id = $1")
            .bind(&user_id)
            .execute(&mut *tx)
            .await?;
        let user = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users u WHERE u.id = $1"
        )))
        .bind(&user_id)
        .fetch_one(&mut *tx)
        .await?;
        let user = user_from_row(&user)?;
        tx.commit().await?;
        Ok(user)
    }
}
