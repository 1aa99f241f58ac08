//! Health, readiness, metrics, this API's document, flavors and regions.

use crate::App;
use crate::error::ApiError;
use crate::views::{FlavorView, HealthView, Items, ReadyView, RegionView};
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use hearth_core::Tier;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// The process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()), responses((status = 200, description = "alive", body = HealthView)))]
pub async fn healthz() -> Json<HealthView> {
    Json(HealthView { status: "ok" })
}

/// Ready when the database answers (within 0.8 s, so this answers within a second).
/// Hosts are reported (from the last health checks), never a reason for this node to be
/// unready: other hosts may serve.
#[utoipa::path(get, path = "/readyz", tag = "operations", security(()),
    responses((status = 200, description = "ready", body = ReadyView), (status = 503, description = "the database does not answer", body = ReadyView)))]
pub async fn readyz(State(app): State<App>) -> (StatusCode, Json<ReadyView>) {
    let database = match tokio::time::timeout(Duration::from_millis(800), app.store.ping()).await {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 0.8 s".to_string(),
    };
    let hosts = match (database == "ok").then(|| app.store.hosts()) {
        Some(hosts) => match tokio::time::timeout(Duration::from_secs(1), hosts).await {
            Ok(Ok(hosts)) => {
                let healthy = hosts
                    .iter()
                    .filter(|h| h.health == hearth_core::HostHealth::Healthy)
                    .count();
                json!({ "healthy": healthy, "unhealthy": hosts.len() - healthy })
            }
            _ => Value::Null,
        },
        None => Value::Null,
    };
    let ready = database == "ok";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Redis is optional: reported, never a reason to be unready.
    let redis = app.bus.status().await;
    (
        status,
        Json(ReadyView {
            ready,
            database,
            hosts,
            redis,
            node: app.queue.owner().to_string(),
        }),
    )
}

/// Prometheus text: environments and jobs by state (cluster-wide, from the database) and
/// this node's identity. Needs an admin's token unless `HEARTH_METRICS_PUBLIC=1`.
#[utoipa::path(get, path = "/metrics", tag = "operations", security(("bearer" = []), ()),
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        super::docs::Authed, super::docs::AdminOnly))]
pub async fn metrics(
    State(app): State<App>,
    mut parts: axum::http::request::Parts,
) -> Result<impl IntoResponse, ApiError> {
    use axum::extract::FromRequestParts;
    if !app.config.metrics_public {
        super::Admin::from_request_parts(&mut parts, &app).await?;
    }
    use hearth_store::Counted;
    use std::fmt::Write;
    let mut out = String::new();
    let envs = app.store.counts_by_state(Counted::Environments).await?;
    let _ = writeln!(
        out,
        "# HELP hearth_environments Environments by state.\n# TYPE hearth_environments gauge"
    );
    for state in hearth_core::EnvState::ALL {
        let n = envs
            .iter()
            .find(|(s, _)| s == state.as_str())
            .map(|(_, n)| *n)
            .unwrap_or(0);
        let _ = writeln!(out, "hearth_environments{{state=\"{state}\"}} {n}");
    }
    let jobs = app.store.counts_by_state(Counted::Jobs).await?;
    let _ = writeln!(
        out,
        "# HELP hearth_jobs Jobs by state.\n# TYPE hearth_jobs gauge"
    );
    for state in ["queued", "running", "succeeded", "dead"] {
        let n = jobs
            .iter()
            .find(|(s, _)| s == state)
            .map(|(_, n)| *n)
            .unwrap_or(0);
        let _ = writeln!(out, "hearth_jobs{{state=\"{state}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP hearth_node_info This node.\n# TYPE hearth_node_info gauge"
    );
    let _ = writeln!(
        out,
        "hearth_node_info{{owner=\"{}\",workers=\"{}\"}} 1",
        app.queue.owner(),
        app.config.workers
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

/// This document, generated from the code that serves the routes it lists.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", security(()),
    responses((status = 200, description = "the OpenAPI document", content_type = "application/json", body = Object)))]
pub async fn openapi(axum::Extension(document): axum::Extension<Arc<String>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document.as_str().to_string(),
    )
}

/// The sizes offered: any size within quota works, so these are the tiers'.
#[utoipa::path(get, path = "/v1/flavors", tag = "operations", security(()), responses((status = 200, description = "the tiers' sizes, then the flavors of OVH hosts (kept 5 minutes)", body = Items<FlavorView>)))]
pub async fn flavors(State(app): State<App>) -> Json<Items<FlavorView>> {
    Json(Items {
        items: all_flavors(&app).await,
    })
}

/// The tiers' sizes, then what OVH hosts offer: `/v1/flavors`, and the seed's
/// `vm.listFlavors` in its own shape.
pub async fn all_flavors(app: &App) -> Vec<FlavorView> {
    let mut items: Vec<FlavorView> = [Tier::Free, Tier::Pro, Tier::Unlimited]
        .into_iter()
        .map(|t| {
            let r = t.default_resources();
            FlavorView {
                id: t.as_str().to_string(),
                name: t.as_str().to_string(),
                provider: app.config.default_kind,
                type_label: "Tier".into(),
                region: None,
                vcpus: r.vcpus,
                memory_mb: r.memory_mb,
                disk_gb: r.disk_gb,
                gpus: 0,
                gpu_model: None,
            }
        })
        .collect();
    items.extend(
        app.offered_flavors()
            .await
            .into_iter()
            .map(|(kind, f)| FlavorView {
                id: f.id,
                name: f.name,
                provider: kind,
                type_label: f.type_label,
                region: Some(f.region),
                vcpus: f.vcpus,
                memory_mb: f.memory_mb,
                disk_gb: f.disk_gb,
                gpus: f.gpus,
                gpu_model: f.gpu_model,
            }),
    );
    items
}

/// The regions of healthy, ready hosts: where an environment may ask to be placed.
#[utoipa::path(get, path = "/v1/regions", tag = "operations", security(()),
    responses((status = 200, description = "regions and how many hosts each has", body = Items<RegionView>), (status = 503, description = "the database does not answer", body = crate::error::ErrorBody)))]
pub async fn regions(State(app): State<App>) -> Result<Json<Items<RegionView>>, ApiError> {
    let items = app
        .store
        .regions()
        .await?
        .into_iter()
        .map(|(id, hosts)| RegionView { id, hosts })
        .collect();
    Ok(Json(Items { items }))
}

pub async fn not_found() -> ApiError {
    hearth_app::AppError::NotFound("route").into()
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this path does not take that method; see /openapi.json",
    )
}

#[cfg(test)]
mod tests {
    /// The document is built from the routes, so it cannot miss one; what is left to check
    /// is that every operation says what its answers look like.
    #[test]
    fn every_operation_documents_its_answers() {
        let (_, doc) = super::super::routes();
        let doc = serde_json::to_value(doc).unwrap();
        let mut operations = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if method == "parameters" {
                    continue;
                }
                operations += 1;
                let responses = op["responses"]
                    .as_object()
                    .unwrap_or_else(|| panic!("{method} {path} has no responses"));
                // A WebSocket succeeds with 101, a browser's sign-in redirect with 303.
                assert!(
                    responses
                        .keys()
                        .any(|k| k.starts_with('2') || k == "101" || k == "303"),
                    "{method} {path} documents no success"
                );
                for (code, r) in responses {
                    assert!(
                        r["description"].as_str().is_some_and(|d| !d.is_empty()),
                        "{method} {path} {code} has no description"
                    );
                }
                let public = op
                    .get("security")
                    .is_some_and(|s| s == &serde_json::json!([{}]));
                if !public {
                    assert!(
                        responses.contains_key("401"),
                        "{method} {path} needs a token but documents no 401"
                    );
                }
                if path.contains('{') {
                    let params = op["parameters"]
                        .as_array()
                        .unwrap_or_else(|| panic!("{method} {path} declares no parameters"));
                    assert!(
                        params.iter().any(|p| p["in"] == "path"),
                        "{method} {path} does not declare its path parameter"
                    );
                }
            }
        }
        assert!(operations >= 45, "only {operations} operations");
    }
}
