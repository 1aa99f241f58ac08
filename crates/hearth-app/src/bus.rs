//! Redis as a bus (optional, DESIGN decision 1): wakes workers on every node when a job is
//! written, tells every node's event streams to look again when something changed, and
//! keeps the seed's provisioning log tail (`provision-logs:<environment id>`: the last 100
//! entries, for an hour after the last write).
//!
//! Nothing depends on it: the database stays the truth, every publish is best effort with
//! a short timeout, off the request path, and workers and streams poll anyway. When Redis
//! goes away Hearth runs at poll speed; when it comes back the listener resubscribes and
//! publishing reconnects, without a restart.

use crate::App;
use futures::StreamExt;
use redis::AsyncCommands;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, watch};

pub const WAKE: &str = "hearth:wake";
pub const CHANGED: &str = "hearth:changed";
const TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone, Default)]
pub struct Bus {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    client: redis::Client,
    conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// After a failed connect, wait a second before the next try.
    retry_after: Mutex<Option<Instant>>,
}

/// `REDIS_URL`, or `REDIS_HOST` and `REDIS_PORT` as the seed had them.
pub fn url_from_env() -> Option<String> {
    let var = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
    var("REDIS_URL").or_else(|| {
        var("REDIS_HOST").map(|h| {
            format!(
                "redis://{h}:{}/",
                var("REDIS_PORT").unwrap_or_else(|| "6379".into())
            )
        })
    })
}

impl Bus {
    pub fn new(url: Option<&str>) -> Result<Bus, String> {
        let Some(url) = url else {
            return Ok(Bus::default());
        };
        let client = redis::Client::open(url).map_err(|e| format!("REDIS_URL is invalid: {e}"))?;
        Ok(Bus {
            inner: Some(Arc::new(Inner {
                client,
                conn: Mutex::new(None),
                retry_after: Mutex::new(None),
            })),
        })
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    async fn conn(inner: &Inner) -> Option<redis::aio::MultiplexedConnection> {
        if let Some(c) = inner.conn.lock().await.clone() {
            return Some(c);
        }
        let mut retry_after = inner.retry_after.lock().await;
        if retry_after.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        match inner
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(c) => {
                *retry_after = None;
                *inner.conn.lock().await = Some(c.clone());
                Some(c)
            }
            Err(e) => {
                tracing::debug!(error = %e, "Redis unreachable; running at poll speed");
                *retry_after = Some(Instant::now() + Duration::from_secs(1));
                None
            }
        }
    }

    /// Runs `f` on a connection in the background; a failure drops the connection so the
    /// next call reconnects.
    fn spawn<F, Fut>(&self, f: F)
    where
        F: FnOnce(redis::aio::MultiplexedConnection) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = redis::RedisResult<()>> + Send,
    {
        let Some(inner) = self.inner.clone() else {
            return;
        };
        tokio::spawn(async move {
            let Some(conn) = Bus::conn(&inner).await else {
                return;
            };
            match tokio::time::timeout(TIMEOUT, f(conn)).await {
                Ok(Ok(())) => {}
                _ => {
                    *inner.conn.lock().await = None;
                }
            }
        });
    }

    pub fn publish(&self, channel: &'static str, payload: String) {
        self.spawn(move |mut c| async move { c.publish::<_, _, ()>(channel, payload).await });
    }

    /// The seed's log tail: RPUSH, keep the last 100, expire an hour after the last write.
    pub fn push_log(&self, environment_id: &str, entry: serde_json::Value) {
        let key = format!("provision-logs:{environment_id}");
        self.spawn(move |mut c| async move {
            redis::pipe()
                .rpush(&key, entry.to_string())
                .ltrim(&key, -100, -1)
                .expire(&key, 3600)
                .query_async::<()>(&mut c)
                .await
        });
    }

    /// Listens for other nodes' wake-ups and changes until shutdown, resubscribing after
    /// Redis comes back.
    pub async fn listen(self, app: App, mut shutdown: watch::Receiver<bool>) {
        let Some(inner) = self.inner.clone() else {
            return;
        };
        let mut warned = false;
        loop {
            let session = async {
                let mut pubsub = inner.client.get_async_pubsub().await?;
                pubsub.subscribe(WAKE).await?;
                pubsub.subscribe(CHANGED).await?;
                tracing::info!("listening on Redis for wake-ups and events");
                // Anything published while we were away is in the database: look now.
                for q in app.config.queues.iter() {
                    app.queue.wake(&q.name);
                }
                app.notify_changed_locally();
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    let payload: String = msg.get_payload().unwrap_or_default();
                    match msg.get_channel_name() {
                        WAKE => app.queue.wake(&payload),
                        _ => app.notify_changed_locally(),
                    }
                }
                Ok::<bool, redis::RedisError>(true)
            };
            tokio::select! {
                result = session => {
                    // Warn once per outage: when a session ended, or the first failed connect.
                    if matches!(result, Ok(true)) || !warned {
                        tracing::warn!(error = ?result.err(), "Redis is gone; running at poll speed until it returns");
                    }
                    warned = true;
                }
                _ = shutdown.wait_for(|s| *s) => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// "ok", "off" or why not, for `/readyz` (informational: Redis is optional).
    pub async fn status(&self) -> String {
        let Some(inner) = &self.inner else {
            return "off".into();
        };
        let ping = async {
            let mut c = inner.client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut c).await
        };
        match tokio::time::timeout(TIMEOUT, ping).await {
            Ok(Ok(_)) => "ok".into(),
            Ok(Err(e)) => format!("unreachable ({e}); running at poll speed"),
            Err(_) => "unreachable (timed out); running at poll speed".into(),
        }
    }
}
