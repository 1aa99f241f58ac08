//! Managing hosts (admins): add one after checking it answers, drain it, change its
//! capacity or simulated faults, remove it once it holds nothing.

use crate::App;
use crate::error::{AppError, AppResult};
use hearth_core::host::{MAX_GPUS, check_label, check_name};
use hearth_core::{HostKind, HostStatus};
use hearth_provider::sim::SimOptions;
use hearth_store::{Host, HostCapacity, HostUpdate, NewHost, User};
use std::time::Duration;

/// How long adding a host waits for it to answer.
const ADD_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds on what one host may announce.
pub const MAX_HOST_VCPUS: i64 = 100_000;
pub const MAX_HOST_MEMORY_MB: i64 = 100_000_000;
pub const MAX_HOST_ENVIRONMENTS: i64 = 100_000;

/// A host to add, as an admin describes it.
#[derive(Debug, Clone, Default)]
pub struct HostInput {
    pub name: String,
    pub kind: String,
    pub endpoint: Option<String>,
    pub guest_address: Option<String>,
    pub region: Option<String>,
    pub gpu_model: Option<String>,
    pub gpu_count: Option<i64>,
    pub max_vcpus: i64,
    pub max_memory_mb: i64,
    pub max_environments: Option<i64>,
    pub tls_ca: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub options: Option<serde_json::Value>,
    /// For `ovh` hosts: the API credentials (sealed with the master key, never shown).
    pub ovh_credentials: Option<hearth_provider::ovh::client::Credentials>,
}

fn capacity(vcpus: i64, memory_mb: i64, environments: i64) -> AppResult<HostCapacity> {
    for (name, v, max) in [
        ("maxVcpus", vcpus, MAX_HOST_VCPUS),
        ("maxMemoryMb", memory_mb, MAX_HOST_MEMORY_MB),
        ("maxEnvironments", environments, MAX_HOST_ENVIRONMENTS),
    ] {
        if !(1..=max).contains(&v) {
            return Err(AppError::Invalid(format!(
                "{name} must be between 1 and {max}, got {v}"
            )));
        }
    }
    Ok(HostCapacity {
        max_vcpus: vcpus,
        max_memory_mb: memory_mb,
        max_environments: environments,
    })
}

/// A kind's options, checked: a simulated host's faults, a Docker host's confinement.
fn options(kind: HostKind, options: Option<serde_json::Value>) -> AppResult<serde_json::Value> {
    let options = options.unwrap_or_else(|| serde_json::json!({}));
    match kind {
        HostKind::Sim => {
            SimOptions::parse(&options).map_err(AppError::Invalid)?;
        }
        HostKind::Docker => {
            hearth_provider::docker::options::DockerOptions::parse(&options)
                .map_err(AppError::Invalid)?;
        }
        HostKind::Ovh => {
            hearth_provider::ovh::OvhOptions::parse(&options).map_err(AppError::Invalid)?;
        }
        _ if options.as_object().is_some_and(|o| o.is_empty()) => {}
        _ => {
            return Err(AppError::Invalid(format!(
                "hosts of kind {kind} take no options"
            )));
        }
    }
    Ok(options)
}

/// The URL a bought host reaches this control plane at. Its join token and the binary it
/// runs as root travel over it, so `https://`, or `http://` to this machine only (a test,
/// or a TLS proxy on the same machine).
pub(crate) fn check_control_plane(url: &str) -> AppResult<()> {
    let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"];
    let ok = (url.starts_with("https://") || loopback.iter().any(|p| url.starts_with(p)))
        && url.len() <= 500
        && !url.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(AppError::Invalid(
            "controlPlane must be the https:// URL a new host reaches this control plane at (its join token and hearth's binary travel over it); http:// is accepted for 127.0.0.1 only".into(),
        ))
    }
}

/// An address the nodes can reach guests at: an IP address or a DNS name.
fn check_address(a: &str) -> AppResult<()> {
    let ok = (1..=253).contains(&a.len())
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(AppError::Invalid(format!(
            "guestAddress {a:?} must be an IP address or a DNS name"
        )))
    }
}

impl App {
    /// Adds a host once it answers; nothing is written when it does not.
    pub async fn add_host(&self, actor: &User, input: HostInput) -> AppResult<Host> {
        check_name(&input.name).map_err(AppError::Invalid)?;
        let kind = HostKind::parse(&input.kind).ok_or_else(|| {
            AppError::Invalid(format!(
                "kind must be docker, agent, ovh or sim; got {:?}",
                input.kind
            ))
        })?;
        self.providers
            .get(kind)
            .map_err(|e| AppError::Invalid(e.to_string()))?;
        let endpoint = match (kind, input.endpoint) {
            (HostKind::Sim, None) => format!("sim://{}", input.name),
            (HostKind::Ovh, e) => {
                hearth_provider::ovh::client::base_url(e.as_deref().unwrap_or("ovh-eu"))
                    .map_err(AppError::Invalid)?
            }
            (_, Some(e)) => e,
            (_, None) => {
                return Err(AppError::Invalid(format!(
                    "a {kind} host needs an endpoint"
                )));
            }
        };
        let schemes: &[&str] = match kind {
            HostKind::Docker => &["unix://", "tcp://", "ssh://"],
            HostKind::Sim => &["sim://"],
            // Checked above (`base_url`): https://, or http:// to this machine.
            HostKind::Ovh => &["https://", "http://"],
            _ => &["https://"],
        };
        if !schemes.iter().any(|s| endpoint.starts_with(s))
            || endpoint.len() > 1000
            || endpoint.chars().any(char::is_whitespace)
        {
            return Err(AppError::Invalid(format!(
                "the endpoint of a {kind} host must start with {}",
                schemes.join(", ")
            )));
        }
        let guest_address = input.guest_address.unwrap_or_else(|| "127.0.0.1".into());
        check_address(&guest_address)?;
        if let Some(r) = &input.region {
            check_label("region", r).map_err(AppError::Invalid)?;
        }
        if let Some(m) = &input.gpu_model {
            check_label("gpuModel", m).map_err(AppError::Invalid)?;
        }
        let gpu_count = input.gpu_count.unwrap_or(0);
        if !(0..=MAX_GPUS * 8).contains(&gpu_count) {
            return Err(AppError::Invalid(format!(
                "gpuCount must be between 0 and {}",
                MAX_GPUS * 8
            )));
        }
        if (gpu_count > 0) != input.gpu_model.is_some() {
            return Err(AppError::Invalid(
                "gpuModel and gpuCount go together".into(),
            ));
        }
        if kind == HostKind::Ovh && input.region.is_none() {
            return Err(AppError::Invalid(
                "an ovh host is one project and region: give its region (GRA9, SBG5, ...)".into(),
            ));
        }
        if (kind == HostKind::Ovh) != input.ovh_credentials.is_some() {
            return Err(AppError::Invalid(
                "ovhCredentials (applicationKey, applicationSecret, consumerKey) go with ovh hosts, and only with them".into(),
            ));
        }
        if let Some(c) = &input.ovh_credentials {
            c.check().map_err(AppError::Invalid)?;
        }
        // An OVH host's capacity is its project's quota, read when it is checked below.
        let capacity = if kind == HostKind::Ovh {
            HostCapacity {
                max_vcpus: 1,
                max_memory_mb: 1,
                max_environments: 1,
            }
        } else {
            capacity(
                input.max_vcpus,
                input.max_memory_mb,
                input.max_environments.unwrap_or(200),
            )?
        };
        let tls = match (input.tls_ca, input.tls_cert, input.tls_key) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some((ca, cert, key)),
            _ => {
                return Err(AppError::Invalid(
                    "tlsCa, tlsCert and tlsKey go together".into(),
                ));
            }
        };
        if endpoint.starts_with("tcp://") != tls.is_some() {
            return Err(AppError::Invalid(
                "a tcp:// endpoint needs tlsCa, tlsCert and tlsKey (plain TCP hands out root on the host); other endpoints take none".into(),
            ));
        }
        if kind == HostKind::Agent {
            return Err(AppError::Invalid(
                "agents join by themselves: make a join token (`hearth admin hosts join-token NAME`) and start `hearth agent` with it".into(),
            ));
        }
        let options = options(kind, input.options)?;
        let mut new = NewHost {
            id: uuid::Uuid::now_v7().to_string(),
            name: input.name,
            kind,
            endpoint,
            guest_address,
            region: input.region,
            gpu_model: input.gpu_model,
            gpu_count,
            capacity,
            tls_ca: tls.as_ref().map(|t| t.0.clone()),
            tls_cert: tls.as_ref().map(|t| t.1.clone()),
            tls_key_sealed: tls.as_ref().map(|t| self.master_key.seal(&t.2)),
            credential_sealed: input.ovh_credentials.as_ref().map(|c| {
                self.master_key
                    .seal(&serde_json::to_string(c).expect("serializable"))
            }),
            options,
            identity: None,
        };
        self.check_unsaved(&mut new).await?;
        let host = self.store.add_host(&new).await?;
        let _ = self
            .store
            .audit(&actor.id, "host_add", None, "success", None, None)
            .await;
        tracing::info!(host = %host.name, kind = %host.kind, endpoint = %host.endpoint, "host added");
        Ok(host)
    }

    /// Checks a host before it is written, under the id it will have; learns its identity.
    async fn check_unsaved(&self, new: &mut NewHost) -> AppResult<()> {
        let provider = self
            .providers
            .get(new.kind)
            .map_err(|e| AppError::Invalid(e.to_string()))?;
        let probe = Host {
            id: new.id.clone(),
            name: new.name.clone(),
            kind: new.kind,
            endpoint: new.endpoint.clone(),
            guest_address: new.guest_address.clone(),
            region: new.region.clone(),
            gpu_model: None,
            gpu_count: 0,
            status: HostStatus::Ready,
            health: hearth_core::HostHealth::Healthy,
            health_message: None,
            last_seen_at: None,
            capacity: new.capacity,
            used_vcpus: 0,
            used_memory_mb: 0,
            used_environments: 0,
            used_gpus: 0,
            tls_ca: new.tls_ca.clone(),
            tls_cert: new.tls_cert.clone(),
            tls_key_sealed: new.tls_key_sealed.clone(),
            credential_sealed: new.credential_sealed.clone(),
            options: new.options.clone(),
            identity: None,
            report: None,
            created_at: 0,
            updated_at: 0,
        };
        let host_ref = self.host_ref(&probe)?;
        match tokio::time::timeout(ADD_CHECK_TIMEOUT, provider.check(&host_ref)).await {
            Ok(Ok(facts)) => {
                new.identity = facts.identity;
                if let Some(c) = facts.capacity {
                    new.capacity = capacity(c.vcpus, c.memory_mb, c.environments).map_err(|e| {
                        AppError::Invalid(format!(
                            "host {} states a capacity out of bounds: {e}",
                            new.name
                        ))
                    })?;
                }
            }
            Ok(Err(e)) => {
                return Err(AppError::Invalid(format!(
                    "host {} does not answer: {e}; nothing was added",
                    new.name
                )));
            }
            Err(_) => {
                return Err(AppError::Invalid(format!(
                    "host {} did not answer within {} s; nothing was added",
                    new.name,
                    ADD_CHECK_TIMEOUT.as_secs()
                )));
            }
        }
        Ok(())
    }

    /// The sizes healthy, ready hosts offer beyond the tiers' (OVH flavors), each host
    /// asked for at most 5 s; a host that does not answer offers nothing this time.
    pub async fn offered_flavors(&self) -> Vec<(HostKind, hearth_provider::OfferedFlavor)> {
        let Ok(hosts) = self.store.hosts().await else {
            return Vec::new();
        };
        let mut offered = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for host in hosts.iter().filter(|h| {
            h.kind == HostKind::Ovh
                && h.status == HostStatus::Ready
                && h.health == hearth_core::HostHealth::Healthy
        }) {
            let (Ok(provider), Ok(host_ref)) = (self.providers.get(host.kind), self.host_ref(host))
            else {
                continue;
            };
            match tokio::time::timeout(Duration::from_secs(5), provider.flavors(&host_ref)).await {
                Ok(Ok(flavors)) => {
                    for f in flavors {
                        if seen.insert(f.id.clone()) {
                            offered.push((host.kind, f));
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(host = %host.name, error = %e, "could not list the host's flavors")
                }
                Err(_) => {
                    tracing::warn!(host = %host.name, "the host's flavors did not come within 5 s")
                }
            }
        }
        offered
    }

    /// Buys an agent host on OVH: a join token for `name`, then an instance in the project
    /// and region of the `ovh` host `via` (or the only `ovh` host in `region`) whose
    /// cloud-init fetches `hearth` from `control_plane` and joins with the token. The host
    /// appears when its agent reports in.
    pub async fn buy_agent_host(
        &self,
        admin: &User,
        name: &str,
        via: Option<&str>,
        region: Option<&str>,
        flavor: &str,
        control_plane: &str,
    ) -> AppResult<hearth_store::BoughtHost> {
        self.buy_host(&admin.id, name, via, region, flavor, control_plane, false)
            .await
    }

    /// `buy_agent_host` for `actor` (an admin, or the demand policy).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn buy_host(
        &self,
        actor: &str,
        name: &str,
        via: Option<&str>,
        region: Option<&str>,
        flavor: &str,
        control_plane: &str,
        by_demand: bool,
    ) -> AppResult<hearth_store::BoughtHost> {
        check_name(name).map_err(AppError::Invalid)?;
        check_label("flavor", flavor).map_err(AppError::Invalid)?;
        check_control_plane(control_plane)?;
        let via = match via {
            Some(v) => self
                .find_host(v)
                .await
                .map_err(|_| AppError::Invalid(format!("via: there is no host {v:?}")))?,
            None => {
                let candidates: Vec<Host> = self
                    .store
                    .hosts()
                    .await?
                    .into_iter()
                    .filter(|h| {
                        h.kind == HostKind::Ovh
                            && (region.is_none() || h.region.as_deref() == region)
                    })
                    .collect();
                match <[Host; 1]>::try_from(candidates) {
                    Ok([h]) => h,
                    Err(found) => {
                        return Err(AppError::Invalid(format!(
                            "name the OVH project and region to buy through with `via` (an ovh host): {} ovh hosts match",
                            found.len()
                        )));
                    }
                }
            }
        };
        if via.kind != HostKind::Ovh {
            return Err(AppError::Invalid(format!(
                "host {} is not an ovh host: agent hosts are bought through an OVH project and region",
                via.name
            )));
        }
        // The row first, as a reservation: the name's primary key stops a second buy of
        // it, and no instance is paid for that nothing records.
        let mut bought = hearth_store::BoughtHost {
            host_name: name.to_string(),
            via_host_id: via.id.clone(),
            instance_id: String::new(),
            flavor: flavor.to_string(),
            created_by: actor.to_string(),
            created_at: self.now(),
            empty_since: None,
            by_demand,
        };
        if self.store.find_host(name).await.is_ok()
            || self.store.add_bought_host(&bought).await.is_err()
        {
            return Err(AppError::Conflict(format!(
                "a host named {name:?} exists or is being bought"
            )));
        }
        let made = async {
            let (token, _) = self
                .issue_join_token(actor, name, via.region.as_deref(), Some(6 * 3600))
                .await?;
            let user_data =
                hearth_provider::ovh::agent_user_data(control_plane.trim_end_matches('/'), &token);
            let host_ref = self.host_ref(&via)?;
            self.ovh
                .create_agent_instance(&host_ref, name, flavor, &user_data)
                .await
                .map_err(|e| AppError::Unavailable(format!("could not buy the host on OVH: {e}")))
        }
        .await;
        match made {
            Ok(id) => {
                self.store.set_bought_instance(name, &id).await?;
                bought.instance_id = id;
            }
            Err(e) => {
                // Nothing was bought: the reservation and the token go.
                let _ = self.store.remove_bought_host(name).await;
                let _ = self.store.revoke_join_tokens(name).await;
                return Err(e);
            }
        }
        let _ = self
            .store
            .audit(actor, "host_buy", None, "success", None, None)
            .await;
        Ok(bought)
    }

    /// Sells a bought agent host: it is drained, refused (409) while it holds environments;
    /// otherwise the host is removed and its instance deleted (waiting until it is gone).
    pub async fn sell_agent_host(&self, admin: &User, name: &str) -> AppResult<()> {
        self.sell_host(&admin.id, name).await
    }

    /// `sell_agent_host` for `actor` (an admin, or the demand policy).
    pub(crate) async fn sell_host(&self, actor: &str, name: &str) -> AppResult<()> {
        let bought = self
            .store
            .bought_host(name)
            .await
            .map_err(AppError::not_found("bought host"))?;
        // Drained first, then the row removed in a transaction that refuses while any
        // environment is on it: once it is gone nothing can be placed there, and only then
        // is the instance deleted (a failed delete leaves the bought row, to sell again).
        if let Ok(host) = self.store.find_host(name).await {
            if host.kind != HostKind::Agent {
                return Err(AppError::Conflict(format!(
                    "host {name} is a {} host, not the agent host that was bought under that name; remove or rename it first",
                    host.kind
                )));
            }
            if host.status != HostStatus::Draining {
                self.store
                    .set_host_status(&host.id, HostStatus::Draining)
                    .await?;
            }
            let held = self.store.count_host_environments(&host.id).await?;
            if held > 0 {
                return Err(AppError::Conflict(format!(
                    "host {name} is draining and still holds {held} environments: destroy them (or wait for them to go), then sell it"
                )));
            }
            self.store.remove_host(&host.id).await?;
        }
        let via = self.store.host(&bought.via_host_id).await?;
        let host_ref = self.host_ref(&via)?;
        self.ovh
            .delete_agent_instance(&host_ref, name, &bought.instance_id)
            .await
            .map_err(|e| {
                AppError::Unavailable(format!("could not delete the instance on OVH: {e}"))
            })?;
        self.store.remove_bought_host(name).await?;
        let _ = self
            .store
            .audit(actor, "host_sell", None, "success", None, None)
            .await;
        tracing::info!(host = name, instance = %bought.instance_id, "sold an agent host: its OVH instance is deleted");
        Ok(())
    }

    /// A one-time token with which an agent joins as host `name` (valid `ttl_seconds`,
    /// 3600 unless given; at most a week). Returns the token (shown once) and its expiry.
    pub async fn create_join_token(
        &self,
        admin: &User,
        name: &str,
        region: Option<&str>,
        ttl_seconds: Option<i64>,
    ) -> AppResult<(String, i64)> {
        self.issue_join_token(&admin.id, name, region, ttl_seconds)
            .await
    }

    /// `create_join_token` for `actor` (an admin, or the demand policy).
    async fn issue_join_token(
        &self,
        actor: &str,
        name: &str,
        region: Option<&str>,
        ttl_seconds: Option<i64>,
    ) -> AppResult<(String, i64)> {
        check_name(name).map_err(AppError::Invalid)?;
        if let Some(r) = region {
            check_label("region", r).map_err(AppError::Invalid)?;
        }
        let ttl = ttl_seconds.unwrap_or(3600);
        if !(60..=7 * 86_400).contains(&ttl) {
            return Err(AppError::Invalid(
                "ttlSeconds must be between 60 and 604800".into(),
            ));
        }
        if self.store.find_host(name).await.is_ok() {
            return Err(AppError::Conflict(format!("a host named {name:?} exists")));
        }
        let token = format!("hearth_join_{}", &hearth_store::generate_token()[7..]);
        let expires_at = self.now() + ttl * 1000;
        self.store
            .create_join_token(
                &hearth_store::hash_token(&token),
                name,
                region,
                actor,
                expires_at,
            )
            .await?;
        let _ = self
            .store
            .audit(actor, "join_token_create", None, "success", None, None)
            .await;
        Ok((token, expires_at))
    }

    /// An agent joins with a join token: it must answer on its endpoint with the certificate
    /// it sent; then it becomes a host, and gets the credential the control plane will
    /// present to it from now on (shown once; kept sealed here).
    pub async fn join_agent(
        &self,
        req: hearth_provider::agent::wire::JoinRequest,
    ) -> AppResult<(Host, String)> {
        let refused = || {
            AppError::Unauthenticated(
            "the join token is unknown, used or expired; ask an admin for a new one (`hearth admin hosts join-token NAME`)".into(),
        )
        };
        let token_hash = hearth_store::hash_token(&req.token);
        let token = self
            .store
            .join_token(&token_hash)
            .await?
            .ok_or_else(refused)?;
        if !req.endpoint.starts_with("https://")
            || req.endpoint.len() > 1000
            || req.endpoint.chars().any(char::is_whitespace)
        {
            return Err(AppError::Invalid(
                "endpoint must be https://host:port".into(),
            ));
        }
        check_address(&req.guest_address)?;
        if !req.certificate.contains("BEGIN CERTIFICATE") || req.certificate.len() > 16 * 1024 {
            return Err(AppError::Invalid(
                "certificate must be one PEM certificate".into(),
            ));
        }
        let c = &req.capacity;
        let capacity = capacity(c.max_vcpus, c.max_memory_mb, c.max_vms)?;
        let credential = format!("hearth_agent_{}", &hearth_store::generate_token()[7..]);
        let mut new = NewHost {
            id: uuid::Uuid::now_v7().to_string(),
            name: token.host_name.clone(),
            kind: HostKind::Agent,
            endpoint: req.endpoint.clone(),
            guest_address: req.guest_address.clone(),
            region: token.region.clone(),
            gpu_model: None,
            gpu_count: 0,
            capacity,
            tls_ca: Some(req.certificate.clone()),
            tls_cert: None,
            tls_key_sealed: None,
            credential_sealed: Some(self.master_key.seal(&credential)),
            options: serde_json::json!({}),
            identity: None,
        };
        // The agent must already accept this credential: it learns it from our answer, so
        // the check can only prove it answers on that endpoint with that certificate.
        self.check_agent_answers(&mut new).await?;
        let host = self
            .store
            .join_host(&token_hash, &new)
            .await
            .map_err(|e| match e {
                hearth_store::StoreError::NotFound => refused(),
                e => e.into(),
            })?;
        let _ = self
            .store
            .audit("system:join", "host_join", None, "success", None, None)
            .await;
        tracing::info!(host = %host.name, endpoint = %host.endpoint, version = %req.version, "an agent joined");
        Ok((host, credential))
    }

    /// Before an agent has its credential it answers only `/healthz`: that it does so over
    /// TLS with the certificate it presented is what joining proves.
    async fn check_agent_answers(&self, new: &mut NewHost) -> AppResult<()> {
        let ca = new.tls_ca.clone().unwrap_or_default();
        let answered = hearth_provider::agent::healthz(&new.endpoint, &ca).await;
        answered.map_err(|e| {
            AppError::Invalid(format!(
                "the agent does not answer on {} with its certificate: {e}; nothing was added",
                new.endpoint
            ))
        })?;
        new.identity = Some(format!(
            "agent:{}",
            hearth_provider::agent::fingerprint(&ca)
        ));
        Ok(())
    }

    pub async fn find_host(&self, id_or_name: &str) -> AppResult<Host> {
        self.store
            .find_host(id_or_name)
            .await
            .map_err(AppError::not_found("host"))
    }

    pub async fn set_host_status(
        &self,
        actor: &User,
        id_or_name: &str,
        status: HostStatus,
    ) -> AppResult<Host> {
        let host = self.find_host(id_or_name).await?;
        let host = self.store.set_host_status(&host.id, status).await?;
        let action = if status == HostStatus::Draining {
            "host_drain"
        } else {
            "host_ready"
        };
        let _ = self
            .store
            .audit(&actor.id, action, None, "success", None, None)
            .await;
        Ok(host)
    }

    /// Changes a host's capacity or options; `None` keeps what it has.
    pub async fn update_host(
        &self,
        actor: &User,
        id_or_name: &str,
        cap: (Option<i64>, Option<i64>, Option<i64>),
        new_options: Option<serde_json::Value>,
    ) -> AppResult<Host> {
        let host = self.find_host(id_or_name).await?;
        let capacity = capacity(
            cap.0.unwrap_or(host.capacity.max_vcpus),
            cap.1.unwrap_or(host.capacity.max_memory_mb),
            cap.2.unwrap_or(host.capacity.max_environments),
        )?;
        let options = match new_options {
            Some(o) => Some(options(host.kind, Some(o))?),
            None => None,
        };
        let host = self
            .store
            .update_host(
                &host.id,
                &HostUpdate {
                    capacity: Some(capacity),
                    options,
                },
            )
            .await?;
        let _ = self
            .store
            .audit(&actor.id, "host_update", None, "success", None, None)
            .await;
        Ok(host)
    }

    /// Removes a host that holds no environment.
    pub async fn remove_host(&self, actor: &User, id_or_name: &str) -> AppResult<Host> {
        let host = self.find_host(id_or_name).await?;
        let bought = self.store.count_bought_via(&host.id).await?;
        if bought > 0 {
            return Err(AppError::Conflict(format!(
                "{bought} agent hosts were bought through host {}; sell them first (`hearth admin hosts destroy NAME`), or their instances could no longer be deleted",
                host.name
            )));
        }
        let host = self.store.remove_host(&host.id).await?;
        let _ = self
            .store
            .audit(&actor.id, "host_remove", None, "success", None, None)
            .await;
        tracing::info!(host = %host.name, "host removed");
        Ok(host)
    }
}
