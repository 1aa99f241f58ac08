//! The ledger of simulated hosts: the VMs a `sim` host "runs", kept in the database so
//! they outlive a node's death like a real host's VMs do. Only the simulated provider
//! reads and writes it.

use crate::{Result, Store, StoreError};
use sqlx::Row;
use sqlx::any::AnyRow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimVmRow {
    pub vm_id: String,
    pub host_id: String,
    /// The deterministic name the control plane gave it.
    pub name: String,
    pub installation_id: String,
    pub environment_id: String,
    /// `running`, `stopped` or `destroyed`.
    pub state: String,
    /// `None` until an init script starts; then `exit:<code>`.
    pub init_state: Option<String>,
    pub init_runs: i64,
    pub created_at: i64,
}

const SELECT: &str = "SELECT vm_id, host_id, name, installation_id, environment_id, state, init_state, init_runs, created_at FROM sim_vms";

fn from_row(r: &AnyRow) -> Result<SimVmRow> {
    Ok(SimVmRow {
        vm_id: r.try_get("vm_id")?,
        host_id: r.try_get("host_id")?,
        name: r.try_get("name")?,
        installation_id: r.try_get("installation_id")?,
        environment_id: r.try_get("environment_id")?,
        state: r.try_get("state")?,
        init_state: r.try_get("init_state")?,
        init_runs: r.try_get("init_runs")?,
        created_at: r.try_get("created_at")?,
    })
}

impl Store {
    /// The live VM named `name` on the host, made (running) if there is none.
    pub async fn sim_ensure(
        &self,
        host_id: &str,
        name: &str,
        installation_id: &str,
        environment_id: &str,
    ) -> Result<SimVmRow> {
        let mut tx = self.begin().await?;
        let sql = format!("{SELECT} WHERE host_id = $1 AND name = $2 AND state <> 'destroyed'");
        if let Some(r) = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(host_id)
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
        {
            return from_row(&r);
        }
        let row = SimVmRow {
            vm_id: format!("sim-{}", uuid::Uuid::new_v4().simple()),
            host_id: host_id.into(),
            name: name.into(),
            installation_id: installation_id.into(),
            environment_id: environment_id.into(),
            state: "running".into(),
            init_state: None,
            init_runs: 0,
            created_at: self.now(),
        };
        sqlx::query(
            "INSERT INTO sim_vms (vm_id, host_id, name, installation_id, environment_id, state, init_runs, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 0, $7)",
        )
        .bind(&row.vm_id)
        .bind(&row.host_id)
        .bind(&row.name)
        .bind(&row.installation_id)
        .bind(&row.environment_id)
        .bind(&row.state)
        .bind(row.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row)
    }

    /// The live VM with this id or name on the host.
    pub async fn sim_vm(&self, host_id: &str, id_or_name: &str) -> Result<Option<SimVmRow>> {
        let sql = format!(
            "{SELECT} WHERE host_id = $1 AND (vm_id = $2 OR name = $2) AND state <> 'destroyed'"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(host_id)
            .bind(id_or_name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Moves a live VM to `state`; `NotFound` when there is none.
    pub async fn sim_set_state(&self, vm_id: &str, state: &str) -> Result<()> {
        let done =
            sqlx::query("UPDATE sim_vms SET state = $1 WHERE vm_id = $2 AND state <> 'destroyed'")
                .bind(state)
                .bind(vm_id)
                .execute(&self.pool)
                .await?;
        if done.rows_affected() == 0 {
            Err(StoreError::NotFound)
        } else {
            Ok(())
        }
    }

    /// The host's live VMs of one installation.
    pub async fn sim_list(&self, host_id: &str, installation_id: &str) -> Result<Vec<SimVmRow>> {
        let sql = format!(
            "{SELECT} WHERE host_id = $1 AND installation_id = $2 AND state <> 'destroyed'"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(host_id)
            .bind(installation_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// Runs the VM's init script if it never started (the guest's own once-only guard);
    /// it finishes at once with `exit_code`.
    pub async fn sim_run_init(&self, vm_id: &str, exit_code: i64) -> Result<()> {
        sqlx::query(
            "UPDATE sim_vms SET init_state = $1, init_runs = init_runs + 1 WHERE vm_id = $2 AND init_state IS NULL",
        )
        .bind(format!("exit:{exit_code}"))
        .bind(vm_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every VM ever made for an environment, destroyed ones included (tests count them).
    pub async fn sim_vms_of(&self, environment_id: &str) -> Result<Vec<SimVmRow>> {
        let sql = format!("{SELECT} WHERE environment_id = $1 ORDER BY created_at, vm_id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(environment_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(from_row).collect()
    }
}
