//! The simulated provider: hosts of kind `sim` that make no VMs. Their VMs are rows in a
//! ledger (kept by the caller, in Hearth's case in the database, so they outlive a node's
//! death as a real host's VMs do), and their guests answer at once. A host's `options`
//! inject latency and failures, so every failure path of every job and of the reconciler
//! can be exercised without Docker and without waiting:
//!
//! ```json
//! { "latencyMs": 20,                       // every call takes this long
//!   "down": false,                          // every call fails as unreachable
//!   "initExitCode": 0,                      // what init scripts exit with
//!   "faults": {                             // by job step (`provision.create_vm`, ...)
//!     "provision.create_vm": "fail",        // every time
//!     "stop.stop_vm": {"mode": "unavailable", "times": 1},   // the first time only
//!     "provision.init_script": "hang" } }   // never returns (for kill tests)
//! ```
//!
//! What it cannot show: anything about real VMs (boot times, images, SSH, resource
//! limits). `times` is counted per process, so a restarted node injects afresh.

use crate::{HostFacts, HostRef, Provider, ProviderError, VmInfo, VmRef, VmSpec, VmState};
use async_trait::async_trait;
use hearth_core::HostKind;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A VM of a simulated host, as its ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimVm {
    pub vm_id: String,
    pub name: String,
    pub environment_id: String,
    /// `running` or `stopped`.
    pub state: String,
    /// `None` until an init script started; then `exit:<code>`.
    pub init_state: Option<String>,
}

/// Where simulated hosts keep their VMs. Errors are messages (the ledger's own store).
#[async_trait]
pub trait SimLedger: Send + Sync + 'static {
    /// The live VM named `name` on the host, made (running) if there is none.
    async fn ensure(
        &self,
        host_id: &str,
        name: &str,
        installation_id: &str,
        environment_id: &str,
    ) -> Result<SimVm, String>;
    async fn find(&self, host_id: &str, id_or_name: &str) -> Result<Option<SimVm>, String>;
    /// `running`, `stopped` or `destroyed`; false when there is no live VM.
    async fn set_state(&self, vm_id: &str, state: &str) -> Result<bool, String>;
    async fn list(&self, host_id: &str, installation_id: &str) -> Result<Vec<SimVm>, String>;
    /// Starts the init script unless it ever started (the guest's once-only guard).
    async fn run_init(&self, vm_id: &str, exit_code: i64) -> Result<(), String>;
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FaultMode {
    /// The host refuses (`ProviderError::Failed`).
    Fail,
    /// The host cannot be reached (`ProviderError::Unavailable`).
    Unavailable,
    /// The call never returns.
    Hang,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Fault {
    Always(FaultMode),
    Counted { mode: FaultMode, times: u64 },
}

/// A simulated host's `options`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimOptions {
    #[serde(default)]
    pub latency_ms: u64,
    #[serde(default)]
    pub down: bool,
    #[serde(default)]
    pub init_exit_code: i64,
    #[serde(default)]
    pub faults: BTreeMap<String, Fault>,
}

impl SimOptions {
    pub fn parse(options: &serde_json::Value) -> Result<SimOptions, String> {
        if options.is_null() {
            return Ok(SimOptions::default());
        }
        let parsed: SimOptions = serde_json::from_value(options.clone())
            .map_err(|e| format!("options of a sim host are invalid: {e}"))?;
        if parsed.latency_ms > 600_000 {
            return Err("options.latencyMs must be at most 600000".into());
        }
        Ok(parsed)
    }
}

pub struct SimProvider {
    ledger: Arc<dyn SimLedger>,
    /// How many times each counted fault fired, per (host, step).
    fired: Mutex<HashMap<(String, String), u64>>,
    /// Calls now hanging at a `hang` fault (tests wait for it before "killing" a node).
    hanging: tokio::sync::watch::Sender<u64>,
}

fn ledger_error(e: String) -> ProviderError {
    ProviderError::Unavailable(format!("the simulated hosts' ledger failed: {e}"))
}

impl SimProvider {
    pub fn new(ledger: Arc<dyn SimLedger>) -> SimProvider {
        SimProvider {
            ledger,
            fired: Mutex::new(HashMap::new()),
            hanging: tokio::sync::watch::channel(0).0,
        }
    }

    /// Watches how many calls ever reached a `hang` fault in this process.
    pub fn hangs(&self) -> tokio::sync::watch::Receiver<u64> {
        self.hanging.subscribe()
    }

    /// Every call: the host's options, its latency, and its being down.
    async fn enter(&self, host: &HostRef) -> Result<SimOptions, ProviderError> {
        let options = SimOptions::parse(&host.options).map_err(ProviderError::Failed)?;
        if options.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(options.latency_ms)).await;
        }
        if options.down {
            return Err(ProviderError::Unavailable(format!(
                "simulated host {} is down",
                host.name
            )));
        }
        Ok(options)
    }

    async fn live(&self, host: &HostRef, vm: &VmRef) -> Result<Option<SimVm>, ProviderError> {
        self.ledger
            .find(&host.id, vm.key())
            .await
            .map_err(ledger_error)
    }

    fn info(host: &HostRef, vm: SimVm) -> VmInfo {
        let state = match vm.state.as_str() {
            "running" => VmState::Running,
            "stopped" => VmState::Stopped,
            _ => VmState::Other,
        };
        let running = state == VmState::Running;
        VmInfo {
            vm: VmRef {
                name: vm.name,
                id: Some(vm.vm_id),
            },
            environment_id: vm.environment_id,
            state,
            ssh_host: running.then(|| host.guest_address.clone()),
            ssh_port: running.then_some(22),
            ip_address: None,
        }
    }

    /// The guest answers once its VM runs.
    pub async fn probe(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError> {
        self.enter(host).await?;
        match self.live(host, vm).await? {
            Some(v) if v.state == "running" => Ok(()),
            Some(_) => Err(ProviderError::Failed(format!(
                "simulated VM {} is not running",
                vm.name
            ))),
            None => Err(ProviderError::NotFound(vm.name.clone())),
        }
    }

    /// Starts the VM's init script unless it ever started; simulated scripts end at once.
    pub async fn start_init(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError> {
        let options = self.enter(host).await?;
        let live = self
            .live(host, vm)
            .await?
            .ok_or_else(|| ProviderError::NotFound(vm.name.clone()))?;
        self.ledger
            .run_init(&live.vm_id, options.init_exit_code)
            .await
            .map_err(ledger_error)
    }

    /// The init script's exit code once it ended; `None` while it runs or never started.
    pub async fn init_outcome(
        &self,
        host: &HostRef,
        vm: &VmRef,
    ) -> Result<Option<i64>, ProviderError> {
        self.enter(host).await?;
        let live = self
            .live(host, vm)
            .await?
            .ok_or_else(|| ProviderError::NotFound(vm.name.clone()))?;
        Ok(live
            .init_state
            .as_deref()
            .and_then(|s| s.strip_prefix("exit:"))
            .and_then(|c| c.parse().ok()))
    }
}

#[async_trait]
impl Provider for SimProvider {
    fn kind(&self) -> HostKind {
        HostKind::Sim
    }

    async fn check(&self, host: &HostRef) -> Result<HostFacts, ProviderError> {
        self.enter(host).await.map(|_| HostFacts::default())
    }

    async fn ensure_created(&self, host: &HostRef, spec: &VmSpec) -> Result<VmRef, ProviderError> {
        self.enter(host).await?;
        let vm = self
            .ledger
            .ensure(
                &host.id,
                &spec.name,
                &host.installation_id,
                &spec.environment_id,
            )
            .await
            .map_err(ledger_error)?;
        Ok(VmRef {
            name: vm.name,
            id: Some(vm.vm_id),
        })
    }

    async fn start(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError> {
        self.set(host, vm, "running").await
    }

    async fn stop(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError> {
        self.set(host, vm, "stopped").await
    }

    async fn destroy(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError> {
        match self.set(host, vm, "destroyed").await {
            Err(ProviderError::NotFound(_)) => Ok(()),
            other => other,
        }
    }

    async fn inspect(&self, host: &HostRef, vm: &VmRef) -> Result<Option<VmInfo>, ProviderError> {
        self.enter(host).await?;
        Ok(self.live(host, vm).await?.map(|v| Self::info(host, v)))
    }

    async fn list(&self, host: &HostRef) -> Result<Vec<VmInfo>, ProviderError> {
        self.enter(host).await?;
        let vms = self
            .ledger
            .list(&host.id, &host.installation_id)
            .await
            .map_err(ledger_error)?;
        Ok(vms.into_iter().map(|v| Self::info(host, v)).collect())
    }

    async fn fault_point(&self, host: &HostRef, step: &str) -> Result<(), ProviderError> {
        let options = SimOptions::parse(&host.options).map_err(ProviderError::Failed)?;
        let Some(fault) = options.faults.get(step) else {
            return Ok(());
        };
        let (mode, times) = match fault {
            Fault::Always(mode) => (*mode, None),
            Fault::Counted { mode, times } => (*mode, Some(*times)),
        };
        let fired = {
            let mut fired = self.fired.lock().unwrap();
            let n = fired
                .entry((host.id.clone(), step.to_string()))
                .or_insert(0);
            *n += 1;
            *n
        };
        if times.is_some_and(|t| fired > t) {
            return Ok(());
        }
        match mode {
            FaultMode::Fail => Err(ProviderError::Failed(format!(
                "simulated failure at {step} on host {}",
                host.name
            ))),
            FaultMode::Unavailable => Err(ProviderError::Unavailable(format!(
                "simulated host {} unreachable at {step}",
                host.name
            ))),
            FaultMode::Hang => {
                tracing::warn!(host = %host.name, step, "simulated host hangs here until this process dies");
                self.hanging.send_modify(|n| *n += 1);
                std::future::pending().await
            }
        }
    }
}

impl SimProvider {
    async fn set(&self, host: &HostRef, vm: &VmRef, state: &str) -> Result<(), ProviderError> {
        self.enter(host).await?;
        let live = self
            .live(host, vm)
            .await?
            .ok_or_else(|| ProviderError::NotFound(vm.name.clone()))?;
        if self
            .ledger
            .set_state(&live.vm_id, state)
            .await
            .map_err(ledger_error)?
        {
            Ok(())
        } else {
            Err(ProviderError::NotFound(vm.name.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ledger in memory, for this module's own tests.
    #[derive(Default)]
    struct Memory(Mutex<Vec<(String, String, SimVm)>>);

    #[async_trait]
    impl SimLedger for Memory {
        async fn ensure(
            &self,
            host_id: &str,
            name: &str,
            _inst: &str,
            env: &str,
        ) -> Result<SimVm, String> {
            let mut all = self.0.lock().unwrap();
            if let Some((_, _, v)) = all
                .iter()
                .find(|(h, _, v)| h == host_id && v.name == name && v.state != "destroyed")
            {
                return Ok(v.clone());
            }
            let vm = SimVm {
                vm_id: format!("vm{}", all.len()),
                name: name.into(),
                environment_id: env.into(),
                state: "running".into(),
                init_state: None,
            };
            all.push((host_id.into(), "i".into(), vm.clone()));
            Ok(vm)
        }
        async fn find(&self, host_id: &str, key: &str) -> Result<Option<SimVm>, String> {
            let all = self.0.lock().unwrap();
            Ok(all
                .iter()
                .find(|(h, _, v)| {
                    h == host_id && (v.vm_id == key || v.name == key) && v.state != "destroyed"
                })
                .map(|t| t.2.clone()))
        }
        async fn set_state(&self, vm_id: &str, state: &str) -> Result<bool, String> {
            let mut all = self.0.lock().unwrap();
            match all
                .iter_mut()
                .find(|(_, _, v)| v.vm_id == vm_id && v.state != "destroyed")
            {
                Some((_, _, v)) => {
                    v.state = state.into();
                    Ok(true)
                }
                None => Ok(false),
            }
        }
        async fn list(&self, host_id: &str, _inst: &str) -> Result<Vec<SimVm>, String> {
            Ok(self
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|(h, _, v)| h == host_id && v.state != "destroyed")
                .map(|t| t.2.clone())
                .collect())
        }
        async fn run_init(&self, vm_id: &str, code: i64) -> Result<(), String> {
            let mut all = self.0.lock().unwrap();
            if let Some((_, _, v)) = all
                .iter_mut()
                .find(|(_, _, v)| v.vm_id == vm_id && v.init_state.is_none())
            {
                v.init_state = Some(format!("exit:{code}"));
            }
            Ok(())
        }
    }

    fn host(options: serde_json::Value) -> HostRef {
        HostRef {
            agent: None,
            ovh: None,
            region: None,
            id: "h1".into(),
            name: "sim-1".into(),
            kind: HostKind::Sim,
            endpoint: "sim://sim-1".into(),
            guest_address: "10.0.0.1".into(),
            tls: None,
            options,
            installation_id: "inst".into(),
        }
    }

    fn spec() -> VmSpec {
        VmSpec {
            environment_id: "e1".into(),
            name: crate::vm_name("e1"),
            hostname: "env-x".into(),
            image: "any".into(),
            vcpus: 1,
            memory_mb: 256,
            disk_gb: 1,
            gpus: 0,
            env: BTreeMap::new(),
            authorized_key: String::new(),
            labels: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn vms_live_in_the_ledger_and_creates_are_idempotent() {
        let sim = SimProvider::new(Arc::new(Memory::default()));
        let h = host(serde_json::json!({}));
        let a = sim.ensure_created(&h, &spec()).await.unwrap();
        let b = sim.ensure_created(&h, &spec()).await.unwrap();
        assert_eq!(a, b);
        let info = sim.inspect(&h, &VmRef::named("e1")).await.unwrap().unwrap();
        assert_eq!(
            (info.state, info.ssh_host.as_deref()),
            (VmState::Running, Some("10.0.0.1"))
        );
        sim.stop(&h, &a).await.unwrap();
        assert_eq!(
            sim.inspect(&h, &a).await.unwrap().unwrap().state,
            VmState::Stopped
        );
        sim.start_init(&h, &a).await.unwrap();
        sim.start_init(&h, &a).await.unwrap();
        assert_eq!(sim.init_outcome(&h, &a).await.unwrap(), Some(0));
        sim.destroy(&h, &a).await.unwrap();
        sim.destroy(&h, &a).await.unwrap();
        assert!(sim.inspect(&h, &a).await.unwrap().is_none());
        assert!(matches!(
            sim.start(&h, &a).await,
            Err(ProviderError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn faults_fire_as_configured() {
        let sim = SimProvider::new(Arc::new(Memory::default()));
        let h = host(
            serde_json::json!({"faults": {"provision.create_vm": "fail", "stop.stop_vm": {"mode": "unavailable", "times": 1}}}),
        );
        assert!(matches!(
            sim.fault_point(&h, "provision.create_vm").await,
            Err(ProviderError::Failed(_))
        ));
        assert!(matches!(
            sim.fault_point(&h, "provision.create_vm").await,
            Err(ProviderError::Failed(_))
        ));
        assert!(matches!(
            sim.fault_point(&h, "stop.stop_vm").await,
            Err(ProviderError::Unavailable(_))
        ));
        sim.fault_point(&h, "stop.stop_vm").await.unwrap();
        sim.fault_point(&h, "destroy.destroy_vm").await.unwrap();
        let down = host(serde_json::json!({"down": true}));
        assert!(matches!(
            sim.check(&down).await,
            Err(ProviderError::Unavailable(_))
        ));
        assert!(SimOptions::parse(&serde_json::json!({"latencyMs": 1, "bogus": 1})).is_err());
        assert!(SimOptions::parse(&serde_json::json!({"faults": {"x": "explode"}})).is_err());
    }
}
