//! Health, readiness, the OpenAPI document and flavors.

use crate::App;
use crate::error::ApiError;
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use hearth_core::Tier;
use serde_json::{Value, json};

/// The spec lives next to the code; a test checks every route is in it.
pub const OPENAPI: &str = include_str!("../../openapi.json");

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the database answers within a second. Hosts are reported (from the last
/// health checks), never a reason for this node to be unready: other hosts may serve.
pub async fn readyz(State(app): State<App>) -> impl IntoResponse {
    let database = match tokio::time::timeout(std::time::Duration::from_secs(1), app.store.ping()).await {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 1 s".to_string(),
    };
    let hosts = match (database == "ok").then(|| app.store.hosts()) {
        Some(hosts) => match tokio::time::timeout(std::time::Duration::from_secs(1), hosts).await {
            Ok(Ok(hosts)) => {
                let healthy = hosts.iter().filter(|h| h.health == hearth_core::HostHealth::Healthy).count();
                json!({ "healthy": healthy, "unhealthy": hosts.len() - healthy })
            }
            _ => Value::Null,
        },
        None => Value::Null,
    };
    let ready = database == "ok";
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    // Redis is optional: reported, never a reason to be unready.
    let redis = app.bus.status().await;
    (status, Json(json!({ "ready": ready, "database": database, "hosts": hosts, "redis": redis, "node": app.queue.owner() })))
}

/// Prometheus text: environments and jobs by state (cluster-wide, from the database) and
/// this node's identity.
pub async fn metrics(State(app): State<App>) -> Result<impl IntoResponse, ApiError> {
    use hearth_store::Counted;
    use std::fmt::Write;
    let mut out = String::new();
    let envs = app.store.counts_by_state(Counted::Environments).await?;
    let _ = writeln!(out, "# HELP hearth_environments Environments by state.\n# TYPE hearth_environments gauge");
    for state in hearth_core::EnvState::ALL {
        let n = envs.iter().find(|(s, _)| s == state.as_str()).map(|(_, n)| *n).unwrap_or(0);
        let _ = writeln!(out, "hearth_environments{{state=\"{state}\"}} {n}");
    }
    let jobs = app.store.counts_by_state(Counted::Jobs).await?;
    let _ = writeln!(out, "# HELP hearth_jobs Jobs by state.\n# TYPE hearth_jobs gauge");
    for state in ["queued", "running", "succeeded", "dead"] {
        let n = jobs.iter().find(|(s, _)| s == state).map(|(_, n)| *n).unwrap_or(0);
        let _ = writeln!(out, "hearth_jobs{{state=\"{state}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP hearth_node_info This node.\n# TYPE hearth_node_info gauge");
    let _ = writeln!(out, "hearth_node_info{{owner=\"{}\",workers=\"{}\"}} 1", app.queue.owner(), app.config.workers);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// The sizes offered: any size within quota works, so these are the tiers'.
pub async fn flavors(State(app): State<App>) -> Json<Value> {
    let items: Vec<Value> = [Tier::Free, Tier::Pro, Tier::Unlimited]
        .into_iter()
        .map(|t| {
            let r = t.default_resources();
            json!({ "id": t.as_str(), "name": t.as_str(), "provider": app.config.default_kind,
                    "vcpus": r.vcpus, "memoryMb": r.memory_mb, "diskGb": r.disk_gb })
        })
        .collect();
    Json(json!({ "items": items }))
}

/// The regions of healthy, ready hosts: where an environment may ask to be placed.
pub async fn regions(State(app): State<App>) -> Result<Json<Value>, ApiError> {
    let items: Vec<Value> = app.store.regions().await?.into_iter().map(|(id, hosts)| json!({ "id": id, "hosts": hosts })).collect();
    Ok(Json(json!({ "items": items })))
}

pub async fn not_found() -> ApiError {
    hearth_app::AppError::NotFound("route").into()
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this path does not take that method; see /openapi.json")
}

#[cfg(test)]
mod tests {
    /// Every route the router declares is in the OpenAPI document, with each of its methods.
    #[test]
    fn spec_lists_every_route() {
        let spec: serde_json::Value = serde_json::from_str(super::OPENAPI).unwrap();
        let router = include_str!("mod.rs");
        let mut checked = 0;
        for line in router.lines().map(str::trim).filter(|l| l.starts_with(".route(\"")) {
            let path = line.split('"').nth(1).unwrap();
            let entry = spec["paths"].get(path).unwrap_or_else(|| panic!("{path} is not in openapi.json"));
            for method in ["get", "post", "delete", "patch"] {
                if line.contains(&format!("{method}(")) {
                    assert!(entry.get(method).is_some(), "{method} {path} is not in openapi.json");
                }
            }
            checked += 1;
        }
        assert!(checked >= 30, "only {checked} routes found; did the router move?");
    }
}
