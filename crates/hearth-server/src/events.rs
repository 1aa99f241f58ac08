//! Live events for one environment, as server-sent events: `state` when the state
//! changes, `log` for each provisioning log line.
//!
//! The database is the source: a stream polls it (every `EVENT_POLL`) and is woken at
//! once by writes in this process, so events written on one node reach clients of
//! another through the database, only a little later. Each event's id is the cursor
//! `<generation>-<log id>`; a client reconnecting with `Last-Event-ID` resumes after it.

use crate::App;
use crate::views::time;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use hearth_core::EnvState;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

pub const EVENT_POLL: Duration = Duration::from_millis(250);

struct Cursor {
    app: App,
    id: String,
    generation: i64,
    log_id: i64,
    pending: VecDeque<Event>,
    done: bool,
}

/// Parses `Last-Event-ID` (`<generation>-<log id>`); anything else starts afresh.
pub fn parse_cursor(last_event_id: Option<&str>) -> Option<(i64, i64)> {
    let (g, l) = last_event_id?.rsplit_once('-')?;
    Some((g.parse().ok()?, l.parse().ok()?))
}

pub fn stream(app: App, environment_id: String, resume: Option<(i64, i64)>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    // Generations start at 1, so 0 means "nothing seen yet".
    let (generation, log_id) = resume.unwrap_or((0, 0));
    let cursor = Cursor { app, id: environment_id, generation, log_id, pending: VecDeque::new(), done: false };
    let events = futures::stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(ev) = c.pending.pop_front() {
                return Some((Ok(ev), c));
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
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("ping"))
}

impl Cursor {
    fn id(&self) -> String {
        format!("{}-{}", self.generation, self.log_id)
    }

    async fn poll(&mut self) {
        // Log lines first: they describe how the state below was reached.
        if let Ok(lines) = self.app.store.logs_after(&self.id, self.log_id).await {
            for l in lines {
                self.log_id = l.id;
                let data = serde_json::json!({ "timestamp": time(l.at), "level": l.level, "message": l.message });
                self.pending.push_back(Event::default().event("log").id(self.id()).data(data.to_string()));
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
            self.pending.push_back(Event::default().event("state").id(self.id()).data(data.to_string()));
        }
        if env.state == EnvState::Destroyed {
            self.done = true;
        }
    }
}
