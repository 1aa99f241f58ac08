//! The seed's front end speaks tRPC v11 to procedures named `vm.*`; this serves them at
//! `/api/trpc` on the same service functions as the REST API, so that front end (or any
//! `@trpc/client` v11) works against Hearth unchanged. The REST API stays the main
//! interface: this module only translates.
//!
//! The wire format (no transformer, plain JSON), as `@trpc/server` 11 answers it:
//! - a query is a GET with its input as JSON in `?input=`; a mutation is a POST with the
//!   input as the body;
//! - `?batch=1` takes comma-separated paths and inputs keyed by index (`{"0": ...}`) and
//!   answers an array of results, with 207 when their statuses differ;
//! - a result is `{"result": {"data": ...}}`; an error is `{"error": {"message", "code"
//!   (JSON-RPC number), "data": {"code", "httpStatus", "path"}}}`;
//! - a subscription is a GET answered with server-sent events: `connected`, one unnamed
//!   event per value, then `return`, or `serialized-error` with the error's shape.
//!
//! Authentication is the REST API's: a bearer token, or the session cookie. A cookie
//! rides along with any request a browser makes, so with a cookie a mutation or the
//! command-running subscription must carry `Sec-Fetch-Site: same-origin` (every current
//! browser sends it; one that does not is refused) and a mutation must be JSON, which no
//! cross-site form can send; a read is refused when the browser says it comes from
//! elsewhere. The seed's front end, in a current browser, meets all of it by itself.

use super::auth;
use crate::App;
use crate::error::ApiError;
use crate::views::{HostView, LogView, UserVm, VmStatsView};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use hearth_app::service::{ExecInput, SizeRequest};
use hearth_core::{JobKind, Role};
use hearth_store::User;
use serde_json::{Value, json};
use std::convert::Infallible;

/// Calls one batch may hold.
const MAX_BATCH: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Query,
    Mutation,
    Subscription,
}

fn kind_of(path: &str) -> Option<Kind> {
    Some(match path {
        "vm.listRegions"
        | "vm.listFlavors"
        | "vm.getMyVm"
        | "vm.getProvisionLogs"
        | "vm.getAllVms" => Kind::Query,
        "vm.provisionMyVm" | "vm.startMyVm" | "vm.stopMyVm" | "vm.destroyMyVm"
        | "vm.executeCode" | "vm.destroyVm" => Kind::Mutation,
        "vm.executeCodeStream" => Kind::Subscription,
        _ => return None,
    })
}

/// A tRPC error: its name (`BAD_REQUEST`, ...), HTTP status and message.
#[derive(Debug)]
struct TrpcError {
    code: &'static str,
    status: u16,
    message: String,
}

impl TrpcError {
    fn new(code: &'static str, message: impl Into<String>) -> TrpcError {
        let status = match code {
            "PARSE_ERROR" | "BAD_REQUEST" => 400,
            "UNAUTHORIZED" => 401,
            "FORBIDDEN" => 403,
            "NOT_FOUND" => 404,
            "METHOD_NOT_SUPPORTED" => 405,
            "TIMEOUT" => 408,
            "CONFLICT" => 409,
            "UNSUPPORTED_MEDIA_TYPE" => 415,
            "TOO_MANY_REQUESTS" => 429,
            "SERVICE_UNAVAILABLE" => 503,
            _ => 500,
        };
        TrpcError {
            code,
            status,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> TrpcError {
        TrpcError::new("BAD_REQUEST", message)
    }

    /// The JSON-RPC number tRPC gives each name.
    fn number(&self) -> i64 {
        match self.code {
            "PARSE_ERROR" => -32700,
            "BAD_REQUEST" => -32600,
            "UNAUTHORIZED" => -32001,
            "FORBIDDEN" => -32003,
            "NOT_FOUND" => -32004,
            "METHOD_NOT_SUPPORTED" => -32005,
            "TIMEOUT" => -32008,
            "CONFLICT" => -32009,
            "UNSUPPORTED_MEDIA_TYPE" => -32015,
            "TOO_MANY_REQUESTS" => -32029,
            _ => -32603,
        }
    }

    fn shape(&self, path: &str) -> Value {
        json!({
            "message": self.message,
            "code": self.number(),
            "data": { "code": self.code, "httpStatus": self.status, "path": path },
        })
    }
}

impl From<ApiError> for TrpcError {
    fn from(e: ApiError) -> TrpcError {
        let code = match e.status {
            StatusCode::BAD_REQUEST => "BAD_REQUEST",
            StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
            StatusCode::FORBIDDEN => "FORBIDDEN",
            StatusCode::NOT_FOUND => "NOT_FOUND",
            StatusCode::REQUEST_TIMEOUT => "TIMEOUT",
            StatusCode::CONFLICT => "CONFLICT",
            StatusCode::TOO_MANY_REQUESTS => "TOO_MANY_REQUESTS",
            StatusCode::SERVICE_UNAVAILABLE => "SERVICE_UNAVAILABLE",
            _ => "INTERNAL_SERVER_ERROR",
        };
        TrpcError::new(code, e.message)
    }
}

impl From<hearth_app::AppError> for TrpcError {
    fn from(e: hearth_app::AppError) -> TrpcError {
        ApiError::from(e).into()
    }
}

/// The caller, as the REST API finds it; a cookie must come from this site (see above).
/// A call that acts (a mutation, or the subscription that runs a command) with a cookie
/// must say it comes from this site (`Sec-Fetch-Site: same-origin`); a browser that does
/// not say where a request comes from is refused then, never trusted. A read is refused
/// only when the browser says it comes from elsewhere: another site cannot read the answer.
async fn caller(
    app: &App,
    method: &Method,
    headers: &HeaderMap,
    acts: bool,
) -> Result<User, TrpcError> {
    if let Some(h) = headers.get(header::AUTHORIZATION) {
        let token = super::bearer(h).ok_or_else(|| {
            TrpcError::new(
                "UNAUTHORIZED",
                "the Authorization header must be `Bearer <token>`",
            )
        })?;
        return Ok(app.authenticate(token).await?);
    }
    let Some(session) = auth::session_cookie(headers) else {
        return Err(TrpcError::new(
            "UNAUTHORIZED",
            "missing Authorization: Bearer <token> header (or a session: POST /v1/auth/sign-in)",
        ));
    };
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(|o| o.split_once("://").map(|(_, h)| h).unwrap_or(o));
    let from_here = if acts {
        site == Some("same-origin")
    } else {
        matches!(site, None | Some("same-origin" | "none"))
    };
    let from_elsewhere = !from_here || matches!((origin_host, host), (Some(o), Some(h)) if o != h);
    if from_elsewhere {
        return Err(TrpcError::new(
            "FORBIDDEN",
            "a session cookie is accepted only from this site's own pages",
        ));
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if *method == Method::POST && !json {
        return Err(TrpcError::new(
            "UNSUPPORTED_MEDIA_TYPE",
            "a mutation with a session cookie must be sent as application/json",
        ));
    }
    Ok(app.session(&session).await?.0)
}

/// `{}` or absent: no input; else the object, with only `allowed` keys read.
fn object(input: &Option<Value>) -> Result<serde_json::Map<String, Value>, TrpcError> {
    match input {
        None | Some(Value::Null) => Ok(Default::default()),
        Some(Value::Object(o)) => Ok(o.clone()),
        Some(other) => Err(TrpcError::bad(format!(
            "the input must be an object, not {other}"
        ))),
    }
}

/// An integer field within `range`, or `default` when absent.
fn integer(
    o: &serde_json::Map<String, Value>,
    name: &str,
    range: std::ops::RangeInclusive<i64>,
    default: i64,
) -> Result<i64, TrpcError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_i64().filter(|n| range.contains(n)).ok_or_else(|| {
            TrpcError::bad(format!(
                "{name} must be an integer from {} to {}, not {v}",
                range.start(),
                range.end()
            ))
        }),
    }
}

fn text(o: &serde_json::Map<String, Value>, name: &str) -> Result<String, TrpcError> {
    o.get(name)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| TrpcError::bad(format!("{name} must be a string")))
}

fn to_json<T: serde::Serialize>(v: T) -> Value {
    serde_json::to_value(v).expect("views serialize")
}

/// One query or mutation.
async fn call(
    app: &App,
    user: &User,
    path: &str,
    input: Option<Value>,
) -> Result<Value, TrpcError> {
    let o = object(&input)?;
    let admin = || {
        if user.role == Role::Admin {
            Ok(())
        } else {
            Err(TrpcError::new("FORBIDDEN", "this needs the admin role"))
        }
    };
    Ok(match path {
        "vm.listRegions" => to_json(
            app.store
                .regions()
                .await
                .map_err(ApiError::from)?
                .into_iter()
                .map(|(id, _)| id)
                .collect::<Vec<_>>(),
        ),
        "vm.listFlavors" => Value::Array(
            super::ops::all_flavors(app)
                .await
                .into_iter()
                .map(|f| {
                    json!({"id": f.id, "name": f.name, "type": f.type_label, "region": f.region,
                        "vcpus": f.vcpus, "ram": f.memory_mb as f64 / 1024.0, "disk": f.disk_gb, "gpus": f.gpus})
                })
                .collect(),
        ),
        "vm.getMyVm" => match app.personal_vm(user).await {
            Ok(env) => to_json(UserVm::from(&env)),
            Err(hearth_app::AppError::NotFound(_)) => Value::Null,
            Err(e) => return Err(e.into()),
        },
        "vm.getProvisionLogs" => match app.personal_vm(user).await {
            Ok(env) => to_json(
                app.store
                    .logs(&env.id)
                    .await
                    .map_err(ApiError::from)?
                    .iter()
                    .map(LogView::from)
                    .collect::<Vec<_>>(),
            ),
            Err(hearth_app::AppError::NotFound(_)) => json!([]),
            Err(e) => return Err(e.into()),
        },
        "vm.provisionMyVm" => {
            // The seed's input: {vcpus 1..16 = 2, memoryMb >= 1024 = 4096, diskGb 10..500 = 50};
            // without one, the tier's sizes.
            let size = if o.is_empty() {
                SizeRequest::default()
            } else {
                SizeRequest {
                    vcpus: Some(integer(&o, "vcpus", 1..=16, 2)?),
                    memory_mb: Some(integer(&o, "memoryMb", 1024..=262_144, 4096)?),
                    disk_gb: Some(integer(&o, "diskGb", 10..=500, 50)?),
                }
            };
            let (_, env) = app.provision_personal(user, size, None).await?;
            to_json(UserVm::from(&env))
        }
        "vm.startMyVm" | "vm.stopMyVm" => {
            let env = app.personal_vm(user).await?;
            let kind = if path == "vm.startMyVm" {
                JobKind::Start
            } else {
                JobKind::Stop
            };
            app.request(&user.id, &env, kind).await?;
            to_json(UserVm::from(&app.personal_vm(user).await?))
        }
        "vm.destroyMyVm" => {
            let env = app.personal_vm(user).await?;
            app.request(&user.id, &env, JobKind::Destroy).await?;
            json!({ "success": true })
        }
        "vm.executeCode" => {
            let input = ExecInput {
                code: text(&o, "code")?,
                timeout_seconds: None,
                working_dir: None,
            };
            input.validate().map_err(TrpcError::from)?;
            let env = app.personal_vm(user).await?;
            match app.exec(user, &env, input).await {
                Ok(r) => json!({
                    "stdout": r.stdout, "stderr": r.stderr, "exitCode": r.execution.exit_code.unwrap_or(-1),
                }),
                // As the seed answered: a VM that is not running is a failed command that
                // says why (a stopped one has a start queued).
                Err(hearth_app::AppError::InvalidState(why)) => {
                    json!({ "stdout": "", "stderr": why, "exitCode": 1 })
                }
                Err(e) => return Err(e.into()),
            }
        }
        "vm.getAllVms" => {
            admin()?;
            let overview = app.vms_overview().await?;
            json!({
                "vms": overview.vms.iter().map(UserVm::from).collect::<Vec<_>>(),
                "hosts": overview.hosts.iter().map(HostView::from).collect::<Vec<_>>(),
                "stats": VmStatsView::from(&overview.stats),
            })
        }
        "vm.destroyVm" => {
            admin()?;
            let id = text(&o, "vmId")?;
            app.admin_destroy(user, &id).await?;
            json!({ "success": true })
        }
        _ => {
            return Err(TrpcError::new(
                "NOT_FOUND",
                format!("No procedure found on path \"{path}\""),
            ));
        }
    })
}

/// The inputs of the calls: by index for a batch, the one input otherwise.
fn inputs(batch: bool, count: usize, raw: Option<&str>) -> Result<Vec<Option<Value>>, TrpcError> {
    let parsed: Option<Value> =
        match raw.filter(|r| !r.is_empty()) {
            None => None,
            Some(r) => Some(serde_json::from_str(r).map_err(|e| {
                TrpcError::new("PARSE_ERROR", format!("the input is not JSON: {e}"))
            })?),
        };
    if !batch {
        return Ok(vec![parsed]);
    }
    match parsed {
        None => Ok(vec![None; count]),
        Some(Value::Object(by_index)) => Ok((0..count)
            .map(|i| by_index.get(&i.to_string()).cloned())
            .collect()),
        Some(_) => Err(TrpcError::bad(
            "\"input\" needs to be an object when doing a batch call",
        )),
    }
}

fn json_response(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `GET` and `POST /api/trpc/{paths}`.
pub async fn handle(
    State(app): State<App>,
    method: Method,
    Path(paths): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let batch = param("batch") == Some("1");
    let names: Vec<&str> = if batch {
        paths.split(',').collect()
    } else {
        vec![paths.as_str()]
    };
    let fail_all = |e: TrpcError| {
        if batch {
            let status = e.status;
            json_response(
                status,
                Value::Array(
                    names
                        .iter()
                        .map(|p| json!({ "error": e.shape(p) }))
                        .collect(),
                ),
            )
        } else {
            json_response(e.status, json!({ "error": e.shape(&paths) }))
        }
    };
    if names.len() > MAX_BATCH {
        return fail_all(TrpcError::bad(format!(
            "a batch holds at most {MAX_BATCH} calls"
        )));
    }
    let raw = if method == Method::GET {
        param("input").map(str::to_string)
    } else {
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    let inputs = match inputs(batch, names.len(), raw.as_deref()) {
        Ok(i) => i,
        Err(e) => return fail_all(e),
    };
    let kinds: Vec<Option<Kind>> = names.iter().map(|p| kind_of(p)).collect();
    if kinds.contains(&Some(Kind::Subscription)) {
        if batch || method != Method::GET {
            return fail_all(TrpcError::bad(
                "a subscription is a single GET (httpSubscriptionLink)",
            ));
        }
        return subscription(app, &method, &headers, inputs.into_iter().next().flatten()).await;
    }
    let user = caller(&app, &method, &headers, method == Method::POST).await;
    let mut results = Vec::with_capacity(names.len());
    for ((path, kind), input) in names.iter().zip(kinds).zip(inputs) {
        let outcome = match (kind, &user) {
            (None, _) => Err(TrpcError::new(
                "NOT_FOUND",
                format!("No procedure found on path \"{path}\""),
            )),
            (Some(Kind::Query), _) if method != Method::GET => Err(TrpcError::new(
                "METHOD_NOT_SUPPORTED",
                format!("{path} is a query: send it with GET"),
            )),
            (Some(Kind::Mutation), _) if method != Method::POST => Err(TrpcError::new(
                "METHOD_NOT_SUPPORTED",
                format!("{path} is a mutation: send it with POST"),
            )),
            (_, Err(e)) => Err(TrpcError::new(e.code, e.message.clone())),
            (_, Ok(user)) => call(&app, user, path, input).await,
        };
        results.push(match outcome {
            Ok(data) => (200, json!({ "result": { "data": data } })),
            Err(e) => (e.status, json!({ "error": e.shape(path) })),
        });
    }
    if !batch {
        let (status, body) = results.pop().expect("one call");
        return json_response(status, body);
    }
    let first = results[0].0;
    let status = if results.iter().all(|(s, _)| *s == first) {
        first
    } else {
        207
    };
    json_response(
        status,
        Value::Array(results.into_iter().map(|(_, b)| b).collect()),
    )
}

/// `vm.executeCodeStream({command})`: the command's output as it comes, as the seed's
/// events `{type: "stdout"|"stderr", data}`, then `{type: "exit", code}`; a failure is
/// `{type: "error", error}` (the seed's) once the stream is open, a tRPC error before.
async fn subscription(
    app: App,
    method: &Method,
    headers: &HeaderMap,
    input: Option<Value>,
) -> Response {
    let path = "vm.executeCodeStream";
    let started = async {
        let user = caller(&app, method, headers, true).await?;
        let o = object(&input)?;
        let exec = ExecInput {
            code: text(&o, "command")?,
            timeout_seconds: None,
            working_dir: None,
        };
        exec.validate().map_err(TrpcError::from)?;
        let env = app.personal_vm(&user).await?;
        Ok::<_, TrpcError>(app.exec_stream(&user, &env, exec).await)
    }
    .await;
    let connected = Event::default().event("connected").data("{}");
    let events: std::pin::Pin<Box<dyn futures::Stream<Item = Result<Event, Infallible>> + Send>> =
        match started {
            Err(e) => Box::pin(futures::stream::iter([
                Ok(connected),
                Ok(Event::default()
                    .event("serialized-error")
                    .data(e.shape(path).to_string())),
            ])),
            Ok(Err(e)) => Box::pin(futures::stream::iter([
                Ok(connected),
                Ok(Event::default()
                    .data(json!({ "type": "error", "error": e.to_string() }).to_string())),
                Ok(Event::default().event("return").data("")),
            ])),
            Ok(Ok(rx)) => {
                let values = futures::stream::unfold(rx, |mut rx| async move {
                    let e = rx.recv().await?;
                    let value = match e.kind {
                        "exit" => json!({ "type": "exit", "code": e.data["exitCode"] }),
                        kind => json!({ "type": kind, "data": e.data["data"] }),
                    };
                    Some((Ok(Event::default().data(value.to_string())), rx))
                });
                Box::pin(futures::stream::iter([Ok(connected)]).chain(values).chain(
                    futures::stream::iter([Ok(Event::default().event("return").data(""))]),
                ))
            }
        };
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
