use super::*;
use hearth_store::testdb::each_backend;
use hearth_store::{JobState, NewJob};
use std::sync::atomic::{AtomicI64, Ordering};

fn fast(concurrency: usize, max_attempts: i64) -> Vec<QueueConfig> {
    vec![QueueConfig {
        name: "q".into(),
        concurrency,
        max_attempts,
        backoff: Duration::from_millis(50),
    }]
}

fn timing() -> Timing {
    Timing {
        lease: Duration::from_millis(600),
        poll: Duration::from_millis(50),
    }
}

fn job(env: &str) -> NewJob {
    NewJob {
        queue: "q".into(),
        kind: "k".into(),
        environment_id: env.into(),
        max_attempts: 2,
        actor: "system:test".into(),
    }
}

async fn wait_until<F: Fn() -> bool>(what: &str, f: F) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

struct Counting {
    runs: AtomicI64,
    now: AtomicI64,
    peak: AtomicI64,
    fail: bool,
}

#[async_trait]
impl Handler for Counting {
    async fn run(&self, _job: &Job, _lease: &Lease) -> Result<(), JobError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(40)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        if self.fail {
            Err(JobError::Retry("always fails".into()))
        } else {
            Ok(())
        }
    }
}

fn counting(fail: bool) -> Arc<Counting> {
    Arc::new(Counting {
        runs: AtomicI64::new(0),
        now: AtomicI64::new(0),
        peak: AtomicI64::new(0),
        fail,
    })
}

#[tokio::test]
async fn runs_each_job_once_within_the_concurrency_limit() {
    each_backend(|store| async move {
        let mut ids = Vec::new();
        for i in 0..8 {
            ids.push(store.enqueue(&job(&format!("env-{i}")), "k").await.unwrap());
        }
        let queue = Queue::new(store.clone(), fast(3, 2), timing());
        let h = counting(false);
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn({
            let (queue, h) = (queue.clone(), h.clone());
            async move { queue.run(h, rx).await }
        });
        wait_until("8 runs", || h.runs.load(Ordering::SeqCst) >= 8).await;
        stop.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(h.runs.load(Ordering::SeqCst), 8);
        assert!(
            h.peak.load(Ordering::SeqCst) <= 3,
            "peak {}",
            h.peak.load(Ordering::SeqCst)
        );
        for id in ids {
            assert_eq!(store.job(id).await.unwrap().state, JobState::Succeeded);
        }
    })
    .await;
}

#[tokio::test]
async fn failing_jobs_retry_then_go_dead() {
    each_backend(|store| async move {
        let id = store.enqueue(&job("env-x"), "k").await.unwrap();
        let queue = Queue::new(store.clone(), fast(1, 2), timing());
        let h = counting(true);
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn({
            let (queue, h) = (queue.clone(), h.clone());
            async move { queue.run(h, rx).await }
        });
        for _ in 0..200 {
            if store.job(id).await.unwrap().state == JobState::Dead {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        stop.send(true).unwrap();
        task.await.unwrap();
        let j = store.job(id).await.unwrap();
        assert_eq!((j.state, j.attempts), (JobState::Dead, 2));
        assert_eq!(j.last_error.as_deref(), Some("always fails"));
        assert_eq!(h.runs.load(Ordering::SeqCst), 2);
    })
    .await;
}

/// Blocks forever: stands for a worker that hangs or whose process is gone.
struct Hang;

#[async_trait]
impl Handler for Hang {
    async fn run(&self, _job: &Job, _lease: &Lease) -> Result<(), JobError> {
        std::future::pending().await
    }
}

#[tokio::test]
async fn a_dead_workers_job_runs_again_elsewhere() {
    each_backend(|store| async move {
        let id = store.enqueue(&job("env-y"), "k").await.unwrap();
        // First "process": claims the job, then dies (its tasks are aborted, so no heartbeat).
        let first = Queue::new(store.clone(), fast(1, 2), timing());
        let (_stop1, rx1) = watch::channel(false);
        let dying = tokio::spawn({
            let first = first.clone();
            async move { first.run(Arc::new(Hang), rx1).await }
        });
        for _ in 0..200 {
            if store.job(id).await.unwrap().state == JobState::Running {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            store.job(id).await.unwrap().lease_owner.as_deref(),
            Some(first.owner())
        );
        dying.abort();
        // Second process picks it up once the lease runs out.
        let second = Queue::new(store.clone(), fast(1, 2), timing());
        let h = counting(false);
        let (stop2, rx2) = watch::channel(false);
        let task = tokio::spawn({
            let (second, h) = (second.clone(), h.clone());
            async move { second.run(h, rx2).await }
        });
        wait_until("the re-run", || h.runs.load(Ordering::SeqCst) >= 1).await;
        stop2.send(true).unwrap();
        task.await.unwrap();
        let j = store.job(id).await.unwrap();
        // The dead worker's claim is a crash, not an attempt.
        assert_eq!(
            (j.state, j.attempts, j.crashes),
            (JobState::Succeeded, 1, 1)
        );
    })
    .await;
}

/// Holds its job until the lease is gone, then reports whether the token said so.
struct Watchful {
    saw_loss: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait]
impl Handler for Watchful {
    async fn run(&self, _job: &Job, lease: &Lease) -> Result<(), JobError> {
        let saw = self.saw_loss.clone();
        let lost = lease.lost.clone();
        // A side task stands for work the handler would stop doing.
        tokio::spawn(async move {
            lost.cancelled().await;
            saw.store(true, Ordering::SeqCst);
        });
        std::future::pending().await
    }
}

#[tokio::test]
async fn a_handler_learns_that_its_lease_is_lost() {
    each_backend(|store| async move {
        let id = store.enqueue(&job("env-l"), "k").await.unwrap();
        let queue = Queue::new(store.clone(), fast(1, 2), timing());
        let saw = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn({
            let (queue, saw) = (queue.clone(), saw.clone());
            async move { queue.run(Arc::new(Watchful { saw_loss: saw }), rx).await }
        });
        for _ in 0..200 {
            if store.job(id).await.unwrap().state == JobState::Running {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Someone else takes the job (as the sweeper would after a stall).
        store
            .exec_sql_for_tests(
                "UPDATE jobs SET lease_owner = 'other' WHERE id = $1 AND $2 = $2",
                id,
                "",
            )
            .await
            .unwrap();
        wait_until("the handler to see the loss", || saw.load(Ordering::SeqCst)).await;
        stop.send(true).unwrap();
        task.await.unwrap();
        // The old worker recorded nothing: the job is the other owner's.
        assert_eq!(
            store.job(id).await.unwrap().lease_owner.as_deref(),
            Some("other")
        );
    })
    .await;
}

struct Waits;

#[async_trait]
impl Handler for Waits {
    async fn run(&self, _job: &Job, _lease: &Lease) -> Result<(), JobError> {
        Err(JobError::Later(
            "waiting for the host".into(),
            Duration::from_secs(60),
        ))
    }
}

#[tokio::test]
async fn waiting_spends_no_attempt() {
    each_backend(|store| async move {
        let id = store.enqueue(&job("env-w"), "k").await.unwrap();
        let queue = Queue::new(store.clone(), fast(1, 1), timing());
        assert_eq!(queue.run_ready(&Waits).await, 1);
        let j = store.job(id).await.unwrap();
        assert_eq!(
            (j.state, j.attempts, j.last_error.as_deref()),
            (JobState::Queued, 0, Some("waiting for the host"))
        );
        assert!(j.run_after >= store.now() + 59_000);
        assert_eq!(queue.run_ready(&Waits).await, 0, "not due yet");
    })
    .await;
}

#[test]
fn backoff_doubles() {
    let c = &QueueConfig::defaults()[0];
    assert_eq!(c.backoff_for(1), Duration::from_secs(5));
    assert_eq!(c.backoff_for(2), Duration::from_secs(10));
    assert_eq!(c.backoff_for(3), Duration::from_secs(20));
}
