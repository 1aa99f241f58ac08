//! Custom images (migration 0013). A row is written (`building`) before the build, under
//! the owner's count and the name's uniqueness in one transaction; the build and the guest
//! contract check then run, and the row turns `ready` or goes.

use crate::{Result, Store, StoreError, User};
use sqlx::Row;
use sqlx::any::AnyRow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub id: String,
    /// What a create names in `baseImage`.
    pub name: String,
    pub owner_id: String,
    /// `private` (its owner's) or `everyone`.
    pub visibility: String,
    /// The engine that built it: environments of it go there.
    pub host_id: String,
    /// The engine's name for it.
    pub reference: String,
    pub size_bytes: Option<i64>,
    /// The smallest disk a VM of it may have (migration 0017); `None`: any.
    pub min_disk_gb: Option<i64>,
    pub state: String,
    pub created_at: i64,
}

const COLUMNS: &str = "id, name, owner_id, visibility, host_id, reference, size_bytes, min_disk_gb, state, created_at";

fn from_row(r: &AnyRow) -> Result<Image> {
    Ok(Image {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        owner_id: r.try_get("owner_id")?,
        visibility: r.try_get("visibility")?,
        host_id: r.try_get("host_id")?,
        reference: r.try_get("reference")?,
        size_bytes: r.try_get("size_bytes")?,
        min_disk_gb: r.try_get("min_disk_gb")?,
        state: r.try_get("state")?,
        created_at: r.try_get("created_at")?,
    })
}

impl Store {
    /// Holds `name` for an image `owner` is about to build on `host_id`, within the owner's
    /// count (`max`). The engine's name for it is `hearth-image:<id>`.
    pub async fn begin_image(
        &self,
        owner: &User,
        name: &str,
        visibility: &str,
        host_id: &str,
        max: i64,
    ) -> Result<Image> {
        let now = self.now();
        let id = uuid::Uuid::now_v7().to_string();
        let image = Image {
            reference: format!("hearth-image:{id}"),
            id,
            name: name.to_string(),
            owner_id: owner.id.clone(),
            visibility: visibility.to_string(),
            host_id: host_id.to_string(),
            size_bytes: None,
            min_disk_gb: None,
            state: "building".into(),
            created_at: now,
        };
        let mut tx = self.begin().await?;
        let lock = format!("SELECT id FROM users WHERE id = $1{}", self.for_update());
        sqlx::query(sqlx::AssertSqlSafe(lock))
            .bind(&owner.id)
            .fetch_one(&mut *tx)
            .await?;
        let held: i64 =
            sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM images WHERE owner_id = $1")
                .bind(&owner.id)
                .fetch_one(&mut *tx)
                .await?
                .try_get("n")?;
        if held >= max {
            return Err(StoreError::Quota(hearth_core::QuotaExceeded {
                limit: "maxImages",
                max,
                used: held,
                requested: 1,
            }));
        }
        let inserted = sqlx::query(
            "INSERT INTO images (id, name, owner_id, visibility, host_id, reference, state, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'building', $7, $7)",
        )
        .bind(&image.id)
        .bind(&image.name)
        .bind(&image.owner_id)
        .bind(&image.visibility)
        .bind(&image.host_id)
        .bind(&image.reference)
        .bind(now)
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::Conflict(format!(
                    "an image named {name:?} exists already"
                )));
            }
            other => {
                other?;
            }
        }
        tx.commit().await?;
        Ok(image)
    }

    pub async fn image_ready(
        &self,
        id: &str,
        size_bytes: i64,
        min_disk_gb: Option<i64>,
    ) -> Result<Image> {
        sqlx::query(
            "UPDATE images SET state = 'ready', size_bytes = $1, min_disk_gb = $2, updated_at = $3 WHERE id = $4",
        )
        .bind(size_bytes)
        .bind(min_disk_gb)
        .bind(self.now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        self.image_named(id).await
    }

    /// An image by id or name, whoever owns it (callers check who may see it).
    /// By id first, then by name (names never look like ids).
    pub async fn image_named(&self, id_or_name: &str) -> Result<Image> {
        for column in ["id", "name"] {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM images WHERE {column} = $1"
            )))
            .bind(id_or_name)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = row {
                return from_row(&row);
            }
        }
        Err(StoreError::NotFound)
    }

    /// The images `user` may use: their own and everyone's (bounded by the owners' counts).
    pub async fn images_for(&self, user_id: &str) -> Result<Vec<Image>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM images WHERE owner_id = $1 OR visibility = 'everyone' ORDER BY name LIMIT 1000"
        )))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Images left `building` for longer than `older_than_ms` (their builder died).
    pub async fn stale_images(&self, older_than_ms: i64) -> Result<Vec<Image>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM images WHERE state = 'building' AND updated_at < $1 LIMIT 100"
        )))
        .bind(self.now() - older_than_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    pub async fn forget_image(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM images WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
