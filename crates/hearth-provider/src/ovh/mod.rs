//! OVH Public Cloud: a host is one project and region; each VM is an instance.
//!
//! - The instance is named `hearth-<environment id>--<installation id>`, so a retried create
//!   finds the first attempt's instance and the reconciler lists exactly this installation's.
//! - The flavor honours vCPUs, memory and disk (and GPUs when asked), among the region's
//!   available Linux flavors, preferring the types of `flavorTypes` in their order; the
//!   image is `imageName`, or the newest Ubuntu LTS the region offers.
//! - Cloud-init makes the `dev` user with the environment's keys, password login off.
//! - Stop shelves by default (a stopped instance is still billed; a shelved one is not),
//!   start unshelves; `stop: "shutoff"` stops and starts instead. Both wait for the state.
//! - OVH allows about 60 requests a minute per key, so status comes from one listing of
//!   the region's instances per `pollMs` (5 s by default), shared by every environment of
//!   the host: 20 provisioning at once cost what one does. Flavors and images are kept 5
//!   minutes, the quota 1 minute.
//! - The host's capacity is the project's quota in that region.

pub mod client;

use crate::{
    HostCapacityFacts, HostFacts, HostRef, OfferedFlavor, Provider, ProviderError, VmInfo, VmRef,
    VmSpec, VmState,
};
use async_trait::async_trait;
use base64::Engine;
use client::{OvhClient, OvhError, OvhErrorKind};
use hearth_core::HostKind;
use reqwest::Method;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a stop (shelve) or destroy may take before it counts as failed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
const CATALOGUE_TTL: Duration = Duration::from_secs(300);
const QUOTA_TTL: Duration = Duration::from_secs(60);
/// The flavor types preferred when none are configured: general purpose first.
const DEFAULT_FLAVOR_TYPES: [&str; 4] = ["ovh.ssd.eg", "ovh.d2", "ovh.ssd.cpu", "ovh.ssd.ram"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    Shelve,
    Shutoff,
}

/// A host's `options` for kind `ovh`.
#[derive(Debug, Clone)]
pub struct OvhOptions {
    pub project_id: String,
    pub image_name: Option<String>,
    pub flavor_types: Vec<String>,
    pub stop: StopMode,
    pub poll: Duration,
    /// The OVH subsidiary whose catalogue gives prices (`FR` by default).
    pub subsidiary: String,
}

impl OvhOptions {
    pub fn parse(v: &serde_json::Value) -> Result<OvhOptions, String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        struct Raw {
            project_id: String,
            image_name: Option<String>,
            flavor_types: Option<Vec<String>>,
            stop: Option<String>,
            poll_ms: Option<u64>,
            subsidiary: Option<String>,
        }
        let raw: Raw = serde_json::from_value(v.clone()).map_err(|e| {
            format!("options of an ovh host: {e} (projectId, imageName, flavorTypes, stop, pollMs, subsidiary)")
        })?;
        let label = |what: &str, s: &str| {
            if s.is_empty() || s.len() > 128 || s.chars().any(|c| c.is_control()) {
                Err(format!("{what} must be 1 to 128 printable characters"))
            } else {
                Ok(())
            }
        };
        label("projectId", &raw.project_id)?;
        if !raw
            .project_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err("projectId must be letters, digits and dashes".into());
        }
        if let Some(n) = &raw.image_name {
            label("imageName", n)?;
        }
        let flavor_types = raw
            .flavor_types
            .unwrap_or_else(|| DEFAULT_FLAVOR_TYPES.iter().map(|s| s.to_string()).collect());
        if flavor_types.len() > 20 {
            return Err("flavorTypes takes at most 20 types".into());
        }
        for t in &flavor_types {
            label("a flavor type", t)?;
        }
        let stop = match raw.stop.as_deref() {
            None | Some("shelve") => StopMode::Shelve,
            Some("shutoff") => StopMode::Shutoff,
            Some(other) => return Err(format!("stop must be shelve or shutoff, not {other:?}")),
        };
        let poll_ms = raw.poll_ms.unwrap_or(5_000);
        if !(200..=60_000).contains(&poll_ms) {
            return Err("pollMs must be between 200 and 60000".into());
        }
        let subsidiary = raw.subsidiary.unwrap_or_else(|| "FR".into());
        if !(2..=4).contains(&subsidiary.len())
            || !subsidiary.chars().all(|c| c.is_ascii_uppercase())
        {
            return Err(
                "subsidiary must be OVH's code of 2 to 4 capitals (FR, GB, CA, ...)".into(),
            );
        }
        Ok(OvhOptions {
            subsidiary,
            project_id: raw.project_id,
            image_name: raw.image_name,
            flavor_types,
            stop,
            poll: Duration::from_millis(poll_ms),
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IpAddress {
    ip: String,
    #[serde(rename = "type")]
    kind: String,
    version: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Instance {
    id: String,
    name: String,
    status: String,
    #[serde(default)]
    ip_addresses: Vec<IpAddress>,
}

impl Instance {
    /// The public IPv4 address: never an IPv6 one, whatever the order OVH lists them in.
    fn public_ipv4(&self) -> Option<String> {
        self.ip_addresses
            .iter()
            .find(|a| a.kind == "public" && a.version == 4)
            .map(|a| a.ip.clone())
    }
}

/// OVH's instance status, every value of `cloud.instance.InstanceStatusEnum` that matters
/// here named; the rest kept as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Active,
    Build,
    Shutoff,
    Shelving,
    Shelved,
    Unshelving,
    Deleting,
    Error,
    Other(String),
}

impl Status {
    pub fn parse(s: &str) -> Status {
        match s {
            "ACTIVE" => Status::Active,
            "BUILD" | "BUILDING" | "REBUILD" => Status::Build,
            "SHUTOFF" | "STOPPED" => Status::Shutoff,
            "SHELVING" => Status::Shelving,
            "SHELVED" | "SHELVED_OFFLOADED" => Status::Shelved,
            "UNSHELVING" => Status::Unshelving,
            "DELETING" | "DELETED" | "SOFT_DELETED" => Status::Deleting,
            "ERROR" => Status::Error,
            other => Status::Other(other.to_string()),
        }
    }

    fn vm_state(&self) -> VmState {
        match self {
            Status::Active => VmState::Running,
            Status::Shutoff | Status::Shelved => VmState::Stopped,
            _ => VmState::Other,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Flavor {
    id: String,
    name: String,
    #[serde(default)]
    region: String,
    vcpus: f64,
    /// GB.
    ram: f64,
    /// GB.
    disk: f64,
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    os_type: String,
    #[serde(default)]
    available: bool,
    #[serde(default)]
    plan_codes: Option<PlanCodes>,
}

#[derive(Debug, Clone, Deserialize)]
struct PlanCodes {
    hourly: Option<String>,
}

/// GPUs and their model of OVH's GPU flavors, from OVH's public catalogue (the API's
/// flavor has no GPU field): the name's family gives the model, its size the count.
pub fn gpus_of(name: &str, kind: &str) -> Option<(i64, &'static str)> {
    let families: [(&str, &str, [&str; 3]); 7] = [
        ("t1-le-", "Tesla V100", ["45", "90", "180"]),
        ("t1-", "Tesla V100", ["45", "90", "180"]),
        ("t2-", "Tesla V100S", ["45", "90", "180"]),
        ("l40s-", "L40S", ["90", "180", "360"]),
        ("l4-", "L4", ["90", "180", "360"]),
        ("a100-", "A100", ["180", "360", "720"]),
        ("h100-", "H100", ["380", "760", "1520"]),
    ];
    for (prefix, model, sizes) in families {
        if let Some(size) = name.strip_prefix(prefix) {
            let count = match sizes.iter().position(|s| *s == size) {
                Some(0) => 1,
                Some(1) => 2,
                Some(_) => 4,
                None => 1,
            };
            return Some((count, model));
        }
    }
    kind.contains("gpu").then_some((1, "GPU"))
}

fn type_label(kind: &str) -> &'static str {
    match kind {
        "ovh.d2" => "Starter",
        "ovh.ssd.eg" => "General Purpose",
        "ovh.ssd.cpu" => "CPU Optimized",
        "ovh.ssd.ram" => "RAM Optimized",
        "ovh.iops" => "Storage Optimized",
        k if k.contains("gpu") => "GPU",
        _ => "Other",
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Image {
    id: String,
    name: String,
}

/// The image: the configured name, or the newest Ubuntu LTS (`Ubuntu YY.04`, YY even).
fn pick_image<'a>(images: &'a [Image], wanted: Option<&str>) -> Result<&'a Image, String> {
    if let Some(name) = wanted {
        return images
            .iter()
            .find(|i| i.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                let names: Vec<&str> = images.iter().take(10).map(|i| i.name.as_str()).collect();
                format!(
                    "the region offers no image named {name:?} (some it offers: {})",
                    names.join(", ")
                )
            });
    }
    images
        .iter()
        .filter_map(|i| {
            let version = i.name.strip_prefix("Ubuntu ")?;
            let (major, minor) = version.split_once('.')?;
            let major: u32 = major.parse().ok()?;
            (minor == "04" && major.is_multiple_of(2)).then_some((major, i))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, i)| i)
        .ok_or_else(|| {
            "the region offers no Ubuntu LTS image; set the host's imageName".to_string()
        })
}

/// The smallest flavor that holds the spec, preferring `types` in their order.
fn pick_flavor<'a>(
    flavors: &'a [Flavor],
    spec: &VmSpec,
    types: &[String],
) -> Result<&'a Flavor, String> {
    let rank = |f: &Flavor| {
        types
            .iter()
            .position(|t| *t == f.kind)
            .unwrap_or(types.len())
    };
    flavors
        .iter()
        .filter(|f| f.available && f.os_type == "linux")
        .filter(|f| {
            f.vcpus >= spec.vcpus as f64
                && f.ram * 1024.0 >= spec.memory_mb as f64
                && f.disk >= spec.disk_gb as f64
        })
        .filter(|f| match gpus_of(&f.name, &f.kind) {
            None => spec.gpus == 0,
            Some((n, _)) => spec.gpus > 0 && n >= spec.gpus,
        })
        .min_by(|a, b| {
            (rank(a), a.vcpus, a.ram, a.disk)
                .partial_cmp(&(rank(b), b.vcpus, b.ram, b.disk))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .ok_or_else(|| {
            format!(
                "no available Linux flavor in this region has {} vCPUs, {} MB of memory and {} GB of disk{}",
                spec.vcpus,
                spec.memory_mb,
                spec.disk_gb,
                if spec.gpus > 0 { format!(" with {} GPUs", spec.gpus) } else { String::new() }
            )
        })
}

/// `#cloud-config` user data (JSON is YAML): the `dev` user with the keys, password login
/// off, the hostname, the environment's variables in `/etc/environment`.
pub fn user_data(spec: &VmSpec) -> Result<String, String> {
    let keys: Vec<&str> = spec
        .authorized_key
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut environment = String::new();
    for (k, v) in &spec.env {
        if v.contains(['"', '\n', '\r', '\\']) {
            return Err(format!(
                "variable {k}: OVH guests get variables through /etc/environment, which cannot hold quotes, backslashes or newlines"
            ));
        }
        environment.push_str(&format!("{k}=\"{v}\"\n"));
    }
    let mut config = serde_json::json!({
        "users": [{
            "name": "dev",
            "shell": "/bin/bash",
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "lock_passwd": true,
            "ssh_authorized_keys": keys,
        }],
        "ssh_pwauth": false,
        "disable_root": true,
        "hostname": spec.hostname,
    });
    if !environment.is_empty() {
        config["write_files"] = serde_json::json!([{ "path": "/etc/environment", "append": true, "content": environment }]);
    }
    Ok(format!("#cloud-config\n{config}\n"))
}

/// Instances that are agent hosts (bought with `buy_agent_host`), not VMs: the reconciler
/// never sees them.
pub const AGENT_PREFIX: &str = "hearth-agent--";
/// The port a bought agent host's API listens on.
pub const AGENT_PORT: u16 = 9443;

/// Cloud-init for an agent host bought on OVH: QEMU from the distribution, `hearth` from
/// the control plane (fetched with the join token), the VM image built on the machine, and
/// `hearth agent` as a service that joins with the token, advertising the address it
/// reaches the control plane from. Every command is an argument list (cloud-init runs those
/// without a shell); the variables sit in a root-only file.
pub fn agent_user_data(control_plane: &str, join_token: &str) -> String {
    let env = format!(
        "HEARTH_CONTROL_PLANE={control_plane}\nHEARTH_JOIN_TOKEN={join_token}\nHEARTH_AGENT_LISTEN=0.0.0.0:{AGENT_PORT}\n\
         HEARTH_AGENT_ADVERTISE=auto\nHEARTH_AGENT_GUEST_ADDRESS=auto\n"
    );
    let unit = "[Unit]\nDescription=Hearth agent\nWants=network-online.target\nAfter=network-online.target\n\n\
                [Service]\nEnvironmentFile=/etc/hearth/agent.env\nExecStart=/usr/local/bin/hearth agent\nRestart=always\n\n\
                [Install]\nWantedBy=multi-user.target\n";
    let config = serde_json::json!({
        "package_update": true,
        "packages": ["qemu-system-x86", "qemu-utils", "curl"],
        "write_files": [
            { "path": "/etc/hearth/agent.env", "permissions": "0600", "content": env },
            { "path": "/etc/systemd/system/hearth-agent.service", "permissions": "0644", "content": unit },
        ],
        "runcmd": [
            ["curl", "-fsS", "--retry", "10", "--retry-connrefused", "--retry-delay", "5", "-o", "/usr/local/bin/hearth", "-H",
             format!("Authorization: Bearer {join_token}"), format!("{control_plane}/v1/agents/binary")],
            ["chmod", "0755", "/usr/local/bin/hearth"],
            ["/usr/local/bin/hearth", "image", "build", "--vm"],
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", "hearth-agent"],
        ],
    });
    format!("#cloud-config\n{config}\n")
}

/// A list and when it was fetched.
type Kept<T> = Option<(Instant, Arc<Vec<T>>)>;

/// Cached answers per host.
#[derive(Default)]
struct HostCache {
    instances: Kept<Instance>,
    flavors: Kept<Flavor>,
    images: Kept<Image>,
    quota: Option<(Instant, HostCapacityFacts, serde_json::Value)>,
    /// Hourly prices by plan code, from OVH's public catalogue.
    prices: Option<(Instant, Arc<HashMap<String, f64>>)>,
}

#[derive(Default)]
pub struct OvhProvider {
    clients: Mutex<HashMap<String, (String, Arc<OvhClient>)>>,
    caches: Mutex<HashMap<String, HostCache>>,
    /// One listing at a time per host: concurrent lookers wait for it and share it.
    listing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// What a call needs: the client, the options and the region.
struct On {
    client: Arc<OvhClient>,
    options: OvhOptions,
    region: String,
    project: String,
}

/// The moment `age` ago (or the earliest there is).
fn recent(age: Duration) -> Instant {
    let now = Instant::now();
    now.checked_sub(age).unwrap_or(now)
}

fn failed(e: OvhError) -> ProviderError {
    match e.kind {
        OvhErrorKind::Unavailable => ProviderError::Unavailable(e.message),
        _ => ProviderError::Failed(e.message),
    }
}

impl OvhProvider {
    pub fn new() -> OvhProvider {
        OvhProvider::default()
    }

    fn on(&self, host: &HostRef) -> Result<On, ProviderError> {
        let options = OvhOptions::parse(&host.options).map_err(ProviderError::Failed)?;
        let region = host.region.clone().ok_or_else(|| {
            ProviderError::Failed(format!(
                "host {} has no region; an ovh host is one project and region",
                host.name
            ))
        })?;
        let credentials = host.ovh.clone().ok_or_else(|| {
            ProviderError::Failed(format!("host {} has no OVH credentials", host.name))
        })?;
        let base = client::base_url(&host.endpoint).map_err(ProviderError::Failed)?;
        // Any change of the credentials makes a new client (and so a new clock and caches).
        let fingerprint = {
            use sha2::Digest;
            let digest =
                sha2::Sha256::digest(serde_json::to_vec(&credentials).expect("serializable"));
            format!("{base} {}", hex::encode(digest))
        };
        let client = {
            let mut clients = self.clients.lock().unwrap();
            match clients.get(&host.id) {
                Some((f, c)) if *f == fingerprint => c.clone(),
                _ => {
                    let c = Arc::new(OvhClient::new(base, credentials));
                    clients.insert(host.id.clone(), (fingerprint, c.clone()));
                    c
                }
            }
        };
        let project = options.project_id.clone();
        Ok(On {
            client,
            options,
            region,
            project,
        })
    }

    fn instance_name(host: &HostRef, vm_name: &str) -> String {
        format!("{vm_name}--{}", host.installation_id)
    }

    /// The region's instances as listed at `not_before` or later: one listing at a time per
    /// host, so callers who ask together share one call.
    async fn instances(
        &self,
        host: &HostRef,
        on: &On,
        not_before: Instant,
    ) -> Result<Arc<Vec<Instance>>, ProviderError> {
        let gate = self
            .listing
            .lock()
            .unwrap()
            .entry(host.id.clone())
            .or_default()
            .clone();
        let _one = gate.lock().await;
        if let Some((at, list)) = self
            .caches
            .lock()
            .unwrap()
            .get(&host.id)
            .and_then(|c| c.instances.clone())
            && at >= not_before
        {
            return Ok(list);
        }
        let path = format!(
            "/cloud/project/{}/instance?region={}",
            on.project, on.region
        );
        // Stamped with when it was asked for: it holds everything made before that.
        let asked = Instant::now();
        let list: Vec<Instance> = on
            .client
            .call(Method::GET, &path, None)
            .await
            .map_err(failed)?;
        let list = Arc::new(list);
        self.caches
            .lock()
            .unwrap()
            .entry(host.id.clone())
            .or_default()
            .instances = Some((asked, list.clone()));
        Ok(list)
    }

    fn forget_instances(&self, host: &HostRef) {
        if let Some(c) = self.caches.lock().unwrap().get_mut(&host.id) {
            c.instances = None;
        }
    }

    async fn flavors(&self, host: &HostRef, on: &On) -> Result<Arc<Vec<Flavor>>, ProviderError> {
        let path = format!("/cloud/project/{}/flavor?region={}", on.project, on.region);
        self.catalogue(host, on, path, |c| &mut c.flavors).await
    }

    async fn images(&self, host: &HostRef, on: &On) -> Result<Arc<Vec<Image>>, ProviderError> {
        let path = format!(
            "/cloud/project/{}/image?osType=linux&region={}",
            on.project, on.region
        );
        self.catalogue(host, on, path, |c| &mut c.images).await
    }

    /// A list OVH changes rarely (flavors, images), kept `CATALOGUE_TTL` in `slot` of the
    /// host's cache.
    async fn catalogue<T: serde::de::DeserializeOwned>(
        &self,
        host: &HostRef,
        on: &On,
        path: String,
        slot: fn(&mut HostCache) -> &mut Kept<T>,
    ) -> Result<Arc<Vec<T>>, ProviderError> {
        let kept = self
            .caches
            .lock()
            .unwrap()
            .get_mut(&host.id)
            .and_then(|c| slot(c).clone());
        if let Some((at, list)) = kept
            && at.elapsed() < CATALOGUE_TTL
        {
            return Ok(list);
        }
        let list: Vec<T> = on
            .client
            .call(Method::GET, &path, None)
            .await
            .map_err(failed)?;
        let list = Arc::new(list);
        *slot(
            self.caches
                .lock()
                .unwrap()
                .entry(host.id.clone())
                .or_default(),
        ) = Some((Instant::now(), list.clone()));
        Ok(list)
    }

    /// The instance of `vm`: by id from the shared listing, or asked directly when the
    /// listing is older than the instance.
    async fn find(
        &self,
        host: &HostRef,
        on: &On,
        vm: &VmRef,
    ) -> Result<Option<Instance>, ProviderError> {
        let name = Self::instance_name(host, &vm.name);
        let list = self.instances(host, on, recent(on.options.poll)).await?;
        if let Some(i) = list
            .iter()
            .find(|i| Some(&i.id) == vm.id.as_ref() || (vm.id.is_none() && i.name == name))
        {
            return Ok(Some(i.clone()));
        }
        let Some(id) = &vm.id else { return Ok(None) };
        let path = format!("/cloud/project/{}/instance/{id}", on.project);
        match on.client.call::<Instance>(Method::GET, &path, None).await {
            Ok(i) => Ok(Some(i)),
            Err(e) if e.kind == OvhErrorKind::NotFound => Ok(None),
            Err(e) => Err(failed(e)),
        }
    }

    fn info(host: &HostRef, i: &Instance) -> VmInfo {
        let status = Status::parse(&i.status);
        let environment_id = i
            .name
            .strip_prefix("hearth-")
            .and_then(|rest| rest.strip_suffix(&format!("--{}", host.installation_id)))
            .unwrap_or_default()
            .to_string();
        let ip = i.public_ipv4().filter(|_| status == Status::Active);
        VmInfo {
            vm: VmRef {
                name: crate::vm_name(&environment_id),
                id: Some(i.id.clone()),
            },
            environment_id,
            state: status.vm_state(),
            ssh_host: ip.clone(),
            ssh_port: ip.as_ref().map(|_| 22),
            ip_address: ip,
        }
    }

    /// Waits (on the shared listing) until `done` says the instance is where it should be.
    async fn settle(
        &self,
        host: &HostRef,
        on: &On,
        vm: &VmRef,
        what: &str,
        done: impl Fn(Option<&Instance>) -> Result<bool, ProviderError>,
    ) -> Result<(), ProviderError> {
        let started = Instant::now();
        loop {
            let found = self.find(host, on, vm).await?;
            if done(found.as_ref())? {
                return Ok(());
            }
            if started.elapsed() > SETTLE_TIMEOUT {
                return Err(ProviderError::Failed(format!(
                    "the OVH instance of {} did not {what} within {} min (status {})",
                    vm.name,
                    SETTLE_TIMEOUT.as_secs() / 60,
                    found.map(|i| i.status).unwrap_or_else(|| "gone".into())
                )));
            }
            tokio::time::sleep(on.options.poll).await;
        }
    }

    async fn action(
        &self,
        host: &HostRef,
        on: &On,
        id: &str,
        action: &str,
    ) -> Result<(), OvhError> {
        let path = format!("/cloud/project/{}/instance/{id}/{action}", on.project);
        let r = on
            .client
            .call::<serde_json::Value>(Method::POST, &path, None)
            .await
            .map(|_| ());
        self.forget_instances(host);
        r
    }
}

impl OvhProvider {
    /// Buys an agent host: an instance of flavor `flavor` (by name) in the host's project
    /// and region, named for `name`, booting `user_data`. Returns the instance's id.
    pub async fn create_agent_instance(
        &self,
        host: &HostRef,
        name: &str,
        flavor: &str,
        user_data: &str,
    ) -> Result<String, ProviderError> {
        let on = self.on(host)?;
        let flavors = self.flavors(host, &on).await?;
        let chosen = flavors
            .iter()
            .find(|f| f.name == flavor && f.available && f.os_type == "linux")
            .ok_or_else(|| {
                let names: Vec<&str> = flavors
                    .iter()
                    .filter(|f| f.available && f.os_type == "linux")
                    .map(|f| f.name.as_str())
                    .collect();
                ProviderError::Failed(format!(
                    "region {} offers no available Linux flavor {flavor:?} (it offers {})",
                    on.region,
                    names.join(", ")
                ))
            })?;
        let images = self.images(host, &on).await?;
        let image =
            pick_image(&images, on.options.image_name.as_deref()).map_err(ProviderError::Failed)?;
        let body = serde_json::json!({
            "name": format!("{AGENT_PREFIX}{name}--{}", host.installation_id),
            "flavorId": chosen.id,
            "imageId": image.id,
            "region": on.region,
            "monthlyBilling": false,
            "userData": base64::engine::general_purpose::STANDARD.encode(user_data),
        });
        let path = format!("/cloud/project/{}/instance", on.project);
        let made: Instance = on
            .client
            .call(Method::POST, &path, Some(&body))
            .await
            .map_err(failed)?;
        self.forget_instances(host);
        tracing::info!(host = %host.name, agent = name, flavor, instance = %made.id, "bought an agent host on OVH");
        Ok(made.id)
    }

    /// What a flavor costs an hour, from OVH's public catalogue (`/order/catalog/public/cloud`,
    /// kept an hour): the flavor's hourly plan code among the catalogue's add-ons, whose
    /// prices OVH gives in hundred-millionths of the currency.
    pub async fn hourly_price(&self, host: &HostRef, flavor: &str) -> Result<f64, ProviderError> {
        let on = self.on(host)?;
        let flavors = self.flavors(host, &on).await?;
        let plan = flavors
            .iter()
            .find(|f| f.name == flavor)
            .and_then(|f| f.plan_codes.as_ref()?.hourly.clone())
            .ok_or_else(|| {
                ProviderError::Failed(format!(
                    "flavor {flavor} has no hourly plan in region {}",
                    on.region
                ))
            })?;
        let cached = self
            .caches
            .lock()
            .unwrap()
            .get(&host.id)
            .and_then(|c| c.prices.clone());
        let prices = match cached {
            Some((at, p)) if at.elapsed() < Duration::from_secs(3600) => p,
            _ => {
                let path = format!(
                    "/order/catalog/public/cloud?ovhSubsidiary={}",
                    on.options.subsidiary
                );
                let catalogue: serde_json::Value = on
                    .client
                    .call(Method::GET, &path, None)
                    .await
                    .map_err(failed)?;
                let mut prices = HashMap::new();
                for addon in catalogue["addons"].as_array().into_iter().flatten() {
                    let (Some(code), Some(pricings)) =
                        (addon["planCode"].as_str(), addon["pricings"].as_array())
                    else {
                        continue;
                    };
                    if let Some(p) = pricings
                        .iter()
                        .find(|p| p["intervalUnit"] == "hour")
                        .and_then(|p| p["price"].as_f64())
                    {
                        prices.insert(code.to_string(), p / 1e8);
                    }
                }
                let prices = Arc::new(prices);
                self.caches
                    .lock()
                    .unwrap()
                    .entry(host.id.clone())
                    .or_default()
                    .prices = Some((Instant::now(), prices.clone()));
                prices
            }
        };
        prices.get(&plan).copied().ok_or_else(|| {
            ProviderError::Failed(format!("OVH's catalogue has no hourly price for {plan}"))
        })
    }

    /// Deletes a bought agent host's instance and waits until it is gone; an instance whose
    /// id was never recorded (the buyer stopped between the create and the record) is
    /// found by its name.
    pub async fn delete_agent_instance(
        &self,
        host: &HostRef,
        name: &str,
        instance_id: &str,
    ) -> Result<(), ProviderError> {
        let id = if instance_id.is_empty() {
            let on = self.on(host)?;
            let full = format!("{AGENT_PREFIX}{name}--{}", host.installation_id);
            match self
                .instances(host, &on, Instant::now())
                .await?
                .iter()
                .find(|i| i.name == full)
            {
                Some(i) => i.id.clone(),
                None => return Ok(()),
            }
        } else {
            instance_id.to_string()
        };
        let vm = VmRef {
            name: id.clone(),
            id: Some(id),
        };
        self.destroy(host, &vm).await
    }
}

#[async_trait]
impl Provider for OvhProvider {
    fn kind(&self) -> HostKind {
        HostKind::Ovh
    }

    /// Reads the project's quota in the region (at most once a minute): the host's capacity.
    async fn check(&self, host: &HostRef) -> Result<HostFacts, ProviderError> {
        let on = self.on(host)?;
        if let Some((at, capacity, report)) = self
            .caches
            .lock()
            .unwrap()
            .get(&host.id)
            .and_then(|c| c.quota.clone())
            && at.elapsed() < QUOTA_TTL
        {
            return Ok(HostFacts {
                identity: Some(format!("ovh:{}:{}", on.project, on.region)),
                report: Some(report),
                capacity: Some(capacity),
            });
        }
        let path = format!("/cloud/project/{}/quota", on.project);
        let quotas: Vec<serde_json::Value> = on
            .client
            .call(Method::GET, &path, None)
            .await
            .map_err(failed)?;
        let q = quotas
            .iter()
            .find(|q| q["region"] == on.region.as_str())
            .ok_or_else(|| {
                ProviderError::Failed(format!(
                    "OVH project {} has no quota in region {}: is the region enabled?",
                    on.project, on.region
                ))
            })?;
        let i = &q["instance"];
        let n = |k: &str| i[k].as_i64().unwrap_or(0);
        let capacity = HostCapacityFacts {
            vcpus: n("maxCores"),
            memory_mb: n("maxRam"),
            environments: n("maxInstances"),
        };
        let report = serde_json::json!({
            "project": on.project, "region": on.region,
            "cores": format!("{} of {}", n("usedCores"), n("maxCores")),
            "instances": format!("{} of {}", n("usedInstances"), n("maxInstances")),
            "ramMb": format!("{} of {}", n("usedRAM"), n("maxRam")),
        });
        self.caches
            .lock()
            .unwrap()
            .entry(host.id.clone())
            .or_default()
            .quota = Some((Instant::now(), capacity, report.clone()));
        Ok(HostFacts {
            identity: Some(format!("ovh:{}:{}", on.project, on.region)),
            report: Some(report),
            capacity: Some(capacity),
        })
    }

    async fn ensure_created(&self, host: &HostRef, spec: &VmSpec) -> Result<VmRef, ProviderError> {
        let on = self.on(host)?;
        let name = Self::instance_name(host, &spec.name);
        // A listing made after this call began (an earlier attempt's instance may be
        // seconds old); creates asking together share one.
        if let Some(i) = self
            .instances(host, &on, Instant::now())
            .await?
            .iter()
            .find(|i| i.name == name)
        {
            return Ok(VmRef {
                name: spec.name.clone(),
                id: Some(i.id.clone()),
            });
        }
        let flavors = self.flavors(host, &on).await?;
        let flavor =
            pick_flavor(&flavors, spec, &on.options.flavor_types).map_err(ProviderError::Failed)?;
        let images = self.images(host, &on).await?;
        let image =
            pick_image(&images, on.options.image_name.as_deref()).map_err(ProviderError::Failed)?;
        let user_data = user_data(spec).map_err(ProviderError::Failed)?;
        let body = serde_json::json!({
            "name": name,
            "flavorId": flavor.id,
            "imageId": image.id,
            "region": on.region,
            "monthlyBilling": false,
            "userData": base64::engine::general_purpose::STANDARD.encode(user_data),
        });
        tracing::info!(host = %host.name, flavor = %flavor.name, image = %image.name, instance = %name, "creating an OVH instance");
        let path = format!("/cloud/project/{}/instance", on.project);
        let made: Instance = on
            .client
            .call(Method::POST, &path, Some(&body))
            .await
            .map_err(failed)?;
        self.forget_instances(host);
        Ok(VmRef {
            name: spec.name.clone(),
            id: Some(made.id),
        })
    }

    async fn start(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError> {
        let on = self.on(host)?;
        let Some(i) = self.find(host, &on, vm).await? else {
            return Err(ProviderError::NotFound(vm.name.clone()));
        };
        let action = match Status::parse(&i.status) {
            Status::Active | Status::Build | Status::Unshelving => return Ok(()),
            Status::Shelved => "unshelve",
            Status::Shutoff => "start",
            Status::Shelving => {
                // Let the shelve finish, then unshelve.
                self.settle(host, &on, vm, "finish shelving", |i| {
                    Ok(i.is_none_or(|i| Status::parse(&i.status) != Status::Shelving))
                })
                .await?;
                "unshelve"
            }
            other => {
                return Err(ProviderError::Failed(format!(
                    "an OVH instance in status {other:?} cannot be started"
                )));
            }
        };
        match self.action(host, &on, &i.id, action).await {
            Ok(()) => Ok(()),
            // Someone else moved it first: fine if it is coming up.
            Err(e) if e.kind == OvhErrorKind::Conflict => match self.find(host, &on, vm).await? {
                Some(i)
                    if matches!(
                        Status::parse(&i.status),
                        Status::Active | Status::Unshelving | Status::Build
                    ) =>
                {
                    Ok(())
                }
                _ => Err(failed(e)),
            },
            Err(e) if e.kind == OvhErrorKind::NotFound => {
                Err(ProviderError::NotFound(vm.name.clone()))
            }
            Err(e) => Err(failed(e)),
        }
    }

    async fn stop(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError> {
        let on = self.on(host)?;
        let Some(i) = self.find(host, &on, vm).await? else {
            return Err(ProviderError::NotFound(vm.name.clone()));
        };
        let (action, target) = match on.options.stop {
            StopMode::Shelve => ("shelve", Status::Shelved),
            StopMode::Shutoff => ("stop", Status::Shutoff),
        };
        let now = Status::parse(&i.status);
        let needed = now != target && !(target == Status::Shelved && now == Status::Shelving);
        if needed {
            match self.action(host, &on, &i.id, action).await {
                Ok(()) => {}
                // Fine if someone else is already taking it there; otherwise say why not.
                Err(e) if e.kind == OvhErrorKind::Conflict => {
                    let now = self
                        .find(host, &on, vm)
                        .await?
                        .map(|i| Status::parse(&i.status));
                    let on_its_way = now == Some(target.clone())
                        || (target == Status::Shelved && now == Some(Status::Shelving));
                    if !on_its_way {
                        return Err(failed(e));
                    }
                }
                Err(e) if e.kind == OvhErrorKind::NotFound => {
                    return Err(ProviderError::NotFound(vm.name.clone()));
                }
                Err(e) => return Err(failed(e)),
            }
        }
        let name = vm.name.clone();
        self.settle(host, &on, vm, action, |i| match i {
            None => Err(ProviderError::NotFound(name.clone())),
            Some(i) => Ok(Status::parse(&i.status) == target),
        })
        .await
    }

    async fn destroy(&self, host: &HostRef, vm: &VmRef) -> Result<(), ProviderError> {
        let on = self.on(host)?;
        let Some(i) = self.find(host, &on, vm).await? else {
            return Ok(());
        };
        let path = format!("/cloud/project/{}/instance/{}", on.project, i.id);
        match on
            .client
            .call::<serde_json::Value>(Method::DELETE, &path, None)
            .await
        {
            Ok(_) => {}
            Err(e) if e.kind == OvhErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(failed(e)),
        }
        self.forget_instances(host);
        let gone = VmRef {
            name: vm.name.clone(),
            id: Some(i.id.clone()),
        };
        self.settle(host, &on, &gone, "go away", |i| Ok(i.is_none()))
            .await
    }

    async fn inspect(&self, host: &HostRef, vm: &VmRef) -> Result<Option<VmInfo>, ProviderError> {
        let on = self.on(host)?;
        Ok(self
            .find(host, &on, vm)
            .await?
            .map(|i| Self::info(host, &i)))
    }

    async fn list(&self, host: &HostRef) -> Result<Vec<VmInfo>, ProviderError> {
        let on = self.on(host)?;
        let suffix = format!("--{}", host.installation_id);
        Ok(self
            .instances(host, &on, recent(on.options.poll))
            .await?
            .iter()
            .filter(|i| {
                i.name.starts_with("hearth-")
                    && !i.name.starts_with(AGENT_PREFIX)
                    && i.name.ends_with(&suffix)
            })
            .map(|i| Self::info(host, i))
            .collect())
    }

    async fn flavors(&self, host: &HostRef) -> Result<Vec<OfferedFlavor>, ProviderError> {
        let on = self.on(host)?;
        let mut offered: Vec<OfferedFlavor> = self
            .flavors(host, &on)
            .await?
            .iter()
            .filter(|f| f.available && f.os_type == "linux")
            .map(|f| {
                let gpu = gpus_of(&f.name, &f.kind);
                OfferedFlavor {
                    id: format!(
                        "ovh:{}:{}",
                        if f.region.is_empty() {
                            &on.region
                        } else {
                            &f.region
                        },
                        f.name
                    ),
                    name: f.name.clone(),
                    type_label: type_label(&f.kind).to_string(),
                    region: on.region.clone(),
                    vcpus: f.vcpus as i64,
                    memory_mb: (f.ram * 1024.0) as i64,
                    disk_gb: f.disk as i64,
                    gpus: gpu.map(|g| g.0).unwrap_or(0),
                    gpu_model: gpu.map(|g| g.1.to_string()),
                }
            })
            .collect();
        offered
            .sort_by(|a, b| (a.vcpus, a.memory_mb, &a.name).cmp(&(b.vcpus, b.memory_mb, &b.name)));
        Ok(offered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flavor(name: &str, kind: &str, vcpus: f64, ram: f64, disk: f64) -> Flavor {
        Flavor {
            id: name.into(),
            name: name.into(),
            region: "GRA9".into(),
            vcpus,
            ram,
            disk,
            kind: kind.into(),
            os_type: "linux".into(),
            available: true,
            plan_codes: None,
        }
    }

    fn spec(vcpus: i64, memory_mb: i64, disk_gb: i64, gpus: i64) -> VmSpec {
        VmSpec {
            environment_id: "e".into(),
            name: "hearth-e".into(),
            hostname: "env".into(),
            image: String::new(),
            vcpus,
            memory_mb,
            disk_gb,
            gpus,
            env: Default::default(),
            authorized_key: "ssh-ed25519 AAAA hearth\nssh-ed25519 BBBB me".into(),
            labels: Default::default(),
        }
    }

    #[test]
    fn the_flavor_honours_disk_and_gpus_and_the_type_preference() {
        let flavors = vec![
            flavor("d2-4", "ovh.d2", 2.0, 4.0, 50.0),
            flavor("b2-7", "ovh.ssd.eg", 2.0, 7.0, 50.0),
            flavor("b2-15", "ovh.ssd.eg", 4.0, 15.0, 100.0),
            flavor("t1-45", "ovh.ssd.gpu", 8.0, 45.0, 400.0),
            flavor("t1-90", "ovh.ssd.gpu", 18.0, 90.0, 800.0),
        ];
        let types: Vec<String> = DEFAULT_FLAVOR_TYPES.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            pick_flavor(&flavors, &spec(2, 4096, 50, 0), &types)
                .unwrap()
                .name,
            "b2-7",
            "general purpose first"
        );
        assert_eq!(
            pick_flavor(&flavors, &spec(2, 4096, 80, 0), &types)
                .unwrap()
                .name,
            "b2-15",
            "disk is honoured"
        );
        assert_eq!(
            pick_flavor(&flavors, &spec(2, 4096, 50, 2), &types)
                .unwrap()
                .name,
            "t1-90",
            "two GPUs"
        );
        assert!(
            pick_flavor(&flavors, &spec(64, 4096, 50, 0), &types)
                .unwrap_err()
                .contains("64 vCPUs")
        );
        let starter = vec!["ovh.d2".to_string()];
        assert_eq!(
            pick_flavor(&flavors, &spec(2, 4096, 50, 0), &starter)
                .unwrap()
                .name,
            "d2-4"
        );
    }

    #[test]
    fn the_image_is_the_newest_ubuntu_lts_unless_named() {
        let images: Vec<Image> = [
            "Ubuntu 22.04",
            "Ubuntu 23.10",
            "Ubuntu 24.04",
            "Debian 12",
            "Ubuntu 25.04",
        ]
        .iter()
        .map(|n| Image {
            id: n.to_string(),
            name: n.to_string(),
        })
        .collect();
        assert_eq!(pick_image(&images, None).unwrap().name, "Ubuntu 24.04");
        assert_eq!(
            pick_image(&images, Some("debian 12")).unwrap().name,
            "Debian 12"
        );
        assert!(pick_image(&images, Some("Arch")).is_err());
        assert!(pick_image(&images[3..4], None).is_err());
    }

    #[test]
    fn every_status_maps_and_unknown_ones_are_kept() {
        assert_eq!(Status::parse("ACTIVE").vm_state(), VmState::Running);
        assert_eq!(
            Status::parse("SHELVED_OFFLOADED").vm_state(),
            VmState::Stopped
        );
        assert_eq!(Status::parse("SHUTOFF").vm_state(), VmState::Stopped);
        assert_eq!(
            Status::parse("MIGRATING"),
            Status::Other("MIGRATING".into())
        );
        assert_eq!(Status::parse("MIGRATING").vm_state(), VmState::Other);
    }

    #[test]
    fn user_data_makes_dev_with_both_keys_and_no_password_login() {
        let text = user_data(&spec(1, 1024, 10, 0)).unwrap();
        let (first, rest) = text.split_once('\n').unwrap();
        assert_eq!(first, "#cloud-config");
        let config: serde_json::Value = serde_json::from_str(rest).unwrap();
        assert_eq!(config["ssh_pwauth"], false);
        assert_eq!(config["users"][0]["name"], "dev");
        assert_eq!(
            config["users"][0]["ssh_authorized_keys"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        let mut quoted = spec(1, 1024, 10, 0);
        quoted.env.insert("A".into(), "x\"; rm -rf /".into());
        assert!(user_data(&quoted).is_err());
    }

    #[test]
    fn options_are_checked() {
        assert!(OvhOptions::parse(&serde_json::json!({"projectId": "abc"})).is_ok());
        assert!(OvhOptions::parse(&serde_json::json!({})).is_err());
        assert!(
            OvhOptions::parse(&serde_json::json!({"projectId": "abc", "stop": "pause"})).is_err()
        );
        assert!(OvhOptions::parse(&serde_json::json!({"projectId": "a b"})).is_err());
        assert!(OvhOptions::parse(&serde_json::json!({"projectId": "abc", "colour": 1})).is_err());
    }
}
