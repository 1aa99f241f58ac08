//! Agent hosts bought as cloud instances (OVH): which instance, bought through which host
//! (the OVH project and region), so selling one deletes exactly that instance.

use crate::{Result, Store, StoreError};
use sqlx::Row;
use sqlx::any::AnyRow;

macro_rules! select_bought {
    ($tail:literal) => {
        concat!(
            "SELECT host_name, via_host_id, instance_id, flavor, created_by, created_at, empty_since, by_demand \
             FROM bought_hosts ",
            $tail
        )
    };
}

fn bought_from_row(row: &AnyRow) -> Result<BoughtHost> {
    Ok(BoughtHost {
        host_name: row.try_get("host_name")?,
        via_host_id: row.try_get("via_host_id")?,
        instance_id: row.try_get("instance_id")?,
        flavor: row.try_get("flavor")?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        empty_since: row.try_get("empty_since")?,
        by_demand: row.try_get::<i64, _>("by_demand")? != 0,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoughtHost {
    pub host_name: String,
    pub via_host_id: String,
    pub instance_id: String,
    pub flavor: String,
    pub created_by: String,
    pub created_at: i64,
    /// Holding no environment since then; `None` while it holds some or has not joined.
    pub empty_since: Option<i64>,
    /// Bought by the demand policy (which may sell it), not by an admin.
    pub by_demand: bool,
}

impl Store {
    pub async fn add_bought_host(&self, b: &BoughtHost) -> Result<()> {
        sqlx::query(
            "INSERT INTO bought_hosts (host_name, via_host_id, instance_id, flavor, created_by, created_at, by_demand) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&b.host_name)
        .bind(&b.via_host_id)
        .bind(&b.instance_id)
        .bind(&b.flavor)
        .bind(&b.created_by)
        .bind(b.created_at)
        .bind(b.by_demand as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn bought_host(&self, host_name: &str) -> Result<BoughtHost> {
        let row = sqlx::query(select_bought!("WHERE host_name = $1"))
            .bind(host_name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        bought_from_row(&row)
    }

    /// Every bought host, oldest first.
    pub async fn bought_hosts(&self) -> Result<Vec<BoughtHost>> {
        let rows = sqlx::query(select_bought!("ORDER BY created_at, host_name"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(bought_from_row).collect()
    }

    pub async fn set_bought_instance(&self, host_name: &str, instance_id: &str) -> Result<()> {
        sqlx::query("UPDATE bought_hosts SET instance_id = $1 WHERE host_name = $2")
            .bind(instance_id)
            .bind(host_name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Voids the unused join tokens for `host_name` (a purchase that failed).
    pub async fn revoke_join_tokens(&self, host_name: &str) -> Result<()> {
        sqlx::query("DELETE FROM join_tokens WHERE host_name = $1 AND used_at IS NULL")
            .bind(host_name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Bought hosts made through host `via_host_id`.
    pub async fn count_bought_via(&self, via_host_id: &str) -> Result<i64> {
        Ok(
            sqlx::query("SELECT COUNT(*) AS n FROM bought_hosts WHERE via_host_id = $1")
                .bind(via_host_id)
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?,
        )
    }

    pub async fn set_empty_since(&self, host_name: &str, since: Option<i64>) -> Result<()> {
        sqlx::query("UPDATE bought_hosts SET empty_since = $1 WHERE host_name = $2")
            .bind(since)
            .bind(host_name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn remove_bought_host(&self, host_name: &str) -> Result<()> {
        sqlx::query("DELETE FROM bought_hosts WHERE host_name = $1")
            .bind(host_name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

impl Store {
    /// An installation-wide setting (JSON text), if set.
    pub async fn setting(&self, key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("value")).transpose()?)
    }

    pub async fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        let now = self.now();
        sqlx::query(
            "INSERT INTO settings (key, value, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (key) DO UPDATE SET value = $2, updated_at = $3",
        )
        .bind(key)
        .bind(value)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Takes (or renews) the lease `key` for `holder` for `ttl_ms`, unless another holder's
    /// lease runs: true when this holder has it now.
    pub async fn take_lease(&self, key: &str, holder: &str, ttl_ms: i64) -> Result<bool> {
        let now = self.now();
        let value = format!("{holder} {}", now + ttl_ms);
        sqlx::query("INSERT INTO settings (key, value, updated_at) VALUES ($1, '', 0) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .execute(&self.pool)
            .await?;
        // The holder and expiry sit in the text: "<holder> <expires at>".
        let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_one(&self.pool)
            .await?;
        let current: String = row.try_get("value")?;
        let (owner, expires) = current.split_once(' ').unwrap_or(("", "0"));
        let free = owner == holder || expires.parse::<i64>().unwrap_or(0) < now;
        if !free {
            return Ok(false);
        }
        let taken = sqlx::query(
            "UPDATE settings SET value = $1, updated_at = $2 WHERE key = $3 AND value = $4",
        )
        .bind(&value)
        .bind(now)
        .bind(key)
        .bind(&current)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(taken == 1)
    }
}
