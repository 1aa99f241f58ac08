//! A signed client of the OVH API (`../shared/reference/ovh-api.md`, B.1 to B.3). No
//! maintained Rust crate exists, and the whole algorithm is one SHA-1 over a fixed
//! string, so it is ours.
//!
//! - Every request but `GET /auth/time` is signed over exactly the bytes sent: the method,
//!   the full URL as sent (base included), the body string, and the timestamp.
//! - The timestamp is local time plus the delta to OVH's clock, read once from
//!   `/auth/time` and read again when OVH answers `INVALID_SIGNATURE` (then the request is
//!   tried once more).
//! - 429 and 5xx answers (and, for reads, a connection that fails) are retried with
//!   doubling backoff, at most `ATTEMPTS` tries and `BUDGET` in all. Writes are retried on
//!   429 only: OVH did not act on those, while a 5xx may hide a create that happened.
//! - Credentials never appear in logs, errors or `Debug` output.

use reqwest::Method;
use serde::de::DeserializeOwned;
use sha1::{Digest, Sha1};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Tries per request (the first included).
const ATTEMPTS: u32 = 4;
/// All tries of one request, waits included.
const BUDGET: Duration = Duration::from_secs(30);
/// One try.
const TRY_TIMEOUT: Duration = Duration::from_secs(15);

/// An application's key and secret and the consumer key it was granted.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Credentials {
    pub application_key: String,
    pub application_secret: String,
    pub consumer_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials { .. }")
    }
}

impl Credentials {
    /// Each part present, printable and without spaces.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("applicationKey", &self.application_key),
            ("applicationSecret", &self.application_secret),
            ("consumerKey", &self.consumer_key),
        ] {
            if v.is_empty() || v.len() > 256 || !v.chars().all(|c| c.is_ascii_graphic()) {
                return Err(format!(
                    "the OVH {name} must be 1 to 256 printable characters without spaces"
                ));
            }
        }
        Ok(())
    }
}

/// `ovh-eu`, `ovh-ca`, `ovh-us`, or a full base URL: `https://...`, or `http://` to this
/// machine only (a local proxy or a test's fake), never plain HTTP across a network.
pub fn base_url(endpoint: &str) -> Result<String, String> {
    let url = match endpoint {
        "ovh-eu" => "https://eu.api.ovh.com/1.0",
        "ovh-ca" => "https://ca.api.ovh.com/1.0",
        "ovh-us" => "https://api.us.ovhcloud.com/1.0",
        other => other,
    };
    let loopback = ["http://127.0.0.1:", "http://localhost:", "http://[::1]:"];
    let ok = (url.starts_with("https://") || loopback.iter().any(|p| url.starts_with(p)))
        && url.len() <= 500
        && !url
            .chars()
            .any(|c| c.is_whitespace() || c == '?' || c == '#');
    if ok {
        Ok(url.trim_end_matches('/').to_string())
    } else {
        Err(format!(
            "the OVH endpoint must be ovh-eu, ovh-ca, ovh-us or an https:// base URL (http:// only to 127.0.0.1), not {endpoint:?}"
        ))
    }
}

/// `$1$` and the lowercase hex SHA-1 of `secret+consumer+METHOD+url+body+timestamp`.
pub fn sign(secret: &str, consumer: &str, method: &str, url: &str, body: &str, ts: i64) -> String {
    let mut h = Sha1::new();
    h.update(format!("{secret}+{consumer}+{method}+{url}+{body}+{ts}"));
    format!("$1${}", hex::encode(h.finalize()))
}

/// What went wrong, sorted by what the caller should do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OvhErrorKind {
    /// The keys are wrong, revoked, or lack the right to that call.
    Credentials,
    NotFound,
    Conflict,
    /// The request was refused as it stands (a missing field, a quota).
    Refused,
    /// Too many requests, a server error, or no answer: try again later.
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvhError {
    pub kind: OvhErrorKind,
    pub message: String,
}

impl std::fmt::Display for OvhError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OvhError {}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub struct OvhClient {
    http: reqwest::Client,
    base: String,
    credentials: Credentials,
    /// OVH's clock minus ours, in seconds, once read.
    delta: Mutex<Option<i64>>,
}

impl std::fmt::Debug for OvhClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OvhClient")
            .field("base", &self.base)
            .finish()
    }
}

impl OvhClient {
    pub fn new(base: String, credentials: Credentials) -> OvhClient {
        let http = reqwest::Client::builder()
            .timeout(TRY_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client");
        OvhClient {
            http,
            base,
            credentials,
            delta: Mutex::new(None),
        }
    }

    /// The delta to OVH's clock, read from `/auth/time` when unknown or `refresh`.
    async fn delta(&self, refresh: bool) -> Result<i64, OvhError> {
        if !refresh && let Some(d) = *self.delta.lock().unwrap() {
            return Ok(d);
        }
        let url = format!("{}/auth/time", self.base);
        let answer = self
            .http
            .get(&url)
            .header("X-Ovh-Application", &self.credentials.application_key)
            .send()
            .await
            .map_err(|e| unavailable(&format!("GET /auth/time: {}", without_url(&e))))?;
        let status = answer.status();
        let text = answer.text().await.unwrap_or_default();
        let server: i64 = text.trim().parse().map_err(|_| OvhError {
            kind: OvhErrorKind::Unavailable,
            message: format!(
                "OVH's /auth/time answered {status} with {:?}, not a time",
                cut(&text)
            ),
        })?;
        let delta = server - unix_now();
        *self.delta.lock().unwrap() = Some(delta);
        if delta.abs() > 60 {
            tracing::info!(
                delta_seconds = delta,
                "OVH's clock differs from ours; signing with its time"
            );
        }
        Ok(delta)
    }

    /// Calls `path` (from the base, with its query) and reads the JSON answer; `null` and
    /// empty answers read as `T`'s null (use `serde_json::Value` or `Option`).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, OvhError> {
        let text = self.call_text(method, path, body).await?;
        let text = if text.trim().is_empty() {
            "null"
        } else {
            &text
        };
        serde_json::from_str(text).map_err(|e| OvhError {
            kind: OvhErrorKind::Unavailable,
            message: format!("OVH's answer to {path} is not what its API describes: {e}"),
        })
    }

    async fn call_text(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<String, OvhError> {
        let url = format!("{}{}", self.base, path);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let read = method == Method::GET;
        let started = Instant::now();
        let mut wait = Duration::from_millis(500);
        let mut resynced = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ts = unix_now() + self.delta(false).await?;
            let signature = sign(
                &self.credentials.application_secret,
                &self.credentials.consumer_key,
                method.as_str(),
                &url,
                &body,
                ts,
            );
            let mut request = self
                .http
                .request(method.clone(), &url)
                .header("X-Ovh-Application", &self.credentials.application_key)
                .header("X-Ovh-Consumer", &self.credentials.consumer_key)
                .header("X-Ovh-Timestamp", ts.to_string())
                .header("X-Ovh-Signature", signature);
            if !body.is_empty() {
                request = request
                    .header("Content-Type", "application/json")
                    .body(body.clone());
            }
            let (retry, error) = match request.send().await {
                Ok(answer) => {
                    let status = answer.status();
                    let query = answer
                        .headers()
                        .get("x-ovh-queryid")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let text = answer.text().await.unwrap_or_default();
                    if status.is_success() {
                        return Ok(text);
                    }
                    classify(&method, path, status.as_u16(), &text, query)
                }
                Err(e) => (
                    read,
                    unavailable(&format!("{method} {path}: {}", without_url(&e))),
                ),
            };
            if error.message.contains("INVALID_SIGNATURE") && !resynced {
                // Most often the clocks moved apart: read OVH's time again and try once more.
                resynced = true;
                self.delta(true).await?;
                continue;
            }
            if !retry || attempt >= ATTEMPTS || started.elapsed() + wait > BUDGET {
                return Err(error);
            }
            tracing::debug!(%method, path, attempt, error = %error, "OVH call failed; trying again");
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
}

fn unavailable(what: &str) -> OvhError {
    OvhError {
        kind: OvhErrorKind::Unavailable,
        message: format!("cannot reach the OVH API ({what}); it is retried"),
    }
}

/// A transport error without the URL (it is ours, and long).
fn without_url(e: &reqwest::Error) -> String {
    let mut e = e.to_string();
    if let Some(at) = e.find(" for url (") {
        e.truncate(at);
    }
    e
}

fn cut(s: &str) -> String {
    s.chars().take(300).collect()
}

/// An OVH error answer as an `OvhError`, and whether trying again may help.
fn classify(
    method: &Method,
    path: &str,
    status: u16,
    text: &str,
    query: Option<String>,
) -> (bool, OvhError) {
    let body: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let said = body["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| cut(text));
    let code = body["errorCode"].as_str().unwrap_or("");
    let query = query
        .map(|q| format!(" (OVH query {q})"))
        .unwrap_or_default();
    let what = format!("{method} {path}");
    let (kind, retry, message) = match (status, code) {
        (_, "INVALID_SIGNATURE") => (
            OvhErrorKind::Credentials,
            false,
            format!(
                "OVH refused the signature of {what} (INVALID_SIGNATURE) even after reading its clock again: check OVH_APPLICATION_SECRET and OVH_CONSUMER_KEY{query}"
            ),
        ),
        (403, _) | (401, _) => (
            OvhErrorKind::Credentials,
            false,
            format!(
                "OVH refused the credentials for {what}: {said} ({}); check the application key, secret and consumer key, and that the consumer key is granted /cloud/project/*{query}",
                if code.is_empty() { "403" } else { code }
            ),
        ),
        (404, _) => (
            OvhErrorKind::NotFound,
            false,
            format!("OVH: {what}: not found: {said}{query}"),
        ),
        (409, _) => (
            OvhErrorKind::Conflict,
            false,
            format!("OVH: {what}: conflict: {said}{query}"),
        ),
        (429, _) => (
            OvhErrorKind::Unavailable,
            true,
            format!("OVH: {what}: 429 too many requests: {said}{query}"),
        ),
        (s, _) if s >= 500 => (
            OvhErrorKind::Unavailable,
            method == Method::GET,
            format!("OVH: {what}: {s}: {said}{query}"),
        ),
        (_, _) if said.to_ascii_lowercase().contains("quota") => (
            OvhErrorKind::Refused,
            false,
            format!(
                "OVH: the project's quota does not allow {what}: {said}; raise it in the OVH control panel{query}"
            ),
        ),
        (s, _) => (
            OvhErrorKind::Refused,
            false,
            format!("OVH refused {what} ({s}): {said}{query}"),
        ),
    };
    (retry, OvhError { kind, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seven vectors of `ovh-api.md` B.2 (from python-ovh's own tests).
    #[test]
    fn golden_vectors() {
        let (secret, consumer, ts) = (
            "9ufkBmLaTQ9nz5yMUlg79taH0GNnzDjk",
            "5mBuy6SUQcRw2ZUxg0cG68BoDKpED4KY",
            1457018875,
        );
        let body = r#"{"a":"b","c":"d"}"#;
        for (method, url, body, want) in [
            (
                "GET",
                "https://eu.api.ovh.com/1.0/auth",
                "",
                "$1$e9556054b6309771395efa467c22e627407461ad",
            ),
            (
                "POST",
                "https://eu.api.ovh.com/1.0/auth",
                body,
                "$1$ec2fb5c7a81f64723c77d2e5b609ae6f58a84fc1",
            ),
            (
                "PUT",
                "https://eu.api.ovh.com/1.0/auth",
                body,
                "$1$8a75a9e7c8e7296c9dbeda6a2a735eb6bd58ec4b",
            ),
            (
                "DELETE",
                "https://eu.api.ovh.com/1.0/auth",
                "",
                "$1$a1eecd00b3b02b6cf5708b84b9ff42059a950d85",
            ),
            (
                "GET",
                "https://eu.api.ovh.com/1.0/call",
                "",
                "$1$7f2db49253edfc41891023fcd1a54cf61db05fbb",
            ),
            (
                "GET",
                "https://eu.api.ovh.com/v1/call",
                "",
                "$1$e6e7906d385eb28adcbfbe6b66c1528a42d741ad",
            ),
            (
                "GET",
                "https://eu.api.ovh.com/v2/call",
                "",
                "$1$bb63b132a6f84ad5433d0c534d48d3f7c3804285",
            ),
        ] {
            assert_eq!(
                sign(secret, consumer, method, url, body, ts),
                want,
                "{method} {url}"
            );
        }
    }

    #[test]
    fn endpoints_by_name_or_url_and_never_plain_http_across_a_network() {
        assert_eq!(base_url("ovh-eu").unwrap(), "https://eu.api.ovh.com/1.0");
        assert_eq!(
            base_url("ovh-us").unwrap(),
            "https://api.us.ovhcloud.com/1.0"
        );
        assert_eq!(
            base_url("https://ovh.example/1.0/").unwrap(),
            "https://ovh.example/1.0"
        );
        assert_eq!(
            base_url("http://127.0.0.1:9/1.0").unwrap(),
            "http://127.0.0.1:9/1.0"
        );
        for bad in [
            "http://ovh.example/1.0",
            "ovh-mars",
            "https://a b",
            "https://x/?q",
        ] {
            assert!(base_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_say_what_to_do_and_never_hold_the_secret() {
        let (_, e) = classify(
            &Method::GET,
            "/cloud/project/p/instance",
            403,
            r#"{"errorCode":"INVALID_CREDENTIAL","httpCode":"403 Forbidden","message":"This credential is not valid"}"#,
            Some("FR.1".into()),
        );
        assert_eq!(e.kind, OvhErrorKind::Credentials);
        assert!(
            e.message.contains("INVALID_CREDENTIAL")
                && e.message.contains("consumer key")
                && e.message.contains("FR.1"),
            "{}",
            e.message
        );
        let (retry, e) = classify(&Method::POST, "/x", 429, r#"{"message":"slow down"}"#, None);
        assert!(retry && e.kind == OvhErrorKind::Unavailable);
        let (retry, e) = classify(&Method::POST, "/x", 503, "", None);
        assert!(
            !retry && e.kind == OvhErrorKind::Unavailable,
            "a write is not retried on 5xx"
        );
        let (_, e) = classify(
            &Method::POST,
            "/x",
            400,
            r#"{"class":"Client::BadRequest","message":"Quota exceeded for cores"}"#,
            None,
        );
        assert_eq!(e.kind, OvhErrorKind::Refused);
        assert!(e.message.contains("quota"));
        let c = Credentials {
            application_key: "ak".into(),
            application_secret: "very-secret".into(),
            consumer_key: "ck".into(),
        };
        assert!(
            !format!("{c:?} {:?}", OvhClient::new("https://x".into(), c.clone()))
                .contains("very-secret")
        );
    }
}
