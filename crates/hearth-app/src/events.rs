//! Live events for one environment: `state` when the state changes, `log` for each
//! provisioning log line. The HTTP layer sends them as server-sent events.
//!
//! The database is the source: a stream polls it (every `EVENT_POLL`) and is woken at
//! once by writes in this process, so events written on one node reach clients of
//! another through the database, only a little later. Each event's id is the cursor
//! `<generation>-<log id>`; a client reconnecting with `Last-Event-ID` resumes after it.
//!
//! A list (one user's environments, or everyone's for an admin) has a stream too:
//! `changed` whenever an environment of the list is created, changes state or goes, so a
//! page re-reads the list only when there is something new.

use crate::App;
use futures::Stream;
use hearth_core::EnvState;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const EVENT_POLL: Duration = Duration::from_millis(250);

/// RFC 3339 with milliseconds, as every time in the API is written.
pub fn time(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// One event: its kind (`state` or `log`), its resume cursor, and its JSON data.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    pub kind: &'static str,
    pub id: String,
    pub data: serde_json::Value,
}

/// Shares the "anything new?" probes among streams: all streams of one environment share
/// its head, all list streams of one user (or the admin's) share the list's fingerprint.
/// So 500 subscribers cost one small query per poll interval, not 500, and a write that
/// wakes every stream at once costs one query per environment or list watched, not one
/// per stream: the first stream to find a probe stale runs it while the others wait for
/// its answer. A local write (or a Redis notice) bumps `version`, which makes every cached
/// answer stale at once.
#[derive(Default)]
pub struct Hub {
    version: AtomicU64,
    heads: Probes<Option<(i64, i64)>>,
    fingerprints: Probes<Option<(i64, i64)>>,
}

impl Hub {
    pub fn bump(&self) {
        self.version.fetch_add(1, Ordering::SeqCst);
    }

    /// (generation, newest log id) of the environment, at most `EVENT_POLL` old.
    pub async fn head(&self, app: &App, environment_id: &str) -> Option<(i64, i64)> {
        let version = self.version.load(Ordering::SeqCst);
        self.heads
            .get(environment_id, version, EVENT_POLL, || async {
                app.store.event_head(environment_id).await.ok().flatten()
            })
            .await
    }

    /// The fingerprint of `user_id`'s list (everyone's with `None`), at most `LIST_POLL`
    /// old; `None` when the database did not answer.
    pub async fn fingerprint(&self, app: &App, user_id: Option<&str>) -> Option<(i64, i64)> {
        let version = self.version.load(Ordering::SeqCst);
        self.fingerprints
            .get(user_id.unwrap_or(""), version, LIST_POLL, || async {
                app.store.environments_fingerprint(user_id).await.ok()
            })
            .await
    }
}

/// Answers to one kind of probe, by key: each valid for the `version` it was read at and
/// for a while. At most `MAX_PROBES` keys are kept; past that, those no stream is reading
/// are dropped.
struct Probes<T> {
    slots: Mutex<HashMap<String, Slot<T>>>,
}

type Slot<T> = Arc<tokio::sync::Mutex<Option<(u64, Instant, T)>>>;

const MAX_PROBES: usize = 10_000;

impl<T> Default for Probes<T> {
    fn default() -> Self {
        Probes {
            slots: Mutex::default(),
        }
    }
}

impl<T: Copy> Probes<T> {
    async fn get<F, Fut>(&self, key: &str, version: u64, fresh_for: Duration, probe: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let slot = {
            let mut slots = self.slots.lock().unwrap();
            if slots.len() >= MAX_PROBES && !slots.contains_key(key) {
                slots.retain(|_, slot| Arc::strong_count(slot) > 1);
            }
            slots.entry(key.to_string()).or_default().clone()
        };
        let mut answer = slot.lock().await;
        // An answer read at a later version than the caller's is at least as new.
        if let Some((v, at, value)) = *answer
            && v >= version
            && at.elapsed() < fresh_for
        {
            return value;
        }
        let value = probe().await;
        *answer = Some((version, Instant::now(), value));
        value
    }
}

struct Cursor {
    app: App,
    id: String,
    generation: i64,
    log_id: i64,
    pending: VecDeque<LiveEvent>,
    done: bool,
}

/// Parses `Last-Event-ID` (`<generation>-<log id>`); anything else starts afresh.
pub fn parse_cursor(last_event_id: Option<&str>) -> Option<(i64, i64)> {
    let (g, l) = last_event_id?.rsplit_once('-')?;
    Some((g.parse().ok()?, l.parse().ok()?))
}

pub fn stream(
    app: App,
    environment_id: String,
    resume: Option<(i64, i64)>,
) -> impl Stream<Item = LiveEvent> {
    // Generations start at 1, so 0 means "nothing seen yet".
    let (generation, log_id) = resume.unwrap_or((0, 0));
    let cursor = Cursor {
        app,
        id: environment_id,
        generation,
        log_id,
        pending: VecDeque::new(),
        done: false,
    };

    futures::stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(ev) = c.pending.pop_front() {
                return Some((ev, c));
            }
            if c.done {
                return None;
            }
            c.poll().await;
            if c.pending.is_empty() {
                let changed = c.app.changed.notified();
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep(EVENT_POLL) => {}
                }
            }
        }
    })
}

impl Cursor {
    fn id(&self) -> String {
        format!("{}-{}", self.generation, self.log_id)
    }

    async fn poll(&mut self) {
        match self.app.hub.head(&self.app, &self.id).await {
            None => {
                self.done = true;
                return;
            }
            Some((generation, log_id))
                if generation == self.generation && log_id <= self.log_id =>
            {
                return;
            }
            Some(_) => {}
        }
        // Log lines first: they describe how the state below was reached.
        if let Ok(lines) = self.app.store.logs_after(&self.id, self.log_id).await {
            for l in lines {
                self.log_id = l.id;
                let data = serde_json::json!({ "timestamp": time(l.at), "level": l.level, "message": l.message });
                self.pending.push_back(LiveEvent {
                    kind: "log",
                    id: self.id(),
                    data,
                });
            }
        }
        let Ok(env) = self.app.store.environment(&self.id).await else {
            self.done = true;
            return;
        };
        if env.generation != self.generation {
            self.generation = env.generation;
            let data = serde_json::json!({
                "state": env.state.as_str(), "stateMessage": env.state_message,
                "generation": env.generation, "at": time(env.updated_at),
            });
            self.pending.push_back(LiveEvent {
                kind: "state",
                id: self.id(),
                data,
            });
        }
        if env.state == EnvState::Destroyed {
            self.done = true;
        }
    }
}

/// How often a list stream looks when nothing in this process woke it.
pub const LIST_POLL: Duration = Duration::from_secs(1);

/// `changed` events for the environments of `user_id` (everyone's with `None`): one at
/// once, then one each time the list's fingerprint (`Store::environments_fingerprint`)
/// moves. The data says how many environments there are and the sum of their generations.
pub fn list_stream(app: App, user_id: Option<String>) -> impl Stream<Item = LiveEvent> {
    futures::stream::unfold(
        (app, user_id, None),
        |(app, user_id, mut seen)| async move {
            loop {
                if let Some(now) = app.hub.fingerprint(&app, user_id.as_deref()).await
                    && seen != Some(now)
                {
                    seen = Some(now);
                    let event = LiveEvent {
                        kind: "changed",
                        id: format!("{}-{}", now.0, now.1),
                        data: serde_json::json!({ "environments": now.0, "generations": now.1 }),
                    };
                    return Some((event, (app, user_id, seen)));
                }
                let changed = app.changed.notified();
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep(LIST_POLL) => {}
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::Probes;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// 50 streams that find a probe stale at once cost one query; a bump costs one more.
    #[tokio::test]
    async fn streams_woken_together_share_one_query() {
        let probes: Arc<Probes<u64>> = Arc::default();
        let queries = Arc::new(AtomicUsize::new(0));
        let ask = |version: u64| {
            let (probes, queries) = (probes.clone(), queries.clone());
            async move {
                probes
                    .get("user-a", version, Duration::from_secs(60), || async {
                        queries.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        version * 10
                    })
                    .await
            }
        };
        let answers = futures::future::join_all((0..50).map(|_| tokio::spawn(ask(1)))).await;
        assert!(answers.into_iter().all(|a| a.unwrap() == 10));
        assert_eq!(queries.load(Ordering::SeqCst), 1);
        // A write since: the next caller asks again, and an answer that new serves a
        // caller who saw only the older version.
        assert_eq!(ask(2).await, 20);
        assert_eq!(ask(1).await, 20);
        assert_eq!(queries.load(Ordering::SeqCst), 2);
    }
}
