//! Users, their API tokens (stored as SHA-256 hashes) and their quotas.

use crate::{Result, Store, StoreError, Tx};
use hearth_core::{Quota, Role, Tier, Usage};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::{FromRow, Row};

/// Admin overrides of a user's quota, column by column.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuotaOverrides {
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 10000000))]
    pub max_environments: Option<i64>,
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 10000000))]
    pub max_concurrent_environments: Option<i64>,
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 10000000))]
    pub max_vcpus: Option<i64>,
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 10000000))]
    pub max_memory_mb: Option<i64>,
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 10000000))]
    pub max_disk_gb: Option<i64>,
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 10000000))]
    pub max_duration_hours: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub email: String,
    pub role: Role,
    pub tier: Tier,
    pub created_at: i64,
}

/// Characters of a token's hash that name it (its id): enough to be unique per user,
/// useless for finding the token.
const TOKEN_ID_CHARS: usize = 16;

fn token_id(hash: &str) -> String {
    hash[..TOKEN_ID_CHARS].to_string()
}

/// What a user may see of one of their tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    /// To the minute; `None` when never used.
    pub last_used_at: Option<i64>,
}

/// A new bearer token: 32 random bytes from the OS CSPRNG, hex, with a prefix that makes
/// leaked tokens easy to grep for.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("hearth_{}", hex::encode(bytes))
}

/// Tokens are random and long, so a plain SHA-256 is enough (no password stretching needed).
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub(crate) fn user_from_row(row: &AnyRow) -> Result<User> {
    UserRow::from_row(row)?.into_user()
}

/// A user's row, read by either driver.
#[derive(sqlx::FromRow)]
pub(crate) struct UserRow {
    id: String,
    email: String,
    role: String,
    tier: String,
    created_at: i64,
}

impl UserRow {
    pub(crate) fn into_user(self) -> Result<User> {
        Ok(User {
            role: Role::parse(&self.role)
                .ok_or_else(|| StoreError::Corrupt(format!("role {}", self.role)))?,
            tier: Tier::parse(&self.tier)
                .ok_or_else(|| StoreError::Corrupt(format!("tier {}", self.tier)))?,
            id: self.id,
            email: self.email,
            created_at: self.created_at,
        })
    }
}

/// A session's user, and the session's CSRF token.
#[derive(sqlx::FromRow)]
pub(crate) struct SessionRow {
    #[sqlx(flatten)]
    pub(crate) user: UserRow,
    pub(crate) csrf: String,
}

/// A token's user, and when the token was last used.
#[derive(sqlx::FromRow)]
struct TokenRow {
    #[sqlx(flatten)]
    user: UserRow,
    last_used_at: Option<i64>,
}

impl Store {
    /// Creates a user and a first token; returns the plaintext token (shown once).
    pub async fn create_user(&self, email: &str, role: Role, tier: Tier) -> Result<(User, String)> {
        let user = User {
            id: uuid::Uuid::now_v7().to_string(),
            email: email.to_string(),
            role,
            tier,
            created_at: self.now(),
        };
        let token = generate_token();
        let mut tx = self.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO users (id, email, role, tier, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&user.id)
        .bind(&user.email)
        .bind(role.as_str())
        .bind(tier.as_str())
        .bind(user.created_at)
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            if crate::is_unique_violation(&e) {
                return Err(StoreError::Conflict(format!(
                    "a user with email {email:?} exists"
                )));
            }
            return Err(e.into());
        }
        sqlx::query("INSERT INTO api_tokens (token_hash, user_id, name, created_at) VALUES ($1, $2, $3, $4)")
            .bind(hash_token(&token))
            .bind(&user.id)
            .bind("default")
            .bind(user.created_at)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((user, token))
    }

    /// The token's user; notes the use (at most once a minute per token, so reads stay reads).
    pub async fn user_by_token(&self, token: &str) -> Result<Option<User>> {
        let hash = hash_token(token);
        const SQL: &str = "SELECT u.id, u.email, u.role, u.tier, u.created_at, t.last_used_at \
                           FROM users u JOIN api_tokens t ON t.user_id = u.id WHERE t.token_hash = $1";
        let row: Option<TokenRow> =
            fetch_read!(self, sqlx::query_as(SQL).bind(&hash), fetch_optional)?;
        let Some(row) = row else { return Ok(None) };
        let now = self.now();
        if row.last_used_at.is_none_or(|at| at < now - 60_000) {
            sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE token_hash = $2")
                .bind(now)
                .bind(&hash)
                .execute(&self.pool)
                .await?;
        }
        row.user.into_user().map(Some)
    }

    /// Makes another token for the user; returns it in plaintext (shown once) with its id.
    pub async fn create_token(&self, user_id: &str, name: &str) -> Result<(ApiToken, String)> {
        let token = generate_token();
        let hash = hash_token(&token);
        let created_at = self.now();
        sqlx::query("INSERT INTO api_tokens (token_hash, user_id, name, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&hash)
            .bind(user_id)
            .bind(name)
            .bind(created_at)
            .execute(&self.pool)
            .await?;
        Ok((
            ApiToken {
                id: token_id(&hash),
                name: name.to_string(),
                created_at,
                last_used_at: None,
            },
            token,
        ))
    }

    /// The user's tokens (never the tokens themselves: only their ids and names).
    pub async fn list_tokens(&self, user_id: &str) -> Result<Vec<ApiToken>> {
        let rows = sqlx::query("SELECT token_hash, name, created_at, last_used_at FROM api_tokens WHERE user_id = $1 ORDER BY created_at, token_hash")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let hash: String = r.try_get("token_hash")?;
                Ok(ApiToken {
                    id: token_id(&hash),
                    name: r.try_get("name")?,
                    created_at: r.try_get("created_at")?,
                    last_used_at: r.try_get("last_used_at")?,
                })
            })
            .collect()
    }

    /// Revokes one of the user's tokens by id; NotFound when the user has no such token.
    pub async fn revoke_token(&self, user_id: &str, id: &str) -> Result<()> {
        if id.len() != TOKEN_ID_CHARS || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::NotFound);
        }
        self.delete_one(
            "DELETE FROM api_tokens WHERE user_id = $1 AND token_hash LIKE $2",
            user_id,
            &format!("{}%", id.to_ascii_lowercase()),
        )
        .await
    }

    /// Removes a user who holds nothing: Conflict while any of their environments is not
    /// destroyed. What destroyed environments left (rows, jobs, executions, logs), tokens
    /// and quota overrides go with the user; the audit log keeps its entries.
    pub async fn delete_user(&self, id: &str) -> Result<()> {
        let mut tx = self.begin().await?;
        user_in(&mut tx, id, self.for_update()).await?;
        let live: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM environments WHERE user_id = $1 AND state <> 'destroyed'",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if live > 0 {
            return Err(StoreError::Conflict(format!(
                "the user still has {live} environment(s) that are not destroyed; destroy them first"
            )));
        }
        for sql in [
            "DELETE FROM executions WHERE environment_id IN (SELECT id FROM environments WHERE user_id = $1)",
            "DELETE FROM provision_logs WHERE environment_id IN (SELECT id FROM environments WHERE user_id = $1)",
            "DELETE FROM jobs WHERE environment_id IN (SELECT id FROM environments WHERE user_id = $1)",
            "DELETE FROM port_shares WHERE environment_id IN (SELECT id FROM environments WHERE user_id = $1)",
            "DELETE FROM environments WHERE user_id = $1",
            "DELETE FROM api_tokens WHERE user_id = $1",
            "DELETE FROM git_credentials WHERE user_id = $1",
            "DELETE FROM sessions WHERE user_id = $1",
            "DELETE FROM password_links WHERE user_id = $1",
            "DELETE FROM quotas WHERE user_id = $1",
            "DELETE FROM users WHERE id = $1",
        ] {
            sqlx::query(sql).bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Marks a terminal ticket used; false when it was used before. `expires_at` is when
    /// the row may go (the ticket is refused after that anyway).
    pub async fn use_ticket(&self, ticket_hash: &str, expires_at: i64) -> Result<bool> {
        let done = sqlx::query("INSERT INTO used_tickets (ticket_hash, expires_at) VALUES ($1, $2) ON CONFLICT (ticket_hash) DO NOTHING")
            .bind(ticket_hash)
            .bind(expires_at)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn user(&self, id: &str) -> Result<User> {
        let row = sqlx::query("SELECT id, email, role, tier, created_at FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        user_from_row(&row)
    }

    pub async fn list_users(&self) -> Result<Vec<User>> {
        let rows = sqlx::query(
            "SELECT id, email, role, tier, created_at FROM users ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(user_from_row).collect()
    }

    pub async fn count_users(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM users")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    pub async fn set_user_tier_role(
        &self,
        id: &str,
        tier: Option<Tier>,
        role: Option<Role>,
    ) -> Result<User> {
        let user = self.user(id).await?;
        sqlx::query("UPDATE users SET tier = $1, role = $2 WHERE id = $3")
            .bind(tier.unwrap_or(user.tier).as_str())
            .bind(role.unwrap_or(user.role).as_str())
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.user(id).await
    }

    /// Sets per-user overrides; `None` in a field means "the tier's default".
    pub async fn set_quota_overrides(&self, id: &str, o: &QuotaOverrides) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM quotas WHERE user_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO quotas (user_id, max_environments, max_concurrent_environments, max_vcpus, max_memory_mb, \
             max_disk_gb, max_duration_hours) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(o.max_environments)
        .bind(o.max_concurrent_environments)
        .bind(o.max_vcpus)
        .bind(o.max_memory_mb)
        .bind(o.max_disk_gb)
        .bind(o.max_duration_hours)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn quota_overrides(&self, id: &str) -> Result<QuotaOverrides> {
        let row = sqlx::query(
            "SELECT max_environments, max_concurrent_environments, max_vcpus, max_memory_mb, max_disk_gb, \
             max_duration_hours FROM quotas WHERE user_id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else {
            return Ok(QuotaOverrides::default());
        };
        Ok(QuotaOverrides {
            max_environments: r.try_get("max_environments")?,
            max_concurrent_environments: r.try_get("max_concurrent_environments")?,
            max_vcpus: r.try_get("max_vcpus")?,
            max_memory_mb: r.try_get("max_memory_mb")?,
            max_disk_gb: r.try_get("max_disk_gb")?,
            max_duration_hours: r.try_get("max_duration_hours")?,
        })
    }

    /// The user's quota: the tier's defaults, overridden column by column. A user with
    /// no override row gets the tier defaults, never a free pass.
    pub async fn quota(&self, user: &User) -> Result<Quota> {
        let mut conn = self.pool.acquire().await?;
        quota_in(&mut conn, user).await
    }

    pub async fn usage(&self, user_id: &str) -> Result<Usage> {
        let mut conn = self.pool.acquire().await?;
        usage_in(&mut conn, user_id).await
    }
}

pub(crate) async fn quota_in(conn: &mut sqlx::AnyConnection, user: &User) -> Result<Quota> {
    let mut q = user.tier.default_quota();
    let row = sqlx::query(
        "SELECT max_environments, max_concurrent_environments, max_vcpus, max_memory_mb, \
         max_disk_gb, max_duration_hours FROM quotas WHERE user_id = $1",
    )
    .bind(&user.id)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = row {
        let pick = |col: &str, default: i64| -> Result<i64> {
            Ok(row.try_get::<Option<i64>, _>(col)?.unwrap_or(default))
        };
        q = Quota {
            max_environments: pick("max_environments", q.max_environments)?,
            max_concurrent_environments: pick(
                "max_concurrent_environments",
                q.max_concurrent_environments,
            )?,
            max_vcpus: pick("max_vcpus", q.max_vcpus)?,
            max_memory_mb: pick("max_memory_mb", q.max_memory_mb)?,
            max_disk_gb: pick("max_disk_gb", q.max_disk_gb)?,
            max_duration_hours: pick("max_duration_hours", q.max_duration_hours)?,
        };
    }
    Ok(q)
}

/// Counts what the user holds now. Environments count until destroyed; resources count
/// while reserved (see `EnvState::reservation`).
pub(crate) async fn usage_in(conn: &mut sqlx::AnyConnection, user_id: &str) -> Result<Usage> {
    // Summed in SQL: one row back however many environments the user has.
    const ACTIVE: &str = "reserved = 1";
    let sql = format!(
        "SELECT CAST(COUNT(*) AS BIGINT) AS environments, \
         CAST(COALESCE(SUM(CASE WHEN {ACTIVE} THEN 1 ELSE 0 END), 0) AS BIGINT) AS concurrent, \
         CAST(COALESCE(SUM(CASE WHEN {ACTIVE} THEN vcpus ELSE 0 END), 0) AS BIGINT) AS vcpus, \
         CAST(COALESCE(SUM(CASE WHEN {ACTIVE} THEN memory_mb ELSE 0 END), 0) AS BIGINT) AS memory_mb, \
         CAST(COALESCE(SUM(CASE WHEN {ACTIVE} THEN disk_gb ELSE 0 END), 0) AS BIGINT) AS disk_gb \
         FROM environments WHERE user_id = $1 AND state <> 'destroyed'"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(user_id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Usage {
        environments: row.try_get("environments")?,
        concurrent_environments: row.try_get("concurrent")?,
        vcpus: row.try_get("vcpus")?,
        memory_mb: row.try_get("memory_mb")?,
        disk_gb: row.try_get("disk_gb")?,
    })
}

/// Reads (and on PostgreSQL locks, with `lock` = " FOR UPDATE") a user inside a transaction.
pub(crate) async fn user_in(tx: &mut Tx, id: &str, lock: &str) -> Result<User> {
    let sql = format!("SELECT id, email, role, tier, created_at FROM users WHERE id = $1{lock}");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound)?;
    user_from_row(&row)
}

/// Used by the transaction that creates an environment.
pub(crate) async fn quota_and_usage(tx: &mut Tx, user: &User) -> Result<(Quota, Usage)> {
    let q = quota_in(&mut *tx, user).await?;
    let u = usage_in(&mut *tx, &user.id).await?;
    Ok((q, u))
}

#[cfg(test)]
mod tests {
    use crate::testdb::each_backend;
    use hearth_core::{Role, Tier};

    #[tokio::test]
    async fn tokens_are_hashed_and_resolve() {
        each_backend(|store| async move {
            let (user, token) = store
                .create_user("a@example.com", Role::User, Tier::Free)
                .await
                .unwrap();
            assert!(token.starts_with("hearth_"));
            let found = store.user_by_token(&token).await.unwrap().unwrap();
            assert_eq!(found, user);
            assert!(store.user_by_token("hearth_wrong").await.unwrap().is_none());
            // The plaintext is nowhere in the table.
            let n: i64 = sqlx::Row::try_get(
                &sqlx::query("SELECT COUNT(*) AS n FROM api_tokens WHERE token_hash = $1")
                    .bind(&token)
                    .fetch_one(store.pool())
                    .await
                    .unwrap(),
                "n",
            )
            .unwrap();
            assert_eq!(n, 0);
            let dup = store
                .create_user("a@example.com", Role::User, Tier::Free)
                .await;
            assert!(matches!(dup, Err(crate::StoreError::Conflict(_))));
        })
        .await;
    }

    #[tokio::test]
    async fn tokens_are_listed_by_id_and_revoked_one_by_one() {
        each_backend(|store| async move {
            let (user, first) = store
                .create_user("t@example.com", Role::User, Tier::Free)
                .await
                .unwrap();
            let (other, _) = store
                .create_user("o@example.com", Role::User, Tier::Free)
                .await
                .unwrap();
            let (made, second) = store.create_token(&user.id, "laptop").await.unwrap();
            let listed = store.list_tokens(&user.id).await.unwrap();
            // Oldest first; two made in the same millisecond come in either order.
            let mut names: Vec<&str> = listed.iter().map(|t| t.name.as_str()).collect();
            names.sort();
            assert_eq!(names, ["default", "laptop"]);
            assert!(
                listed
                    .iter()
                    .all(|t| !first.contains(&t.id) && !second.contains(&t.id))
            );
            // Another user cannot revoke it, nor can a malformed id match several.
            assert!(matches!(
                store.revoke_token(&other.id, &made.id).await,
                Err(crate::StoreError::NotFound)
            ));
            assert!(matches!(
                store.revoke_token(&user.id, "").await,
                Err(crate::StoreError::NotFound)
            ));
            assert!(matches!(
                store.revoke_token(&user.id, "%%%%%%%%%%%%%%%%").await,
                Err(crate::StoreError::NotFound)
            ));
            store.revoke_token(&user.id, &made.id).await.unwrap();
            assert!(store.user_by_token(&second).await.unwrap().is_none());
            assert_eq!(
                store.user_by_token(&first).await.unwrap().unwrap().id,
                user.id
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_ticket_is_used_once() {
        each_backend(|store| async move {
            assert!(store.use_ticket("abc", 10).await.unwrap());
            assert!(!store.use_ticket("abc", 10).await.unwrap());
        })
        .await;
    }

    #[tokio::test]
    async fn quota_defaults_to_tier_without_a_row() {
        each_backend(|store| async move {
            let (user, _) = store
                .create_user("q@example.com", Role::User, Tier::Pro)
                .await
                .unwrap();
            assert_eq!(store.quota(&user).await.unwrap(), Tier::Pro.default_quota());
            sqlx::query("INSERT INTO quotas (user_id, max_vcpus) VALUES ($1, $2)")
                .bind(&user.id)
                .bind(3i64)
                .execute(store.pool())
                .await
                .unwrap();
            let q = store.quota(&user).await.unwrap();
            assert_eq!(q.max_vcpus, 3);
            assert_eq!(q.max_memory_mb, Tier::Pro.default_quota().max_memory_mb);
        })
        .await;
    }
}
