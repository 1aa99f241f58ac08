//! `hearth serve`: open the installation, start this node's background work and the HTTP
//! listener, and stop cleanly on SIGTERM or Ctrl-C.

use crate::Config;
use anyhow::{Context, Result};
use std::future::IntoFuture;
use tokio::sync::watch;

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub async fn run(config: Config) -> Result<()> {
    let listen = config.listen.clone();
    let app = hearth_app::start::open_app(config).await?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}; set HEARTH_LISTEN to a free address"))?;
    tracing::info!(address = %listener.local_addr()?, data_dir = %app.config.data_dir.display(), "Hearth is serving");

    let (stop, stopped) = watch::channel(false);
    let background = hearth_app::start::spawn_background(&app, stopped);
    let router = crate::api::router(app.clone());
    let (closing, closed) = watch::channel(false);
    // No Nagle delay: terminal keystrokes and event lines are small writes.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = tokio::spawn(
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let mut closed = closed;
                let _ = closed.wait_for(|c| *c).await;
            })
            .into_future(),
    );
    shutdown_signal().await;
    tracing::info!("shutting down: no new jobs are claimed; running ones finish");
    let _ = closing.send(true);
    let _ = stop.send(true);
    // Event streams and terminals never end by themselves: give them a moment, then go.
    if tokio::time::timeout(std::time::Duration::from_secs(5), server).await.is_err() {
        tracing::info!("closing the remaining long-lived connections");
    }
    for task in background {
        let _ = task.await;
    }
    tracing::info!("stopped");
    Ok(())
}
