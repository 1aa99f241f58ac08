//! Hosts, their health, and placement.
//!
//! A host's `used_*` counters change only inside the transactions that reserve or release
//! an environment's resources (`EnvState::reservation`), with a conditional update that
//! re-checks the room, so two requests can never together overfill a host.
//! `resum_hosts` recomputes them from the environments, for the reconciler to catch drift.
//!
//! Placement policy (in SQL, because at 1,000 hosts reading every row into Rust costs more
//! than the whole budget): among `ready`, `healthy` hosts of the wanted kind, in the wanted
//! region, with the GPUs asked for and room for the VM, GPU hosts last for VMs that need no
//! GPU, then the most room left after placing (the free share of vCPUs and of memory,
//! averaged), then by name.

use crate::{Result, Store, StoreError, Tx};
use hearth_core::{HostHealth, HostKind, HostStatus, Resources};
use sqlx::Row;
use sqlx::any::AnyRow;

/// What a host offers to placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCapacity {
    pub max_vcpus: i64,
    pub max_memory_mb: i64,
    pub max_environments: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub id: String,
    pub name: String,
    pub kind: HostKind,
    /// How a node reaches it: `unix:///path`, `tcp://host:port`, `ssh://user@host`, `sim://name`.
    pub endpoint: String,
    /// Where its guests answer, from the nodes.
    pub guest_address: String,
    pub region: Option<String>,
    pub gpu_model: Option<String>,
    pub gpu_count: i64,
    pub status: HostStatus,
    pub health: HostHealth,
    /// Why the last check failed, if it did.
    pub health_message: Option<String>,
    pub last_seen_at: Option<i64>,
    pub capacity: HostCapacity,
    pub used_vcpus: i64,
    pub used_memory_mb: i64,
    pub used_environments: i64,
    pub used_gpus: i64,
    pub tls_ca: Option<String>,
    pub tls_cert: Option<String>,
    /// Sealed with the master key; the store never sees it in the clear.
    pub tls_key_sealed: Option<String>,
    /// An agent's bearer credential, sealed with the master key (`tls_ca` then holds the
    /// certificate authority the agent presented when it joined).
    pub credential_sealed: Option<String>,
    /// Kind-specific settings (a simulated host's latency and faults).
    pub options: serde_json::Value,
    /// Which machine it is, as it says itself; `None` until first checked, or for kinds
    /// that cannot say.
    pub identity: Option<String>,
    /// What the host said of itself at its last check (an agent: version, accelerator,
    /// VMs), kept only to be shown.
    pub report: Option<serde_json::Value>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A host to register.
#[derive(Debug, Clone)]
pub struct NewHost {
    /// Chosen by the caller, who may have checked the host under this id already.
    pub id: String,
    pub name: String,
    pub kind: HostKind,
    pub endpoint: String,
    pub guest_address: String,
    pub region: Option<String>,
    pub gpu_model: Option<String>,
    pub gpu_count: i64,
    pub capacity: HostCapacity,
    pub tls_ca: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key_sealed: Option<String>,
    pub credential_sealed: Option<String>,
    pub options: serde_json::Value,
    pub identity: Option<String>,
}

/// Changes to a host; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct HostUpdate {
    pub capacity: Option<HostCapacity>,
    pub options: Option<serde_json::Value>,
}

/// What an environment needs from a host.
#[derive(Debug, Clone)]
pub struct Placement {
    pub kind: HostKind,
    pub resources: Resources,
    pub gpus: i64,
    pub gpu_model: Option<String>,
    pub region: Option<String>,
}

const SELECT_HOST: &str = "SELECT id, name, kind, endpoint, guest_address, region, gpu_model, gpu_count, status, health, \
    health_message, last_seen_at, max_vcpus, max_memory_mb, max_environments, used_vcpus, used_memory_mb, \
    used_environments, used_gpus, tls_ca, tls_cert, tls_key_sealed, credential_sealed, options, identity, report, created_at, updated_at FROM hosts";

fn host_from_row(r: &AnyRow) -> Result<Host> {
    let corrupt = |what: &str, v: &str| StoreError::Corrupt(format!("host {what} {v:?}"));
    let kind: String = r.try_get("kind")?;
    let status: String = r.try_get("status")?;
    let health: String = r.try_get("health")?;
    let options: String = r.try_get("options")?;
    Ok(Host {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        kind: HostKind::parse(&kind).ok_or_else(|| corrupt("kind", &kind))?,
        endpoint: r.try_get("endpoint")?,
        guest_address: r.try_get("guest_address")?,
        region: r.try_get("region")?,
        gpu_model: r.try_get("gpu_model")?,
        gpu_count: r.try_get("gpu_count")?,
        status: HostStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
        health: HostHealth::parse(&health).ok_or_else(|| corrupt("health", &health))?,
        health_message: r.try_get("health_message")?,
        last_seen_at: r.try_get("last_seen_at")?,
        capacity: HostCapacity {
            max_vcpus: r.try_get("max_vcpus")?,
            max_memory_mb: r.try_get("max_memory_mb")?,
            max_environments: r.try_get("max_environments")?,
        },
        used_vcpus: r.try_get("used_vcpus")?,
        used_memory_mb: r.try_get("used_memory_mb")?,
        used_environments: r.try_get("used_environments")?,
        used_gpus: r.try_get("used_gpus")?,
        tls_ca: r.try_get("tls_ca")?,
        tls_cert: r.try_get("tls_cert")?,
        tls_key_sealed: r.try_get("tls_key_sealed")?,
        credential_sealed: r.try_get("credential_sealed")?,
        options: serde_json::from_str(&options).map_err(|_| corrupt("options", &options))?,
        identity: r.try_get("identity")?,
        report: r
            .try_get::<Option<String>, _>("report")?
            .and_then(|t| serde_json::from_str(&t).ok()),
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// What a join token was made for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub host_name: String,
    pub region: Option<String>,
    pub expires_at: i64,
}

impl Store {
    /// Records a join token (by its hash) for a host to be called `host_name`.
    pub async fn create_join_token(
        &self,
        token_hash: &str,
        host_name: &str,
        region: Option<&str>,
        created_by: &str,
        expires_at: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, host_name, region, created_by, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(token_hash)
        .bind(host_name)
        .bind(region)
        .bind(created_by)
        .bind(self.now())
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The token if it is unused and unexpired (it stays so: see `use_join_token`).
    pub async fn join_token(&self, token_hash: &str) -> Result<Option<JoinToken>> {
        let row = sqlx::query("SELECT host_name, region, expires_at FROM join_tokens WHERE token_hash = $1 AND used_at IS NULL AND expires_at >= $2")
            .bind(token_hash)
            .bind(self.now())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(JoinToken {
                host_name: r.try_get("host_name")?,
                region: r.try_get("region")?,
                expires_at: r.try_get("expires_at")?,
            })
        })
        .transpose()
    }

    /// Spends the token and registers the host in one transaction: a token makes one host,
    /// and a host is only made with a token that was good at that moment.
    pub async fn join_host(&self, token_hash: &str, new: &NewHost) -> Result<Host> {
        let now = self.now();
        let spent = sqlx::query("UPDATE join_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL AND expires_at >= $1")
            .bind(now)
            .bind(token_hash)
            .execute(&self.pool)
            .await?;
        if spent.rows_affected() != 1 {
            return Err(StoreError::NotFound);
        }
        match self.add_host(new).await {
            Ok(host) => Ok(host),
            Err(e) => {
                // Nothing was made: the token may be used again.
                let _ = sqlx::query("UPDATE join_tokens SET used_at = NULL WHERE token_hash = $1")
                    .bind(token_hash)
                    .execute(&self.pool)
                    .await;
                Err(e)
            }
        }
    }

    /// Registers a host; a taken name is a `Conflict`. New hosts are `ready` and, having
    /// been checked by the caller, `healthy`.
    pub async fn add_host(&self, new: &NewHost) -> Result<Host> {
        let now = self.now();
        let id = new.id.clone();
        let mut tx = self.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO hosts (id, name, kind, status, max_vcpus, max_memory_mb, max_environments, created_at, updated_at, \
             endpoint, guest_address, region, gpu_model, gpu_count, health, last_seen_at, tls_ca, tls_cert, tls_key_sealed, options, \
             identity, credential_sealed) VALUES ($1, $2, $3, 'ready', $4, $5, $6, $7, $7, $8, $9, $10, $11, $12, 'healthy', $7, $13, $14, $15, \
             $16, $17, $18)",
        )
        .bind(&id)
        .bind(&new.name)
        .bind(new.kind.as_str())
        .bind(new.capacity.max_vcpus)
        .bind(new.capacity.max_memory_mb)
        .bind(new.capacity.max_environments)
        .bind(now)
        .bind(&new.endpoint)
        .bind(&new.guest_address)
        .bind(&new.region)
        .bind(&new.gpu_model)
        .bind(new.gpu_count)
        .bind(&new.tls_ca)
        .bind(&new.tls_cert)
        .bind(&new.tls_key_sealed)
        .bind(new.options.to_string())
        .bind(&new.identity)
        .bind(&new.credential_sealed)
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            if crate::is_unique_violation(&e) {
                drop(tx);
                if let Some(twin) = self.host_with_identity(new.identity.as_deref()).await? {
                    return Err(StoreError::Conflict(format!(
                        "{} reaches the same host as {}; a host is registered once",
                        new.endpoint, twin.name
                    )));
                }
                return Err(StoreError::Conflict(format!(
                    "a host named {:?} exists",
                    new.name
                )));
            }
            return Err(e.into());
        }
        tx.commit().await?;
        self.host(&id).await
    }

    async fn host_with_identity(&self, identity: Option<&str>) -> Result<Option<Host>> {
        let Some(identity) = identity else {
            return Ok(None);
        };
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT_HOST} WHERE identity = $1"
        )))
        .bind(identity)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(host_from_row).transpose()
    }

    /// Records which machine a host is, once known. `Err(Conflict)` names the other host
    /// when it is the same host.
    /// Keeps what a host said of itself (only shown, never acted on).
    pub async fn record_report(&self, id: &str, report: &serde_json::Value) -> Result<()> {
        sqlx::query("UPDATE hosts SET report = $1 WHERE id = $2")
            .bind(report.to_string())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn record_identity(&self, id: &str, identity: &str) -> Result<()> {
        let done = sqlx::query("UPDATE hosts SET identity = $1 WHERE id = $2 AND identity IS NULL")
            .bind(identity)
            .bind(id)
            .execute(&self.pool)
            .await;
        match done {
            Ok(_) => Ok(()),
            Err(e) if crate::is_unique_violation(&e) => {
                let twin = self
                    .host_with_identity(Some(identity))
                    .await?
                    .map(|h| h.name)
                    .unwrap_or_default();
                Err(StoreError::Conflict(format!(
                    "it reaches the same host as {twin}; remove one of the two"
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn hosts(&self) -> Result<Vec<Host>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT_HOST} ORDER BY name")))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(host_from_row).collect()
    }

    pub async fn count_hosts(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM hosts")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    pub async fn host(&self, id: &str) -> Result<Host> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT_HOST} WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        host_from_row(&row)
    }

    /// A host by id or by name.
    pub async fn find_host(&self, id_or_name: &str) -> Result<Host> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT_HOST} WHERE id = $1 OR name = $1"
        )))
        .bind(id_or_name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound)?;
        host_from_row(&row)
    }

    /// `draining` hosts take no new environments; `ready` undoes it.
    pub async fn set_host_status(&self, id: &str, status: HostStatus) -> Result<Host> {
        let done = sqlx::query("UPDATE hosts SET status = $1, updated_at = $2 WHERE id = $3")
            .bind(status.as_str())
            .bind(self.now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        self.host(id).await
    }

    pub async fn update_host(&self, id: &str, update: &HostUpdate) -> Result<Host> {
        let host = self.host(id).await?;
        let cap = update.capacity.unwrap_or(host.capacity);
        let options = update.options.clone().unwrap_or(host.options);
        sqlx::query(
            "UPDATE hosts SET max_vcpus = $1, max_memory_mb = $2, max_environments = $3, options = $4, updated_at = $5 \
             WHERE id = $6",
        )
        .bind(cap.max_vcpus)
        .bind(cap.max_memory_mb)
        .bind(cap.max_environments)
        .bind(options.to_string())
        .bind(self.now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        self.host(id).await
    }

    /// Removes a host that holds no environment (destroyed ones aside). A host with live
    /// environments is a `Conflict`: removing it would orphan their VMs.
    pub async fn remove_host(&self, id: &str) -> Result<Host> {
        let host = self.host(id).await?;
        let mut tx = self.begin().await?;
        let live: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM environments WHERE host_id = $1 AND state <> 'destroyed'",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if live > 0 {
            return Err(StoreError::Conflict(format!(
                "host {} has {live} environments that are not destroyed; drain it, then destroy or wait for them",
                host.name
            )));
        }
        let pooled = self.count_pooled_on_host(&mut tx, id).await?;
        if pooled > 0 {
            return Err(StoreError::Conflict(format!(
                "host {} keeps {pooled} warm VMs; set its pools to 0 and wait for them to drain",
                host.name
            )));
        }
        for sql in [
            "DELETE FROM pooled_vms WHERE host_id = $1",
            "DELETE FROM warm_pools WHERE host_id = $1",
        ] {
            sqlx::query(sql).bind(id).execute(&mut *tx).await?;
        }
        sqlx::query("DELETE FROM hosts WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(host)
    }

    /// Environments on the host that are not destroyed.
    pub async fn count_host_environments(&self, id: &str) -> Result<i64> {
        Ok(sqlx::query(
            "SELECT COUNT(*) AS n FROM environments WHERE host_id = $1 AND state <> 'destroyed'",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?)
    }

    /// Records a round of health checks: `answered` hosts were seen now; `failed` ones
    /// (with why) turn `unhealthy` once they have not been seen for `unhealthy_after_ms`.
    /// Returns the hosts whose health changed, as they are now.
    pub async fn record_health(
        &self,
        answered: &[String],
        failed: &[(String, String)],
        unhealthy_after_ms: i64,
    ) -> Result<Vec<Host>> {
        let now = self.now();
        let mut changed = Vec::new();
        let mut tx = self.begin().await?;
        for chunk in answered.chunks(500) {
            let marks = (0..chunk.len())
                .map(|i| format!("${}", i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let turned = format!(
                "SELECT id FROM hosts WHERE health <> 'healthy' AND id IN ({marks}) AND $1 = $1"
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(turned)).bind(now);
            for id in chunk {
                q = q.bind(id);
            }
            for r in q.fetch_all(&mut *tx).await? {
                changed.push(r.try_get::<String, _>("id")?);
            }
            let sql = format!(
                "UPDATE hosts SET last_seen_at = $1, health = 'healthy', health_message = NULL WHERE id IN ({marks})"
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
            for id in chunk {
                q = q.bind(id);
            }
            q.execute(&mut *tx).await?;
        }
        for (id, why) in failed {
            let turned = sqlx::query(
                "UPDATE hosts SET health = 'unhealthy', health_message = $1 \
                 WHERE id = $2 AND health = 'healthy' AND (last_seen_at IS NULL OR last_seen_at < $3)",
            )
            .bind(why)
            .bind(id)
            .bind(now - unhealthy_after_ms)
            .execute(&mut *tx)
            .await?;
            if turned.rows_affected() == 1 {
                changed.push(id.clone());
            } else {
                sqlx::query("UPDATE hosts SET health_message = $1 WHERE id = $2")
                    .bind(why)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        let mut out = Vec::new();
        for id in changed {
            out.push(self.host(&id).await?);
        }
        Ok(out)
    }

    /// Regions of healthy, ready hosts, with how many hosts each has.
    pub async fn regions(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT region, CAST(COUNT(*) AS BIGINT) AS n FROM hosts WHERE region IS NOT NULL AND health = 'healthy' \
             AND status = 'ready' GROUP BY region ORDER BY region",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("region")?, r.try_get("n")?)))
            .collect()
    }

    /// Picks a host for `need` inside the caller's transaction and reserves its room, or
    /// (with `pinned`, for an environment coming back to life) reserves room on that host.
    pub(crate) async fn place_in(
        &self,
        tx: &mut Tx,
        need: &Placement,
        pinned: Option<&str>,
    ) -> Result<String> {
        let wanted = describe(need);
        if let Some(id) = pinned {
            if reserve(tx, id, need).await? {
                return Ok(id.to_string());
            }
            let host = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT_HOST} WHERE id = $1")))
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?;
            let Some(host) = host.as_ref().map(host_from_row).transpose()? else {
                return Err(StoreError::NoCapacity(format!(
                    "its host {id} is no longer registered"
                )));
            };
            let why = match (host.status, host.health) {
                (HostStatus::Draining, _) => "is draining".to_string(),
                (_, HostHealth::Unhealthy) => "is not answering".to_string(),
                _ => format!("has no room for {wanted} now"),
            };
            return Err(StoreError::NoCapacity(format!(
                "its host {why}; try again later"
            )));
        }
        // A few rounds: on PostgreSQL a concurrent create may take the chosen host's last
        // room between the choice and the conditional reservation.
        for _ in 0..8 {
            let row = sqlx::query(
                "SELECT id FROM hosts WHERE kind = $1 AND status = 'ready' AND health = 'healthy' \
                 AND ($2 = '' OR region = $2) AND ($3 = '' OR gpu_model = $3) AND gpu_count - used_gpus >= $4 \
                 AND used_vcpus + $5 <= max_vcpus AND used_memory_mb + $6 <= max_memory_mb \
                 AND used_environments < max_environments \
                 ORDER BY CASE WHEN gpu_count > 0 AND $4 = 0 THEN 1 ELSE 0 END, \
                 ((max_vcpus - used_vcpus - $5) * 1.0 / max_vcpus + (max_memory_mb - used_memory_mb - $6) * 1.0 / max_memory_mb) DESC, \
                 name LIMIT 1",
            )
            .bind(need.kind.as_str())
            .bind(need.region.as_deref().unwrap_or(""))
            .bind(need.gpu_model.as_deref().unwrap_or(""))
            .bind(need.gpus)
            .bind(need.resources.vcpus)
            .bind(need.resources.memory_mb)
            .fetch_optional(&mut **tx)
            .await?;
            let Some(row) = row else { break };
            let id: String = row.try_get("id")?;
            if reserve(tx, &id, need).await? {
                return Ok(id);
            }
        }
        Err(self.why_no_host(tx, need).await?)
    }

    /// Tells "no host could ever take this" (a 400: no such region, no such GPUs, too
    /// big) from "none has room now" (a 503). Names no host and no one's usage.
    async fn why_no_host(&self, tx: &mut Tx, need: &Placement) -> Result<StoreError> {
        let row = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n, \
             CAST(COALESCE(SUM(CASE WHEN status = 'draining' THEN 1 ELSE 0 END), 0) AS BIGINT) AS draining, \
             CAST(COALESCE(SUM(CASE WHEN health = 'unhealthy' THEN 1 ELSE 0 END), 0) AS BIGINT) AS unhealthy \
             FROM hosts WHERE kind = $1 AND ($2 = '' OR region = $2) AND ($3 = '' OR gpu_model = $3) AND gpu_count >= $4 \
             AND max_vcpus >= $5 AND max_memory_mb >= $6",
        )
        .bind(need.kind.as_str())
        .bind(need.region.as_deref().unwrap_or(""))
        .bind(need.gpu_model.as_deref().unwrap_or(""))
        .bind(need.gpus)
        .bind(need.resources.vcpus)
        .bind(need.resources.memory_mb)
        .fetch_one(&mut **tx)
        .await?;
        let (n, draining, unhealthy): (i64, i64, i64) = (
            row.try_get("n")?,
            row.try_get("draining")?,
            row.try_get("unhealthy")?,
        );
        let wanted = describe(need);
        Ok(if n == 0 {
            StoreError::NoSuchHost(format!(
                "no {} host can ever take {wanted}; an administrator adds one with `hearth admin hosts add`",
                need.kind
            ))
        } else {
            StoreError::NoCapacity(format!(
                "no host has room for {wanted} now ({n} could: {draining} draining, {unhealthy} not answering, the rest full); \
                 try again later"
            ))
        })
    }
}

fn describe(need: &Placement) -> String {
    let mut s = format!(
        "{} vCPUs and {} MB",
        need.resources.vcpus, need.resources.memory_mb
    );
    if need.gpus > 0 {
        s.push_str(&format!(
            " with {} GPU{}",
            need.gpus,
            if need.gpus == 1 { "" } else { "s" }
        ));
        if let Some(m) = &need.gpu_model {
            s.push_str(&format!(" ({m})"));
        }
    }
    if let Some(r) = &need.region {
        s.push_str(&format!(" in region {r}"));
    }
    s
}

/// Takes room for one environment on a host if it still fits there (and the host is
/// ready and healthy); true when taken.
pub(crate) async fn reserve(tx: &mut Tx, host_id: &str, need: &Placement) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE hosts SET used_vcpus = used_vcpus + $1, used_memory_mb = used_memory_mb + $2, \
         used_environments = used_environments + 1, used_gpus = used_gpus + $3 \
         WHERE id = $4 AND status = 'ready' AND health = 'healthy' AND used_vcpus + $1 <= max_vcpus \
         AND used_memory_mb + $2 <= max_memory_mb AND used_environments < max_environments \
         AND gpu_count - used_gpus >= $3",
    )
    .bind(need.resources.vcpus)
    .bind(need.resources.memory_mb)
    .bind(need.gpus)
    .bind(host_id)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives back one environment's room on a host.
pub(crate) async fn release(tx: &mut Tx, host_id: &str, r: &Resources, gpus: i64) -> Result<()> {
    sqlx::query(
        "UPDATE hosts SET used_vcpus = used_vcpus - $1, used_memory_mb = used_memory_mb - $2, \
         used_environments = used_environments - 1, used_gpus = used_gpus - $3 WHERE id = $4",
    )
    .bind(r.vcpus)
    .bind(r.memory_mb)
    .bind(gpus)
    .bind(host_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// What holds room on hosts: reserved environments, and pooled VMs that no environment
/// has claimed yet (a claimed one's room is its environment's).
const HOLDERS: &str = "SELECT id, host_id, vcpus, memory_mb, gpus FROM environments WHERE reserved = 1 \
     UNION ALL SELECT id, host_id, vcpus, memory_mb, 0 AS gpus FROM pooled_vms WHERE state <> 'claimed'";

impl Store {
    /// Recomputes every host's counters from what holds room on it (`HOLDERS`);
    /// returns the names of hosts whose counters had drifted (a bug worth a log line).
    pub async fn resum_hosts(&self) -> Result<Vec<String>> {
        let mut tx = self.begin().await?;
        let sums = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT h.id AS id, h.name AS name, h.used_vcpus AS uv, h.used_memory_mb AS um, h.used_environments AS ue, \
             h.used_gpus AS ug, \
             CAST(COALESCE(SUM(e.vcpus), 0) AS BIGINT) AS v, CAST(COALESCE(SUM(e.memory_mb), 0) AS BIGINT) AS m, \
             CAST(COUNT(e.id) AS BIGINT) AS n, CAST(COALESCE(SUM(e.gpus), 0) AS BIGINT) AS g \
             FROM hosts h LEFT JOIN ({HOLDERS}) e ON e.host_id = h.id \
             GROUP BY h.id, h.name, h.used_vcpus, h.used_memory_mb, h.used_environments, h.used_gpus"
        )))
        .fetch_all(&mut *tx)
        .await?;
        let mut drifted = Vec::new();
        for r in &sums {
            let used: (i64, i64, i64, i64) = (
                r.try_get("uv")?,
                r.try_get("um")?,
                r.try_get("ue")?,
                r.try_get("ug")?,
            );
            let sum: (i64, i64, i64, i64) = (
                r.try_get("v")?,
                r.try_get("m")?,
                r.try_get("n")?,
                r.try_get("g")?,
            );
            if used != sum {
                // Re-summed under the lock, in case a transaction committed since the read.
                let id: String = r.try_get("id")?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE hosts SET \
                     used_vcpus = (SELECT CAST(COALESCE(SUM(vcpus), 0) AS BIGINT) FROM ({HOLDERS}) e WHERE host_id = $1), \
                     used_memory_mb = (SELECT CAST(COALESCE(SUM(memory_mb), 0) AS BIGINT) FROM ({HOLDERS}) e WHERE host_id = $1), \
                     used_environments = (SELECT CAST(COUNT(*) AS BIGINT) FROM ({HOLDERS}) e WHERE host_id = $1), \
                     used_gpus = (SELECT CAST(COALESCE(SUM(gpus), 0) AS BIGINT) FROM ({HOLDERS}) e WHERE host_id = $1) \
                     WHERE id = $1"
                )))
                .bind(&id)
                .execute(&mut *tx)
                .await?;
                drifted.push(r.try_get("name")?);
            }
        }
        tx.commit().await?;
        Ok(drifted)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::environments::tests::{provision_job, sample};
    use crate::testdb::each_backend;
    use hearth_core::{EnvState, Role, Tier};

    pub(crate) fn host(name: &str, kind: HostKind, vcpus: i64, memory_mb: i64) -> NewHost {
        NewHost {
            id: uuid::Uuid::now_v7().to_string(),
            name: name.into(),
            kind,
            endpoint: format!("sim://{name}"),
            guest_address: "127.0.0.1".into(),
            region: None,
            gpu_model: None,
            gpu_count: 0,
            capacity: HostCapacity {
                max_vcpus: vcpus,
                max_memory_mb: memory_mb,
                max_environments: 10,
            },
            tls_ca: None,
            tls_cert: None,
            tls_key_sealed: None,
            credential_sealed: None,
            options: serde_json::json!({}),
            identity: None,
        }
    }

    #[tokio::test]
    async fn environments_go_where_they_fit_and_capacity_returns() {
        each_backend(|store| async move {
            let small = store.add_host(&host("small", HostKind::Docker, 2, 4096)).await.unwrap();
            let big = store.add_host(&host("big", HostKind::Docker, 4, 8192)).await.unwrap();
            let (user, _) = store.create_user("p@example.com", Role::User, Tier::Unlimited).await.unwrap();
            let mut placed = Vec::new();
            // 2 vCPUs each: big (room 4) takes the first, then the two tie and big wins by room,
            // then small, then nothing fits.
            for _ in 0..3 {
                let env = store.create_environment(&user, sample(false), provision_job(&user.id)).await.unwrap();
                placed.push(env.host_id.clone().unwrap());
            }
            assert_eq!(placed, vec![big.id.clone(), big.id.clone(), small.id.clone()]);
            let err = store.create_environment(&user, sample(false), provision_job(&user.id)).await.unwrap_err();
            assert!(matches!(err, StoreError::NoCapacity(ref m) if m.contains("no host has room")), "{err}");
            let b = store.host(&big.id).await.unwrap();
            assert_eq!((b.used_vcpus, b.used_environments), (4, 2));

            // Destroying one on the big host frees its room for the next.
            let on_big = store.live_environments().await.unwrap().into_iter().find(|e| e.host_id.as_deref() == Some(&big.id)).unwrap();
            let now = store.now();
            let destroying = store.save_transition(&on_big, on_big.moved_to(EnvState::Destroying, None, now).unwrap(), "t").await.unwrap();
            store.save_transition(&destroying, destroying.moved_to(EnvState::Destroyed, None, now).unwrap(), "t").await.unwrap();
            let env = store.create_environment(&user, sample(false), provision_job(&user.id)).await.unwrap();
            assert_eq!(env.host_id.as_deref(), Some(big.id.as_str()));

            // A draining host takes nothing new; neither does an unhealthy one.
            store.set_host_status(&big.id, HostStatus::Draining).await.unwrap();
            store.record_health(&[], &[(small.id.clone(), "down".into())], -1).await.unwrap();
            assert_eq!(store.host(&small.id).await.unwrap().health, HostHealth::Unhealthy);
            store.exec_sql_for_tests("UPDATE hosts SET used_vcpus = $1 WHERE id = $2", 0, &small.id).await.unwrap();
            let err = store.create_environment(&user, sample(false), provision_job(&user.id)).await.unwrap_err();
            assert!(matches!(err, StoreError::NoCapacity(ref m) if m.contains("1 draining, 1 not answering")), "{err}");
            // No host of that kind at all: a different error, naming the fix.
            let mut sim = sample(false);
            sim.placement.kind = HostKind::Sim;
            let err = store.create_environment(&user, sim, provision_job(&user.id)).await.unwrap_err();
            assert!(matches!(err, StoreError::NoSuchHost(ref m) if m.contains("hearth admin hosts add")), "{err}");
        })
        .await;
    }

    #[tokio::test]
    async fn restarting_needs_room_on_its_own_host() {
        each_backend(|store| async move {
            let host = store.add_host(&host("one", HostKind::Docker, 2, 4096)).await.unwrap();
            let (user, _) = store.create_user("r@example.com", Role::User, Tier::Unlimited).await.unwrap();
            let mut a = store.create_environment(&user, sample(false), provision_job(&user.id)).await.unwrap();
            a.vm_id = Some("vm-of-a".into());
            let a = store.save_vm(&a).await.unwrap();
            // a fails (releases its room), b takes the host, a's VM cannot come back there.
            let now = store.now();
            let a_err = store.save_transition(&a, a.moved_to(EnvState::Error, Some("x".into()), now).unwrap(), "t").await.unwrap();
            let b = store.create_environment(&user, sample(false), provision_job(&user.id)).await.unwrap();
            assert_eq!(b.host_id.as_deref(), Some(host.id.as_str()));
            let retry = a_err.moved_to(EnvState::Provisioning, None, now).unwrap();
            let err = store.save_transition(&a_err, retry, "t").await.unwrap_err();
            assert!(matches!(err, StoreError::NoCapacity(ref m) if m.contains("its host has no room") && !m.contains("one")), "{err}");
            assert_eq!(store.environment(&a.id).await.unwrap().state, EnvState::Error);
            // Destroying needs no room, even on a full host.
            let d = store.save_transition(&a_err, a_err.moved_to(EnvState::Destroying, None, now).unwrap(), "t").await.unwrap();
            assert!(!d.reserved);
        })
        .await;
    }

    #[tokio::test]
    async fn counters_match_the_environments_and_drift_is_repaired() {
        each_backend(|store| async move {
            let host = store
                .add_host(&host("h", HostKind::Docker, 64, 65536))
                .await
                .unwrap();
            let (user, _) = store
                .create_user("d@example.com", Role::User, Tier::Unlimited)
                .await
                .unwrap();
            let a = store
                .create_environment(&user, sample(false), provision_job(&user.id))
                .await
                .unwrap();
            store
                .create_environment(&user, sample(false), provision_job(&user.id))
                .await
                .unwrap();
            store
                .save_transition(
                    &a,
                    a.moved_to(EnvState::Error, None, store.now()).unwrap(),
                    "t",
                )
                .await
                .unwrap();
            assert!(
                store.resum_hosts().await.unwrap().is_empty(),
                "counters kept in step"
            );
            let h = store.host(&host.id).await.unwrap();
            assert_eq!((h.used_vcpus, h.used_environments), (2, 1));
            store
                .exec_sql_for_tests(
                    "UPDATE hosts SET used_vcpus = $1 WHERE id = $2",
                    99,
                    &host.id,
                )
                .await
                .unwrap();
            assert_eq!(store.resum_hosts().await.unwrap(), vec!["h".to_string()]);
            assert_eq!(store.host(&host.id).await.unwrap().used_vcpus, 2);
        })
        .await;
    }

    #[tokio::test]
    async fn regions_and_gpus_place_only_where_they_exist() {
        each_backend(|store| async move {
            let mut gra = host("gra-1", HostKind::Sim, 64, 65536);
            gra.region = Some("gra".into());
            let gra = store.add_host(&gra).await.unwrap();
            let mut gpu = host("gpu-1", HostKind::Sim, 64, 65536);
            gpu.region = Some("sbg".into());
            gpu.gpu_model = Some("nvidia-a100".into());
            gpu.gpu_count = 2;
            let gpu = store.add_host(&gpu).await.unwrap();
            let plain = store
                .add_host(&host("plain", HostKind::Sim, 64, 65536))
                .await
                .unwrap();
            let (user, _) = store
                .create_user("g@example.com", Role::User, Tier::Unlimited)
                .await
                .unwrap();
            let mk = |region: Option<&str>, gpus: i64, model: Option<&str>| {
                let mut n = sample(false);
                n.placement.kind = HostKind::Sim;
                n.placement.region = region.map(str::to_string);
                n.placement.gpus = gpus;
                n.placement.gpu_model = model.map(str::to_string);
                n
            };
            let e = store
                .create_environment(&user, mk(Some("gra"), 0, None), provision_job(&user.id))
                .await
                .unwrap();
            assert_eq!(e.host_id.as_deref(), Some(gra.id.as_str()));
            // Without a GPU, the GPU host is the last choice even with the most room.
            for _ in 0..3 {
                let e = store
                    .create_environment(&user, mk(None, 0, None), provision_job(&user.id))
                    .await
                    .unwrap();
                assert_ne!(e.host_id.as_deref(), Some(gpu.id.as_str()));
            }
            let e = store
                .create_environment(&user, mk(None, 1, None), provision_job(&user.id))
                .await
                .unwrap();
            assert_eq!(e.host_id.as_deref(), Some(gpu.id.as_str()));
            let e = store
                .create_environment(
                    &user,
                    mk(Some("sbg"), 1, Some("nvidia-a100")),
                    provision_job(&user.id),
                )
                .await
                .unwrap();
            assert_eq!((e.host_id.as_deref(), e.gpus), (Some(gpu.id.as_str()), 1));
            // Both GPUs taken: room may come back (503); nobody has 3, or an H100, or Tokyo (400).
            let err = store
                .create_environment(&user, mk(None, 1, None), provision_job(&user.id))
                .await
                .unwrap_err();
            assert!(matches!(err, StoreError::NoCapacity(_)), "{err}");
            for (region, gpus, model) in [
                (None, 3, None),
                (None, 1, Some("nvidia-h100")),
                (Some("tyo"), 0, None),
                (Some("gra"), 1, None),
            ] {
                let err = store
                    .create_environment(&user, mk(region, gpus, model), provision_job(&user.id))
                    .await
                    .unwrap_err();
                assert!(
                    matches!(err, StoreError::NoSuchHost(_)),
                    "{region:?} {gpus} {model:?}: {err}"
                );
            }
            assert_eq!(store.host(&gpu.id).await.unwrap().used_gpus, 2);
            assert_eq!(
                store.regions().await.unwrap(),
                vec![("gra".to_string(), 1), ("sbg".to_string(), 1)]
            );
            let _ = plain;
            assert!(store.resum_hosts().await.unwrap().is_empty());
        })
        .await;
    }

    #[tokio::test]
    async fn a_machine_is_registered_once() {
        each_backend(|store| async move {
            let mut a = host("a", HostKind::Docker, 8, 8192);
            a.identity = Some("engine-1".into());
            store.add_host(&a).await.unwrap();
            let mut b = host("b", HostKind::Docker, 8, 8192);
            b.identity = Some("engine-1".into());
            let err = store.add_host(&b).await.unwrap_err();
            assert!(
                matches!(err, StoreError::Conflict(ref m) if m.contains("same host as a")),
                "{err}"
            );
            b.identity = None;
            let b = store.add_host(&b).await.unwrap();
            let err = store.record_identity(&b.id, "engine-1").await.unwrap_err();
            assert!(
                matches!(err, StoreError::Conflict(ref m) if m.contains("host a")),
                "{err}"
            );
            store.record_identity(&b.id, "engine-2").await.unwrap();
            assert_eq!(
                store.host(&b.id).await.unwrap().identity.as_deref(),
                Some("engine-2")
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_host_with_live_environments_cannot_be_removed() {
        each_backend(|store| async move {
            let h = store
                .add_host(&host("busy", HostKind::Docker, 8, 8192))
                .await
                .unwrap();
            let dup = store
                .add_host(&host("busy", HostKind::Docker, 8, 8192))
                .await
                .unwrap_err();
            assert!(matches!(dup, StoreError::Conflict(_)));
            let (user, _) = store
                .create_user("h@example.com", Role::User, Tier::Unlimited)
                .await
                .unwrap();
            let e = store
                .create_environment(&user, sample(false), provision_job(&user.id))
                .await
                .unwrap();
            let err = store.remove_host(&h.id).await.unwrap_err();
            assert!(
                matches!(err, StoreError::Conflict(ref m) if m.contains("1 environments")),
                "{err}"
            );
            let now = store.now();
            let d = store
                .save_transition(
                    &e,
                    e.moved_to(EnvState::Destroying, None, now).unwrap(),
                    "t",
                )
                .await
                .unwrap();
            store
                .save_transition(&d, d.moved_to(EnvState::Destroyed, None, now).unwrap(), "t")
                .await
                .unwrap();
            store.remove_host(&h.id).await.unwrap();
            assert!(matches!(store.host(&h.id).await, Err(StoreError::NotFound)));
        })
        .await;
    }

    #[tokio::test]
    async fn hosts_turn_unhealthy_only_after_the_stated_time() {
        each_backend(|store| async move {
            let h = store
                .add_host(&host("flaky", HostKind::Sim, 8, 8192))
                .await
                .unwrap();
            let failed = vec![(h.id.clone(), "connection refused".to_string())];
            // Seen just now: one failed check is not enough.
            assert!(
                store
                    .record_health(&[], &failed, 15_000)
                    .await
                    .unwrap()
                    .is_empty()
            );
            let now = store.host(&h.id).await.unwrap();
            assert_eq!(
                (now.health, now.health_message.as_deref()),
                (HostHealth::Healthy, Some("connection refused"))
            );
            store
                .exec_sql_for_tests(
                    "UPDATE hosts SET last_seen_at = $1 WHERE id = $2",
                    store.now() - 16_000,
                    &h.id,
                )
                .await
                .unwrap();
            let changed = store.record_health(&[], &failed, 15_000).await.unwrap();
            assert_eq!(changed.len(), 1);
            assert_eq!(changed[0].health, HostHealth::Unhealthy);
            let changed = store
                .record_health(std::slice::from_ref(&h.id), &[], 15_000)
                .await
                .unwrap();
            assert_eq!(
                (changed[0].health, changed[0].health_message.clone()),
                (HostHealth::Healthy, None)
            );
        })
        .await;
    }
}
