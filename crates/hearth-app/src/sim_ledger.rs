//! The simulated hosts' ledger, kept in the database so simulated VMs outlive a node.

use async_trait::async_trait;
use hearth_provider::sim::{SimLedger, SimVm};
use hearth_store::{SimVmRow, Store, StoreError};

pub(crate) struct StoreLedger(pub Store);

fn vm(row: SimVmRow) -> SimVm {
    SimVm {
        vm_id: row.vm_id,
        name: row.name,
        environment_id: row.environment_id,
        state: row.state,
        init_state: row.init_state,
    }
}

#[async_trait]
impl SimLedger for StoreLedger {
    async fn ensure(
        &self,
        host_id: &str,
        name: &str,
        installation_id: &str,
        environment_id: &str,
    ) -> Result<SimVm, String> {
        self.0
            .sim_ensure(host_id, name, installation_id, environment_id)
            .await
            .map(vm)
            .map_err(|e| e.to_string())
    }

    async fn find(&self, host_id: &str, id_or_name: &str) -> Result<Option<SimVm>, String> {
        self.0
            .sim_vm(host_id, id_or_name)
            .await
            .map(|r| r.map(vm))
            .map_err(|e| e.to_string())
    }

    async fn set_state(&self, vm_id: &str, state: &str) -> Result<bool, String> {
        match self.0.sim_set_state(vm_id, state).await {
            Ok(()) => Ok(true),
            Err(StoreError::NotFound) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn list(&self, host_id: &str, installation_id: &str) -> Result<Vec<SimVm>, String> {
        self.0
            .sim_list(host_id, installation_id)
            .await
            .map(|rows| rows.into_iter().map(vm).collect())
            .map_err(|e| e.to_string())
    }

    async fn run_init(&self, vm_id: &str, exit_code: i64) -> Result<(), String> {
        self.0
            .sim_run_init(vm_id, exit_code)
            .await
            .map_err(|e| e.to_string())
    }
}
