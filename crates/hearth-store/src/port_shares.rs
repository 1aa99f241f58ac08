//! Ports of environments shared beyond their owners (migration 0016): by a token, whose
//! hash alone is kept, or with everyone. Every share expires; expired ones are pruned.

use crate::{Result, Store, StoreError};
use sqlx::Row;
use sqlx::any::AnyRow;

/// Shares one environment may have at once.
pub const MAX_SHARES_PER_ENVIRONMENT: i64 = 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortShare {
    pub id: String,
    pub environment_id: String,
    pub port: i64,
    /// With everyone (no token).
    pub public: bool,
    pub expires_at: i64,
    pub created_at: i64,
}

const COLUMNS: &str = "id, environment_id, port, public, expires_at, created_at";

fn from_row(r: &AnyRow) -> Result<PortShare> {
    Ok(PortShare {
        id: r.try_get("id")?,
        environment_id: r.try_get("environment_id")?,
        port: r.try_get("port")?,
        public: r.try_get::<i64, _>("public")? != 0,
        expires_at: r.try_get("expires_at")?,
        created_at: r.try_get("created_at")?,
    })
}

impl Store {
    /// Shares `port` of `environment_id` until `expires_at`: with the holders of the token
    /// whose hash is `token_hash`, or with everyone when it is `None`.
    pub async fn add_port_share(
        &self,
        environment_id: &str,
        port: i64,
        token_hash: Option<&str>,
        expires_at: i64,
    ) -> Result<PortShare> {
        let now = self.now();
        let share = PortShare {
            id: uuid::Uuid::now_v7().to_string(),
            environment_id: environment_id.to_string(),
            port,
            public: token_hash.is_none(),
            expires_at,
            created_at: now,
        };
        let mut tx = self.begin().await?;
        let lock = format!(
            "SELECT id FROM environments WHERE id = $1{}",
            self.for_update()
        );
        sqlx::query(sqlx::AssertSqlSafe(lock))
            .bind(environment_id)
            .fetch_one(&mut *tx)
            .await?;
        let held: i64 = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM port_shares WHERE environment_id = $1 AND expires_at > $2",
        )
        .bind(environment_id)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if held >= MAX_SHARES_PER_ENVIRONMENT {
            return Err(StoreError::Conflict(format!(
                "the environment has {held} shares, the most allowed; delete one first"
            )));
        }
        sqlx::query(
            "INSERT INTO port_shares (id, environment_id, port, token_hash, public, expires_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&share.id)
        .bind(&share.environment_id)
        .bind(share.port)
        .bind(token_hash)
        .bind(share.public as i64)
        .bind(share.expires_at)
        .bind(share.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(share)
    }

    /// An environment's shares that have not expired, newest first.
    pub async fn port_shares(&self, environment_id: &str) -> Result<Vec<PortShare>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM port_shares WHERE environment_id = $1 AND expires_at > $2 ORDER BY id DESC"
        )))
        .bind(environment_id)
        .bind(self.now())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// The live share a token opens.
    pub async fn port_share_by_token(&self, token_hash: &str) -> Result<PortShare> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM port_shares WHERE token_hash = $1 AND expires_at > $2"
        )))
        .bind(token_hash)
        .bind(self.now())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound)?;
        from_row(&row)
    }

    /// Whether `port` of `environment_id` is shared with everyone now.
    pub async fn port_is_public(&self, environment_id: &str, port: i64) -> Result<bool> {
        let row = sqlx::query(
            "SELECT id FROM port_shares WHERE environment_id = $1 AND port = $2 AND public = 1 AND expires_at > $3",
        )
        .bind(environment_id)
        .bind(port)
        .bind(self.now())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Ends a share at once.
    pub async fn delete_port_share(&self, environment_id: &str, id: &str) -> Result<()> {
        self.delete_one(
            "DELETE FROM port_shares WHERE environment_id = $1 AND id = $2",
            environment_id,
            id,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use crate::StoreError;
    use crate::testdb::each_backend;

    #[tokio::test]
    async fn shares_open_their_port_until_they_expire_or_go() {
        each_backend(|store| async move {
            let (user, _) = store
                .create_user(
                    "share@example.com",
                    hearth_core::Role::User,
                    hearth_core::Tier::Pro,
                )
                .await
                .unwrap();
            let host = crate::environments::tests::roomy_host(&store).await;
            store
                .insert_running_for_tests(&user.id, &[(host.id.clone(), 1)])
                .await
                .unwrap();
            let env = store
                .list_environments(Some(&user.id), None, false, None, 1)
                .await
                .unwrap()
                .0
                .remove(0)
                .id;
            let later = store.now() + 3_600_000;
            let by_token = store
                .add_port_share(&env, 8000, Some("hash-1"), later)
                .await
                .unwrap();
            assert_eq!(store.port_share_by_token("hash-1").await.unwrap(), by_token);
            assert!(matches!(
                store.port_share_by_token("hash-2").await,
                Err(StoreError::NotFound)
            ));
            assert!(!store.port_is_public(&env, 8000).await.unwrap());
            let public = store.add_port_share(&env, 8000, None, later).await.unwrap();
            assert!(store.port_is_public(&env, 8000).await.unwrap());
            assert!(!store.port_is_public(&env, 8001).await.unwrap());
            assert_eq!(store.port_shares(&env).await.unwrap().len(), 2);
            store.delete_port_share(&env, &public.id).await.unwrap();
            assert!(!store.port_is_public(&env, 8000).await.unwrap());
            assert!(matches!(
                store.delete_port_share(&env, &public.id).await,
                Err(StoreError::NotFound)
            ));
            // Expired: neither opens anything nor counts.
            let gone = store
                .add_port_share(&env, 9000, Some("hash-3"), store.now() - 1)
                .await
                .unwrap();
            assert!(matches!(
                store.port_share_by_token("hash-3").await,
                Err(StoreError::NotFound)
            ));
            assert!(!store.port_shares(&env).await.unwrap().contains(&gone));
            for i in 1..super::MAX_SHARES_PER_ENVIRONMENT {
                store
                    .add_port_share(&env, 3000 + i, Some(&format!("h{i}")), later)
                    .await
                    .unwrap();
            }
            assert!(matches!(
                store.add_port_share(&env, 1, None, later).await,
                Err(StoreError::Conflict(_))
            ));
        })
        .await;
    }
}
