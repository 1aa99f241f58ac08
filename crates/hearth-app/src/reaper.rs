//! Background upkeep on every node (state writes are conditional, so two nodes doing it at
//! once is harmless): the reaper stops idle environments and destroys expired ones (actor
//! `system:reaper`), then the reconciler runs (`reconcile`), the demand policy buys or sells agent hosts
//! (`demand`), the fleet's capacity is sampled for the admin's chart (`Store::sample_capacity`), then old history goes
//! (`Store::prune`, by `HEARTH_RETAIN_*_DAYS`).

use crate::App;
use hearth_core::JobKind;
use tokio::sync::watch;

pub const REAPER: &str = "system:reaper";

pub async fn run(app: App, mut shutdown: watch::Receiver<bool>) {
    let every = app.config.reaper_interval;
    let mut passes: u64 = 0;
    loop {
        // Listing a Docker engine's images is heavy for the engine: images no record
        // names are looked for on one pass in ten only.
        let sweep = passes.is_multiple_of(10);
        passes += 1;
        if let Err(e) = reap(&app).await {
            tracing::warn!(error = %e, "reaper pass failed");
        }
        if let Err(e) = crate::reconcile::reconcile(&app).await {
            tracing::warn!(error = %e, "reconciler pass failed");
        }
        if let Err(e) = app.settle_snapshots(sweep).await {
            tracing::warn!(error = %e, "snapshot upkeep failed");
        }
        if let Err(e) = app.settle_images(sweep).await {
            tracing::warn!(error = %e, "image upkeep failed");
        }
        if let Err(e) = app.demand_pass().await {
            tracing::warn!(error = %e, "demand policy pass failed");
        }
        if let Err(e) = app.store.sample_capacity().await {
            tracing::warn!(error = %e, "capacity sample failed");
        }
        match app.store.prune(&app.config.retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "removed history past its retention"),
            Err(e) => tracing::warn!(error = %e, "retention pass failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

pub async fn reap(app: &App) -> anyhow::Result<()> {
    let now = app.now();
    for env in app.store.idle_environments().await? {
        if app
            .store
            .has_pending_job(&env.id, JobKind::Stop.as_str())
            .await?
        {
            continue;
        }
        let idle = (now
            - env
                .last_activity_at
                .or(env.started_at)
                .unwrap_or(env.created_at))
            / 60_000;
        app.log(
            &env,
            "info",
            &format!(
                "idle for {idle} minutes (auto-stop after {}); stopping",
                env.auto_stop_minutes.unwrap_or(0)
            ),
        )
        .await;
        if let Err(e) = app.request(REAPER, &env, JobKind::Stop).await {
            tracing::warn!(environment = %env.id, error = %e, "reaper could not queue a stop");
        }
    }
    for env in app.store.expired_environments().await? {
        if app
            .store
            .has_pending_job(&env.id, JobKind::Destroy.as_str())
            .await?
        {
            continue;
        }
        app.log(&env, "info", "past its expiry time; destroying")
            .await;
        if let Err(e) = app.request(REAPER, &env, JobKind::Destroy).await {
            tracing::warn!(environment = %env.id, error = %e, "reaper could not queue a destroy");
        }
    }
    Ok(())
}
