//! Users' stored git credentials (migration 0015): an HTTPS token or an SSH deploy key,
//! sealed with the master key by the caller, named once and then named in creates. The
//! secret is read back only by the job that clones with it.

use crate::{Result, Store, StoreError, User};
use sqlx::Row;
use sqlx::any::AnyRow;

/// Credentials one user may keep.
pub const MAX_GIT_CREDENTIALS_PER_USER: i64 = 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitCredential {
    pub id: String,
    pub user_id: String,
    pub name: String,
    /// `https-token` or `ssh-key`.
    pub kind: String,
    /// Sent with an HTTPS token (`x-access-token` when `None`).
    pub username: Option<String>,
    /// Sealed with the master key.
    pub secret_enc: String,
    pub created_at: i64,
}

const COLUMNS: &str = "id, user_id, name, kind, username, secret_enc, created_at";

fn from_row(r: &AnyRow) -> Result<GitCredential> {
    Ok(GitCredential {
        id: r.try_get("id")?,
        user_id: r.try_get("user_id")?,
        name: r.try_get("name")?,
        kind: r.try_get("kind")?,
        username: r.try_get("username")?,
        secret_enc: r.try_get("secret_enc")?,
        created_at: r.try_get("created_at")?,
    })
}

impl Store {
    /// Keeps a credential under a name of its owner's, within `MAX_GIT_CREDENTIALS_PER_USER`.
    pub async fn add_git_credential(
        &self,
        owner: &User,
        name: &str,
        kind: &str,
        username: Option<&str>,
        secret_enc: &str,
    ) -> Result<GitCredential> {
        let credential = GitCredential {
            id: uuid::Uuid::now_v7().to_string(),
            user_id: owner.id.clone(),
            name: name.to_string(),
            kind: kind.to_string(),
            username: username.map(str::to_string),
            secret_enc: secret_enc.to_string(),
            created_at: self.now(),
        };
        let mut tx = self.begin().await?;
        let lock = format!("SELECT id FROM users WHERE id = $1{}", self.for_update());
        sqlx::query(sqlx::AssertSqlSafe(lock))
            .bind(&owner.id)
            .fetch_one(&mut *tx)
            .await?;
        let held: i64 = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM git_credentials WHERE user_id = $1",
        )
        .bind(&owner.id)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if held >= MAX_GIT_CREDENTIALS_PER_USER {
            return Err(StoreError::Conflict(format!(
                "you keep {held} git credentials, the most allowed; delete one first"
            )));
        }
        let inserted = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO git_credentials ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        )))
        .bind(&credential.id)
        .bind(&credential.user_id)
        .bind(&credential.name)
        .bind(&credential.kind)
        .bind(&credential.username)
        .bind(&credential.secret_enc)
        .bind(credential.created_at)
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(e) if crate::is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!(
                    "you have a git credential named {name:?} already"
                )));
            }
            other => {
                other?;
            }
        }
        tx.commit().await?;
        Ok(credential)
    }

    /// A user's credentials, by name.
    pub async fn git_credentials(&self, user_id: &str) -> Result<Vec<GitCredential>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM git_credentials WHERE user_id = $1 ORDER BY name"
        )))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// One of a user's credentials, by name.
    pub async fn git_credential_named(&self, user_id: &str, name: &str) -> Result<GitCredential> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM git_credentials WHERE user_id = $1 AND name = $2"
        )))
        .bind(user_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound)?;
        from_row(&row)
    }

    /// A credential by id (for the job that clones with it).
    pub async fn git_credential(&self, id: &str) -> Result<GitCredential> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM git_credentials WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound)?;
        from_row(&row)
    }

    /// Forgets one of a user's credentials; an environment not yet cloned with it then
    /// fails its clone, saying so.
    pub async fn delete_git_credential(&self, user_id: &str, name: &str) -> Result<()> {
        self.delete_one(
            "DELETE FROM git_credentials WHERE user_id = $1 AND name = $2",
            user_id,
            name,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use crate::StoreError;
    use crate::testdb::each_backend;
    use hearth_core::{Role, Tier};

    #[tokio::test]
    async fn credentials_are_named_per_user_bounded_and_go_with_their_user() {
        each_backend(|store| async move {
            let (alice, _) = store
                .create_user("alice@example.com", Role::User, Tier::Free)
                .await
                .unwrap();
            let (bob, _) = store
                .create_user("bob@example.com", Role::User, Tier::Free)
                .await
                .unwrap();
            let kept = store
                .add_git_credential(&alice, "ci", "https-token", Some("me"), "sealed-1")
                .await
                .unwrap();
            assert_eq!(store.git_credential(&kept.id).await.unwrap(), kept);
            // The same name: refused for alice, free for bob.
            assert!(matches!(
                store
                    .add_git_credential(&alice, "ci", "ssh-key", None, "sealed-2")
                    .await,
                Err(StoreError::Conflict(_))
            ));
            store
                .add_git_credential(&bob, "ci", "ssh-key", None, "sealed-3")
                .await
                .unwrap();
            let found = store.git_credential_named(&alice.id, "ci").await.unwrap();
            assert_eq!(found.secret_enc, "sealed-1");
            // At most MAX per user.
            for i in 1..super::MAX_GIT_CREDENTIALS_PER_USER {
                store
                    .add_git_credential(&alice, &format!("c{i:02}"), "https-token", None, "s")
                    .await
                    .unwrap();
            }
            assert!(matches!(
                store
                    .add_git_credential(&alice, "one-more", "https-token", None, "s")
                    .await,
                Err(StoreError::Conflict(_))
            ));
            let names: Vec<String> = store
                .git_credentials(&alice.id)
                .await
                .unwrap()
                .into_iter()
                .map(|c| c.name)
                .collect();
            assert_eq!(names.len() as i64, super::MAX_GIT_CREDENTIALS_PER_USER);
            assert_eq!(names.first().map(String::as_str), Some("c01"));
            // Deleting: once; a second time is NotFound; bob's stays.
            store.delete_git_credential(&alice.id, "ci").await.unwrap();
            assert!(matches!(
                store.delete_git_credential(&alice.id, "ci").await,
                Err(StoreError::NotFound)
            ));
            assert!(matches!(
                store.git_credential(&kept.id).await,
                Err(StoreError::NotFound)
            ));
            assert!(store.git_credential_named(&bob.id, "ci").await.is_ok());
            // A user who is deleted takes their credentials along.
            store.delete_user(&bob.id).await.unwrap();
            assert!(store.git_credentials(&bob.id).await.unwrap().is_empty());
        })
        .await;
    }
}
