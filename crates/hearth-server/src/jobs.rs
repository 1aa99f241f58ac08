//! The job handlers: provisioning and control as sagas.
//!
//! Every step is safe to run again: the provider finds a VM by the environment id, state
//! writes are conditional on state and generation, and a job that finds its work already
//! done succeeds without doing it twice. On the last attempt a failing step undoes what
//! was done (removes the half-made VM) and leaves the environment in `error` with the reason.

use crate::App;
use crate::service::JobKind;
use async_trait::async_trait;
use hearth_core::EnvState;
use hearth_provider::{ProviderError, VmInfo, VmSpec};
use hearth_queue::{Handler, JobError};
use hearth_store::{Environment, Job, StoreError, now_ms};

pub struct JobHandler {
    pub app: App,
}

fn retry<E: std::fmt::Display>(e: E) -> JobError {
    JobError::Retry(e.to_string())
}

/// Why a step failed, and whether another attempt could help.
enum StepError {
    Retryable(String),
    Final(String),
}

impl From<ProviderError> for StepError {
    fn from(e: ProviderError) -> StepError {
        match e {
            ProviderError::Unavailable(m) | ProviderError::Failed(m) => StepError::Retryable(m),
            ProviderError::NotFound(id) => StepError::Final(format!("the VM of environment {id} no longer exists")),
        }
    }
}

impl StepError {
    fn message(&self) -> &str {
        match self {
            StepError::Retryable(m) | StepError::Final(m) => m,
        }
    }
}

#[async_trait]
impl Handler for JobHandler {
    async fn run(&self, job: &Job) -> Result<(), JobError> {
        let Some(kind) = JobKind::parse(&job.kind) else {
            return Err(JobError::Fatal(format!("unknown job kind {:?}", job.kind)));
        };
        let env = match self.app.store.environment(&job.environment_id).await {
            Ok(env) => env,
            Err(StoreError::NotFound) => return Err(JobError::Fatal("the environment does not exist".into())),
            Err(e) => return Err(retry(e)),
        };
        match kind {
            JobKind::Provision => self.provision(job, env).await,
            JobKind::Start => self.start(job, env).await,
            JobKind::Stop => self.stop(job, env).await,
            JobKind::Destroy => self.destroy(job, env).await,
        }
    }
}

impl JobHandler {
    async fn log(&self, env: &Environment, level: &str, message: &str) {
        tracing::info!(environment = %env.id, level, "{message}");
        if let Err(e) = self.app.store.append_log(&env.id, level, message).await {
            tracing::warn!(environment = %env.id, error = %e, "could not write a provisioning log line");
        }
        let entry = serde_json::json!({ "timestamp": crate::views::time(now_ms()), "level": level, "message": message });
        self.app.bus.push_log(&env.id, entry);
        self.app.notify_changed(&env.id);
    }

    async fn move_to(&self, env: &Environment, to: EnvState, message: Option<String>, actor: &str) -> Result<Environment, JobError> {
        let next = env.moved_to(to, message, now_ms()).map_err(|e| JobError::Fatal(e.to_string()))?;
        match self.app.store.save_transition(env, next, actor).await {
            Ok(env) => {
                self.app.notify_changed(&env.id);
                Ok(env)
            }
            // Coming back to life needs quota and host room; without them it stays put.
            Err(e @ (StoreError::Quota(_) | StoreError::NoCapacity(_))) => {
                let msg = format!("cannot become {to}: {e}");
                self.log(env, "error", &msg).await;
                let _ = self.app.store.audit(actor, &format!("state_{to}"), Some(&env.id), "failed", Some(&msg), None).await;
                Err(JobError::Fatal(msg))
            }
            Err(e) => Err(retry(e)),
        }
    }

    fn actor(job: &Job) -> String {
        // Jobs act for whoever asked; the audit shows both the request and the worker's steps.
        job.actor.clone()
    }

    /// Records the VM's address and moves to `running`.
    async fn mark_running(&self, env: &Environment, vm: &VmInfo, actor: &str) -> Result<Environment, JobError> {
        let mut next = env.moved_to(EnvState::Running, None, now_ms()).map_err(|e| JobError::Fatal(e.to_string()))?;
        next.vm_id = Some(vm.vm_id.clone());
        next.ssh_host = vm.ssh_host.clone();
        next.ssh_port = vm.ssh_port;
        next.ip_address = vm.ip_address.clone();
        let saved = self.app.store.save_transition(env, next, actor).await.map_err(retry)?;
        self.app.notify_changed(&saved.id);
        Ok(saved)
    }

    /// Ends a failed attempt: retry if attempts remain and the error allows, else undo
    /// (remove the VM when `remove_vm`) and leave the environment in `error`.
    async fn fail(&self, job: &Job, env: &Environment, err: StepError, remove_vm: bool) -> Result<(), JobError> {
        let msg = err.message().to_string();
        if matches!(err, StepError::Retryable(_)) && !job.is_last_attempt() {
            self.log(env, "error", &format!("attempt {} of {} failed: {msg}; will retry", job.attempts, job.max_attempts)).await;
            return Err(JobError::Retry(msg));
        }
        self.log(env, "error", &format!("{} failed: {msg}", job.kind)).await;
        if remove_vm {
            if let Err(e) = self.app.provider.destroy(&env.id).await {
                self.log(env, "error", &format!("could not remove the half-made VM: {e}; the reconciler will")).await;
            }
            self.app.ssh.forget(&env.id).await;
        }
        let current = self.app.store.environment(&env.id).await.map_err(retry)?;
        if current.state.can_become(EnvState::Error) {
            self.move_to(&current, EnvState::Error, Some(msg.clone()), &Self::actor(job)).await?;
        }
        Err(JobError::Fatal(msg))
    }

    fn spec(&self, env: &Environment) -> VmSpec {
        VmSpec {
            environment_id: env.id.clone(),
            image: env.base_image.clone(),
            vcpus: env.vcpus,
            memory_mb: env.memory_mb,
            disk_gb: env.disk_gb,
            env: env.environment_vars.clone(),
            authorized_key: env.ssh_public_key.clone(),
        }
    }

    /// The SSH target of `env` at the address the provider just reported (the row is
    /// only updated once the VM is ready).
    fn target_at(&self, env: &Environment, vm: &VmInfo) -> Result<hearth_guest::Target, StepError> {
        let mut at = env.clone();
        at.ssh_host = vm.ssh_host.clone();
        at.ssh_port = vm.ssh_port;
        self.app.target(&at).map_err(|e| StepError::Final(e.message))
    }

    /// Boots (or finds) the VM and waits for SSH. Shared by provision and start.
    async fn bring_up(&self, env: &Environment, create: bool) -> Result<VmInfo, StepError> {
        let vm = if create {
            self.log(env, "info", &format!(
                "creating a {} VM from {} with {} vCPUs and {} MB of memory",
                self.app.provider.name(), env.base_image, env.vcpus, env.memory_mb
            ))
            .await;
            self.app.provider.create(&self.spec(env)).await?
        } else {
            self.app.provider.start(&env.id).await?
        };
        self.log(env, "info", &format!(
            "VM {} is up; SSH on {}:{}; waiting for SSH to answer",
            short(&vm.vm_id),
            vm.ssh_host.as_deref().unwrap_or("?"),
            vm.ssh_port.unwrap_or(0)
        ))
        .await;
        let target = self.target_at(env, &vm)?;
        self.app
            .ssh
            .wait_ready(&target, self.app.config.ssh_wait)
            .await
            .map_err(|e| StepError::Retryable(format!("SSH did not answer within {:?}: {e}", self.app.config.ssh_wait)))?;
        Ok(vm)
    }

    async fn log_host(&self, env: &Environment) {
        let line = match &env.host_id {
            Some(id) => match self.app.store.host(id).await {
                Ok(h) => format!("placed on host {} ({} of {} vCPUs in use)", h.name, h.room.used_vcpus, h.room.max_vcpus),
                Err(_) => format!("placed on host {id}"),
            },
            None => format!("the {} provider places VMs itself", env.provider),
        };
        self.log(env, "info", &line).await;
    }

    /// Runs the user's init script once, as the guest user, with the environment's
    /// variables. A non-zero exit fails provisioning with the script's last output.
    async fn run_init_script(&self, env: &Environment, vm: &VmInfo, script: &str) -> Result<(), StepError> {
        self.log(env, "info", "running the init script").await;
        let target = self.target_at(env, vm)?;
        let request = hearth_guest::ExecRequest {
            code: script.to_string(),
            working_dir: None,
            env: env.environment_vars.clone(),
            timeout: std::time::Duration::from_secs(1800),
            max_output: 64 * 1024,
        };
        let out = self.app.ssh.exec(&target, &request).await.map_err(|e| StepError::Retryable(e.to_string()))?;
        let tail = |b: &[u8]| {
            let text = String::from_utf8_lossy(b);
            let lines: Vec<&str> = text.lines().rev().take(5).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
        };
        match out.exit_code {
            Some(0) => {
                self.log(env, "info", &format!("init script finished: {}", tail(&out.stdout))).await;
                Ok(())
            }
            code => Err(StepError::Final(format!(
                "the init script {} : {}",
                match code { Some(c) => format!("exited with {c}"), None => "was killed or timed out".into() },
                tail(&out.stderr)
            ))),
        }
    }

    async fn provision(&self, job: &Job, env: Environment) -> Result<(), JobError> {
        let actor = Self::actor(job);
        let env = match env.state {
            EnvState::Requested | EnvState::Error => {
                self.log(&env, "info", &format!("picked up by worker {} (attempt {})", self.app.queue.owner(), job.attempts)).await;
                let env = self.move_to(&env, EnvState::Provisioning, Some("provisioning".into()), &actor).await?;
                self.log_host(&env).await;
                env
            }
            EnvState::Provisioning => {
                self.log(&env, "info", &format!("resumed by worker {} (attempt {})", self.app.queue.owner(), job.attempts)).await;
                env
            }
            // Done already, or overtaken by a destroy: nothing left to do.
            _ => return Ok(()),
        };
        if job.exhausted() {
            return self.fail(job, &env, StepError::Final("the worker running it died on the last attempt".into()), true).await;
        }
        let vm = match self.bring_up(&env, true).await {
            Ok(vm) => vm,
            Err(e) => return self.fail(job, &env, e, true).await,
        };
        if let Some(script) = env.init_script.clone() {
            if let Err(e) = self.run_init_script(&env, &vm, &script).await {
                return self.fail(job, &env, e, true).await;
            }
        }
        self.mark_running(&env, &vm, &actor).await?;
        self.log(&env, "success", "provisioning complete: the VM is ready and running").await;
        Ok(())
    }

    async fn start(&self, job: &Job, env: Environment) -> Result<(), JobError> {
        let actor = Self::actor(job);
        let env = match env.state {
            EnvState::Running | EnvState::Destroying | EnvState::Destroyed => return Ok(()),
            // Never got a VM: starting it means provisioning it.
            EnvState::Error if env.vm_id.is_none() => return self.provision(job, env).await,
            EnvState::Stopped | EnvState::Error => self.move_to(&env, EnvState::Starting, Some("starting".into()), &actor).await?,
            EnvState::Starting => env,
            other => return Err(JobError::Retry(format!("the environment is {other}; waiting for it to settle"))),
        };
        self.log(&env, "info", "starting the VM").await;
        if job.exhausted() {
            return self.fail(job, &env, StepError::Final("the worker running it died on the last attempt".into()), false).await;
        }
        match self.bring_up(&env, false).await {
            Ok(vm) => {
                self.mark_running(&env, &vm, &actor).await?;
                self.log(&env, "success", "the VM is running").await;
                Ok(())
            }
            Err(e) => self.fail(job, &env, e, false).await,
        }
    }

    async fn stop(&self, job: &Job, env: Environment) -> Result<(), JobError> {
        let actor = Self::actor(job);
        let env = match env.state {
            EnvState::Running => self.move_to(&env, EnvState::Stopping, Some("stopping".into()), &actor).await?,
            EnvState::Stopping => env,
            // Stopped, failed, destroyed: nothing runs.
            _ => return Ok(()),
        };
        self.app.ssh.forget(&env.id).await;
        match self.app.provider.stop(&env.id).await {
            Ok(()) | Err(ProviderError::NotFound(_)) => {
                let mut next = env.moved_to(EnvState::Stopped, None, now_ms()).map_err(|e| JobError::Fatal(e.to_string()))?;
                next.ssh_port = None;
                self.app.store.save_transition(&env, next, &actor).await.map_err(retry)?;
                self.log(&env, "info", "the VM is stopped").await;
                Ok(())
            }
            Err(e) => self.fail(job, &env, e.into(), false).await,
        }
    }

    async fn destroy(&self, job: &Job, env: Environment) -> Result<(), JobError> {
        let actor = Self::actor(job);
        let env = match env.state {
            EnvState::Destroyed => return Ok(()),
            EnvState::Destroying => env,
            s if s.can_become(EnvState::Destroying) => {
                self.move_to(&env, EnvState::Destroying, Some("destroying".into()), &actor).await?
            }
            // A transition whose job died (provisioning, starting, stopping): fail it first.
            _ => {
                let failed = self.move_to(&env, EnvState::Error, Some("interrupted by destroy".into()), &actor).await?;
                self.move_to(&failed, EnvState::Destroying, Some("destroying".into()), &actor).await?
            }
        };
        self.app.ssh.forget(&env.id).await;
        match self.app.provider.destroy(&env.id).await {
            Ok(()) => {
                let mut next = env.moved_to(EnvState::Destroyed, None, now_ms()).map_err(|e| JobError::Fatal(e.to_string()))?;
                next.ssh_port = None;
                self.app.store.save_transition(&env, next, &actor).await.map_err(retry)?;
                self.log(&env, "info", "the VM is destroyed").await;
                Ok(())
            }
            Err(e) => self.fail(job, &env, e.into(), false).await,
        }
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}
