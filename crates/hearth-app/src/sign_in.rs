//! Signing in with a password, browser sessions, and one-time links to set a password.
//!
//! - Passwords are hashed with argon2id (the argon2 crate's defaults: 19 MiB, 2 passes),
//!   at most `HASHES_AT_ONCE` at a time on a blocking thread, so a flood of sign-ins costs
//!   at most that much memory and never stalls the async workers.
//! - A user has no password until they follow a link an admin made for them: `invite`
//!   (valid `INVITE_LIFETIME`) or `reset` (`RESET_LIFETIME`). A link works once; setting a
//!   password ends every session the user had.
//! - Sessions last `SESSION_LIFETIME`, at most `MAX_SESSIONS_PER_USER` per user. The
//!   session id lives in an HTTP-only cookie (set by the HTTP layer) and its CSRF token must
//!   come back in a header on every call that changes something.
//! - After `MAX_FAILURES` failed sign-ins for one email within `FAILURE_WINDOW`, this node
//!   refuses that email until the window passes (429); the table of failures holds at most
//!   `TRACKED_EMAILS` emails. An unknown email costs a hash like a known one, so timing
//!   does not tell which emails exist.

use crate::{App, AppError, AppResult};
use argon2::Argon2;
use argon2::password_hash::{
    PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng,
};
use hearth_core::Role;
use hearth_store::{NewSession, User};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const SESSION_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
pub const INVITE_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
pub const RESET_LIFETIME: Duration = Duration::from_secs(3600);
pub const MIN_PASSWORD_CHARS: usize = 12;
pub const MAX_PASSWORD_CHARS: usize = 256;
const HASHES_AT_ONCE: usize = 2;
const MAX_FAILURES: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
const TRACKED_EMAILS: usize = 10_000;

struct Guard {
    hashing: tokio::sync::Semaphore,
    failures: Mutex<HashMap<String, (u32, Instant)>>,
    /// Verified when the email is unknown, so both cases take as long.
    decoy: String,
}

fn guard() -> &'static Guard {
    static GUARD: OnceLock<Guard> = OnceLock::new();
    GUARD.get_or_init(|| Guard {
        hashing: tokio::sync::Semaphore::new(HASHES_AT_ONCE),
        failures: Mutex::new(HashMap::new()),
        decoy: hash_now("a password nobody has").expect("argon2 hashes"),
    })
}

fn hash_now(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Runs `work` on a blocking thread, at most `HASHES_AT_ONCE` at a time.
async fn hashing<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> AppResult<T> {
    let _permit = guard()
        .hashing
        .acquire()
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?;
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| AppError::Internal(e.to_string()))
}

/// Whether two secrets (a CSRF token, an OpenID state) are equal, in time that does not
/// depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn check_password(password: &str) -> AppResult<()> {
    let chars = password.chars().count();
    if !(MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&chars) {
        return Err(AppError::Invalid(format!(
            "a password has {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters"
        )));
    }
    Ok(())
}

fn email_key(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Refuses an email that failed too often lately.
fn check_failures(email: &str) -> AppResult<()> {
    let failures = guard().failures.lock().expect("not poisoned");
    if let Some((count, since)) = failures.get(&email_key(email))
        && *count >= MAX_FAILURES
        && since.elapsed() < FAILURE_WINDOW
    {
        let minutes = (FAILURE_WINDOW - since.elapsed()).as_secs() / 60 + 1;
        return Err(AppError::TooMany(format!(
            "too many failed sign-ins for this email; try again in {minutes} min"
        )));
    }
    Ok(())
}

fn count_failure(email: &str) {
    let mut failures = guard().failures.lock().expect("not poisoned");
    if failures.len() >= TRACKED_EMAILS {
        failures.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        if failures.len() >= TRACKED_EMAILS {
            // Full of live entries: forget the oldest rather than grow.
            if let Some(oldest) = failures
                .iter()
                .min_by_key(|(_, (_, since))| *since)
                .map(|(k, _)| k.clone())
            {
                failures.remove(&oldest);
            }
        }
    }
    let entry = failures
        .entry(email_key(email))
        .or_insert((0, Instant::now()));
    if entry.1.elapsed() >= FAILURE_WINDOW {
        *entry = (0, Instant::now());
    }
    entry.0 += 1;
}

impl App {
    /// Checks an email and password; makes a session.
    pub async fn sign_in(&self, email: &str, password: &str) -> AppResult<(User, NewSession)> {
        check_failures(email)?;
        let found = self.store.user_with_password(email.trim()).await?;
        let stored = found
            .as_ref()
            .and_then(|(_, hash)| hash.clone())
            .unwrap_or_else(|| guard().decoy.clone());
        let attempt = password.to_string();
        let matches = hashing(move || {
            PasswordHash::new(&stored).is_ok_and(|parsed| {
                Argon2::default()
                    .verify_password(attempt.as_bytes(), &parsed)
                    .is_ok()
            })
        })
        .await?;
        let user = match found {
            Some((user, Some(_))) if matches => user,
            _ => {
                count_failure(email);
                return Err(AppError::Unauthenticated("wrong email or password".into()));
            }
        };
        guard()
            .failures
            .lock()
            .expect("not poisoned")
            .remove(&email_key(email));
        let session = self
            .store
            .create_session(&user.id, SESSION_LIFETIME.as_millis() as i64)
            .await?;
        let _ = self
            .store
            .audit(&user.id, "sign_in", None, "success", None, None)
            .await;
        Ok((user, session))
    }

    /// The user of a session cookie, with the session's CSRF token.
    pub async fn session(&self, session_id: &str) -> AppResult<(User, String)> {
        self.store.session_user(session_id).await?.ok_or_else(|| {
            AppError::Unauthenticated("the session ended or is unknown; sign in again".into())
        })
    }

    pub async fn sign_out(&self, session_id: &str) -> AppResult<()> {
        Ok(self.store.end_session(session_id).await?)
    }

    /// A one-time link token with which a user sets their password: `invite` or `reset`.
    pub async fn password_link(
        &self,
        admin: &User,
        user_id: &str,
        purpose: &str,
    ) -> AppResult<(String, i64)> {
        if admin.role != Role::Admin {
            return Err(AppError::Forbidden("this needs the admin role".into()));
        }
        let lifetime = match purpose {
            "invite" => INVITE_LIFETIME,
            "reset" => RESET_LIFETIME,
            other => {
                return Err(AppError::Invalid(format!(
                    "purpose must be invite or reset, not {other:?}"
                )));
            }
        };
        let user = self
            .store
            .user(user_id)
            .await
            .map_err(AppError::not_found("user"))?;
        let made = self
            .store
            .create_password_link(&user.id, purpose, lifetime.as_millis() as i64)
            .await?;
        let _ = self
            .store
            .audit(
                &admin.id,
                &format!("password_{purpose}"),
                None,
                "success",
                None,
                None,
            )
            .await;
        Ok(made)
    }

    /// Sets the password a link was made for; the link is spent.
    pub async fn set_password(&self, link: &str, password: &str) -> AppResult<User> {
        check_password(password)?;
        let password = password.to_string();
        let hash = hashing(move || hash_now(&password))
            .await?
            .map_err(AppError::Internal)?;
        let user = self
            .store
            .use_password_link(link, &hash)
            .await
            .map_err(|e| match e {
                hearth_store::StoreError::NotFound => AppError::Unauthenticated(
                    "the link is unknown, used or expired; ask an admin for a new one".into(),
                ),
                e => e.into(),
            })?;
        let _ = self
            .store
            .audit(&user.id, "password_set", None, "success", None, None)
            .await;
        Ok(user)
    }
}
