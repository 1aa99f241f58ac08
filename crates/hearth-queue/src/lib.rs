//! Runs jobs from the jobs table: per-queue concurrency, leases kept alive by a heartbeat,
//! retries with exponential backoff, a dead-letter state, and a sweeper that hands back the
//! jobs of workers that died.
//!
//! Workers sleep until woken in-process (`Queue::wake`) or until the poll interval passes,
//! so a job written by another process is still picked up, only later. A handler holds a
//! `Lease`: its token is cancelled the moment the lease is found lost, and the handler's
//! future is dropped, so a worker that lost a job stops acting on it.
//!
//! Architecture invariant: the queue knows jobs, not environments; what a job does is the
//! handler's business.

use async_trait::async_trait;
use hearth_store::{Job, Store};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
pub use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub name: String,
    pub concurrency: usize,
    pub max_attempts: i64,
    /// First retry waits this long; each later one twice as long as the one before.
    pub backoff: Duration,
}

impl QueueConfig {
    /// The seed's queues: `provision` (2 at a time, 3 attempts, 5 s doubling) and
    /// `control` (5, 2 attempts, 2 s doubling); and `mail` for commands by mail (4 at a
    /// time; 8 attempts 10 s doubling; waiting for a VM or a relay spends none).
    pub fn defaults() -> Vec<QueueConfig> {
        vec![
            QueueConfig {
                name: "provision".into(),
                concurrency: 2,
                max_attempts: 3,
                backoff: Duration::from_secs(5),
            },
            QueueConfig {
                name: "control".into(),
                concurrency: 5,
                max_attempts: 2,
                backoff: Duration::from_secs(2),
            },
            QueueConfig {
                name: "mail".into(),
                concurrency: 4,
                max_attempts: 8,
                backoff: Duration::from_secs(10),
            },
        ]
    }

    pub fn backoff_for(&self, attempts: i64) -> Duration {
        let exp = (attempts - 1).clamp(0, 16) as u32;
        self.backoff.saturating_mul(2u32.saturating_pow(exp))
    }
}

#[derive(Debug)]
pub enum JobError {
    /// Worth another attempt (until attempts run out).
    Retry(String),
    /// Retrying cannot help; the job goes straight to `dead`.
    Fatal(String),
    /// Not a failure: the job waits for something outside it and runs again after the
    /// delay without spending an attempt.
    Later(String, Duration),
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Retry(m) | JobError::Fatal(m) | JobError::Later(m, _) => f.write_str(m),
        }
    }
}

/// A worker's hold on a job.
#[derive(Clone, Debug)]
pub struct Lease {
    /// The lease owner, as written on the job row (progress is saved under it).
    pub owner: String,
    /// Cancelled when the lease is found lost: stop acting.
    pub lost: CancellationToken,
}

/// Does the work of a job. It must be idempotent: after a crash the same job runs again.
/// On the last attempt (`job.is_last_attempt()`) or when `job.exhausted()`, a failing
/// handler undoes what it did before returning.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn run(&self, job: &Job, lease: &Lease) -> Result<(), JobError>;
}

#[derive(Debug, Clone)]
pub struct Timing {
    pub lease: Duration,
    pub poll: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease: Duration::from_secs(30),
            poll: Duration::from_secs(1),
        }
    }
}

#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    configs: Vec<QueueConfig>,
    wakers: HashMap<String, Arc<Notify>>,
    owner: String,
    timing: Timing,
}

impl Queue {
    pub fn new(store: Store, configs: Vec<QueueConfig>, timing: Timing) -> Queue {
        let wakers = configs
            .iter()
            .map(|c| (c.name.clone(), Arc::new(Notify::new())))
            .collect();
        let owner = format!("{}:{}", hostname(), uuid::Uuid::new_v4().simple());
        Queue {
            inner: Arc::new(Inner {
                store,
                configs,
                wakers,
                owner,
                timing,
            }),
        }
    }

    pub fn config(&self, queue: &str) -> Option<&QueueConfig> {
        self.inner.configs.iter().find(|c| c.name == queue)
    }

    /// This process's lease owner name, as it appears in the jobs table.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// Wakes the workers of `queue` after a job was written.
    pub fn wake(&self, queue: &str) {
        if let Some(n) = self.inner.wakers.get(queue) {
            n.notify_one();
        }
    }

    /// Runs every queue's workers and the sweeper until `shutdown` turns true, then
    /// waits for running jobs to finish.
    pub async fn run(&self, handler: Arc<dyn Handler>, mut shutdown: watch::Receiver<bool>) {
        let mut set = JoinSet::new();
        for config in self.inner.configs.clone() {
            let (this, handler, shutdown) = (self.clone(), handler.clone(), shutdown.clone());
            set.spawn(async move { this.run_queue(config, handler, shutdown).await });
        }
        let this = self.clone();
        let sweeper_shutdown = shutdown.clone();
        set.spawn(async move { this.sweep(sweeper_shutdown).await });
        let _ = shutdown.wait_for(|stop| *stop).await;
        while set.join_next().await.is_some() {}
    }

    async fn run_queue(
        &self,
        config: QueueConfig,
        handler: Arc<dyn Handler>,
        shutdown: watch::Receiver<bool>,
    ) {
        let permits = Arc::new(Semaphore::new(config.concurrency));
        let wake = self.inner.wakers[&config.name].clone();
        let mut running = JoinSet::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closes");
            let claimed = self
                .inner
                .store
                .claim(&config.name, &self.inner.owner, self.lease_ms())
                .await;
            match claimed {
                Ok(Some(job)) => {
                    // Another job may be ready too: let the next loop look without waiting.
                    let (this, handler, config) = (self.clone(), handler.clone(), config.clone());
                    running.spawn(async move {
                        this.execute(&config, handler.as_ref(), job).await;
                        drop(permit);
                    });
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(queue = %config.name, error = %e, "could not claim a job; retrying")
                }
            }
            drop(permit);
            let sleep = self.idle_sleep(&config.name).await;
            let mut shutdown = shutdown.clone();
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
            while running.try_join_next().is_some() {}
        }
        while running.join_next().await.is_some() {}
    }

    /// Until the next delayed job is due, capped by the poll interval.
    async fn idle_sleep(&self, queue: &str) -> Duration {
        let poll = self.inner.timing.poll;
        match self.inner.store.next_run_after(queue).await {
            Ok(Some(at)) => Duration::from_millis(
                (at - self.inner.store.now()).clamp(10, poll.as_millis() as i64) as u64,
            ),
            _ => poll,
        }
    }

    /// Claims and runs, one after another, every job that is ready now on any queue;
    /// returns how many ran. For tests that drive jobs (with a manual clock) instead of
    /// running the worker loops.
    pub async fn run_ready(&self, handler: &dyn Handler) -> usize {
        let mut ran = 0;
        loop {
            let mut any = false;
            for config in &self.inner.configs {
                if let Ok(Some(job)) = self
                    .inner
                    .store
                    .claim(&config.name, &self.inner.owner, self.lease_ms())
                    .await
                {
                    self.execute(config, handler, job).await;
                    ran += 1;
                    any = true;
                }
            }
            if !any {
                return ran;
            }
        }
    }

    fn lease_ms(&self) -> i64 {
        self.inner.timing.lease.as_millis() as i64
    }

    async fn execute(&self, config: &QueueConfig, handler: &dyn Handler, job: Job) {
        let store = &self.inner.store;
        let owner = &self.inner.owner;
        tracing::info!(job = job.id, kind = %job.kind, environment = %job.environment_id, attempt = job.attempts, crashes = job.crashes, "job started");
        let lease = Lease {
            owner: owner.clone(),
            lost: CancellationToken::new(),
        };
        let _heartbeat = {
            let (store, owner, lease_ms, lost) = (
                store.clone(),
                owner.clone(),
                self.lease_ms(),
                lease.lost.clone(),
            );
            let id = job.id;
            AbortOnDrop(tokio::spawn(async move {
                let mut tick =
                    tokio::time::interval(Duration::from_millis((lease_ms / 3).max(1) as u64));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    match store.renew_lease(id, &owner, lease_ms).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(
                                job = id,
                                "lost the lease on a running job; stopping it here"
                            );
                            lost.cancel();
                            break;
                        }
                        Err(e) => tracing::warn!(job = id, error = %e, "could not renew a lease"),
                    }
                }
            }))
        };
        let result = tokio::select! {
            result = handler.run(&job, &lease) => result,
            _ = lease.lost.cancelled() => {
                // Another worker owns it now; its outcome is that worker's to record.
                self.wake(&config.name);
                return;
            }
        };
        drop(_heartbeat);
        let recorded = match result {
            Ok(()) => {
                tracing::info!(job = job.id, kind = %job.kind, "job succeeded");
                store.succeed(job.id, owner).await
            }
            Err(JobError::Retry(msg)) if !job.is_last_attempt() => {
                let delay = config.backoff_for(job.attempts);
                tracing::warn!(job = job.id, kind = %job.kind, error = %msg, retry_in_ms = delay.as_millis() as u64, "job failed; will retry");
                store
                    .fail(
                        job.id,
                        owner,
                        &msg,
                        Some(store.now() + delay.as_millis() as i64),
                    )
                    .await
            }
            Err(JobError::Later(msg, delay)) => {
                tracing::info!(job = job.id, kind = %job.kind, note = %msg, again_in_ms = delay.as_millis() as u64, "job waits");
                store
                    .postpone(job.id, owner, &msg, store.now() + delay.as_millis() as i64)
                    .await
            }
            Err(e) => {
                tracing::error!(job = job.id, kind = %job.kind, error = %e, "job failed for good; dead-lettered");
                store.fail(job.id, owner, &e.to_string(), None).await
            }
        };
        if let Err(e) = recorded {
            tracing::error!(job = job.id, error = %e, "could not record a job's outcome; its lease will expire and it will run again");
        }
        self.wake(&config.name);
    }

    async fn sweep(&self, mut shutdown: watch::Receiver<bool>) {
        let every = (self.inner.timing.lease / 2).max(Duration::from_millis(100));
        loop {
            match self.inner.store.requeue_expired().await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(
                        jobs = n,
                        "handed back jobs whose worker stopped renewing its lease"
                    );
                    for c in &self.inner.configs {
                        self.wake(&c.name);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "lease sweep failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Stops the lease heartbeat when the job's task ends, however it ends (also when the
/// task is cancelled), so a dead worker's lease really expires.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "node".into())
}

#[cfg(test)]
mod tests;
