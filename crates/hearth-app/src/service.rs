//! What a request may do, and the writes it makes. The HTTP handlers call these; jobs do
//! the work.

use crate::App;
use crate::error::{AppError, AppResult};
use hearth_core::{EnvState, HostKind, JobKind, Resources, validate};
use hearth_guest::{ExecRequest, KeyPair, Target};
use hearth_store::{
    Environment, Execution, NewEnvironment, NewJob, PersonalOutcome, Placement, StoreError, User,
};
use std::collections::BTreeMap;
use std::time::Duration;

/// Output kept per stream in the API answer; the executions table keeps 64 KiB.
pub const EXEC_OUTPUT_LIMIT: usize = 1024 * 1024;
pub const STORED_OUTPUT_LIMIT: usize = 64 * 1024;
pub const MAX_DURATION_HOURS: i64 = 24 * 365;

#[derive(Debug, Clone, Default)]
pub struct SizeRequest {
    pub vcpus: Option<i64>,
    pub memory_mb: Option<i64>,
    pub disk_gb: Option<i64>,
}

/// `POST /v1/environments`, as received.
#[derive(Debug, Clone, Default)]
pub struct CreateInput {
    pub name: String,
    pub size: SizeRequest,
    pub duration_hours: Option<i64>,
    pub base_image: Option<String>,
    pub init_script: Option<String>,
    pub environment_vars: BTreeMap<String, String>,
    /// Cloned into the `dev` user's home after SSH answers, before the init script.
    pub repository_url: Option<String>,
    /// The branch or tag to clone.
    pub repository_ref: Option<String>,
    /// The name of the caller's stored git credential to clone with.
    pub git_credential: Option<String>,
    pub ssh_public_key: Option<String>,
    /// A host kind (`docker`, `sim`, ...); the installation's default when absent.
    pub provider: Option<String>,
    pub region: Option<String>,
    pub gpus: Option<i64>,
    pub gpu_model: Option<String>,
    /// Made for this received mail (see `NewEnvironment::for_mail`).
    pub for_mail: Option<i64>,
    /// Made from this snapshot of the caller's (id or name), on the snapshot's host.
    pub snapshot: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ExecInput {
    pub code: String,
    pub timeout_seconds: Option<i64>,
    pub working_dir: Option<String>,
}

/// One event of a streaming exec: `stdout`, `stderr`, then `exit`.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    pub kind: &'static str,
    pub data: serde_json::Value,
}

/// What a command returned, as the API shows it.
#[derive(Debug, Clone)]
pub struct ExecResult {
    pub execution: Execution,
    /// Up to `EXEC_OUTPUT_LIMIT` per stream (the stored execution keeps less).
    pub stdout: String,
    pub stderr: String,
    pub truncated: bool,
}

impl ExecInput {
    /// Checks the input before anything is looked up; returns the timeout in seconds.
    pub fn validate(&self) -> AppResult<i64> {
        validate::command(&self.code).map_err(AppError::Invalid)?;
        if let Some(dir) = &self.working_dir {
            validate::working_dir(dir).map_err(AppError::Invalid)?;
        }
        validate::timeout_seconds(self.timeout_seconds.unwrap_or(60)).map_err(AppError::Invalid)
    }
}

/// The first `STORED_OUTPUT_LIMIT` bytes of a stream (and a note of what was dropped).
#[derive(Default)]
struct Capped {
    bytes: Vec<u8>,
    dropped: bool,
}

impl Capped {
    fn push(&mut self, data: &[u8]) {
        // One byte over the limit, so `cut` still sees the output was longer.
        let room = (STORED_OUTPUT_LIMIT + 1).saturating_sub(self.bytes.len());
        self.dropped |= data.len() > room;
        self.bytes.extend_from_slice(&data[..data.len().min(room)]);
    }
}

fn cut(bytes: &[u8], limit: usize) -> (String, bool) {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= limit {
        return (text.into_owned(), false);
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (text[..end].to_string(), true)
}

impl App {
    pub fn new_job(&self, kind: JobKind, environment_id: &str, actor: &str) -> NewJob {
        let max_attempts = self
            .queue
            .config(kind.queue())
            .map(|c| c.max_attempts)
            .unwrap_or(1);
        NewJob {
            queue: kind.queue().into(),
            kind: kind.as_str().into(),
            environment_id: environment_id.into(),
            max_attempts,
            actor: actor.into(),
        }
    }

    /// The caller behind a bearer token.
    pub async fn authenticate(&self, token: &str) -> AppResult<User> {
        self.store
            .user_by_token(token)
            .await?
            .ok_or_else(|| AppError::Unauthenticated("unknown or revoked token".into()))
    }

    fn resources(&self, user: &User, size: &SizeRequest) -> AppResult<Resources> {
        let defaults = user.tier.default_resources();
        Ok(Resources {
            vcpus: validate::vcpus(size.vcpus.unwrap_or(defaults.vcpus))
                .map_err(AppError::Invalid)?,
            memory_mb: validate::memory_mb(size.memory_mb.unwrap_or(defaults.memory_mb))
                .map_err(AppError::Invalid)?,
            disk_gb: validate::disk_gb(size.disk_gb.unwrap_or(defaults.disk_gb))
                .map_err(AppError::Invalid)?,
        })
    }

    /// What the request needs from a host: a kind this installation drives, and an
    /// optional region and GPUs.
    fn placement(&self, resources: Resources, input: &CreateInput) -> AppResult<Placement> {
        let kind = match &input.provider {
            None => self.config.default_kind,
            Some(p) => HostKind::parse(p).ok_or_else(|| {
                AppError::Invalid(format!(
                    "provider must be one of docker, agent, ovh, sim; got {p:?}"
                ))
            })?,
        };
        self.providers
            .get(kind)
            .map_err(|e| AppError::Invalid(e.to_string()))?;
        if let Some(r) = &input.region {
            hearth_core::host::check_label("region", r).map_err(AppError::Invalid)?;
        }
        if let Some(m) = &input.gpu_model {
            hearth_core::host::check_label("gpuModel", m).map_err(AppError::Invalid)?;
        }
        let gpus = input
            .gpus
            .unwrap_or(if input.gpu_model.is_some() { 1 } else { 0 });
        if !(0..=hearth_core::host::MAX_GPUS).contains(&gpus) {
            return Err(AppError::Invalid(format!(
                "gpus must be between 0 and {}, got {gpus}",
                hearth_core::host::MAX_GPUS
            )));
        }
        if gpus == 0 && input.gpu_model.is_some() {
            return Err(AppError::Invalid(
                "gpuModel needs gpus of at least 1".into(),
            ));
        }
        Ok(Placement {
            kind,
            resources,
            gpus,
            gpu_model: input.gpu_model.clone(),
            region: input.region.clone(),
        })
    }

    /// Creates an environment under quota, placed on a host and queued for provisioning.
    pub async fn create_environment(
        &self,
        user: &User,
        input: CreateInput,
    ) -> AppResult<Environment> {
        let actor = user.id.clone();
        self.create_environment_as(user, input, &actor).await
    }

    /// `create_environment` on the user's behalf by `actor` (the audit names it: a mail's
    /// sender, say).
    pub async fn create_environment_as(
        &self,
        user: &User,
        input: CreateInput,
        actor: &str,
    ) -> AppResult<Environment> {
        validate::name(&input.name).map_err(AppError::Invalid)?;
        let resources = self.resources(user, &input.size)?;
        let placement = self.placement(resources, &input)?;
        validate::env_vars(&input.environment_vars).map_err(AppError::Invalid)?;
        let git_credential_id = self.repository_credential(user, &input).await?;
        // The server's image, a custom one (made on the host that built it), or a
        // snapshot's (on the host that keeps it).
        let requested = input
            .base_image
            .clone()
            .unwrap_or_else(|| self.config.image.clone());
        let (image, on_host) = match &input.snapshot {
            Some(_) if input.base_image.is_some() => {
                return Err(AppError::Invalid(
                    "a snapshot brings its own image: give snapshot or baseImage, not both".into(),
                ));
            }
            Some(name) => {
                let snapshot = self.ready_snapshot(user, name).await?;
                // A disk smaller than the one saved would cut its file system short (the
                // source's record may be gone by retention; the host checks again).
                match self.store.environment(&snapshot.environment_id).await {
                    Ok(source) if resources.disk_gb < source.disk_gb => {
                        return Err(AppError::Invalid(format!(
                            "snapshot {} is of a {} GB disk: ask for diskGb {} or more",
                            snapshot.name, source.disk_gb, source.disk_gb
                        )));
                    }
                    Ok(_) | Err(StoreError::NotFound) => {}
                    Err(e) => return Err(e.into()),
                }
                (snapshot.image.unwrap_or(requested), Some(snapshot.host_id))
            }
            None if requested == self.config.image => (requested, None),
            None => {
                let custom = self.usable_image(user, &requested).await?;
                let host = self.store.host(&custom.host_id).await?;
                if host.kind != placement.kind {
                    return Err(AppError::Invalid(format!(
                        "image {} is for provider {}: ask for that provider",
                        custom.name, host.kind
                    )));
                }
                if let Some(min) = custom.min_disk_gb.filter(|min| resources.disk_gb < *min) {
                    return Err(AppError::Invalid(format!(
                        "image {} holds a file system of {min} GB: ask for diskGb {min} or more",
                        custom.name
                    )));
                }
                (custom.reference, Some(custom.host_id))
            }
        };
        if let Some(script) = &input.init_script {
            validate::command(script).map_err(|e| AppError::Invalid(format!("initScript: {e}")))?;
        }
        let user_key = match &input.ssh_public_key {
            Some(k) => Some(hearth_guest::keys::check_public_key(k).map_err(AppError::Invalid)?),
            None => None,
        };
        let quota = self.store.quota(user).await?;
        let hours = input
            .duration_hours
            .unwrap_or(quota.max_duration_hours.min(24));
        if !(1..=MAX_DURATION_HOURS).contains(&hours) {
            return Err(AppError::Invalid(format!(
                "durationHours must be between 1 and {MAX_DURATION_HOURS}, got {hours}"
            )));
        }
        if hours > quota.max_duration_hours {
            return Err(AppError::Quota(hearth_core::QuotaExceeded {
                limit: "maxDurationHours",
                max: quota.max_duration_hours,
                used: 0,
                requested: hours,
            }));
        }
        let keys = KeyPair::generate();
        let authorized = authorized_keys(&keys, user_key);
        let new = NewEnvironment {
            name: input.name,
            personal: false,
            placement,
            base_image: image,
            ssh_user: "dev".into(),
            environment_vars: input.environment_vars,
            ssh_public_key: authorized,
            ssh_private_key_enc: self.master_key.seal(&keys.private_openssh),
            auto_stop_minutes: user.tier.auto_stop_minutes(),
            expires_at: Some(self.now() + hours * 3_600_000),
            init_script: input.init_script,
            repository_url: input.repository_url,
            repository_ref: input.repository_ref,
            git_credential_id,
            for_mail: input.for_mail,
            on_host,
        };
        let job = self.new_job(JobKind::Provision, "", actor);
        let env = self.store.create_environment(user, new, job).await?;
        self.wake(JobKind::Provision.queue());
        Ok(env)
    }

    /// Creates the caller's personal VM (queued for provisioning) or returns the live one.
    /// `ssh_public_key`, when given, is authorized next to Hearth's own key.
    pub async fn provision_personal(
        &self,
        user: &User,
        size: SizeRequest,
        ssh_public_key: Option<&str>,
    ) -> AppResult<(bool, Environment)> {
        let resources = self.resources(user, &size)?;
        let user_key = ssh_public_key
            .map(|k| hearth_guest::keys::check_public_key(k).map_err(AppError::Invalid))
            .transpose()?;
        if let Some(existing) = self.store.personal_environment(&user.id).await? {
            return Ok((false, existing));
        }
        let keys = KeyPair::generate();
        let new = NewEnvironment {
            name: "Personal VM".into(),
            personal: true,
            placement: self.placement(resources, &CreateInput::default())?,
            base_image: self.config.image.clone(),
            ssh_user: "dev".into(),
            environment_vars: BTreeMap::new(),
            ssh_public_key: authorized_keys(&keys, user_key),
            ssh_private_key_enc: self.master_key.seal(&keys.private_openssh),
            auto_stop_minutes: user.tier.auto_stop_minutes(),
            expires_at: None,
            init_script: None,
            repository_url: None,
            repository_ref: None,
            git_credential_id: None,
            for_mail: None,
            on_host: None,
        };
        let job = self.new_job(JobKind::Provision, "", &user.id);
        let outcome = self
            .store
            .create_personal_environment(user, new, job)
            .await?;
        Ok(match outcome {
            PersonalOutcome::Created(env) => {
                self.wake(JobKind::Provision.queue());
                (true, env)
            }
            PersonalOutcome::Existing(env) => (false, env),
        })
    }

    /// The caller's environment by id or slug; someone else's is "not found".
    pub async fn owned_environment(&self, user: &User, id_or_slug: &str) -> AppResult<Environment> {
        self.store
            .environment_for_user(&user.id, id_or_slug)
            .await
            .map_err(AppError::not_found("environment"))
    }

    /// One of the caller's executions in one of their environments, with its output.
    pub async fn execution(
        &self,
        user: &User,
        id_or_slug: &str,
        execution_id: &str,
    ) -> AppResult<Execution> {
        let env = self.owned_environment(user, id_or_slug).await?;
        self.store
            .execution(&env.id, execution_id)
            .await
            .map_err(AppError::not_found("execution"))
    }

    /// Records an explicit keep-alive (activity for auto-stop) on a running environment.
    pub async fn keep_alive(&self, user: &User, id_or_slug: &str) -> AppResult<Environment> {
        let env = self.owned_environment(user, id_or_slug).await?;
        if env.state != EnvState::Running {
            return Err(AppError::InvalidState(format!(
                "the environment is {}; only a running one can be kept alive",
                env.state
            )));
        }
        self.store
            .touch_activity(&env.id, self.now(), "keepalive")
            .await?;
        self.owned_environment(user, id_or_slug).await
    }

    /// The caller's personal VM.
    pub async fn personal_vm(&self, user: &User) -> AppResult<Environment> {
        self.store
            .personal_environment(&user.id)
            .await?
            .ok_or(AppError::NotFound("personal VM"))
    }

    /// Queues start, stop or destroy. The job decides at run time what is left to do,
    /// so a repeated request is kept (and runs in order), never silently dropped.
    pub async fn request(&self, actor: &str, env: &Environment, kind: JobKind) -> AppResult<()> {
        match (kind, env.state) {
            (_, EnvState::Destroyed) => {
                return Err(AppError::InvalidState(
                    "the VM is destroyed; provision a new one".into(),
                ));
            }
            (JobKind::Start | JobKind::Stop, EnvState::Destroying) => {
                return Err(AppError::InvalidState("the VM is being destroyed".into()));
            }
            _ => {}
        }
        if kind == JobKind::Start && !env.reserved {
            // Fail fast; the job enforces it again atomically when it moves the state.
            let owner = self.store.user(&env.user_id).await?;
            let quota = self.store.quota(&owner).await?;
            let usage = self.store.usage(&owner.id).await?;
            quota
                .admit_existing(&usage, &env.resources())
                .map_err(AppError::Quota)?;
        }
        let job = self.new_job(kind, &env.id, actor);
        self.store
            .enqueue_control(&job, &format!("{}_requested", kind.as_str()))
            .await?;
        self.wake(kind.queue());
        Ok(())
    }

    /// Returns once the environment is in `want`: waits on change notices (this node's
    /// writes, other nodes' through Redis, and the shared head probe otherwise).
    /// `InvalidState` when it settled in `error` or `destroyed` instead; `Timeout` when
    /// `timeout` passed.
    pub async fn wait_for_state(
        &self,
        env: Environment,
        want: EnvState,
        timeout: Duration,
    ) -> AppResult<Environment> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut env = env;
        loop {
            if env.state == want {
                return Ok(env);
            }
            // At rest for good, unless a job is about to move it on (a destroy of an
            // environment in `error`, say, that has not begun yet).
            if matches!(env.state, EnvState::Error | EnvState::Destroyed)
                && !self.store.has_outstanding_job(&env.id).await?
            {
                return Err(AppError::InvalidState(format!(
                    "the environment is {} ({}), it will not become {want} by itself",
                    env.state,
                    env.state_message.as_deref().unwrap_or("no message")
                )));
            }
            let seen = env.generation;
            loop {
                let notice = self.changed.notified();
                match self.hub.head(self, &env.id).await {
                    Some((generation, _)) if generation != seen => break,
                    None => return Err(AppError::NotFound("environment")),
                    Some(_) => {}
                }
                tokio::select! {
                    _ = notice => {}
                    _ = tokio::time::sleep(crate::events::EVENT_POLL) => {}
                    _ = tokio::time::sleep_until(deadline) => {
                        return Err(AppError::Timeout(format!("still {} after {} s", env.state, timeout.as_secs())));
                    }
                }
            }
            env = self.store.environment(&env.id).await?;
        }
    }

    pub fn target(&self, env: &Environment) -> AppResult<Target> {
        let (Some(host), Some(port)) = (env.ssh_host.clone(), env.ssh_port) else {
            return Err(AppError::InvalidState(
                "the VM has no SSH address yet".into(),
            ));
        };
        if env.provider == HostKind::Sim {
            return Err(AppError::InvalidState(
                "a simulated VM runs no commands; it exists for tests and load measurements".into(),
            ));
        }
        let private_key_openssh = self
            .master_key
            .open(&env.ssh_private_key_enc)
            .map_err(|e| AppError::Internal(format!("{e}; was HEARTH_MASTER_KEY changed?")))?;
        Ok(Target {
            environment_id: env.id.clone(),
            host,
            port: u16::try_from(port)
                .map_err(|_| AppError::Internal("stored SSH port out of range".into()))?,
            user: env.ssh_user.clone(),
            private_key_openssh,
            host_key: env.ssh_host_key.clone(),
        })
    }

    /// Refuses a command unless the VM runs. A stopped VM gets a start queued (as the
    /// original did) and the caller is told to retry.
    async fn ensure_running(&self, user: &User, env: &Environment) -> AppResult<()> {
        match env.state {
            EnvState::Running => Ok(()),
            EnvState::Stopped => {
                if !self
                    .store
                    .has_pending_job(&env.id, JobKind::Start.as_str())
                    .await?
                {
                    self.request(&user.id, env, JobKind::Start).await?;
                }
                Err(AppError::InvalidState(
                    "the VM is stopped; a start has been queued, try again in a few seconds".into(),
                ))
            }
            EnvState::Requested | EnvState::Provisioning => Err(AppError::InvalidState(
                "the VM is still provisioning; try again when it is running".into(),
            )),
            other => Err(AppError::InvalidState(format!(
                "the VM is {other}; commands run only when it is running"
            ))),
        }
    }

    /// Checks the input and the VM, and builds the SSH request: shared by both exec forms.
    async fn prepare_exec(
        &self,
        user: &User,
        env: &Environment,
        input: &ExecInput,
    ) -> AppResult<(Target, ExecRequest)> {
        let timeout = input.validate()?;
        self.ensure_running(user, env).await?;
        let request = ExecRequest {
            code: input.code.clone(),
            code_on_stdin: true,
            working_dir: input.working_dir.clone(),
            env: env.environment_vars.clone(),
            stdin: Vec::new(),
            timeout: Duration::from_secs(timeout as u64),
            max_output: EXEC_OUTPUT_LIMIT,
        };
        Ok((self.target(env)?, request))
    }

    fn new_execution(
        &self,
        env_id: &str,
        user_id: &str,
        input: &ExecInput,
        started_at: i64,
    ) -> Execution {
        let finished_at = self.now();
        Execution {
            id: uuid::Uuid::now_v7().to_string(),
            environment_id: env_id.to_string(),
            user_id: user_id.to_string(),
            command: input.code.clone(),
            working_dir: input.working_dir.clone(),
            status: String::new(),
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            truncated: false,
            started_at,
            finished_at: Some(finished_at),
            duration_ms: Some(finished_at - started_at),
        }
    }

    /// Runs a command in a running VM and records it.
    pub async fn exec(
        &self,
        user: &User,
        env: &Environment,
        input: ExecInput,
    ) -> AppResult<ExecResult> {
        let (target, request) = self.prepare_exec(user, env, &input).await?;
        let started_at = self.now();
        let result = self.ssh.exec(&target, &request).await;
        let _ = self.store.touch_activity(&env.id, self.now(), "exec").await;
        let mut execution = self.new_execution(&env.id, &user.id, &input, started_at);
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                execution.status = "failed".into();
                execution.stderr = e.to_string();
                self.store.insert_execution(&execution).await?;
                return Err(AppError::Unavailable(format!(
                    "could not run the command: {e}"
                )));
            }
        };
        let (stdout, out_cut) = cut(&out.stdout, EXEC_OUTPUT_LIMIT);
        let (stderr, err_cut) = cut(&out.stderr, EXEC_OUTPUT_LIMIT);
        let (stored_out, so) = cut(stdout.as_bytes(), STORED_OUTPUT_LIMIT);
        let (stored_err, se) = cut(stderr.as_bytes(), STORED_OUTPUT_LIMIT);
        execution.status = if out.timed_out {
            "timeout"
        } else {
            "completed"
        }
        .into();
        execution.exit_code = out.exit_code;
        execution.stdout = stored_out;
        execution.stderr = stored_err;
        execution.truncated = out.truncated || so || se;
        execution.duration_ms = Some(out.duration.as_millis() as i64);
        self.store.insert_execution(&execution).await?;
        Ok(ExecResult {
            execution,
            stdout,
            stderr,
            truncated: out.truncated || out_cut || err_cut,
        })
    }

    /// Starts a command and streams its output. The execution is recorded when it ends,
    /// or as `cancelled` when the listener goes away (which kills the remote process).
    pub async fn exec_stream(
        &self,
        user: &User,
        env: &Environment,
        input: ExecInput,
    ) -> AppResult<tokio::sync::mpsc::Receiver<StreamEvent>> {
        let (target, request) = self.prepare_exec(user, env, &input).await?;
        let started_at = self.now();
        let mut chunks = self
            .ssh
            .exec_stream(&target, &request)
            .await
            .map_err(|e| AppError::Unavailable(format!("could not run the command: {e}")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let app = self.clone();
        let (env_id, user_id) = (env.id.clone(), user.id.clone());
        tokio::spawn(async move {
            use hearth_guest::StreamChunk;
            // Only what is stored is kept: memory stays bounded whatever the command
            // prints; the rest passes through to the listener, at the listener's pace
            // (the channel is bounded, and so is the SSH channel behind it).
            let (mut stdout, mut stderr) = (Capped::default(), Capped::default());
            let mut ending = None;
            loop {
                let chunk = tokio::select! {
                    chunk = chunks.recv() => chunk,
                    // The listener hung up while the command was quiet.
                    _ = tx.closed() => None,
                };
                let Some(chunk) = chunk else { break };
                let event = match chunk {
                    StreamChunk::Stdout(b) => {
                        stdout.push(&b);
                        StreamEvent {
                            kind: "stdout",
                            data: serde_json::json!({ "data": String::from_utf8_lossy(&b) }),
                        }
                    }
                    StreamChunk::Stderr(b) => {
                        stderr.push(&b);
                        StreamEvent {
                            kind: "stderr",
                            data: serde_json::json!({ "data": String::from_utf8_lossy(&b) }),
                        }
                    }
                    StreamChunk::Exit {
                        code,
                        timed_out,
                        duration,
                    } => {
                        ending = Some((code, timed_out, duration));
                        StreamEvent {
                            kind: "exit",
                            data: serde_json::json!({ "exitCode": code, "timedOut": timed_out, "durationMs": duration.as_millis() as i64 }),
                        }
                    }
                };
                if tx.send(event).await.is_err() {
                    break; // listener gone: dropping `chunks` kills the command
                }
            }
            drop(chunks);
            let mut execution = app.new_execution(&env_id, &user_id, &input, started_at);
            let (stored_out, so) = cut(&stdout.bytes, STORED_OUTPUT_LIMIT);
            let (stored_err, se) = cut(&stderr.bytes, STORED_OUTPUT_LIMIT);
            let (status, code) = match ending {
                Some((_, true, _)) => ("timeout", None),
                Some((code, false, _)) => ("completed", code),
                None => ("cancelled", None),
            };
            execution.status = status.into();
            execution.exit_code = code;
            execution.stdout = stored_out;
            execution.stderr = stored_err;
            execution.truncated = so || se || stdout.dropped || stderr.dropped;
            let _ = app.store.insert_execution(&execution).await;
            let _ = app.store.touch_activity(&env_id, app.now(), "exec").await;
        });
        Ok(rx)
    }
}

/// The guest's `authorized_keys`: Hearth's own key first, then the user's, if any.
fn authorized_keys(hearth: &KeyPair, user_key: Option<String>) -> String {
    match user_key {
        Some(k) => format!("{}\n{k}", hearth.public_openssh),
        None => hearth.public_openssh.clone(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cut_respects_char_boundaries() {
        let (s, t) = super::cut("héllo".as_bytes(), 2);
        assert_eq!((s.as_str(), t), ("h", true));
        let (s, t) = super::cut(b"abc", 10);
        assert_eq!((s.as_str(), t), ("abc", false));
    }
}
