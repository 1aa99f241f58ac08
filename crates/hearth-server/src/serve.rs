//! `hearth serve`: open the installation, start this node's background work and the HTTP
//! listener, and stop cleanly on SIGTERM or Ctrl-C.
//!
//! The listener is ours (on hyper-util) because what one client can hold must be bounded:
//! - at most `HEARTH_MAX_CONNECTIONS` connections (default 16,384, and always some
//!   descriptors short of the process's limit, which is raised to its hard limit); one
//!   over the limit is closed at once;
//! - a request's headers must arrive within `HEARTH_HEADER_TIMEOUT_SECONDS` (default 10),
//!   which also closes a keep-alive connection idle that long;
//! - running out of descriptors (EMFILE) pauses accepting for 100 ms, logged once a
//!   second at most, instead of spinning.

use crate::Config;
use anyhow::{Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};

/// Descriptors kept back from connections for the database, hosts, SSH and logs.
const RESERVED_DESCRIPTORS: u64 = 512;
/// How long a listener waits after running out of descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Raises the soft limit on open files to the hard one; returns the limit now in force.
fn raise_descriptor_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// The connection limit: as configured, and always within the descriptors there are.
fn connection_limit(configured: usize) -> usize {
    let descriptors = raise_descriptor_limit();
    let room = descriptors.saturating_sub(RESERVED_DESCRIPTORS).max(64) as usize;
    configured.min(room)
}

pub async fn run(config: Config) -> Result<()> {
    let listen = config.listen.clone();
    let max_connections = connection_limit(config.max_connections);
    let header_timeout = config.header_timeout;
    let app = hearth_app::start::open_app(config).await?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| {
            format!("cannot listen on {listen}; set HEARTH_LISTEN to a free address")
        })?;
    tracing::info!(address = %listener.local_addr()?, data_dir = %app.config.data_dir.display(), max_connections, "Hearth is serving");

    let (stop, stopped) = watch::channel(false);
    let mut background = hearth_app::start::spawn_background(&app, stopped.clone());
    if let Some(listen) = app.mail.as_ref().and_then(|m| m.config.smtp_listen.clone()) {
        let smtp = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen for SMTP on {listen}; set HEARTH_SMTP_LISTEN to a free address"
                )
            })?;
        tracing::info!(address = %smtp.local_addr()?, "taking commands by mail over SMTP");
        background.push(tokio::spawn(crate::smtp::serve(app.clone(), smtp, stopped)));
    }
    let router = crate::api::router(app.clone());
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut last_warning: Option<Instant> = None;
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut signal => break,
        };
        let (tcp, _) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of descriptors (or a peer gone before accept): wait a moment, do
                // not spin, and say so at most once a second.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    tracing::warn!(error = %e, "cannot accept connections for now; pausing {} ms", ACCEPT_PAUSE.as_millis());
                    last_warning = Some(Instant::now());
                }
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Over the limit: closed at once, so the descriptor is back.
            drop(tcp);
            continue;
        };
        // No Nagle delay: terminal keystrokes and event lines are small writes.
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
    tracing::info!("shutting down: no new jobs are claimed; running ones finish");
    drop(listener);
    let _ = stop.send(true);
    // Event streams and terminals never end by themselves: give them a moment, then go.
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("closing the remaining long-lived connections");
    }
    for task in background {
        let _ = task.await;
    }
    tracing::info!("stopped");
    Ok(())
}
