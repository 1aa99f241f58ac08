//! The sagas, the reconciler and host health on simulated hosts with a manual clock: every
//! failure path of every job, on SQLite and PostgreSQL, without Docker and without sleeping.

use crate::hosts::HostInput;
use crate::jobs::JobHandler;
use crate::saga::Plan;
use crate::service::{CreateInput, SizeRequest};
use crate::{App, Config};
use hearth_core::clock::ManualClock;
use hearth_core::{EnvState, HostHealth, HostKind, JobKind, Role, Tier};
use hearth_store::testdb::each_backend_url;
use hearth_store::{Environment, Host, JobState, User};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

struct World {
    app: App,
    clock: Arc<ManualClock>,
    admin: User,
    user: User,
    _dir: tempfile::TempDir,
}

async fn world(url: String) -> World {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path().join("data"), url);
    config.default_kind = HostKind::Sim;
    config.local_docker_host = false;
    config.ssh_wait = Duration::from_secs(5);
    for q in &mut config.queues {
        q.backoff = Duration::from_secs(1);
    }
    let clock = ManualClock::new();
    let app = crate::start::open_app_with_clock(config, clock.clone())
        .await
        .unwrap();
    let (admin, _) = app
        .store
        .create_user("ops@example.com", Role::Admin, Tier::Unlimited)
        .await
        .unwrap();
    let (user, _) = app
        .store
        .create_user("u@example.com", Role::User, Tier::Unlimited)
        .await
        .unwrap();
    World {
        app,
        clock,
        admin,
        user,
        _dir: dir,
    }
}

impl World {
    /// A simulated host of its own region, so an environment can be sent there.
    async fn host(&self, region: &str, options: Value) -> Host {
        let input = HostInput {
            name: format!("sim-{region}"),
            kind: "sim".into(),
            region: Some(region.into()),
            max_vcpus: 64,
            max_memory_mb: 65536,
            options: Some(options),
            ..Default::default()
        };
        self.app.add_host(&self.admin, input).await.unwrap()
    }

    async fn create(&self, region: &str) -> Environment {
        let input = CreateInput {
            name: format!("in {region}"),
            region: Some(region.into()),
            init_script: Some("echo ready".into()),
            // So every fault point of the clone step is run too (a simulated guest's
            // clone succeeds while its VM lives).
            repository_url: Some("https://example.com/team/project.git".into()),
            size: SizeRequest {
                vcpus: Some(1),
                memory_mb: Some(512),
                disk_gb: Some(1),
            },
            ..Default::default()
        };
        self.app
            .create_environment(&self.user, input)
            .await
            .unwrap()
    }

    async fn env(&self, id: &str) -> Environment {
        self.app.store.environment(id).await.unwrap()
    }

    async fn request(&self, id: &str, kind: JobKind) {
        let env = self.env(id).await;
        self.app.request(&self.user.id, &env, kind).await.unwrap();
    }

    async fn faults(&self, host: &Host, options: Value) {
        self.app
            .update_host(&self.admin, &host.id, (None, None, None), Some(options))
            .await
            .unwrap();
    }

    /// Runs every job until none is left, moving the clock past backoffs and waits.
    async fn settle(&self) {
        let handler = JobHandler {
            app: self.app.clone(),
        };
        for _ in 0..500 {
            if self.app.queue.run_ready(&handler).await == 0 {
                if self
                    .app
                    .store
                    .count("SELECT COUNT(*) AS n FROM jobs WHERE state IN ('queued', 'running')")
                    .await
                    .unwrap()
                    == 0
                {
                    return;
                }
                self.clock.advance_ms(60_000);
            }
        }
        panic!(
            "jobs did not settle: {:?}",
            self.app.store.list_jobs(None, None, 1000).await.unwrap().0
        );
    }

    /// A node runs the ready jobs until one hangs at a simulated fault, and dies there
    /// (its task dropped: no clean-up, the lease kept). Then its lease runs out and the
    /// sweeper hands the job back; returns how many jobs it handed back.
    async fn crash_at_the_hang(&self, handler: &Arc<JobHandler>) -> u64 {
        let mut hangs = self.app.sim.hangs();
        let seen = *hangs.borrow_and_update();
        let node = tokio::spawn({
            let (queue, handler) = (self.app.queue.clone(), handler.clone());
            async move { queue.run_ready(handler.as_ref()).await }
        });
        hangs.wait_for(|n| *n > seen).await.unwrap();
        node.abort();
        let _ = node.await;
        self.clock.advance_ms(31_000);
        self.app.store.requeue_expired().await.unwrap()
    }

    /// Two reconciler passes: it acts on what it finds twice in a row.
    async fn reconcile(&self) {
        crate::reconcile::reconcile(&self.app).await.unwrap();
        crate::reconcile::reconcile(&self.app).await.unwrap();
    }

    async fn live_vms(&self, env_id: &str) -> Vec<hearth_store::SimVmRow> {
        self.app
            .store
            .sim_vms_of(env_id)
            .await
            .unwrap()
            .into_iter()
            .filter(|v| v.state != "destroyed")
            .collect()
    }

    /// What no failure may break: counters equal the sums, nothing transitional without a
    /// job, at most one VM per environment and none for a destroyed one, a running VM only
    /// for an environment that holds its resources, usage equal to what is held.
    async fn check_invariants(&self, context: &str) {
        assert!(
            self.app.store.resum_hosts().await.unwrap().is_empty(),
            "{context}: host counters drifted"
        );
        let mut held = (0, 0);
        for env in self.app.store.live_environments().await.unwrap() {
            if env.state.is_transitional() {
                assert!(
                    self.app.store.has_outstanding_job(&env.id).await.unwrap(),
                    "{context}: {} left {}",
                    env.id,
                    env.state
                );
            }
            let vms = self.live_vms(&env.id).await;
            assert!(
                vms.len() <= 1,
                "{context}: {} VMs for one environment",
                vms.len()
            );
            if vms.iter().any(|v| v.state == "running") {
                assert!(
                    env.reserved,
                    "{context}: a VM runs for an environment in {} that holds nothing",
                    env.state
                );
            }
            if env.reserved {
                held.0 += 1;
                held.1 += env.vcpus;
            }
        }
        let usage = self.app.store.usage(&self.user.id).await.unwrap();
        assert_eq!(
            (usage.concurrent_environments, usage.vcpus),
            held,
            "{context}: usage"
        );
    }
}

/// What each plan's environment is when its job fails for good at a point.
fn expected_after_failure(plan: Plan, point: &str) -> EnvState {
    let step = point.split('.').nth(1).unwrap();
    let after = point.ends_with(".after");
    match (plan, step, after) {
        // Its last write went through: the job succeeded.
        (_, "finish", true) => plan.target(),
        // Failed before its first write: the environment is where it was.
        (Plan::Start, "begin", false) => EnvState::Stopped,
        (Plan::Stop | Plan::Destroy, "begin", false) => EnvState::Running,
        // The VM had stopped or gone: the job's state after all.
        (Plan::Stop, "stop_vm", true) | (Plan::Stop, "finish", false) => EnvState::Stopped,
        (Plan::Destroy, "destroy_vm", true) | (Plan::Destroy, "finish", false) => {
            EnvState::Destroyed
        }
        // A stop that did not happen leaves it running.
        (Plan::Stop, _, _) => EnvState::Running,
        _ => EnvState::Error,
    }
}

/// Brings a new environment in region `region` to where `plan` starts.
async fn prepared(w: &World, region: &str, plan: Plan) -> Environment {
    let env = w.create(region).await;
    if plan != Plan::Provision {
        w.settle().await;
        assert_eq!(w.env(&env.id).await.state, EnvState::Running);
    }
    if plan == Plan::Start {
        w.request(&env.id, JobKind::Stop).await;
        w.settle().await;
        assert_eq!(w.env(&env.id).await.state, EnvState::Stopped);
    }
    env
}

fn kind_of(plan: Plan) -> JobKind {
    match plan {
        Plan::Provision => JobKind::Provision,
        Plan::Start => JobKind::Start,
        Plan::Stop => JobKind::Stop,
        Plan::Destroy => JobKind::Destroy,
    }
}

#[tokio::test]
async fn a_failure_at_every_step_leaves_nothing_behind() {
    each_backend_url(|url| async move {
        let w = world(url).await;
        for (i, (plan, point)) in Plan::all_fault_points().into_iter().enumerate() {
            let region = format!("r{i}");
            let fault = json!({ "faults": { point.clone(): "fail" } });
            let host = w
                .host(
                    &region,
                    if plan == Plan::Provision {
                        fault.clone()
                    } else {
                        json!({})
                    },
                )
                .await;
            let env = prepared(&w, &region, plan).await;
            if plan != Plan::Provision {
                w.faults(&host, fault).await;
                w.request(&env.id, kind_of(plan)).await;
            }
            w.settle().await;
            let now = w.env(&env.id).await;
            let want = expected_after_failure(plan, &point);
            assert_eq!(now.state, want, "{point}: {:?}", now.state_message);
            let vms = w.live_vms(&env.id).await;
            match want {
                EnvState::Error | EnvState::Running
                    if (want == EnvState::Error || now.state_message.is_some()) =>
                {
                    let msg = now.state_message.clone().unwrap_or_default();
                    assert!(
                        msg.contains(&format!("simulated failure at {point}")),
                        "{point}: the reason is missing: {msg:?}"
                    );
                }
                _ => {}
            }
            match (plan, want) {
                // Provisioning undone: no VM at all, nothing held.
                (Plan::Provision, EnvState::Error) => {
                    assert!(vms.is_empty(), "{point}: a VM was left behind")
                }
                (_, EnvState::Destroyed) => assert!(
                    vms.is_empty(),
                    "{point}: a destroyed environment kept its VM"
                ),
                (_, EnvState::Running) => assert_eq!(vms[0].state, "running", "{point}"),
                (_, EnvState::Stopped) => assert_eq!(vms[0].state, "stopped", "{point}"),
                _ => {}
            }
            // A VM left running behind `error` (a destroy that failed) is stopped by the
            // reconciler: only what holds quota may run.
            w.reconcile().await;
            w.check_invariants(&point).await;
            assert!(
                !now.reserved || matches!(now.state, EnvState::Running),
                "{point}: {:?} holds resources",
                now.state
            );
            // Whatever happened, the environment can still be destroyed, for good.
            w.faults(&host, json!({})).await;
            if want != EnvState::Destroyed {
                w.request(&env.id, JobKind::Destroy).await;
                w.settle().await;
            }
            assert_eq!(
                w.env(&env.id).await.state,
                EnvState::Destroyed,
                "{point}: destroy after the failure"
            );
            assert!(w.live_vms(&env.id).await.is_empty());
            w.check_invariants(&point).await;
        }
        let dead = w
            .app
            .store
            .list_jobs(Some(JobState::Dead), None, 1000)
            .await
            .unwrap()
            .0;
        assert!(
            !dead.is_empty(),
            "failing jobs end dead, for an admin to see"
        );
    })
    .await;
}

#[tokio::test]
async fn a_crash_at_every_step_finishes_with_one_vm_and_one_init_run() {
    each_backend_url(|url| async move {
        let w = world(url).await;
        let handler = Arc::new(JobHandler { app: w.app.clone() });
        for (i, (plan, point)) in Plan::all_fault_points().into_iter().enumerate() {
            let region = format!("c{i}");
            let hang = json!({ "faults": { point.clone(): "hang" } });
            let host = w
                .host(
                    &region,
                    if plan == Plan::Provision {
                        hang.clone()
                    } else {
                        json!({})
                    },
                )
                .await;
            let env = prepared(&w, &region, plan).await;
            if plan != Plan::Provision {
                w.faults(&host, hang).await;
                w.request(&env.id, kind_of(plan)).await;
            }
            // The node dies at the point; the job goes back to the queue; the host recovers.
            assert_eq!(w.crash_at_the_hang(&handler).await, 1, "{point}");
            w.faults(&host, json!({})).await;
            w.settle().await;
            let now = w.env(&env.id).await;
            assert_eq!(now.state, plan.target(), "{point}: {:?}", now.state_message);
            let all = w.app.store.sim_vms_of(&env.id).await.unwrap();
            assert_eq!(all.len(), 1, "{point}: exactly one VM was ever made");
            assert_eq!(all[0].init_runs, 1, "{point}: the init script ran once");
            assert_eq!(
                w.live_vms(&env.id).await.len(),
                usize::from(plan != Plan::Destroy),
                "{point}"
            );
            let jobs = w.app.store.jobs_for_environment(&env.id).await.unwrap();
            let last = jobs.last().unwrap();
            assert_eq!(
                (last.state, last.crashes),
                (JobState::Succeeded, 1),
                "{point}"
            );
            w.check_invariants(&point).await;
            if plan != Plan::Destroy {
                w.request(&env.id, JobKind::Destroy).await;
                w.settle().await;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_job_whose_workers_keep_dying_winds_down_and_settles() {
    each_backend_url(|url| async move {
        let w = world(url).await;
        let host = w
            .host("k", json!({ "faults": { "provision.wait_ssh": "hang" } }))
            .await;
        let env = w.create("k").await;
        let handler = Arc::new(JobHandler { app: w.app.clone() });
        for _ in 0..=hearth_store::MAX_CRASHES {
            assert_eq!(w.crash_at_the_hang(&handler).await, 1);
        }
        // Past the bound, the next run only winds down: no VM, `error` with the reason.
        w.settle().await;
        let now = w.env(&env.id).await;
        assert_eq!(now.state, EnvState::Error);
        assert!(
            now.state_message.unwrap().contains("died"),
            "the reason names the crashes"
        );
        assert!(w.live_vms(&env.id).await.is_empty());
        w.check_invariants("crashes").await;
        let _ = host;
    })
    .await;
}

#[tokio::test]
async fn an_undo_that_cannot_finish_waits_and_keeps_what_its_vm_uses() {
    each_backend_url(|url| async move {
        let w = world(url).await;
        let host = w
            .host(
                "u",
                json!({ "faults": { "provision.init_script": "fail" } }),
            )
            .await;
        let env = w.create("u").await;
        // The last attempt fails, and the host is unreachable for the undo.
        let handler = JobHandler { app: w.app.clone() };
        for _ in 0..2 {
            w.app.queue.run_ready(&handler).await;
            w.clock.advance_ms(60_000);
        }
        w.faults(
            &host,
            json!({ "down": true, "faults": { "provision.init_script": "fail" } }),
        )
        .await;
        w.app.queue.run_ready(&handler).await;
        let now = w.env(&env.id).await;
        assert_eq!(now.state, EnvState::Error, "the failure is told at once");
        assert!(
            now.state_message
                .as_deref()
                .unwrap()
                .contains("cleaned up once its host answers"),
            "{:?}",
            now.state_message
        );
        assert!(now.reserved, "what the VM may still use stays counted");
        assert_eq!(
            w.app
                .store
                .usage(&w.user.id)
                .await
                .unwrap()
                .concurrent_environments,
            1
        );
        let job = &w.app.store.jobs_for_environment(&env.id).await.unwrap()[0];
        assert_eq!(job.state, JobState::Queued);
        assert!(
            job.last_error.as_deref().unwrap().contains("undoing"),
            "{:?}",
            job.last_error
        );
        // Many retries later the host is back: the undo finishes, then the environment fails.
        for _ in 0..10 {
            w.clock.advance_ms(60_000);
            w.app.queue.run_ready(&handler).await;
        }
        assert!(
            w.env(&env.id).await.reserved,
            "still waiting, attempts unspent"
        );
        assert_eq!(w.live_vms(&env.id).await.len(), 1);
        w.faults(&host, json!({})).await;
        w.settle().await;
        let now = w.env(&env.id).await;
        assert_eq!(now.state, EnvState::Error);
        assert!(now.state_message.unwrap().contains("provision.init_script"));
        assert!(
            !now.reserved && now.vm_id.is_none(),
            "released once the VM is gone"
        );
        assert!(w.live_vms(&env.id).await.is_empty());
        w.check_invariants("undo").await;
    })
    .await;
}

#[tokio::test]
async fn the_reconciler_acts_on_facts_and_leaves_unhealthy_hosts_alone() {
    each_backend_url(|url| async move {
        let w = world(url).await;
        let host = w.host("rc", json!({})).await;
        let (a, b, c, d) = (
            w.create("rc").await,
            w.create("rc").await,
            w.create("rc").await,
            w.create("rc").await,
        );
        let e = w.create("rc").await;
        w.settle().await;
        w.request(&e.id, JobKind::Stop).await;
        w.settle().await;
        let w = &w;
        let vm = |id: String| async move { w.live_vms(&id).await.remove(0) };
        // a's VM vanishes, b's stops, behind Hearth's back; c fails and its VM keeps running.
        w.app
            .store
            .sim_set_state(&vm(a.id.clone()).await.vm_id, "destroyed")
            .await
            .unwrap();
        w.app
            .store
            .sim_set_state(&vm(b.id.clone()).await.vm_id, "stopped")
            .await
            .unwrap();
        let cenv = w.env(&c.id).await;
        let failed = cenv
            .moved_to(EnvState::Error, Some("test".into()), w.app.now())
            .unwrap();
        w.app
            .store
            .save_transition(&cenv, failed, "test")
            .await
            .unwrap();
        // e is stopped, and its VM is removed behind Hearth's back.
        let e_vm = w.app.store.sim_vms_of(&e.id).await.unwrap().pop().unwrap();
        w.app
            .store
            .sim_set_state(&e_vm.vm_id, "destroyed")
            .await
            .unwrap();
        // d is destroyed in the database while its VM stays: an orphan.
        let denv = w.env(&d.id).await;
        let going = w
            .app
            .store
            .save_transition(
                &denv,
                denv.moved_to(EnvState::Destroying, None, w.app.now())
                    .unwrap(),
                "t",
            )
            .await
            .unwrap();
        w.app
            .store
            .save_transition(
                &going,
                going
                    .moved_to(EnvState::Destroyed, None, w.app.now())
                    .unwrap(),
                "t",
            )
            .await
            .unwrap();

        // While the host cannot be asked, nothing is judged.
        w.faults(&host, json!({ "down": true })).await;
        w.clock.advance_ms(16_000);
        crate::health::check_hosts(&w.app).await.unwrap();
        assert_eq!(
            w.app.store.host(&host.id).await.unwrap().health,
            HostHealth::Unhealthy
        );
        w.reconcile().await;
        assert_eq!(
            w.env(&a.id).await.state,
            EnvState::Running,
            "not declared vanished while its host is unreachable"
        );
        // A new environment cannot go there now.
        let err = w
            .app
            .create_environment(
                &w.user,
                CreateInput {
                    name: "x".into(),
                    region: Some("rc".into()),
                    ..Default::default()
                },
            )
            .await;
        assert!(
            matches!(err, Err(crate::AppError::NoCapacity(ref m)) if m.contains("1 not answering")),
            "{err:?}"
        );

        w.faults(&host, json!({})).await;
        crate::health::check_hosts(&w.app).await.unwrap();
        assert_eq!(
            w.app.store.host(&host.id).await.unwrap().health,
            HostHealth::Healthy
        );
        w.reconcile().await;
        let a_now = w.env(&a.id).await;
        assert_eq!(a_now.state, EnvState::Error);
        assert!(a_now.state_message.unwrap().contains("vanished"));
        assert_eq!(a_now.vm_id, None, "forgotten, so a start provisions anew");
        assert_eq!(w.env(&b.id).await.state, EnvState::Stopped);
        let e_now = w.env(&e.id).await;
        assert_eq!(
            (e_now.state, e_now.vm_id.is_none()),
            (EnvState::Error, true),
            "a stopped environment's vanished VM is noticed"
        );
        assert_eq!(
            vm(c.id.clone()).await.state,
            "stopped",
            "a VM may run only while its environment holds resources"
        );
        assert!(w.live_vms(&d.id).await.is_empty(), "the orphan is removed");
        let audit = w.app.store.audit_for_environment(&d.id).await.unwrap();
        assert!(
            audit
                .iter()
                .any(|e| e.action == "orphan_removed" && e.outcome == "success")
        );
        w.check_invariants("reconciler").await;
        // A second pass finds nothing more to do.
        let before = w
            .app
            .store
            .count("SELECT COUNT(*) AS n FROM audit_log")
            .await
            .unwrap();
        w.reconcile().await;
        assert_eq!(
            w.app
                .store
                .count("SELECT COUNT(*) AS n FROM audit_log")
                .await
                .unwrap(),
            before
        );
        // Start re-provisions the one whose VM vanished.
        w.request(&a.id, JobKind::Start).await;
        w.settle().await;
        assert_eq!(w.env(&a.id).await.state, EnvState::Running);
        assert_eq!(
            w.app.store.sim_vms_of(&a.id).await.unwrap().len(),
            2,
            "a new VM was made"
        );
    })
    .await;
}

#[tokio::test]
async fn two_installations_on_one_host_never_see_each_others_vms() {
    each_backend_url(|url| async move {
        let w = world(url).await;
        let host = w.host("shared", json!({})).await;
        let env = w.create("shared").await;
        w.settle().await;
        // Another installation's VM on the same simulated host.
        w.app
            .store
            .sim_ensure(
                &host.id,
                "hearth-someone-else",
                "other-installation",
                "their-env",
            )
            .await
            .unwrap();
        w.reconcile().await;
        let theirs = w.app.store.sim_vms_of("their-env").await.unwrap();
        assert_eq!(
            theirs[0].state, "running",
            "another installation's VM is never touched"
        );
        assert_eq!(w.env(&env.id).await.state, EnvState::Running);
    })
    .await;
}

#[tokio::test]
async fn regions_and_gpus_are_asked_for_and_refused_clearly() {
    each_backend_url(|url| async move {
        let w = world(url).await;
        w.host("gra", json!({})).await;
        let gpu = HostInput {
            name: "gpu-1".into(),
            kind: "sim".into(),
            region: Some("sbg".into()),
            gpu_model: Some("nvidia-l4".into()),
            gpu_count: Some(1),
            max_vcpus: 64,
            max_memory_mb: 65536,
            ..Default::default()
        };
        let gpu = w.app.add_host(&w.admin, gpu).await.unwrap();
        let ask = |region: Option<&str>, gpus: Option<i64>| CreateInput {
            name: "g".into(),
            region: region.map(str::to_string),
            gpus,
            size: SizeRequest {
                vcpus: Some(1),
                memory_mb: Some(512),
                disk_gb: Some(1),
            },
            ..Default::default()
        };
        let e = w
            .app
            .create_environment(&w.user, ask(None, Some(1)))
            .await
            .unwrap();
        assert_eq!(
            (e.host_id.as_deref(), e.region.as_deref()),
            (Some(gpu.id.as_str()), Some("sbg"))
        );
        let e = w
            .app
            .create_environment(&w.user, ask(Some("gra"), None))
            .await
            .unwrap();
        assert_eq!(e.region.as_deref(), Some("gra"));
        assert!(matches!(
            w.app.create_environment(&w.user, ask(None, Some(1))).await,
            Err(crate::AppError::NoCapacity(_))
        ));
        for (region, gpus) in [(Some("tyo"), None), (Some("gra"), Some(1)), (None, Some(2))] {
            let err = w
                .app
                .create_environment(&w.user, ask(region, gpus))
                .await
                .unwrap_err();
            assert!(
                matches!(err, crate::AppError::Invalid(_)),
                "{region:?} {gpus:?}: {err:?}"
            );
        }
        for bad in [
            ask(Some("gra; rm"), None),
            ask(None, Some(-1)),
            ask(None, Some(99)),
        ] {
            assert!(matches!(
                w.app.create_environment(&w.user, bad).await,
                Err(crate::AppError::Invalid(_))
            ));
        }
        // A kind with no host at all: refused, saying how to add one.
        let hostless = CreateInput {
            provider: Some("ovh".into()),
            ..ask(None, None)
        };
        let err = w
            .app
            .create_environment(&w.user, hostless)
            .await
            .unwrap_err();
        assert!(
            matches!(err, crate::AppError::Invalid(_))
                && err.to_string().contains("hearth admin hosts add"),
            "{err}"
        );
    })
    .await;
}

#[tokio::test]
async fn hosts_are_checked_before_they_are_added() {
    each_backend_url(|url| async move {
        let w = world(url).await;
        let down = HostInput {
            name: "down".into(),
            kind: "sim".into(),
            max_vcpus: 8,
            max_memory_mb: 8192,
            options: Some(json!({"down": true})),
            ..Default::default()
        };
        let err = w.app.add_host(&w.admin, down).await.unwrap_err();
        assert!(err.to_string().contains("nothing was added"), "{err}");
        let bad = [
            HostInput {
                name: "a b".into(),
                kind: "sim".into(),
                max_vcpus: 1,
                max_memory_mb: 1,
                ..Default::default()
            },
            HostInput {
                name: "x".into(),
                kind: "vmware".into(),
                max_vcpus: 1,
                max_memory_mb: 1,
                ..Default::default()
            },
            HostInput {
                name: "x".into(),
                kind: "sim".into(),
                max_vcpus: 0,
                max_memory_mb: 1,
                ..Default::default()
            },
            HostInput {
                name: "x".into(),
                kind: "docker".into(),
                endpoint: Some("tcp://10.0.0.1:2375".into()),
                max_vcpus: 1,
                max_memory_mb: 1,
                ..Default::default()
            },
            HostInput {
                name: "x".into(),
                kind: "docker".into(),
                endpoint: Some("http://x".into()),
                max_vcpus: 1,
                max_memory_mb: 1,
                ..Default::default()
            },
            HostInput {
                name: "x".into(),
                kind: "sim".into(),
                options: Some(json!({"faults": {"x": "explode"}})),
                max_vcpus: 1,
                max_memory_mb: 1,
                ..Default::default()
            },
            HostInput {
                name: "x".into(),
                kind: "agent".into(),
                endpoint: Some("https://x".into()),
                max_vcpus: 1,
                max_memory_mb: 1,
                ..Default::default()
            },
        ];
        for input in bad {
            let err = w.app.add_host(&w.admin, input.clone()).await.unwrap_err();
            assert!(
                matches!(err, crate::AppError::Invalid(_)),
                "{input:?}: {err:?}"
            );
        }
        assert_eq!(
            w.app.store.count_hosts().await.unwrap(),
            0,
            "nothing was written"
        );
    })
    .await;
}

#[tokio::test]
async fn destroy_needs_no_quota_and_no_room() {
    each_backend_url(|url| async move {
        let w = world(url).await;
        let host = w.host("full", json!({})).await;
        let id = w.app.store.user(&w.user.id).await.unwrap().id;
        let one = hearth_store::QuotaOverrides {
            max_concurrent_environments: Some(1),
            ..Default::default()
        };
        w.app.store.set_quota_overrides(&id, &one).await.unwrap();
        let stopped = w.create("full").await;
        w.settle().await;
        w.request(&stopped.id, JobKind::Stop).await;
        w.settle().await;
        let running = w.create("full").await;
        w.settle().await;
        assert_eq!(w.env(&running.id).await.state, EnvState::Running);
        // At full quota, the stopped one cannot start, but it can be destroyed.
        let env = w.env(&stopped.id).await;
        assert!(matches!(
            w.app.request(&w.user.id, &env, JobKind::Start).await,
            Err(crate::AppError::Quota(_))
        ));
        w.request(&stopped.id, JobKind::Destroy).await;
        w.settle().await;
        assert_eq!(w.env(&stopped.id).await.state, EnvState::Destroyed);
        // On a draining host, too.
        w.request(&running.id, JobKind::Stop).await;
        w.settle().await;
        w.app
            .set_host_status(&w.admin, &host.id, hearth_core::HostStatus::Draining)
            .await
            .unwrap();
        w.request(&running.id, JobKind::Destroy).await;
        w.settle().await;
        assert_eq!(w.env(&running.id).await.state, EnvState::Destroyed);
        assert!(w.live_vms(&running.id).await.is_empty());
        w.check_invariants("destroy").await;
    })
    .await;
}

#[tokio::test]
async fn kills_during_a_start_that_provisions_settle_it() {
    each_backend_url(|url| async move {
        let w = world(url).await;
        let host = w
            .host("rp", json!({ "faults": { "provision.create_vm": "fail" } }))
            .await;
        let env = w.create("rp").await;
        w.settle().await;
        let failed = w.env(&env.id).await;
        assert_eq!(
            (failed.state, failed.vm_id.is_none()),
            (EnvState::Error, true)
        );
        // A start of an environment that never had a VM provisions it; its node dies there,
        // and the next one dies there too.
        w.faults(&host, json!({ "faults": { "provision.wait_ssh": "hang" } }))
            .await;
        w.request(&env.id, JobKind::Start).await;
        let handler = Arc::new(JobHandler { app: w.app.clone() });
        assert_eq!(w.crash_at_the_hang(&handler).await, 1);
        assert_eq!(w.env(&env.id).await.state, EnvState::Provisioning);
        assert_eq!(
            w.crash_at_the_hang(&handler).await,
            1,
            "the second kill, in the same job"
        );
        w.faults(&host, json!({})).await;
        w.settle().await;
        let now = w.env(&env.id).await;
        assert_eq!(now.state, EnvState::Running, "{:?}", now.state_message);
        let start = w
            .app
            .store
            .jobs_for_environment(&env.id)
            .await
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(
            (
                start.kind.as_str(),
                start.state,
                start.crashes,
                start.attempts
            ),
            ("start", JobState::Succeeded, 2, 1)
        );
        assert_eq!(w.live_vms(&env.id).await.len(), 1);
        w.check_invariants("re-provisioning start").await;
    })
    .await;
}

#[tokio::test]
async fn a_host_outage_is_ridden_out_within_the_budget() {
    each_backend_url(|url| async move {
        let w = world(url).await;
        let host = w.host("out", json!({})).await;
        w.faults(&host, json!({ "down": true })).await;
        let env = w.create("out").await;
        let handler = JobHandler { app: w.app.clone() };
        // Four minutes without the host: the job waits, spending no attempts.
        for _ in 0..8 {
            w.app.queue.run_ready(&handler).await;
            w.clock.advance_ms(30_000);
        }
        let job = &w.app.store.jobs_for_environment(&env.id).await.unwrap()[0];
        assert_eq!((job.state, job.attempts), (JobState::Queued, 0), "{job:?}");
        assert!(
            job.last_error
                .as_deref()
                .unwrap()
                .contains("waiting for the host")
        );
        assert_eq!(w.env(&env.id).await.state, EnvState::Provisioning);
        w.faults(&host, json!({})).await;
        w.settle().await;
        assert_eq!(w.env(&env.id).await.state, EnvState::Running);
        // A stop during an outage waits too, then stops.
        w.faults(&host, json!({ "down": true })).await;
        w.request(&env.id, JobKind::Stop).await;
        w.app.queue.run_ready(&handler).await;
        w.clock.advance_ms(60_000);
        w.app.queue.run_ready(&handler).await;
        assert_eq!(
            w.env(&env.id).await.state,
            EnvState::Stopping,
            "not `error` after a short outage"
        );
        w.faults(&host, json!({})).await;
        w.settle().await;
        assert_eq!(w.env(&env.id).await.state, EnvState::Stopped);
        // Past the budget, the outage counts: the start fails, and its VM is stopped.
        w.faults(&host, json!({ "down": true })).await;
        w.request(&env.id, JobKind::Start).await;
        for _ in 0..30 {
            w.app.queue.run_ready(&handler).await;
            w.clock.advance_ms(60_000);
        }
        let now = w.env(&env.id).await;
        assert_eq!(now.state, EnvState::Error, "{:?}", now.state_message);
        assert!(
            now.state_message
                .as_deref()
                .unwrap()
                .contains("simulated host sim-out is down")
        );
        w.faults(&host, json!({})).await;
        w.settle().await;
        w.reconcile().await;
        w.check_invariants("outage").await;
    })
    .await;
}
