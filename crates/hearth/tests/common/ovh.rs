//! A fake of the OVH Public Cloud API (v1.0) on loopback, because the real API cannot be
//! reached from here. Instances are played by containers on the local Docker engine, so a
//! test can SSH into what the provider created.
//!
//! What it checks, so a client that passes here got these right:
//! - the signature, per the published formula (`/work/shared/reference/ovh-api.md` B.2),
//!   over the exact URL (path and query as received) and the exact body bytes; the
//!   application and consumer keys; a timestamp within 30 s of the fake's clock, which a
//!   test can skew to prove the client syncs with `GET /auth/time`;
//! - a JSON `Content-Type` on every request with a body;
//! - the create body: required fields, unknown fields refused, flavor and image known and
//!   in the requested region, the quota, and a cloud-config `userData` that gives the
//!   `dev` user its keys and turns password login off;
//! - the instance state machine: BUILD → ACTIVE, stop → SHUTOFF, start → ACTIVE,
//!   shelve → SHELVING → SHELVED_OFFLOADED, unshelve → UNSHELVING → ACTIVE, delete →
//!   DELETING → gone; an action from the wrong state answers 409;
//! - that a client does not take the first address as its IPv4: IPv6 is listed first.
//!
//! What it cannot prove:
//! - real OVH's exact answer to a stale timestamp (here 403 `INVALID_SIGNATURE`;
//!   third parties have seen 400 too: unverified), or to an exceeded quota (here 400);
//! - whether real OVH wants `userData` base64-encoded: the schema only says "string"; we
//!   follow the original system, which sent base64, and refuse anything else;
//! - the real flavor and image catalogues (names, sizes, ids, which GPUs): made up here;
//! - real billing, real timings and real rate limits (429 only through [`FakeOvh::fail_next`]).

//!
//! An instance whose cloud-init writes `/etc/hearth/agent.env` (an agent host bought with
//! `POST /v1/admin/hosts/bought`) is played by a process, not a container: the fake fetches
//! `hearth` the way the cloud-init's `curl` says (URL and header), and runs the fetched
//! binary as `hearth agent` with the file's variables. On this one machine it overrides the
//! listen address (a free loopback port, since every agent would want 9443), the state
//! directory, and `HEARTH_AGENT_ACCEL=tcg` (KVM does not run guests here); it skips the
//! cloud-init's package installation and image build, using this machine's QEMU and VM
//! image (`HEARTH_VM_IMAGE_DIR`).

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use base64::Engine as _;
use serde_json::{Value, json};
use sha1::{Digest, Sha1};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const REGIONS: [&str; 2] = ["GRA9", "SBG5"];
/// How far a request's timestamp may be from the fake's clock.
const MAX_DRIFT_SECONDS: i64 = 30;
/// Create-body keys OVH accepts besides the required `flavorId`, `name` and `region`.
const OPTIONAL_KEYS: [&str; 8] = [
    "imageId",
    "sshKeyId",
    "userData",
    "monthlyBilling",
    "networks",
    "groupId",
    "volumeId",
    "autobackup",
];
const DEFAULT_QUOTA: Quota = Quota {
    cores: 40,
    instances: 20,
    ram_mb: 163_840,
};

/// (name, vcpus, ram GB, disk GB, type, osType, available, bandwidth Mbit/s). The GPU
/// flavors carry no GPU field, as in the published schema: t1-45 has one NVIDIA V100,
/// t1-90 two, l4-90 one L4. Bandwidths are made up.
#[allow(clippy::type_complexity)]
const FLAVORS: [(&str, i64, i64, i64, &str, &str, bool, i64); 12] = [
    ("d2-2", 1, 2, 25, "ovh.d2", "linux", true, 100),
    ("d2-4", 2, 4, 50, "ovh.d2", "linux", true, 200),
    ("b2-7", 2, 7, 50, "ovh.ssd.eg", "linux", true, 250),
    ("b2-15", 4, 15, 100, "ovh.ssd.eg", "linux", true, 250),
    ("b2-30", 8, 30, 200, "ovh.ssd.eg", "linux", true, 500),
    ("b2-60", 16, 60, 400, "ovh.ssd.eg", "linux", false, 1000),
    ("c2-7", 2, 7, 50, "ovh.ssd.cpu", "linux", true, 250),
    ("r2-15", 2, 15, 50, "ovh.ssd.ram", "linux", true, 250),
    ("win-b2-7", 2, 7, 50, "ovh.ssd.eg", "windows", true, 250),
    ("t1-45", 8, 45, 400, "ovh.ssd.gpu", "linux", true, 2000),
    ("t1-90", 18, 90, 800, "ovh.ssd.gpu", "linux", true, 4000),
    ("l4-90", 22, 90, 400, "ovh.ssd.gpu3", "linux", true, 8000),
];

/// (name, type, default user, size GB). Windows images want a 50 GB disk.
const IMAGES: [(&str, &str, &str, f64); 5] = [
    ("Ubuntu 22.04", "linux", "ubuntu", 2.2),
    ("Ubuntu 23.10", "linux", "ubuntu", 2.4),
    ("Ubuntu 24.04", "linux", "ubuntu", 2.5),
    ("Debian 12", "linux", "debian", 1.9),
    ("Windows Server 2022", "windows", "Administrator", 11.3),
];

pub struct FakeOvh {
    /// `http://127.0.0.1:PORT/1.0`, the endpoint to configure the client with.
    pub base: String,
    pub project: String,
    pub region: String,
    pub application_key: String,
    pub application_secret: String,
    pub consumer_key: String,
    port: u16,
    state: Shared,
    server: tokio::task::JoinHandle<()>,
}

type Shared = Arc<Mutex<Inner>>;
type Reply = (u16, Value);

#[derive(Clone, Copy)]
struct Quota {
    cores: i64,
    instances: i64,
    ram_mb: i64,
}

struct Failure {
    method: String,
    path_contains: String,
    status: u16,
    error_code: Option<String>,
    remaining: u32,
}

struct Inst {
    id: String,
    name: String,
    region: String,
    status: String,
    created: String,
    flavor: Value,
    image: Option<Value>,
    monthly: bool,
    ip_addresses: Vec<Value>,
    /// The id `docker run` printed, once it has.
    container: Option<String>,
    /// `fakeovh-<short id>`, known before the container exists.
    container_name: String,
    authorized_keys: Vec<String>,
    /// For an agent host: what its cloud-init says to run.
    agent: Option<AgentPlay>,
    /// Instances created before this one, plus one: gives the IPv6 address.
    n: u64,
}

/// What an agent host's cloud-init asks for.
#[derive(Clone)]
struct AgentPlay {
    /// The variables of `/etc/hearth/agent.env`.
    env: Vec<(String, String)>,
    /// The `curl` that fetches `hearth`: its URL and headers.
    url: String,
    headers: Vec<String>,
}

/// A running agent host: its process and directory.
struct AgentRun {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

struct Inner {
    port: u16,
    skew: i64,
    image: String,
    project: String,
    ak: String,
    secret: String,
    ck: String,
    /// For the fake's own region; other regions keep the default.
    quota: Quota,
    flavors: Vec<Value>,
    images: Vec<Value>,
    instances: Vec<Inst>,
    calls: Vec<(String, String, u16)>,
    failures: Vec<Failure>,
    queries: u64,
    created: u64,
    /// Every container name `docker run` was asked for, to remove on drop.
    containers: Vec<String>,
    /// Set on drop: a build that finishes later removes its own container.
    closed: bool,
    /// Agent hosts' processes, by instance id.
    agents: std::collections::HashMap<String, AgentRun>,
}

/// Never poisoned for our purposes: a panicking test must still clean up on drop.
fn lock(st: &Shared) -> MutexGuard<'_, Inner> {
    st.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeOvh {
    /// Starts on a free loopback port; instances are played by containers of `image` on
    /// the local Docker engine. `skew_seconds` is added to the fake's clock (`GET
    /// /auth/time` and the timestamp check), to stand for a client whose clock is wrong.
    pub async fn start(image: &str, skew_seconds: i64) -> FakeOvh {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let project = "fakeproject".to_string();
        let (ak, secret, ck) = (
            "fakeAppKey7Hq2Lx9".to_string(),
            "fakeAppSecret3Vn8Rw1Kp5Zt6Jy0Qm4".to_string(),
            "fakeConsumerKey9Db2Xs7Lf4Gh1Nc8W".to_string(),
        );
        let state: Shared = Arc::new(Mutex::new(Inner {
            port,
            skew: skew_seconds,
            image: image.to_string(),
            project: project.clone(),
            ak: ak.clone(),
            secret: secret.clone(),
            ck: ck.clone(),
            quota: DEFAULT_QUOTA,
            flavors: flavor_catalogue(),
            images: image_catalogue(),
            instances: Vec::new(),
            calls: Vec::new(),
            failures: Vec::new(),
            queries: 0,
            created: 0,
            containers: Vec::new(),
            closed: false,
            agents: Default::default(),
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeOvh {
            base: format!("http://127.0.0.1:{port}/1.0"),
            project,
            region: REGIONS[0].to_string(),
            application_key: ak,
            application_secret: secret,
            consumer_key: ck,
            port,
            state,
            server,
        }
    }

    /// The next `times` requests whose method equals `method` and whose path (as received,
    /// or with ids as `{id}` and the project as `{sn}`) contains `path_contains` answer
    /// `status`. With `error_code` the body is an auth-layer error
    /// (`{"errorCode","httpCode","message"}`); without, an API error with a `class`
    /// (`{"message"}` alone for 429 and 5xx). Checked after the signature, before
    /// handling, and also for the unsigned `GET /auth/time`.
    pub fn fail_next(
        &self,
        method: &str,
        path_contains: &str,
        status: u16,
        error_code: Option<&str>,
        times: u32,
    ) {
        lock(&self.state).failures.push(Failure {
            method: method.to_ascii_uppercase(),
            path_contains: path_contains.to_string(),
            status,
            error_code: error_code.map(str::to_string),
            remaining: times,
        });
    }

    /// Every request received, in order: (method, path without its query, with ids as
    /// `{id}` and the project as `{sn}`, status answered). Includes `/auth/time`.
    pub fn calls(&self) -> Vec<(String, String, u16)> {
        lock(&self.state).calls.clone()
    }

    /// The instances as `GET .../instance` would list them (deleted ones gone).
    pub fn instances(&self) -> Vec<Value> {
        lock(&self.state)
            .instances
            .iter()
            .map(Inst::list_json)
            .collect()
    }

    /// The docker container id playing an instance, if any.
    pub fn container_of(&self, instance_id: &str) -> Option<String> {
        lock(&self.state)
            .instances
            .iter()
            .find(|i| i.id == instance_id)
            .and_then(|i| i.container.clone())
    }

    /// The name of the flavor with OVH id `id` ("" when there is none).
    pub fn flavor_name(&self, id: &str) -> String {
        lock(&self.state)
            .flavors
            .iter()
            .find(|f| f["id"] == id)
            .and_then(|f| f["name"].as_str())
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for FakeOvh {
    fn drop(&mut self) {
        self.server.abort();
        let mut names = {
            let mut g = lock(&self.state);
            g.closed = true;
            for (_, mut run) in g.agents.drain() {
                let _ = run.child.kill();
                let _ = run.child.wait();
            }
            g.containers.clone()
        };
        if let Ok(out) = std::process::Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=hearth-fake-ovh={}", self.port),
            ])
            .output()
        {
            names.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(str::to_string),
            );
        }
        if !names.is_empty() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f"])
                .args(&names)
                .output();
        }
    }
}

/// The one handler: routing by hand keeps the exact URL and body bytes for the signature,
/// and lets every request be recorded, whatever it was.
async fn handle(
    State(st): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (status, reply) = answer(&st, method.as_str(), &uri, &headers, &body);
    let query_id = {
        let mut g = lock(&st);
        g.queries += 1;
        let path = normalize(uri.path(), &g.project);
        g.calls.push((method.as_str().to_string(), path, status));
        format!("FR.fake.{}", g.queries)
    };
    axum::http::Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .header("x-ovh-queryid", query_id)
        .body(Body::from(reply.to_string()))
        .unwrap()
}

fn answer(st: &Shared, method: &str, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Reply {
    let auth_time = method == "GET" && uri.path() == "/1.0/auth/time";
    if !auth_time && let Err(reply) = check_signature(st, method, uri, headers, body) {
        return reply;
    }
    if let Some(reply) = injected(st, method, uri.path()) {
        return reply;
    }
    if auth_time {
        return (200, json!(unix_now() + lock(st).skew));
    }
    if !body.is_empty() {
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type.starts_with("application/json") {
            return bad_request("A request with a body must have Content-Type: application/json");
        }
    }
    route(st, method, uri, body)
}

fn check_signature(
    st: &Shared,
    method: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), Reply> {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let g = lock(st);
    if h("x-ovh-application") != g.ak {
        return Err(auth_error(403, "INVALID_KEY"));
    }
    let invalid = || Err(auth_error(403, "INVALID_SIGNATURE"));
    if h("x-ovh-consumer") != g.ck {
        return invalid();
    }
    let ts = h("x-ovh-timestamp");
    let Ok(t) = ts.parse::<i64>() else {
        return invalid();
    };
    // Real OVH's answer to a stale timestamp is unverified; this is our guess.
    if (t - (unix_now() + g.skew)).abs() > MAX_DRIFT_SECONDS {
        return invalid();
    }
    let path_and_query = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let url = format!("http://127.0.0.1:{}{path_and_query}", g.port);
    if h("x-ovh-signature") != sign_bytes(&g.secret, &g.ck, method, &url, body, ts) {
        return invalid();
    }
    Ok(())
}

fn injected(st: &Shared, method: &str, path: &str) -> Option<Reply> {
    let mut g = lock(st);
    let norm = normalize(path, &g.project);
    let failure = g.failures.iter_mut().find(|f| {
        f.remaining > 0
            && f.method == method
            && (path.contains(f.path_contains.as_str()) || norm.contains(f.path_contains.as_str()))
    })?;
    failure.remaining -= 1;
    let (status, code) = (failure.status, failure.error_code.clone());
    g.failures.retain(|f| f.remaining > 0);
    drop(g);
    Some(match code {
        Some(code) => auth_error(status, &code),
        None if status == 429 => (429, json!({"message": "Too many requests"})),
        None if status >= 500 => (status, json!({"message": "Internal server error"})),
        None => {
            let class = format!("Client::{}", reason(status).replace(' ', ""));
            (
                status,
                json!({"class": class, "message": format!("injected {status}")}),
            )
        }
    })
}

fn route(st: &Shared, method: &str, uri: &Uri, body: &[u8]) -> Reply {
    if method == "GET" && uri.path() == "/1.0/order/catalog/public/cloud" {
        return catalogue(st, uri.query());
    }
    let Some(rest) = uri.path().strip_prefix("/1.0/cloud/project/") else {
        return not_found("Got an invalid (or empty) URL");
    };
    let segments: Vec<&str> = rest.split('/').collect();
    if segments[0] != lock(st).project {
        return not_found("This service does not exist");
    }
    let query = uri.query();
    match (method, &segments[1..]) {
        ("GET", ["region"]) => (200, json!(REGIONS)),
        ("GET", ["quota"]) => quota(st),
        ("GET", ["flavor"]) => {
            let Some(region) = query_param(query, "region") else {
                return bad_request("[region] Property is mandatory");
            };
            let g = lock(st);
            let list: Vec<Value> = g
                .flavors
                .iter()
                .filter(|f| f["region"] == region)
                .cloned()
                .collect();
            (200, Value::Array(list))
        }
        ("GET", ["flavor", id]) => match lock(st).flavors.iter().find(|f| f["id"] == *id) {
            Some(f) => (200, f.clone()),
            None => not_found(format!("Flavor {id} not found")),
        },
        ("GET", ["image"]) => {
            let os_type = query_param(query, "osType");
            let region = query_param(query, "region");
            let g = lock(st);
            let list: Vec<Value> = g
                .images
                .iter()
                .filter(|i| os_type.as_ref().is_none_or(|t| i["type"] == *t))
                .filter(|i| region.as_ref().is_none_or(|r| i["region"] == *r))
                .cloned()
                .collect();
            (200, Value::Array(list))
        }
        ("GET", ["instance"]) => {
            let region = query_param(query, "region");
            let g = lock(st);
            let list: Vec<Value> = g
                .instances
                .iter()
                .filter(|i| region.as_ref().is_none_or(|r| i.region == *r))
                .map(Inst::list_json)
                .collect();
            (200, Value::Array(list))
        }
        ("POST", ["instance"]) => create(st, body),
        ("GET", ["instance", id]) => match lock(st).instances.iter().find(|i| i.id == *id) {
            Some(i) => (200, i.detail_json()),
            None => not_found(format!("Instance {id} not found")),
        },
        ("DELETE", ["instance", id]) => {
            let mut g = lock(st);
            let Some(inst) = g.instances.iter_mut().find(|i| i.id == *id) else {
                return not_found(format!("Instance {id} not found"));
            };
            if inst.status != "DELETING" {
                inst.status = "DELETING".into();
                tokio::spawn(run_op(st.clone(), id.to_string(), Op::Delete));
            }
            (200, Value::Null)
        }
        ("POST", ["instance", id, action]) => act(st, id, action, body),
        _ => not_found("Got an invalid (or empty) URL"),
    }
}

/// OVH's public catalogue, reduced to what prices a flavor: one add-on per hourly plan
/// code, priced at 0.025 an hour per vCPU, in hundred-millionths of the currency as OVH's
/// catalogue gives prices (the shape follows OVH's public catalogue; the figures are made up).
fn catalogue(st: &Shared, query: Option<&str>) -> Reply {
    if query_param(query, "ovhSubsidiary").is_none() {
        return bad_request("[ovhSubsidiary] Property is mandatory");
    }
    let g = lock(st);
    let mut seen = std::collections::HashSet::new();
    let addons: Vec<Value> = g
        .flavors
        .iter()
        .filter_map(|f| {
            let code = f["planCodes"]["hourly"].as_str()?.to_string();
            seen.insert(code.clone()).then(|| {
                let price = f["vcpus"].as_i64().unwrap_or(1) * 2_500_000;
                json!({
                    "planCode": code,
                    "invoiceName": f["name"],
                    "pricings": [{ "intervalUnit": "hour", "interval": 1, "price": price }],
                })
            })
        })
        .collect();
    (
        200,
        json!({ "catalogId": 1, "locale": { "currencyCode": "EUR" }, "addons": addons }),
    )
}

fn quota(st: &Shared) -> Reply {
    let g = lock(st);
    let list: Vec<Value> = REGIONS
        .iter()
        .map(|region| {
            let q = quota_for(&g, region);
            let (cores, count, ram) = usage(&g, region);
            json!({
                "region": region,
                "instance": {"maxCores": q.cores, "maxInstances": q.instances, "maxRam": q.ram_mb,
                             "usedCores": cores, "usedInstances": count, "usedRAM": ram},
                "keypair": {"maxCount": 100},
                "volume": {"maxGigabytes": 10000, "usedGigabytes": 0, "volumeCount": 0, "maxVolumeCount": 100},
            })
        })
        .collect();
    (200, Value::Array(list))
}

fn quota_for(g: &Inner, region: &str) -> Quota {
    if region == REGIONS[0] {
        g.quota
    } else {
        DEFAULT_QUOTA
    }
}

/// (cores, instances, RAM in MB) used in `region` by the instances that still exist.
fn usage(g: &Inner, region: &str) -> (i64, i64, i64) {
    g.instances
        .iter()
        .filter(|i| i.region == region)
        .fold((0, 0, 0), |(c, n, r), i| {
            (
                c + i.flavor["vcpus"].as_i64().unwrap_or(0),
                n + 1,
                r + i.flavor["ram"].as_i64().unwrap_or(0) * 1024,
            )
        })
}

fn create(st: &Shared, body: &[u8]) -> Reply {
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return bad_request("Invalid JSON received: an object is expected");
    };
    for key in ["flavorId", "name", "region"] {
        match req.get(key) {
            None | Some(Value::Null) => {
                return bad_request(format!("[{key}] Property is mandatory"));
            }
            Some(Value::String(_)) => {}
            Some(_) => return bad_request(format!("[{key}] Property must be a string")),
        }
    }
    if let Some(key) = req.keys().find(|k| {
        !["flavorId", "name", "region"].contains(&k.as_str())
            && !OPTIONAL_KEYS.contains(&k.as_str())
    }) {
        return bad_request(format!("[{key}] Unknown property"));
    }
    let text = |k: &str| req.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let (flavor_id, name, region) = (text("flavorId"), text("name"), text("region"));
    if !REGIONS.contains(&region.as_str()) {
        return bad_request(format!("Region {region} is not available in this project"));
    }
    if req.get("sshKeyId").is_some_and(|v| !v.is_null()) {
        return bad_request(
            "[sshKeyId] SSH key not found (the fake has no /sshkey: put keys in userData)",
        );
    }
    let monthly = match req.get("monthlyBilling") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return bad_request("[monthlyBilling] Property must be a boolean"),
    };
    let (authorized_keys, agent) = match req.get("userData") {
        Some(Value::String(data)) => match agent_user_data(data) {
            Ok(Some(play)) => (Vec::new(), Some(play)),
            Ok(None) => match check_user_data(data) {
                Ok(keys) => (keys, None),
                Err(message) => return bad_request(message),
            },
            Err(message) => return bad_request(message),
        },
        None | Some(Value::Null) => {
            return bad_request(
                "[userData] the fake requires userData: it carries the dev user's keys",
            );
        }
        Some(_) => return bad_request("[userData] Property must be a string"),
    };

    let mut g = lock(st);
    let Some(flavor) = g
        .flavors
        .iter()
        .find(|f| f["id"] == flavor_id.as_str())
        .cloned()
    else {
        return bad_request(format!("Flavor {flavor_id} does not exist"));
    };
    if flavor["region"] != region.as_str() {
        return bad_request(format!(
            "Flavor {flavor_id} is not available in region {region}"
        ));
    }
    if flavor["available"] == false {
        let flavor_name = flavor["name"].as_str().unwrap_or("");
        return bad_request(format!(
            "Flavor {flavor_name} is not available at the moment"
        ));
    }
    let image = match req.get("imageId") {
        None | Some(Value::Null) => None,
        Some(Value::String(image_id)) => {
            let Some(image) = g
                .images
                .iter()
                .find(|i| i["id"] == image_id.as_str())
                .cloned()
            else {
                return bad_request(format!("Image {image_id} does not exist"));
            };
            if image["region"] != region.as_str() {
                return bad_request(format!(
                    "Image {image_id} is not available in region {region}"
                ));
            }
            if image["type"] != flavor["osType"] {
                let s = |v: &Value, k: &str| v[k].as_str().unwrap_or("").to_string();
                return bad_request(format!(
                    "Image {} ({}) cannot boot flavor {} ({})",
                    s(&image, "name"),
                    s(&image, "type"),
                    s(&flavor, "name"),
                    s(&flavor, "osType")
                ));
            }
            Some(image)
        }
        Some(_) => return bad_request("[imageId] Property must be a string"),
    };
    let q = quota_for(&g, &region);
    let (cores, count, ram) = usage(&g, &region);
    let (want_cores, want_ram) = (
        flavor["vcpus"].as_i64().unwrap_or(0),
        flavor["ram"].as_i64().unwrap_or(0) * 1024,
    );
    // Real OVH's shape for this error is unverified.
    for (what, used, want, max) in [
        ("instances", count, 1, q.instances),
        ("cores", cores, want_cores, q.cores),
        ("ram", ram, want_ram, q.ram_mb),
    ] {
        if used + want > max {
            return bad_request(format!(
                "Quota exceeded for {what}: Requested {want}, but already used {used} of {max} {what}"
            ));
        }
    }

    g.created += 1;
    let n = g.created;
    let id = fake_uuid(n ^ (u64::from(g.port) << 32));
    let inst = Inst {
        container_name: format!("fakeovh-{}", &id[..8]),
        id: id.clone(),
        name,
        region,
        status: "BUILD".into(),
        created: iso8601(unix_now()),
        flavor,
        image,
        monthly,
        ip_addresses: Vec::new(),
        container: None,
        authorized_keys,
        agent,
        n,
    };
    let detail = inst.detail_json();
    g.containers.push(inst.container_name.clone());
    g.instances.push(inst);
    drop(g);
    tokio::spawn(run_op(st.clone(), id, Op::Build));
    (200, detail)
}

/// The keys for the `dev` user, if `data` is base64 of a cloud-config the fake accepts.
fn check_user_data(data: &str) -> Result<Vec<String>, String> {
    use serde_yaml::Value as Yaml;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| format!("[userData] the fake expects base64 (standard alphabet): {e}"))?;
    let text = String::from_utf8(bytes).map_err(|_| "[userData] is not UTF-8 text".to_string())?;
    if text.lines().next().map(str::trim_end) != Some("#cloud-config") {
        return Err("[userData] must start with a #cloud-config line".into());
    }
    let doc: Yaml =
        serde_yaml::from_str(&text).map_err(|e| format!("[userData] is not valid YAML: {e}"))?;
    if doc.get("ssh_pwauth").and_then(Yaml::as_bool) != Some(false) {
        return Err(
            "[userData] ssh_pwauth must be false: the fake requires password login off".into(),
        );
    }
    let users = doc
        .get("users")
        .and_then(Yaml::as_sequence)
        .ok_or("[userData] has no users: list")?;
    let dev = users
        .iter()
        .find(|u| u.get("name").and_then(Yaml::as_str) == Some("dev"))
        .ok_or("[userData] users: has no entry named dev")?;
    let keys: Vec<String> = dev
        .get("ssh_authorized_keys")
        .and_then(Yaml::as_sequence)
        .ok_or("[userData] user dev has no ssh_authorized_keys list")?
        .iter()
        .map(|k| k.as_str().map(str::to_string))
        .collect::<Option<Vec<String>>>()
        .ok_or("[userData] ssh_authorized_keys must be a list of strings")?;
    if keys.is_empty() {
        return Err("[userData] ssh_authorized_keys of user dev is empty".into());
    }
    Ok(keys)
}

/// An agent host's cloud-init (it writes `/etc/hearth/agent.env`), or `None` for a VM's.
fn agent_user_data(data: &str) -> Result<Option<AgentPlay>, String> {
    use serde_yaml::Value as Yaml;
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(data) else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let Ok(doc) = serde_yaml::from_str::<Yaml>(&text) else {
        return Ok(None);
    };
    let Some(env_file) = doc
        .get("write_files")
        .and_then(Yaml::as_sequence)
        .and_then(|files| {
            files
                .iter()
                .find(|f| f.get("path").and_then(Yaml::as_str) == Some("/etc/hearth/agent.env"))
        })
    else {
        return Ok(None);
    };
    if env_file.get("permissions").and_then(Yaml::as_str) != Some("0600") {
        return Err("[userData] /etc/hearth/agent.env holds a join token: it must be 0600".into());
    }
    let env: Vec<(String, String)> = env_file
        .get("content")
        .and_then(Yaml::as_str)
        .unwrap_or("")
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    for needed in ["HEARTH_CONTROL_PLANE", "HEARTH_JOIN_TOKEN"] {
        if !env.iter().any(|(k, _)| k == needed) {
            return Err(format!("[userData] agent.env has no {needed}"));
        }
    }
    let runcmd = doc
        .get("runcmd")
        .and_then(Yaml::as_sequence)
        .ok_or("[userData] an agent host needs runcmd")?;
    // Each command must be an argument list: cloud-init runs those without a shell.
    let commands: Vec<Vec<String>> = runcmd
        .iter()
        .map(|c| {
            c.as_sequence()
                .map(|args| {
                    args.iter()
                        .filter_map(|a| a.as_str().map(str::to_string))
                        .collect()
                })
                .ok_or(
                    "[userData] every runcmd entry must be an argument list, not shell text"
                        .to_string(),
                )
        })
        .collect::<Result<_, _>>()?;
    let curl = commands
        .iter()
        .find(|c| c.first().map(String::as_str) == Some("curl"))
        .ok_or("[userData] no curl fetches hearth")?;
    let headers = curl
        .windows(2)
        .filter(|w| w[0] == "-H")
        .map(|w| w[1].clone())
        .collect();
    let url = curl.last().cloned().unwrap_or_default();
    if !commands
        .iter()
        .any(|c| c == &["systemctl", "enable", "--now", "hearth-agent"])
    {
        return Err("[userData] nothing starts the hearth-agent service".into());
    }
    Ok(Some(AgentPlay { env, url, headers }))
}

/// Runs an agent host: fetches `hearth` as its cloud-init says, then starts it as
/// `hearth agent` with the cloud-init's variables (and this machine's overrides).
async fn play_agent(st: &Shared, id: &str, play: &AgentPlay) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut request = reqwest::Client::new().get(&play.url);
    for h in &play.headers {
        if let Some((k, v)) = h.split_once(": ") {
            request = request.header(k, v);
        }
    }
    let answer = request
        .send()
        .await
        .map_err(|e| format!("fetching hearth: {e}"))?;
    if !answer.status().is_success() {
        return Err(format!("fetching hearth: {}", answer.status()));
    }
    let binary = dir.path().join("hearth");
    std::fs::write(&binary, answer.bytes().await.map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let log = std::fs::File::create(dir.path().join("agent.log")).map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(&binary);
    cmd.arg("agent")
        .envs(play.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("HEARTH_AGENT_LISTEN", format!("127.0.0.1:{port}"))
        .env("HEARTH_AGENT_STATE_DIR", dir.path().join("state"))
        .env("HEARTH_AGENT_ACCEL", "tcg")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    if let Ok(image) = std::env::var("HEARTH_VM_IMAGE_DIR") {
        cmd.env("HEARTH_VM_IMAGE_DIR", image);
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting the agent: {e}"))?;
    lock(st)
        .agents
        .insert(id.to_string(), AgentRun { child, _dir: dir });
    Ok(())
}

/// The log of an agent host the fake runs, for a test's failure message.
pub fn agent_log_of(fake: &FakeOvh, instance_id: &str) -> String {
    lock(&fake.state)
        .agents
        .get(instance_id)
        .map(|r| std::fs::read_to_string(r._dir.path().join("agent.log")).unwrap_or_default())
        .unwrap_or_default()
}

fn act(st: &Shared, id: &str, action: &str, body: &[u8]) -> Reply {
    let (from, during, op) = match action {
        "stop" => (vec!["ACTIVE"], None, Op::Stop),
        "start" => (vec!["SHUTOFF"], None, Op::Start),
        "shelve" => (vec!["ACTIVE", "SHUTOFF"], Some("SHELVING"), Op::Shelve),
        "unshelve" => (vec!["SHELVED_OFFLOADED"], Some("UNSHELVING"), Op::Unshelve),
        _ => return not_found("Got an invalid (or empty) URL"),
    };
    if !body.is_empty() {
        return bad_request(format!("'{action}' takes no body"));
    }
    let mut g = lock(st);
    let Some(inst) = g.instances.iter_mut().find(|i| i.id == id) else {
        return not_found(format!("Instance {id} not found"));
    };
    if !from.contains(&inst.status.as_str()) {
        let message = format!(
            "Cannot '{action}' instance {id} while it is in vm_state {}",
            inst.status.to_lowercase()
        );
        return (
            409,
            json!({"class": "Client::Conflict", "message": message}),
        );
    }
    if let Some(status) = during {
        inst.status = status.to_string();
    }
    drop(g);
    tokio::spawn(run_op(st.clone(), id.to_string(), op));
    (200, Value::Null)
}

impl Inst {
    fn plan_code(&self) -> Value {
        let period = if self.monthly { "monthly" } else { "hourly" };
        self.flavor["planCodes"][period].clone()
    }

    fn monthly_json(&self) -> Value {
        if self.monthly {
            json!({"since": self.created, "status": "ok"})
        } else {
            Value::Null
        }
    }

    fn list_json(&self) -> Value {
        json!({
            "id": self.id, "name": self.name, "region": self.region, "status": self.status,
            "created": self.created, "flavorId": self.flavor["id"],
            "imageId": self.image.as_ref().map(|i| i["id"].clone()), "sshKeyId": null,
            "planCode": self.plan_code(), "monthlyBilling": self.monthly_json(),
            "operationIds": [], "ipAddresses": self.ip_addresses,
        })
    }

    fn detail_json(&self) -> Value {
        json!({
            "id": self.id, "name": self.name, "region": self.region, "status": self.status,
            "created": self.created, "flavor": self.flavor, "image": self.image, "sshKey": null,
            "planCode": self.plan_code(), "monthlyBilling": self.monthly_json(),
            "operationIds": [], "ipAddresses": self.ip_addresses,
        })
    }
}

/// IPv6 first on purpose: a client must pick the v4 address by its version.
fn ip_addresses(n: u64, ip: &str, gateway: &str) -> Vec<Value> {
    vec![
        json!({"ip": format!("2001:db8::{n:x}"), "type": "public", "version": 6,
               "networkId": "ext-net", "gatewayIp": null}),
        json!({"ip": ip, "type": "public", "version": 4, "networkId": "ext-net",
               "gatewayIp": gateway}),
    ]
}

#[derive(Clone, Copy)]
enum Op {
    Build,
    Delete,
    Stop,
    Start,
    Shelve,
    Unshelve,
}

/// What a finished operation does to the addresses.
enum Ips {
    Keep,
    Clear,
    Set(String, String),
}

/// The slow half of an operation, after the API has answered.
async fn run_op(st: Shared, id: String, op: Op) {
    // The guard is a temporary of this statement: never held across an await.
    let target = lock(&st).instances.iter().find(|i| i.id == id).map(|i| {
        i.container
            .clone()
            .unwrap_or_else(|| i.container_name.clone())
    });
    let Some(target) = target else {
        return;
    };
    match op {
        Op::Build => build(&st, &id).await,
        Op::Delete => {
            let run = lock(&st).agents.remove(&id);
            if let Some(mut run) = run {
                let _ = run.child.kill();
                let _ = tokio::task::spawn_blocking(move || run.child.wait()).await;
            }
            // A build still running sees DELETING and removes its container itself.
            let _ = docker(&["rm", "-f", target.as_str()]).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            lock(&st).instances.retain(|i| i.id != id);
        }
        Op::Stop => {
            let r = docker(&["stop", "-t", "2", target.as_str()])
                .await
                .map(|_| Ips::Keep);
            settle(&st, &id, "ACTIVE", "SHUTOFF", r);
        }
        Op::Start => {
            let r = restart(&target).await;
            settle(&st, &id, "SHUTOFF", "ACTIVE", r);
        }
        Op::Shelve => {
            let r = docker(&["stop", "-t", "2", target.as_str()])
                .await
                .map(|_| Ips::Clear);
            settle(&st, &id, "SHELVING", "SHELVED_OFFLOADED", r);
        }
        Op::Unshelve => {
            let r = restart(&target).await;
            settle(&st, &id, "UNSHELVING", "ACTIVE", r);
        }
    }
}

async fn build(st: &Shared, id: &str) {
    let play = lock(st)
        .instances
        .iter()
        .find(|i| i.id == id)
        .and_then(|i| i.agent.clone());
    if let Some(play) = play {
        let r = play_agent(st, id, &play)
            .await
            .map(|()| Ips::Set("127.0.0.1".into(), "127.0.0.1".into()));
        return settle(st, id, "BUILD", "ACTIVE", r);
    }
    let args: Vec<String> = {
        let g = lock(st);
        let Some(i) = g.instances.iter().find(|i| i.id == id) else {
            return;
        };
        vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            i.container_name.clone(),
            "--label".into(),
            format!("hearth-fake-ovh={}", g.port),
            "--hostname".into(),
            hostname(&i.name),
            "-e".into(),
            format!("HEARTH_AUTHORIZED_KEYS={}", i.authorized_keys.join("\n")),
            g.image.clone(),
        ]
    };
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let container = match docker(&refs).await {
        Ok(out) => out,
        Err(e) => return settle(st, id, "BUILD", "ACTIVE", Err(e)),
    };
    if !record_container(st, id, &container) {
        let _ = docker(&["rm", "-f", container.as_str()]).await;
        return;
    }
    let r = wait_ip(&container).await.map(|(ip, gw)| Ips::Set(ip, gw));
    settle(st, id, "BUILD", "ACTIVE", r);
}

/// Notes the container on its instance; false when the instance was deleted, or the fake
/// dropped, while `docker run` ran: then the container is the caller's to remove.
fn record_container(st: &Shared, id: &str, container: &str) -> bool {
    let mut g = lock(st);
    let closed = g.closed;
    match g.instances.iter_mut().find(|i| i.id == id) {
        Some(i) => {
            i.container = Some(container.to_string());
            !closed && i.status == "BUILD"
        }
        None => false,
    }
}

/// A DNS label from an instance name (OVH names need not be unique or valid hostnames).
fn hostname(name: &str) -> String {
    let label: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let label = label.trim_matches('-');
    let label = label[..label.len().min(63)].trim_end_matches('-');
    if label.is_empty() {
        "instance".to_string()
    } else {
        label.to_string()
    }
}

async fn restart(container: &str) -> Result<Ips, String> {
    docker(&["start", container]).await?;
    let (ip, gw) = wait_ip(container).await?;
    Ok(Ips::Set(ip, gw))
}

/// Applies an operation's outcome, unless the instance moved on (or went) meanwhile.
fn settle(st: &Shared, id: &str, expect: &str, next: &str, outcome: Result<Ips, String>) {
    let mut g = lock(st);
    let Some(inst) = g.instances.iter_mut().find(|i| i.id == id) else {
        return;
    };
    if inst.status != expect {
        return;
    }
    match outcome {
        Ok(ips) => {
            inst.status = next.to_string();
            match ips {
                Ips::Keep => {}
                Ips::Clear => inst.ip_addresses.clear(),
                Ips::Set(ip, gw) => inst.ip_addresses = ip_addresses(inst.n, &ip, &gw),
            }
        }
        Err(e) => {
            eprintln!("fake OVH: instance {id} goes to ERROR: {e}");
            inst.status = "ERROR".into();
        }
    }
}

/// The container's IPv4 address and gateway, once it has them. Reads the networks list
/// rather than `.NetworkSettings.IPAddress`, which newer engines drop; on the default
/// bridge they are the same.
async fn wait_ip(container: &str) -> Result<(String, String), String> {
    let format =
        "{{.State.Status}}|{{range .NetworkSettings.Networks}}{{.IPAddress}},{{.Gateway}};{{end}}";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = docker(&["inspect", "-f", format, container]).await?;
        let (state, networks) = out.split_once('|').unwrap_or((out.as_str(), ""));
        let found = networks
            .split(';')
            .filter_map(|n| n.split_once(','))
            .find(|(ip, _)| !ip.is_empty());
        if let Some((ip, gw)) = found {
            let gw = if gw.is_empty() {
                ip.rsplit_once('.')
                    .map(|(p, _)| format!("{p}.1"))
                    .unwrap_or_default()
            } else {
                gw.to_string()
            };
            return Ok((ip.to_string(), gw));
        }
        if state == "exited" || state == "dead" {
            return Err(format!("container {container} is {state}"));
        }
        if Instant::now() > deadline {
            return Err(format!("container {container} has no IP after 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the docker CLI (no shell); its trimmed stdout, or why it failed.
async fn docker(args: &[&str]) -> Result<String, String> {
    let what = args.first().copied().unwrap_or("");
    let out = tokio::process::Command::new("docker")
        .args(args)
        .output()
        .await
        .map_err(|e| format!("docker {what}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "docker {what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn flavor_catalogue() -> Vec<Value> {
    let mut out = Vec::new();
    for (r, region) in REGIONS.iter().enumerate() {
        for (i, (name, vcpus, ram, disk, kind, os, available, bw)) in FLAVORS.iter().enumerate() {
            out.push(json!({
                "id": format!("{:08x}-f1a0-4000-8000-{:012x}", r + 1, i + 1),
                "name": name, "region": region, "vcpus": vcpus, "ram": ram, "disk": disk,
                "type": kind, "osType": os, "available": available,
                "inboundBandwidth": bw, "outboundBandwidth": bw,
                "planCodes": {"hourly": format!("{name}.consumption"), "monthly": format!("{name}.monthly")},
                "quota": 10,
            }));
        }
    }
    out
}

fn image_catalogue() -> Vec<Value> {
    let mut out = Vec::new();
    for (r, region) in REGIONS.iter().enumerate() {
        for (i, (name, kind, user, size)) in IMAGES.iter().enumerate() {
            let min_disk = if *kind == "windows" { 50 } else { 0 };
            out.push(json!({
                "id": format!("{:08x}-1a9e-4000-8000-{:012x}", r + 1, i + 1),
                "name": name, "region": region, "type": kind, "visibility": "public",
                "status": "active", "creationDate": "2024-04-26T08:30:00Z", "minDisk": min_disk, "minRam": 0,
                "size": size, "user": user, "flavorType": null,
            }));
        }
    }
    out
}

/// "Not Found" for 404: for `httpCode` and, without spaces, for `Client::NotFound`.
fn reason(status: u16) -> &'static str {
    StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

fn auth_error(status: u16, code: &str) -> Reply {
    let message = match code {
        "INVALID_SIGNATURE" => "Invalid signature".to_string(),
        "INVALID_KEY" => "This application key is invalid".to_string(),
        "INVALID_CREDENTIAL" => "This credential is not valid".to_string(),
        "NOT_GRANTED_CALL" => "This call has not been granted".to_string(),
        other => format!("injected {other}"),
    };
    let http_code = format!("{status} {}", reason(status));
    (
        status,
        json!({"errorCode": code, "httpCode": http_code, "message": message}),
    )
}

fn bad_request(message: impl Into<String>) -> Reply {
    let message: String = message.into();
    (
        400,
        json!({"class": "Client::BadRequest", "message": message}),
    )
}

fn not_found(message: impl Into<String>) -> Reply {
    let message: String = message.into();
    (
        404,
        json!({"class": "Client::NotFound", "message": message}),
    )
}

/// The path as `calls()` reports it: ids as `{id}`, the project as `{sn}`.
fn normalize(path: &str, project: &str) -> String {
    path.split('/')
        .map(|seg| {
            if seg == project {
                "{sn}"
            } else if is_uuid(seg) {
                "{id}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// Random enough for ids: the standard library's randomly keyed hasher over `seed`.
fn fake_uuid(seed: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(seed);
    let a = h.finish();
    h.write_u64(a);
    let b = h.finish();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

/// Query parameters without percent-decoding: regions and OS types need none.
fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `2024-04-26T08:30:00Z` from unix seconds (Howard Hinnant's civil-from-days).
fn iso8601(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Over the body's exact bytes and the timestamp exactly as the header spelled it.
fn sign_bytes(
    secret: &str,
    consumer: &str,
    method: &str,
    url: &str,
    body: &[u8],
    ts: &str,
) -> String {
    let mut h = Sha1::new();
    for part in [
        secret.as_bytes(),
        consumer.as_bytes(),
        method.as_bytes(),
        url.as_bytes(),
        body,
    ] {
        h.update(part);
        h.update(b"+");
    }
    h.update(ts.as_bytes());
    let mut out = String::from("$1$");
    for b in h.finalize().iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}
