//! The installation: one row naming this Hearth, shared by every node because they share
//! the database. Its id labels every VM, so two installations on one engine never touch
//! each other's; its key check tells a node whether its master key is the right one.

use crate::{Result, Store, StoreError};
use sqlx::Row;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installation {
    pub id: String,
    /// A one-way check value of the master key; `None` until the first node set it.
    pub key_check: Option<String>,
    pub created_at: i64,
}

/// What `Store::adopt_key_check` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// This node's key is the installation's (or is now, being the first).
    Matches,
    /// The installation has another key.
    Differs,
}

impl Store {
    /// The installation, created on first start. Concurrent first starts agree: the
    /// insert is conditional on the single row's absence.
    pub async fn installation(&self) -> Result<Installation> {
        if let Some(found) = self.read_installation().await? {
            return Ok(found);
        }
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO installation (singleton, id, key_check, created_at) VALUES (1, $1, NULL, $2) \
             ON CONFLICT (singleton) DO NOTHING",
        )
        .bind(uuid::Uuid::now_v7().simple().to_string())
        .bind(self.now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.read_installation().await?.ok_or(StoreError::NotFound)
    }

    async fn read_installation(&self) -> Result<Option<Installation>> {
        let row =
            sqlx::query("SELECT id, key_check, created_at FROM installation WHERE singleton = 1")
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| {
            Ok(Installation {
                id: r.try_get("id")?,
                key_check: r.try_get("key_check")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .transpose()
    }

    /// Records `check` as the installation's key check if none is recorded yet, then says
    /// whether the recorded one is `check`. Two first nodes racing with different keys:
    /// one wins, the other is told its key differs.
    pub async fn adopt_key_check(&self, check: &str) -> Result<KeyCheck> {
        self.installation().await?;
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE installation SET key_check = $1 WHERE singleton = 1 AND key_check IS NULL",
        )
        .bind(check)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let recorded = self.installation().await?.key_check;
        Ok(if recorded.as_deref() == Some(check) {
            KeyCheck::Matches
        } else {
            KeyCheck::Differs
        })
    }
}

#[cfg(test)]
mod tests {
    use super::KeyCheck;
    use crate::testdb::each_backend;

    #[tokio::test]
    async fn one_identity_and_the_first_key_wins() {
        each_backend(|store| async move {
            let a = store.installation().await.unwrap();
            let b = store.installation().await.unwrap();
            assert_eq!(a.id, b.id);
            assert_eq!(a.key_check, None);
            assert_eq!(
                store.adopt_key_check("k1").await.unwrap(),
                KeyCheck::Matches
            );
            assert_eq!(
                store.adopt_key_check("k1").await.unwrap(),
                KeyCheck::Matches
            );
            assert_eq!(
                store.adopt_key_check("k2").await.unwrap(),
                KeyCheck::Differs
            );
            assert_eq!(
                store.installation().await.unwrap().key_check.as_deref(),
                Some("k1")
            );
        })
        .await;
    }
}
