//! Jobs as sagas that remember: each job is a list of named steps (its `Plan`), each with
//! an undo where one is needed. What a step produced is saved on the job as it completes
//! (by the lease owner only), so a retry, or another node after a crash, continues after
//! the last finished step: a half-made VM is found by its saved reference and the init
//! script never runs twice.
//!
//! When a step fails for good (its error cannot be retried, or the last attempt failed,
//! or too many workers died running it), the saga winds down: it records why, undoes every
//! step it reached in reverse, and settles the environment in a state that tells the
//! truth (`error` with the reason, or back where it was). An undo that cannot finish now
//! (the host is unreachable) makes the job wait and try again without spending attempts:
//! undo always finishes eventually, and the environment keeps holding what its VM uses
//! until it has.

use crate::App;
use hearth_core::{EnvState, JobKind};
use hearth_provider::{HostRef, Provider, ProviderError, VmRef};
use hearth_queue::{JobError, Lease};
use hearth_store::{Environment, Host, Job, StoreError};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// How long a wound-down job waits before trying an undo again.
pub(crate) const UNDO_RETRY: Duration = Duration::from_secs(5);
/// How often a job looks again for a host that does not answer.
pub(crate) const HOST_WAIT: Duration = Duration::from_secs(2);

/// What a job's steps produced so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Progress {
    /// The plan chosen on the first run (a start of an environment that never had a VM
    /// provisions it), kept so a resumed job follows the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
    /// Names of the finished steps.
    #[serde(default)]
    pub done: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    /// A warm VM's keys were swapped on a connection this node keeps as the environment's
    /// (so `wait_ssh` has nothing left to prove). A resumed job on another node has no
    /// such connection: it is false there, and `wait_ssh` logs in with the new keys.
    #[serde(default, skip)]
    pub adopted: bool,
    /// When the init script was started (store clock), to bound how long it may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_started_at: Option<i64>,
    /// Since when (store clock) the host has not answered this job, while it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_since: Option<i64>,
    /// Set when the saga gave up: why. A resumed job finishes winding down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// Where a VM's SSH answers, as the provider reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Address {
    pub ssh_host: String,
    pub ssh_port: i64,
    pub ip_address: Option<String>,
    /// The guest's SSH host key, as its first contact offered it.
    #[serde(default)]
    pub host_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Plan {
    Provision,
    Start,
    Stop,
    Destroy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Moves the environment into the job's transitional state (or finds it done).
    Begin,
    /// Ensure created: the VM exists (it may still be booting). Undo: remove it.
    CreateVm,
    /// The provider reports it running, with an SSH address.
    WaitRunning,
    /// A VM claimed from a warm pool takes the environment's keys in place of its pool
    /// key (nothing to do for a VM made for the environment). Undo: forget the claim.
    Adopt,
    /// The guest accepts Hearth's key.
    WaitSsh,
    /// The environment's repository is cloned into the guest (once: a clone in place is
    /// done).
    CloneRepository,
    /// The user's init script ran once and exited 0.
    InitScript,
    /// Undo: stop it again.
    StartVm,
    StopVm,
    DestroyVm,
    /// Moves the environment into the job's final state.
    Finish,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Begin => "begin",
            Step::CreateVm => "create_vm",
            Step::WaitRunning => "wait_running",
            Step::Adopt => "adopt",
            Step::WaitSsh => "wait_ssh",
            Step::CloneRepository => "clone_repository",
            Step::InitScript => "init_script",
            Step::StartVm => "start_vm",
            Step::StopVm => "stop_vm",
            Step::DestroyVm => "destroy_vm",
            Step::Finish => "finish",
        }
    }
}

impl Plan {
    pub fn name(self) -> &'static str {
        match self {
            Plan::Provision => "provision",
            Plan::Start => "start",
            Plan::Stop => "stop",
            Plan::Destroy => "destroy",
        }
    }

    /// The state a successful run leaves the environment in.
    pub fn target(self) -> EnvState {
        match self {
            Plan::Provision | Plan::Start => EnvState::Running,
            Plan::Stop => EnvState::Stopped,
            Plan::Destroy => EnvState::Destroyed,
        }
    }

    /// The plan a job of `kind` follows for `env` when it first runs.
    pub fn choose(kind: JobKind, env: &Environment) -> Plan {
        match kind {
            JobKind::Provision => Plan::Provision,
            // Never got a VM: starting it means provisioning it.
            JobKind::Start
                if env.vm_id.is_none()
                    && matches!(
                        env.state,
                        EnvState::Error | EnvState::Requested | EnvState::Provisioning
                    ) =>
            {
                Plan::Provision
            }
            JobKind::Start => Plan::Start,
            JobKind::Stop => Plan::Stop,
            JobKind::Destroy => Plan::Destroy,
        }
    }

    pub fn steps(self, with_init_script: bool, with_repository: bool) -> Vec<Step> {
        use Step::*;
        match self {
            Plan::Provision => {
                let mut steps = vec![Begin, CreateVm, WaitRunning, Adopt, WaitSsh];
                if with_repository {
                    steps.push(CloneRepository);
                }
                if with_init_script {
                    steps.push(InitScript);
                }
                steps.push(Finish);
                steps
            }
            Plan::Start => vec![Begin, StartVm, WaitRunning, WaitSsh, Finish],
            Plan::Stop => vec![Begin, StopVm, Finish],
            Plan::Destroy => vec![Begin, DestroyVm, Finish],
        }
    }

    /// Every fault point of every plan: before each step (`provision.create_vm`) and
    /// after it acted but before its progress is saved (`provision.create_vm.after`).
    #[cfg(test)]
    pub fn all_fault_points() -> Vec<(Plan, String)> {
        [Plan::Provision, Plan::Start, Plan::Stop, Plan::Destroy]
            .into_iter()
            .flat_map(|p| {
                p.steps(true, true).into_iter().flat_map(move |s| {
                    [
                        (p, format!("{}.{}", p.name(), s.name())),
                        (p, format!("{}.{}.after", p.name(), s.name())),
                    ]
                })
            })
            .collect()
    }
}

/// How a step ended well.
pub(crate) enum Next {
    Continue,
    /// Nothing left to do (the work was already done, or a destroy overtook it): the job
    /// ends successfully.
    Done,
    /// Not finished, not failed: look again later without holding a worker.
    Wait(String, Duration),
}

/// How a step ended badly.
#[derive(Debug)]
pub(crate) enum StepError {
    /// The host cannot be reached: wait for it (up to the outage budget) without spending
    /// attempts, then it counts as retryable.
    Unreachable(String),
    /// Another attempt may work.
    Retryable(String),
    /// No attempt will work.
    Final(String),
    /// The VM disappeared while being brought up: the next attempt makes it again.
    Vanished(String),
}

impl StepError {
    pub fn message(&self) -> &str {
        match self {
            StepError::Unreachable(m)
            | StepError::Retryable(m)
            | StepError::Final(m)
            | StepError::Vanished(m) => m,
        }
    }
}

impl From<ProviderError> for StepError {
    fn from(e: ProviderError) -> StepError {
        match e {
            ProviderError::Unavailable(m) => StepError::Unreachable(m),
            ProviderError::Failed(m) => StepError::Retryable(m),
            ProviderError::NotFound(name) => {
                StepError::Vanished(format!("the VM {name} no longer exists"))
            }
            ProviderError::Unsupported(m) => StepError::Final(m),
        }
    }
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> StepError {
        match e {
            StoreError::Quota(_) | StoreError::NoCapacity(_) | StoreError::NoSuchHost(_) => {
                StepError::Final(e.to_string())
            }
            other => StepError::Retryable(other.to_string()),
        }
    }
}

/// The host an environment lives on, ready for provider calls.
#[derive(Clone)]
pub(crate) struct OnHost {
    pub host: Host,
    pub host_ref: HostRef,
    pub provider: Arc<dyn Provider>,
}

/// One run of a job's saga.
pub(crate) struct Run<'a> {
    pub app: &'a App,
    pub job: &'a Job,
    pub lease: &'a Lease,
    pub plan: Plan,
    pub progress: Progress,
    /// The environment's host, read once per run (a host does not move under a job).
    host: std::sync::Mutex<Option<OnHost>>,
    /// The environment as this run last read or wrote it. Nothing else writes it while the
    /// job runs (jobs of one environment run one at a time and the reconciler leaves it
    /// alone); a write that finds it changed anyway fails as stale, and the run reads again.
    env: std::sync::Mutex<Option<Environment>>,
}

impl<'a> Run<'a> {
    pub fn new(
        app: &'a App,
        job: &'a Job,
        lease: &'a Lease,
        env: &Environment,
    ) -> Result<Run<'a>, JobError> {
        let kind = JobKind::parse(&job.kind)
            .ok_or_else(|| JobError::Fatal(format!("unknown job kind {:?}", job.kind)))?;
        let progress: Progress = serde_json::from_value(job.progress.clone())
            .map_err(|e| JobError::Fatal(format!("the job's saved progress is unreadable: {e}")))?;
        let plan = progress.plan.unwrap_or_else(|| Plan::choose(kind, env));
        Ok(Run {
            app,
            job,
            lease,
            plan,
            progress: Progress {
                plan: Some(plan),
                ..progress
            },
            host: Default::default(),
            env: std::sync::Mutex::new(Some(env.clone())),
        })
    }

    pub fn actor(&self) -> &str {
        &self.job.actor
    }

    fn steps(&self, env: &Environment) -> Vec<Step> {
        self.plan
            .steps(env.init_script.is_some(), env.repository_url.is_some())
    }

    fn is_done(&self, step: Step) -> bool {
        self.progress.done.iter().any(|d| d == step.name())
    }

    /// Saves the progress under this worker's lease; a lost lease stops the saga.
    pub async fn save(&self) -> Result<(), JobError> {
        let value =
            serde_json::to_value(&self.progress).map_err(|e| JobError::Fatal(e.to_string()))?;
        match self
            .app
            .store
            .save_progress(self.job.id, &self.lease.owner, &value)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.lease.lost.cancel();
                Err(JobError::Retry(
                    "lost the lease; another worker continues".into(),
                ))
            }
            Err(e) => Err(JobError::Retry(format!(
                "could not save the job's progress: {e}"
            ))),
        }
    }

    /// Keeps what a write of this run saved as the environment's latest state.
    pub fn remember(&self, env: &Environment) {
        *self.env.lock().unwrap() = Some(env.clone());
    }

    /// The environment as it is now: as this run last saw it, or read afresh.
    pub async fn env(&self) -> Result<Environment, JobError> {
        if let Some(env) = self.env.lock().unwrap().clone() {
            return Ok(env);
        }
        match self.app.store.environment(&self.job.environment_id).await {
            Ok(env) => {
                self.remember(&env);
                Ok(env)
            }
            Err(StoreError::NotFound) => {
                Err(JobError::Fatal("the environment does not exist".into()))
            }
            Err(e) => Err(JobError::Retry(e.to_string())),
        }
    }

    /// The environment's host, if it has one (and its kind has a provider).
    pub async fn on_host(&self, env: &Environment) -> Result<Option<OnHost>, StepError> {
        let Some(host_id) = &env.host_id else {
            return Ok(None);
        };
        if let Some(on) = self
            .host
            .lock()
            .unwrap()
            .as_ref()
            .filter(|on| &on.host.id == host_id)
        {
            return Ok(Some(on.clone()));
        }
        let host = self.app.store.host(host_id).await?;
        let host_ref = self
            .app
            .host_ref(&host)
            .map_err(|e| StepError::Final(e.to_string()))?;
        let provider = self.app.providers.get(host.kind)?;
        let on = OnHost {
            host,
            host_ref,
            provider,
        };
        *self.host.lock().unwrap() = Some(on.clone());
        Ok(Some(on))
    }

    pub async fn execute(mut self) -> Result<(), JobError> {
        if let Some(reason) = self.progress.failed.clone() {
            return self.wind_down(reason).await;
        }
        if self.job.exhausted() {
            let env = self.env().await?;
            self.app
                .log(
                    &env,
                    "error",
                    &format!(
                        "{} workers died running this {}; undoing it",
                        self.job.crashes,
                        self.plan.name()
                    ),
                )
                .await;
            return self
                .wind_down(format!(
                    "the workers running it died {} times",
                    self.job.crashes
                ))
                .await;
        }
        let env = self.env().await?;
        for step in self.steps(&env) {
            if self.is_done(step) {
                continue;
            }
            let env = self.env().await?;
            if self.overtaken(&env).await? {
                return Ok(());
            }
            let outcome = match self.fault_point(&env, step, "").await {
                Ok(()) => match self.step(step, env.clone()).await {
                    // Acted, not yet recorded: the window a crash must not spoil.
                    Ok(Next::Continue) => self
                        .fault_point(&env, step, ".after")
                        .await
                        .map(|()| Next::Continue),
                    other => other,
                },
                Err(e) => Err(e),
            };
            match outcome {
                Ok(Next::Continue) => {
                    self.progress.done.push(step.name().to_string());
                    self.progress.unreachable_since = None;
                    self.save().await?;
                }
                Ok(Next::Done) => {
                    self.save().await?;
                    return Ok(());
                }
                Ok(Next::Wait(note, after)) => {
                    self.save().await?;
                    return Err(JobError::Later(note, after));
                }
                Err(e) => return self.failed(step, &env, e).await,
            }
        }
        Ok(())
    }

    /// A destroy of the environment is waiting: a provision, start or stop ends here
    /// (between steps, or in a long wait) and leaves the VM to the destroy, which removes
    /// it by name whatever this run reached. A user's delete never waits out an SSH budget
    /// or an init script.
    pub async fn overtaken(&mut self, env: &Environment) -> Result<bool, JobError> {
        if self.plan == Plan::Destroy {
            return Ok(false);
        }
        let waiting = self
            .app
            .store
            .destroy_queued(&env.id)
            .await
            .map_err(|e| JobError::Retry(e.to_string()))?;
        if waiting {
            self.app
                .log(
                    env,
                    "info",
                    &format!(
                        "a destroy was requested; the {} stops here and the destroy cleans up",
                        self.plan.name()
                    ),
                )
                .await;
            self.save().await?;
        }
        Ok(waiting)
    }

    /// A simulated host may fail or stall here; real hosts pass.
    async fn fault_point(
        &self,
        env: &Environment,
        step: Step,
        suffix: &str,
    ) -> Result<(), StepError> {
        if let Some(on) = self.on_host(env).await? {
            let point = format!("{}.{}{suffix}", self.plan.name(), step.name());
            on.provider.fault_point(&on.host_ref, &point).await?;
        }
        Ok(())
    }

    async fn failed(
        &mut self,
        step: Step,
        env: &Environment,
        e: StepError,
    ) -> Result<(), JobError> {
        // Whatever failed, read the environment afresh from here on.
        *self.env.lock().unwrap() = None;
        let msg = e.message().to_string();
        if let StepError::Unreachable(_) = e {
            // A daemon restart or a network blip: wait for the host, spending no attempts,
            // for as long as the outage budget allows.
            let now = self.app.now();
            let since = *self.progress.unreachable_since.get_or_insert(now);
            let budget = self.app.config.host_outage_budget;
            if now - since < budget.as_millis() as i64 {
                if since == now {
                    self.app
                        .log(
                            env,
                            "error",
                            &format!(
                                "{}: {msg}; waiting up to {} s for the host to answer",
                                step.name(),
                                budget.as_secs()
                            ),
                        )
                        .await;
                }
                self.save().await?;
                return Err(JobError::Later(
                    format!("waiting for the host: {msg}"),
                    HOST_WAIT,
                ));
            }
        }
        let retryable = !matches!(e, StepError::Final(_));
        if let StepError::Vanished(_) = e {
            // Made again on the next attempt.
            self.progress.done.retain(|d| d == Step::Begin.name());
            self.progress.vm = None;
            self.progress.address = None;
        }
        if retryable && !self.job.is_last_attempt() {
            self.app
                .log(
                    env,
                    "error",
                    &format!(
                        "{} failed (attempt {} of {}): {msg}; will retry",
                        step.name(),
                        self.job.attempts,
                        self.job.max_attempts
                    ),
                )
                .await;
            self.save().await?;
            return Err(JobError::Retry(msg));
        }
        self.wind_down(msg).await
    }

    /// Tells the truth before the undo can finish: the environment failed. What its VM may
    /// use stays held until the undo has removed or stopped it.
    async fn fail_holding(&self, env: &Environment, reason: &str) {
        if !matches!(self.plan, Plan::Provision | Plan::Start) || !env.state.is_transitional() {
            return;
        }
        let message = format!(
            "{reason}; its VM is cleaned up once its host answers again, and counts until then"
        );
        if let Ok(next) = env.moved_to(EnvState::Error, Some(message), self.app.now())
            && let Ok(saved) = self
                .app
                .store
                .save_transition_holding(env, next, self.actor())
                .await
        {
            self.remember(&saved);
            self.app.notify_changed(&env.id);
        }
    }

    /// Gives up: records why, undoes every step reached (the one that failed included, as
    /// it may have acted before failing) in reverse, and settles the environment.
    async fn wind_down(&mut self, reason: String) -> Result<(), JobError> {
        let env = self.env().await?;
        if env.state == self.plan.target() {
            // Its last write went through; only the bookkeeping after it failed.
            return Ok(());
        }
        if self.progress.failed.is_none() {
            self.app
                .log(
                    &env,
                    "error",
                    &format!("{} failed: {reason}", self.plan.name()),
                )
                .await;
            let action = format!("{}_failed", self.plan.name());
            let _ = self
                .app
                .store
                .audit(
                    self.actor(),
                    &action,
                    Some(&env.id),
                    "failed",
                    Some(&reason),
                    None,
                )
                .await;
            self.progress.failed = Some(reason.clone());
            self.save().await?;
        }
        let steps = self.steps(&env);
        let reached = steps
            .iter()
            .position(|s| !self.is_done(*s))
            .map(|i| i + 1)
            .unwrap_or(steps.len());
        for step in steps[..reached].iter().rev() {
            let env = self.env().await?;
            if let Err(e) = self.undo(*step, &env).await {
                let note = format!(
                    "undoing {} after \"{reason}\": {}",
                    step.name(),
                    e.message()
                );
                self.app
                    .log(
                        &env,
                        "error",
                        &format!("{note}; trying again in {} s", UNDO_RETRY.as_secs()),
                    )
                    .await;
                self.fail_holding(&env, &reason).await;
                return Err(JobError::Later(note, UNDO_RETRY));
            }
            self.progress.done.retain(|d| d != step.name());
        }
        self.save().await?;
        let env = self.env().await?;
        match self.settle(env, &reason).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(JobError::Fatal(reason)),
            Err(e) => Err(JobError::Later(
                format!("settling after \"{reason}\": {}", e.message()),
                UNDO_RETRY,
            )),
        }
    }
}
