//! The job handler and the steps of each saga (see `saga` for how they are run).
//!
//! Every step is safe to run again: the provider finds a VM by its saved reference or its
//! deterministic name, state writes are conditional on state and generation, and a step
//! that finds its work already done moves on without doing it twice.

use crate::App;
use crate::guest::{CloneRequest, Guest, InitStatus};
use crate::saga::{Address, Next, OnHost, Plan, Run, Step, StepError};
use async_trait::async_trait;
use hearth_core::EnvState;
use hearth_provider::{HostRef, VmRef, VmSpec, VmState};
use hearth_queue::{Handler, JobError, Lease};
use hearth_store::{Environment, Job, StoreError};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Replaces the guest user's authorized keys with standard input, whole or not at all: a
/// copy cut short (the node died mid-send, which `cat` sees as an ordinary end of input)
/// must match the SHA-256 that `@SHA256@` is replaced with (our own hex digits) first.
/// `ssh-keygen -l` proves every line a key sshd can read before it replaces the old file.
const ADOPT_KEYS: &str = "umask 077 && mkdir -p \"$HOME/.ssh\" && cat > \"$HOME/.ssh/authorized_keys.new\" \
     && printf '%s  %s\\n' @SHA256@ \"$HOME/.ssh/authorized_keys.new\" | sha256sum -c --status \
     && ssh-keygen -lf \"$HOME/.ssh/authorized_keys.new\" > /dev/null \
     && mv -f \"$HOME/.ssh/authorized_keys.new\" \"$HOME/.ssh/authorized_keys\" \
     && sync \"$HOME/.ssh/authorized_keys\" \"$HOME/.ssh\"";

/// How long a stop waits for an agent host's guest to write its data to its disk.
const STOP_SYNC_LIMIT: Duration = Duration::from_secs(30);

/// The user name sent with an HTTPS token when its credential names none (what GitHub
/// expects; GitLab and Gitea take any).
const DEFAULT_TOKEN_USER: &str = "x-access-token";

/// How long an init script may run before provisioning gives up on it.
pub const INIT_SCRIPT_LIMIT: Duration = Duration::from_secs(1800);
/// How often a job looks in on a running init script (the worker is free in between).
pub const INIT_SCRIPT_POLL: Duration = Duration::from_secs(2);

pub struct JobHandler {
    pub app: App,
}

#[async_trait]
impl Handler for JobHandler {
    async fn run(&self, job: &Job, lease: &Lease) -> Result<(), JobError> {
        if job.queue == crate::mail::MAIL_QUEUE {
            return crate::mail::run_job(&self.app, job, lease).await;
        }
        let env = match self.app.store.environment(&job.environment_id).await {
            Ok(env) => env,
            Err(StoreError::NotFound) => {
                return Err(JobError::Fatal("the environment does not exist".into()));
            }
            Err(e) => return Err(JobError::Retry(e.to_string())),
        };
        let outcome = Run::new(&self.app, job, lease, &env)?.execute().await;
        // Each run writes a handful of log lines: trim here, so the log stays bounded.
        if let Err(e) = self.app.store.trim_log(&env.id).await {
            tracing::warn!(environment = %env.id, error = %e, "could not trim the provisioning log");
        }
        outcome
    }
}

impl App {
    /// A provisioning log line: stored, pushed to the bus, and announced to live streams.
    pub async fn log(&self, env: &Environment, level: &str, message: &str) {
        tracing::info!(environment = %env.id, level, "{message}");
        if let Err(e) = self.store.append_log(&env.id, level, message).await {
            tracing::warn!(environment = %env.id, error = %e, "could not write a provisioning log line");
        }
        let entry = serde_json::json!({ "timestamp": crate::events::time(self.now()), "level": level, "message": message });
        self.bus.push_log(&env.id, entry);
        self.notify_changed(&env.id);
    }

    /// What the provider is asked to create for `env`.
    fn spec(&self, env: &Environment) -> VmSpec {
        let mut labels = BTreeMap::new();
        if let Some(name) = &self.config.instance_name {
            labels.insert("hearth.instance".to_string(), name.clone());
        }
        VmSpec {
            environment_id: env.id.clone(),
            name: hearth_provider::vm_name(&env.id),
            hostname: env.slug.replace('_', "-"),
            image: env.base_image.clone(),
            vcpus: env.vcpus,
            memory_mb: env.memory_mb,
            disk_gb: env.disk_gb,
            gpus: env.gpus,
            env: env.environment_vars.clone(),
            authorized_key: env.ssh_public_key.clone(),
            labels,
        }
    }

    /// The way into `env`'s guest at `at`.
    fn guest(
        &self,
        host: &HostRef,
        env: &Environment,
        vm: &VmRef,
        at: &Address,
    ) -> Result<Guest, StepError> {
        if host.kind == hearth_core::HostKind::Sim {
            return Ok(Guest::Sim {
                sim: self.sim.clone(),
                host: Box::new(host.clone()),
                vm: vm.clone(),
            });
        }
        let mut located = env.clone();
        located.ssh_host = Some(at.ssh_host.clone());
        located.ssh_port = Some(at.ssh_port);
        let target = self
            .target(&located)
            .map_err(|e| StepError::Final(e.to_string()))?;
        Ok(Guest::Ssh {
            pool: self.ssh.clone(),
            target,
        })
    }
}

/// The environment's VM: the saved reference, else the id on the row, else its name.
fn vm_of(run: &Run<'_>, env: &Environment) -> VmRef {
    if let Some(vm) = &run.progress.vm {
        return vm.clone();
    }
    VmRef {
        name: hearth_provider::vm_name(&env.id),
        id: env.vm_id.clone(),
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

impl Run<'_> {
    /// Moves the environment on, conditional on its state and generation.
    async fn move_to(
        &self,
        env: &Environment,
        to: EnvState,
        message: Option<String>,
    ) -> Result<Environment, StepError> {
        let next = env
            .moved_to(to, message, self.app.now())
            .map_err(|e| StepError::Final(e.to_string()))?;
        let saved = self
            .app
            .store
            .save_transition(env, next, self.actor())
            .await?;
        self.remember(&saved);
        self.app.notify_changed(&saved.id);
        Ok(saved)
    }

    fn need_host(on: Option<OnHost>) -> Result<OnHost, StepError> {
        on.ok_or_else(|| StepError::Final("the environment has no host".into()))
    }

    pub(crate) async fn step(&mut self, step: Step, env: Environment) -> Result<Next, StepError> {
        match step {
            Step::Begin => self.begin(env).await,
            Step::CreateVm => self.create_vm(env).await,
            Step::WaitRunning => self.wait_running(env).await,
            Step::Adopt => self.adopt(env).await,
            Step::WaitSsh => self.wait_ssh(env).await,
            Step::CloneRepository => self.clone_repository(env).await,
            Step::InitScript => self.init_script(env).await,
            Step::StartVm => self.start_vm(env).await,
            Step::StopVm => {
                let on = Self::need_host(self.on_host(&env).await?)?;
                if on.host.kind == hearth_core::HostKind::Agent && env.ssh_port.is_some() {
                    // An agent's stop is a power-off (its guests have no init to shut down
                    // cleanly); the guest writes back what it wrote in the last 30 s first.
                    // Docker's stop leaves nothing in a guest's memory; a cloud's is a
                    // clean shutdown.
                    self.app
                        .log(
                            &env,
                            "info",
                            "writing the guest's data to its disk before the power-off",
                        )
                        .await;
                    if let Err(e) = self.app.sync_guest(&env, STOP_SYNC_LIMIT).await {
                        self.app
                            .log(
                                &env,
                                "warn",
                                &format!("{e}; powering off anyway: what the guest wrote in its last 30 s may not be on its disk"),
                            )
                            .await;
                    }
                }
                self.app.ssh.forget(&env.id).await;
                match on.provider.stop(&on.host_ref, &vm_of(self, &env)).await {
                    Ok(()) | Err(hearth_provider::ProviderError::NotFound(_)) => Ok(Next::Continue),
                    Err(e) => Err(e.into()),
                }
            }
            Step::DestroyVm => {
                self.app.ssh.forget(&env.id).await;
                if let Some(on) = self.on_host(&env).await? {
                    on.provider
                        .destroy(&on.host_ref, &vm_of(self, &env))
                        .await?;
                }
                // A warm VM claimed but never taken over (a destroy overtook it).
                self.app.store.finish_claim(&env.id).await?;
                Ok(Next::Continue)
            }
            Step::Finish => self.finish(env).await,
        }
    }

    async fn begin(&mut self, env: Environment) -> Result<Next, StepError> {
        use EnvState::*;
        let worker = format!(
            "worker {} (attempt {})",
            self.app.queue.owner(),
            self.job.attempts
        );
        match (self.plan, env.state) {
            (Plan::Provision, Requested | Error) => {
                let env = self
                    .move_to(&env, Provisioning, Some("provisioning".into()))
                    .await?;
                self.log_host(&env, &worker).await;
                Ok(Next::Continue)
            }
            (Plan::Start, Stopped | Error) => {
                let env = self
                    .move_to(&env, Starting, Some("starting".into()))
                    .await?;
                self.app
                    .log(&env, "info", &format!("starting the VM ({worker})"))
                    .await;
                Ok(Next::Continue)
            }
            (Plan::Stop, Running) => {
                self.move_to(&env, Stopping, Some("stopping".into()))
                    .await?;
                Ok(Next::Continue)
            }
            (Plan::Destroy, Destroyed) => Ok(Next::Done),
            (Plan::Destroy, Destroying) => Ok(Next::Continue),
            (Plan::Destroy, _) => {
                self.move_to(&env, Destroying, Some("destroying".into()))
                    .await?;
                Ok(Next::Continue)
            }
            // Resumed after a crash that came before this step was recorded.
            (Plan::Provision, Provisioning) | (Plan::Start, Starting) | (Plan::Stop, Stopping) => {
                self.app
                    .log(&env, "info", &format!("resumed by {worker}"))
                    .await;
                Ok(Next::Continue)
            }
            // Done already, or overtaken by a destroy: nothing left to do.
            (Plan::Provision | Plan::Start, Running) | (_, Destroying | Destroyed) => {
                Ok(Next::Done)
            }
            (Plan::Stop, _) => Ok(Next::Done),
            (plan, state) => Err(StepError::Retryable(format!(
                "cannot {} an environment that is {state}; waiting for it to settle",
                plan.name()
            ))),
        }
    }

    async fn log_host(&self, env: &Environment, worker: &str) {
        let placed = match self.on_host(env).await {
            Ok(Some(on)) => format!(
                "placed on host {} ({} of {} vCPUs in use{})",
                on.host.name,
                on.host.used_vcpus,
                on.host.capacity.max_vcpus,
                on.host
                    .region
                    .as_deref()
                    .map(|r| format!(", region {r}"))
                    .unwrap_or_default()
            ),
            _ => "not placed on any host".to_string(),
        };
        self.app
            .log(env, "info", &format!("picked up by {worker}; {placed}"))
            .await;
    }

    async fn create_vm(&mut self, env: Environment) -> Result<Next, StepError> {
        if env.vm_id.is_some() && self.app.store.claimed_pooled(&env.id).await?.is_some() {
            // A warm VM: started in case its engine restarted since it was filled (running
            // already is fine); gone, and the next attempt makes one.
            let vm = vm_of(self, &env);
            let on = Self::need_host(self.on_host(&env).await?)?;
            match on.provider.start(&on.host_ref, &vm).await {
                Ok(()) => {}
                Err(hearth_provider::ProviderError::NotFound(_)) => {
                    return Err(self.vanished(&env).await);
                }
                Err(e) => return Err(e.into()),
            }
            self.progress.vm = Some(vm);
            return Ok(Next::Continue);
        }
        let on = Self::need_host(self.on_host(&env).await?)?;
        self.app
            .log(
                &env,
                "info",
                &match on.host.kind {
                    // Other kinds boot their own image (an agent's VM image, a cloud's).
                    hearth_core::HostKind::Docker => format!(
                        "creating a VM on host {} from {} with {} vCPUs and {} MB of memory",
                        on.host.name, env.base_image, env.vcpus, env.memory_mb
                    ),
                    kind => format!(
                        "creating a VM on host {} ({kind}) with {} vCPUs, {} MB of memory and {} GB of disk",
                        on.host.name, env.vcpus, env.memory_mb, env.disk_gb
                    ),
                },
            )
            .await;
        let vm = on
            .provider
            .ensure_created(&on.host_ref, &self.app.spec(&env))
            .await?;
        self.progress.vm = Some(vm.clone());
        // Known from the moment it exists, not only once it runs.
        let mut next = env.clone();
        next.vm_id = vm.id.clone();
        let saved = self.app.store.save_vm(&next).await?;
        self.remember(&saved);
        Ok(Next::Continue)
    }

    /// Until the provider reports the VM running with an SSH address (cloud providers
    /// answer a create long before that).
    async fn wait_running(&mut self, env: Environment) -> Result<Next, StepError> {
        let on = Self::need_host(self.on_host(&env).await?)?;
        let vm = vm_of(self, &env);
        let budget = self.app.config.ssh_wait;
        let started = Instant::now();
        let mut last_look = Instant::now();
        loop {
            if last_look.elapsed() > Duration::from_secs(2) {
                last_look = Instant::now();
                if self.overtaken(&env).await.unwrap_or(false) {
                    return Ok(Next::Done);
                }
            }
            match on.provider.inspect(&on.host_ref, &vm).await? {
                Some(info) if info.state == VmState::Running => {
                    if let (Some(host), Some(port)) = (info.ssh_host, info.ssh_port) {
                        self.progress.vm = Some(info.vm);
                        self.progress.address = Some(Address {
                            ssh_host: host,
                            ssh_port: port,
                            ip_address: info.ip_address,
                            host_key: None,
                        });
                        return Ok(Next::Continue);
                    }
                }
                Some(_) => {}
                None => return Err(self.vanished(&env).await),
            }
            if started.elapsed() > budget {
                return Err(StepError::Retryable(format!(
                    "the VM did not report running within {} s",
                    budget.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The VM is gone. While provisioning, the next attempt makes another; a start cannot
    /// bring it back, so the environment forgets it and the next start provisions anew.
    async fn vanished(&self, env: &Environment) -> StepError {
        let msg = format!(
            "the VM {} no longer exists",
            hearth_provider::vm_name(&env.id)
        );
        if self.plan == Plan::Provision {
            // A warm VM that vanished is not waited for again: the next attempt makes one.
            if let Err(e) = self.app.store.finish_claim(&env.id).await {
                return StepError::Retryable(e.to_string());
            }
            return StepError::Vanished(msg);
        }
        let mut forgotten = env.clone();
        forgotten.vm_id = None;
        forgotten.ssh_port = None;
        match self.app.store.save_vm(&forgotten).await {
            Ok(saved) => self.remember(&saved),
            Err(e) => return StepError::Retryable(e.to_string()),
        }
        StepError::Final(format!("{msg}; start it again to provision a new one"))
    }

    /// A VM claimed from a warm pool: its pool key makes way for the environment's keys
    /// (written whole, then renamed into place; the command is fixed, the keys travel on
    /// standard input). Its host key, learnt when it was filled, is pinned from here on.
    /// Run again after it acted, the pool key is refused: the work is done, and `wait_ssh`
    /// proves it with the environment's key.
    async fn adopt(&mut self, env: Environment) -> Result<Next, StepError> {
        let Some(pooled) = self.app.store.claimed_pooled(&env.id).await? else {
            return Ok(Next::Continue);
        };
        let on = Self::need_host(self.on_host(&env).await?)?;
        let Some(at) = self.progress.address.clone() else {
            return Err(StepError::Vanished(
                "the VM's address was not recorded".into(),
            ));
        };
        self.app
            .log(
                &env,
                "info",
                &format!(
                    "took a warm VM from the pool of host {}; giving it the environment's keys",
                    on.host.name
                ),
            )
            .await;
        if on.host.kind != hearth_core::HostKind::Sim {
            let target = crate::pools::pool_target(
                self.app,
                &pooled,
                &at.ssh_host,
                at.ssh_port,
                pooled.ssh_host_key.clone(),
            )
            .map_err(|e| StepError::Final(e.to_string()))?;
            let keys = format!("{}\n", env.ssh_public_key.trim_end()).into_bytes();
            let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&keys));
            let request = hearth_guest::ExecRequest {
                code: ADOPT_KEYS.replace("@SHA256@", &digest),
                code_on_stdin: false,
                working_dir: None,
                env: BTreeMap::new(),
                stdin: keys,
                timeout: Duration::from_secs(30),
                max_output: 4096,
            };
            // On the connection the filler kept, when this node filled it: no new login.
            let outcome = self.app.ssh.exec(&target, &request).await;
            match outcome {
                Ok(out) if out.exit_code == Some(0) => {
                    // That connection is the environment's now, and its first command runs
                    // on it; the keys file was checked line by line before it went in.
                    self.app.ssh.forget(&env.id).await;
                    self.progress.adopted =
                        self.app.ssh.rename(&target.environment_id, &env.id).await;
                }
                Ok(out) => {
                    return Err(StepError::Retryable(format!(
                        "could not give the warm VM the environment's keys (exit {:?}): {}",
                        out.exit_code,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                Err(hearth_guest::GuestError::Auth(_)) => {
                    self.app.ssh.forget(&target.environment_id).await;
                }
                Err(e @ hearth_guest::GuestError::HostKey(..)) => {
                    return Err(StepError::Final(e.to_string()));
                }
                Err(e) => return Err(StepError::Retryable(e.to_string())),
            }
        }
        if let Some(a) = self.progress.address.as_mut() {
            a.host_key = pooled.ssh_host_key.clone();
        }
        self.app.store.finish_claim(&env.id).await?;
        self.app.pools_wake.notify_one();
        Ok(Next::Continue)
    }

    /// Until the guest accepts Hearth's key, noticing if the VM disappears meanwhile.
    async fn wait_ssh(&mut self, env: Environment) -> Result<Next, StepError> {
        if self.progress.adopted {
            // A warm VM whose keys this run swapped on a live connection, kept as the
            // environment's: SSH answers, with the host key pinned when it was filled.
            return Ok(Next::Continue);
        }
        let on = Self::need_host(self.on_host(&env).await?)?;
        let vm = vm_of(self, &env);
        let Some(at) = self.progress.address.clone() else {
            return Err(StepError::Vanished(
                "the VM's address was not recorded".into(),
            ));
        };
        self.app
            .log(
                &env,
                "info",
                &format!(
                    "VM {} is up; SSH on {}:{}; waiting for SSH to answer",
                    short(vm.key()),
                    at.ssh_host,
                    at.ssh_port
                ),
            )
            .await;
        // A new VM's host key is learnt at this first contact; a VM that was made before
        // must offer the key recorded then.
        // (A warm VM's key was learnt when it was filled, and `adopt` recorded it.)
        let mut known = env.clone();
        if self.plan == Plan::Provision {
            known.ssh_host_key = at.host_key.clone();
        }
        let guest = self.app.guest(&on.host_ref, &known, &vm, &at)?;
        let budget = self.app.config.ssh_wait;
        let started = Instant::now();
        let mut last_look = Instant::now();
        loop {
            // A guest whose sshd is up sends its banner at once; a try that waits longer
            // was most likely made before the guest's network came up, and would hang until
            // its timeout while sshd starts. After 20 s (a slow or very busy guest) tries
            // wait the full 5 s.
            let banner_wait = if started.elapsed() < Duration::from_secs(20) {
                Duration::from_millis(750)
            } else {
                Duration::from_secs(5)
            };
            let error = match guest.probe(banner_wait).await {
                Ok(host_key) => {
                    if let Some(a) = self.progress.address.as_mut() {
                        a.host_key = host_key;
                    }
                    return Ok(Next::Continue);
                }
                Err((true, refused)) => return Err(StepError::Final(refused)),
                Err((false, e)) => e,
            };
            if last_look.elapsed() > Duration::from_secs(2) {
                last_look = Instant::now();
                if self.overtaken(&env).await.unwrap_or(false) {
                    return Ok(Next::Done);
                }
                match on.provider.inspect(&on.host_ref, &vm).await? {
                    None => return Err(self.vanished(&env).await),
                    Some(info) if info.ssh_port != Some(at.ssh_port) => {
                        return Err(StepError::Retryable(
                            "the VM's SSH address changed while waiting".into(),
                        ));
                    }
                    Some(_) => {}
                }
            }
            if started.elapsed() > budget {
                return Err(StepError::Retryable(format!(
                    "SSH did not answer within {} s: {error}",
                    budget.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clones the environment's repository into the guest, with its owner's stored
    /// credential when one was named. The secret is opened here, sent on the clone's
    /// standard input, and never logged.
    async fn clone_repository(&mut self, env: Environment) -> Result<Next, StepError> {
        let Some(url) = env.repository_url.clone() else {
            return Ok(Next::Continue);
        };
        let (_, dir) = hearth_core::validate::repository_url(&url).map_err(StepError::Final)?;
        // A credential deleted since the create: the clone may have been made before a
        // crash; without the credential, only a clone already in place can succeed.
        let mut credential_deleted = false;
        let credential = match &env.git_credential_id {
            None => None,
            Some(id) => match self.app.store.git_credential(id).await {
                Err(StoreError::NotFound) => {
                    credential_deleted = true;
                    None
                }
                Err(e) => return Err(StepError::Retryable(e.to_string())),
                Ok(stored) => {
                    let secret = self.app.master_key.open(&stored.secret_enc).map_err(|e| {
                        StepError::Final(format!(
                            "the git credential {:?} cannot be opened with this master key: {e}",
                            stored.name
                        ))
                    })?;
                    let user = stored
                        .username
                        .unwrap_or_else(|| DEFAULT_TOKEN_USER.to_string());
                    Some((stored.kind, user, secret))
                }
            },
        };
        let on = Self::need_host(self.on_host(&env).await?)?;
        let vm = vm_of(self, &env);
        let Some(at) = self.progress.address.clone() else {
            return Err(StepError::Vanished(
                "the VM's address was not recorded".into(),
            ));
        };
        let guest = self.app.guest(&on.host_ref, &env, &vm, &at)?;
        let request = CloneRequest {
            host: hearth_core::validate::repository_host(&url),
            url: url.clone(),
            git_ref: env.repository_ref.clone(),
            dir: dir.clone(),
            credential,
        };
        let branch = env
            .repository_ref
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        self.app
            .log(&env, "info", &format!("cloning {url}{branch} into ~/{dir}"))
            .await;
        let started = Instant::now();
        match guest.clone_repository(&request).await {
            Ok(()) => {
                self.app
                    .log(
                        &env,
                        "info",
                        &format!(
                            "cloned into ~/{dir} in {:.1} s",
                            started.elapsed().as_secs_f64()
                        ),
                    )
                    .await;
                Ok(Next::Continue)
            }
            Err((true, e)) => Err(StepError::Retryable(e)),
            Err((false, _)) if credential_deleted => {
                let e = "the git credential named at creation was deleted before the clone; create the environment again".to_string();
                self.app.log(&env, "error", &e).await;
                Err(StepError::Final(e))
            }
            Err((false, e)) => {
                self.app.log(&env, "error", &e).await;
                Err(StepError::Final(e))
            }
        }
    }

    /// Starts the init script once (the guest keeps it running and records its end), then
    /// looks in on it every few seconds without holding a worker in between.
    async fn init_script(&mut self, env: Environment) -> Result<Next, StepError> {
        let Some(script) = env.init_script.clone() else {
            return Ok(Next::Continue);
        };
        let on = Self::need_host(self.on_host(&env).await?)?;
        let vm = vm_of(self, &env);
        let Some(at) = self.progress.address.clone() else {
            return Err(StepError::Vanished(
                "the VM's address was not recorded".into(),
            ));
        };
        let guest = self.app.guest(&on.host_ref, &env, &vm, &at)?;
        let now = self.app.now();
        let started_at = match self.progress.init_started_at {
            Some(t) => t,
            None => {
                self.app.log(&env, "info", "running the init script").await;
                self.progress.init_started_at = Some(now);
                self.save()
                    .await
                    .map_err(|e| StepError::Retryable(e.to_string()))?;
                now
            }
        };
        guest
            .start_init(&script, &env.environment_vars)
            .await
            .map_err(StepError::Retryable)?;
        let looked = Instant::now();
        loop {
            match guest.init_status().await.map_err(StepError::Retryable)? {
                InitStatus::Exited {
                    code: 0,
                    output_tail,
                } => {
                    self.app
                        .log(
                            &env,
                            "info",
                            &format!("init script finished: {}", tail(&output_tail)),
                        )
                        .await;
                    return Ok(Next::Continue);
                }
                InitStatus::Exited { code, output_tail } => {
                    return Err(StepError::Final(format!(
                        "the init script exited with {code}: {}",
                        tail(&output_tail)
                    )));
                }
                InitStatus::Lost => {
                    return Err(StepError::Final(
                        "the init script stopped without an exit code (did the VM restart?)".into(),
                    ));
                }
                InitStatus::Running if now - started_at > INIT_SCRIPT_LIMIT.as_millis() as i64 => {
                    return Err(StepError::Final(format!(
                        "the init script did not finish within {} s",
                        INIT_SCRIPT_LIMIT.as_secs()
                    )));
                }
                InitStatus::Running if looked.elapsed() < Duration::from_secs(1) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                InitStatus::Running => {
                    return Ok(Next::Wait(
                        "the init script is running".into(),
                        INIT_SCRIPT_POLL,
                    ));
                }
            }
        }
    }

    async fn start_vm(&mut self, env: Environment) -> Result<Next, StepError> {
        let on = Self::need_host(self.on_host(&env).await?)?;
        match on.provider.start(&on.host_ref, &vm_of(self, &env)).await {
            Ok(()) => Ok(Next::Continue),
            Err(hearth_provider::ProviderError::NotFound(_)) => Err(self.vanished(&env).await),
            Err(e) => Err(e.into()),
        }
    }

    async fn finish(&mut self, env: Environment) -> Result<Next, StepError> {
        use EnvState::*;
        match (self.plan, env.state) {
            (Plan::Provision, Provisioning) | (Plan::Start, Starting) => {
                let at = self
                    .progress
                    .address
                    .clone()
                    .ok_or_else(|| StepError::Vanished("no address recorded".into()))?;
                let mut next = env
                    .moved_to(Running, None, self.app.now())
                    .map_err(|e| StepError::Final(e.to_string()))?;
                if let Some(vm) = &self.progress.vm {
                    next.vm_id = vm.id.clone();
                }
                next.ssh_host = Some(at.ssh_host);
                next.ssh_port = Some(at.ssh_port);
                next.ip_address = at.ip_address;
                if at.host_key.is_some() {
                    next.ssh_host_key = at.host_key;
                }
                let saved = self
                    .app
                    .store
                    .save_transition(&env, next, self.actor())
                    .await?;
                self.remember(&saved);
                self.app.notify_changed(&saved.id);
                let done = if self.plan == Plan::Provision {
                    "provisioning complete: the VM is ready and running"
                } else {
                    "the VM is running"
                };
                self.app.log(&saved, "success", done).await;
            }
            (Plan::Stop, Stopping) => {
                let mut next = env
                    .moved_to(Stopped, None, self.app.now())
                    .map_err(|e| StepError::Final(e.to_string()))?;
                next.ssh_port = None;
                self.remember(
                    &self
                        .app
                        .store
                        .save_transition(&env, next, self.actor())
                        .await?,
                );
                self.app.notify_changed(&env.id);
                self.app.log(&env, "info", "the VM is stopped").await;
            }
            (Plan::Destroy, Destroying) => {
                let mut next = env
                    .moved_to(Destroyed, None, self.app.now())
                    .map_err(|e| StepError::Final(e.to_string()))?;
                next.ssh_port = None;
                next.ssh_host_key = None;
                self.remember(
                    &self
                        .app
                        .store
                        .save_transition(&env, next, self.actor())
                        .await?,
                );
                self.app.notify_changed(&env.id);
                self.app.log(&env, "info", "the VM is destroyed").await;
            }
            // Finished already (the crash came after the write, before the progress).
            _ => {}
        }
        Ok(Next::Continue)
    }

    /// Undoes a step the saga reached. Idempotent: undoing what was never done is a no-op.
    pub(crate) async fn undo(&mut self, step: Step, env: &Environment) -> Result<(), StepError> {
        match (self.plan, step) {
            (Plan::Provision, Step::CreateVm) => {
                self.app.ssh.forget(&env.id).await;
                if let Some(on) = self.on_host(env).await? {
                    on.provider.destroy(&on.host_ref, &vm_of(self, env)).await?;
                    self.app.log(env, "info", "removed the half-made VM").await;
                }
                self.app.store.finish_claim(&env.id).await?;
                Ok(())
            }
            (Plan::Provision, Step::Adopt) => {
                self.app.store.finish_claim(&env.id).await?;
                Ok(())
            }
            (Plan::Start, Step::StartVm) => {
                self.app.ssh.forget(&env.id).await;
                if let Some(on) = self.on_host(env).await? {
                    match on.provider.stop(&on.host_ref, &vm_of(self, env)).await {
                        Ok(()) | Err(hearth_provider::ProviderError::NotFound(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// What the host says of the environment's VM now: `None` when it is gone.
    async fn observe(&self, env: &Environment) -> Result<Option<VmState>, StepError> {
        match self.on_host(env).await? {
            Some(on) => Ok(on
                .provider
                .inspect(&on.host_ref, &vm_of(self, env))
                .await?
                .map(|i| i.state)),
            None => Ok(None),
        }
    }

    /// After the undo: the environment's state that tells the truth, judged for a stop or
    /// destroy by the VM as the host reports it now. `true` when that is the state the job
    /// was for (the VM had stopped or gone before the failure).
    pub(crate) async fn settle(
        &mut self,
        env: Environment,
        reason: &str,
    ) -> Result<bool, StepError> {
        use EnvState::*;
        let (to, message) = match (self.plan, env.state) {
            (Plan::Stop, Stopping) => match self.observe(&env).await? {
                Some(VmState::Running) => (
                    Running,
                    Some(format!("stop failed: {reason}; the VM still runs")),
                ),
                _ => (Stopped, None),
            },
            (Plan::Destroy, Destroying) => match self.observe(&env).await? {
                None => (Destroyed, None),
                Some(_) => (
                    Error,
                    Some(format!("destroy failed: {reason}; destroy it again")),
                ),
            },
            (_, state) if state.is_transitional() => (Error, Some(reason.to_string())),
            // At rest already: the failure came before the first write, or the environment
            // failed while its undo waited for the host; it gives back what it still holds.
            _ => {
                if env.reserved && env.state != Running {
                    let mut released = self.app.store.release_held(&env).await?;
                    if self.plan == Plan::Provision && released.vm_id.is_some() {
                        released.vm_id = None;
                        released = self.app.store.save_vm(&released).await?;
                    }
                    self.remember(&released);
                    self.app.notify_changed(&env.id);
                }
                return Ok(false);
            }
        };
        let mut next = env
            .moved_to(to, message, self.app.now())
            .map_err(|e| StepError::Final(e.to_string()))?;
        if self.plan == Plan::Provision {
            // Its VM was removed by the undo.
            next.vm_id = None;
        }
        if to != Running {
            next.ssh_port = None;
        }
        let saved = self
            .app
            .store
            .save_transition(&env, next, self.actor())
            .await?;
        self.remember(&saved);
        self.app.notify_changed(&saved.id);
        Ok(matches!(
            (self.plan, to),
            (Plan::Stop, Stopped) | (Plan::Destroy, Destroyed)
        ))
    }
}

/// The last lines of some output, on one line.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}
