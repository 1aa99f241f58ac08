//! Hosts (role `admin`): add, list, show, change, drain, make ready, remove.

use super::{Admin, Body};
use crate::App;
use crate::error::ApiResult;
use crate::views::HostView;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use hearth_app::hosts::HostInput;
use hearth_core::HostStatus;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddBody {
    name: String,
    kind: String,
    endpoint: Option<String>,
    guest_address: Option<String>,
    region: Option<String>,
    gpu_model: Option<String>,
    gpu_count: Option<i64>,
    max_vcpus: i64,
    max_memory_mb: i64,
    max_environments: Option<i64>,
    tls_ca: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    options: Option<Value>,
}

pub async fn add(State(app): State<App>, Admin(admin): Admin, Body(b): Body<AddBody>) -> ApiResult<(StatusCode, Json<HostView>)> {
    let input = HostInput {
        name: b.name,
        kind: b.kind,
        endpoint: b.endpoint,
        guest_address: b.guest_address,
        region: b.region,
        gpu_model: b.gpu_model,
        gpu_count: b.gpu_count,
        max_vcpus: b.max_vcpus,
        max_memory_mb: b.max_memory_mb,
        max_environments: b.max_environments,
        tls_ca: b.tls_ca,
        tls_cert: b.tls_cert,
        tls_key: b.tls_key,
        options: b.options,
    };
    let host = app.add_host(&admin, input).await?;
    Ok((StatusCode::CREATED, Json(HostView::from(&host))))
}

pub async fn list(State(app): State<App>, Admin(_): Admin) -> ApiResult<Json<Value>> {
    let items: Vec<HostView> = app.store.hosts().await?.iter().map(HostView::from).collect();
    Ok(Json(json!({ "items": items })))
}

pub async fn get(State(app): State<App>, Admin(_): Admin, Path(id): Path<String>) -> ApiResult<Json<HostView>> {
    Ok(Json(HostView::from(&app.find_host(&id).await?)))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateBody {
    max_vcpus: Option<i64>,
    max_memory_mb: Option<i64>,
    max_environments: Option<i64>,
    options: Option<Value>,
}

pub async fn update(State(app): State<App>, Admin(admin): Admin, Path(id): Path<String>, Body(b): Body<UpdateBody>) -> ApiResult<Json<HostView>> {
    let host = app.update_host(&admin, &id, (b.max_vcpus, b.max_memory_mb, b.max_environments), b.options).await?;
    Ok(Json(HostView::from(&host)))
}

pub async fn drain(State(app): State<App>, Admin(admin): Admin, Path(id): Path<String>) -> ApiResult<Json<HostView>> {
    Ok(Json(HostView::from(&app.set_host_status(&admin, &id, HostStatus::Draining).await?)))
}

pub async fn ready(State(app): State<App>, Admin(admin): Admin, Path(id): Path<String>) -> ApiResult<Json<HostView>> {
    Ok(Json(HostView::from(&app.set_host_status(&admin, &id, HostStatus::Ready).await?)))
}

pub async fn remove(State(app): State<App>, Admin(admin): Admin, Path(id): Path<String>) -> ApiResult<Json<HostView>> {
    Ok(Json(HostView::from(&app.remove_host(&admin, &id).await?)))
}
