//! Hosts by demand: an optional policy per installation that buys agent hosts on OVH when
//! the agent hosts' free vCPUs fall below a threshold (or fewer than the minimum exist),
//! up to a maximum and within a budget of what all bought hosts cost an hour (OVH's
//! catalogue price of the flavor), and sells hosts it bought once they have been empty
//! for the idle time, never below the minimum.
//!
//! It runs in every node's upkeep pass, but only the node holding the `demand_lease` acts,
//! and it buys nothing while a host it bought has not joined yet, so two passes never buy
//! for the same shortfall. Every decision is audited (actor `system:demand`) with its
//! reason; a refusal is audited when its reason changes, not on every pass.

use crate::App;
use crate::error::{AppError, AppResult};
use hearth_core::{HostHealth, HostKind, HostStatus};
use hearth_store::User;
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

pub const DEMAND: &str = "system:demand";
const POLICY_KEY: &str = "demand_policy";
const LEASE_KEY: &str = "demand_lease";
const REFUSAL_KEY: &str = "demand_refusal";
/// A bought host that has not joined after this long no longer holds purchases back.
const JOIN_GRACE_MS: i64 = 30 * 60_000;

/// The policy, as admins set it (`PUT /v1/admin/demand-policy`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DemandPolicy {
    pub enabled: bool,
    /// The ovh host (project and region) hosts are bought through, by name or id.
    pub via: String,
    /// The OVH flavor bought hosts get.
    pub flavor: String,
    /// The URL bought hosts reach this control plane at.
    pub control_plane: String,
    /// Buy when the agent hosts' free vCPUs fall below this.
    pub free_vcpus_below: i64,
    /// Bought hosts kept at least (bought when fewer).
    pub min_hosts: i64,
    /// Bought hosts at most.
    pub max_hosts: i64,
    /// Sell a host it bought once it has held nothing for this long.
    pub idle_seconds: i64,
    /// The most all bought hosts together may cost an hour, in the catalogue's currency.
    pub max_hourly_cost: f64,
}

/// The hosts this process is selling now.
fn selling() -> &'static std::sync::Mutex<std::collections::HashSet<String>> {
    static SELLING: OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> = OnceLock::new();
    SELLING.get_or_init(Default::default)
}

/// This process, as a lease holder.
fn node() -> &'static str {
    static NODE: OnceLock<String> = OnceLock::new();
    NODE.get_or_init(|| uuid::Uuid::now_v7().to_string())
}

impl App {
    pub async fn demand_policy(&self) -> AppResult<Option<DemandPolicy>> {
        Ok(match self.store.setting(POLICY_KEY).await? {
            Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
                AppError::Internal(format!("the stored demand policy is unreadable: {e}"))
            })?),
            None => None,
        })
    }

    /// Checks and stores the policy; it takes effect at the next upkeep pass.
    pub async fn set_demand_policy(
        &self,
        admin: &User,
        p: DemandPolicy,
    ) -> AppResult<DemandPolicy> {
        let via = self
            .find_host(&p.via)
            .await
            .map_err(|_| AppError::Invalid(format!("via: there is no host {:?}", p.via)))?;
        if via.kind != HostKind::Ovh {
            return Err(AppError::Invalid(format!(
                "via must be an ovh host (hosts are bought through an OVH project and region); {} is {}",
                via.name, via.kind
            )));
        }
        hearth_core::host::check_label("flavor", &p.flavor).map_err(AppError::Invalid)?;
        crate::hosts::check_control_plane(&p.control_plane)?;
        for (name, v, max) in [
            ("freeVcpusBelow", p.free_vcpus_below, 100_000),
            ("minHosts", p.min_hosts, 100),
            ("maxHosts", p.max_hosts, 100),
            ("idleSeconds", p.idle_seconds, 30 * 86_400),
        ] {
            if !(0..=max).contains(&v) {
                return Err(AppError::Invalid(format!(
                    "{name} must be between 0 and {max}, got {v}"
                )));
            }
        }
        if p.min_hosts > p.max_hosts {
            return Err(AppError::Invalid("minHosts cannot exceed maxHosts".into()));
        }
        if !p.max_hourly_cost.is_finite() || p.max_hourly_cost < 0.0 {
            return Err(AppError::Invalid(
                "maxHourlyCost must be a number of 0 or more".into(),
            ));
        }
        let text = serde_json::to_string(&p).expect("serializable");
        self.store.set_setting(POLICY_KEY, &text).await?;
        self.store.set_setting(REFUSAL_KEY, "").await?;
        let _ = self
            .store
            .audit(&admin.id, "demand_policy_set", None, "success", None, None)
            .await;
        Ok(p)
    }

    /// One decision round (from the upkeep loop).
    pub async fn demand_pass(&self) -> anyhow::Result<()> {
        let Some(p) = self.demand_policy().await? else {
            return Ok(());
        };
        if !p.enabled {
            return Ok(());
        }
        let lease_ms = (self.config.reaper_interval.as_millis() as i64 * 3).max(10_000);
        if !self.store.take_lease(LEASE_KEY, node(), lease_ms).await? {
            return Ok(());
        }
        let now = self.now();
        let hosts = self.store.hosts().await?;
        let mut bought = self.store.bought_hosts().await?;
        // Empty since when: kept in the database, so any node can judge the idle time.
        for b in &mut bought {
            let Some(h) = hosts.iter().find(|h| h.name == b.host_name) else {
                continue;
            };
            let held = self.store.count_host_environments(&h.id).await?;
            let since = match (held, b.empty_since) {
                (0, None) => Some(now),
                (0, s) => s,
                _ => None,
            };
            if since != b.empty_since {
                self.store.set_empty_since(&b.host_name, since).await?;
                b.empty_since = since;
            }
        }
        let joined = |b: &hearth_store::BoughtHost| hosts.iter().any(|h| h.name == b.host_name);
        let pending = bought
            .iter()
            .filter(|b| !joined(b) && now - b.created_at < JOIN_GRACE_MS)
            .count();
        let free: i64 = hosts
            .iter()
            .filter(|h| {
                h.kind == HostKind::Agent
                    && h.status == HostStatus::Ready
                    && h.health == HostHealth::Healthy
            })
            .map(|h| (h.capacity.max_vcpus - h.used_vcpus).max(0))
            .sum();
        let count = bought.len() as i64;
        let short = if count < p.min_hosts {
            Some(format!(
                "{count} bought hosts, fewer than the minimum of {}",
                p.min_hosts
            ))
        } else if free < p.free_vcpus_below {
            Some(format!(
                "the agent hosts have {free} free vCPUs, fewer than {}",
                p.free_vcpus_below
            ))
        } else {
            None
        };
        if let (Some(why), 0) = (short, pending) {
            self.demand_buy(&p, &bought, &why).await?;
        }
        // What it bought and never joined (a wrong controlPlane, a failed boot) is sold: it
        // is billed and runs nothing.
        for b in bought
            .iter()
            .filter(|b| b.by_demand && !joined(b) && now - b.created_at >= JOIN_GRACE_MS)
        {
            self.sell_in_background(
                &b.host_name,
                format!("it never joined within {} min", JOIN_GRACE_MS / 60_000),
            );
        }
        // What it bought and has been empty long enough goes, down to the minimum, and only
        // while the free vCPUs left stay at the threshold (or a sale would call for a buy).
        // Hosts this node is selling are gone already, as far as the minimum goes.
        let selling = selling().lock().unwrap().clone();
        let mut left = bought
            .iter()
            .filter(|b| !selling.contains(&b.host_name))
            .count() as i64;
        let mut free_left = free;
        for b in bought
            .iter()
            .filter(|b| b.by_demand && !selling.contains(&b.host_name))
        {
            let (Some(since), Some(h)) =
                (b.empty_since, hosts.iter().find(|h| h.name == b.host_name))
            else {
                continue;
            };
            let its = (h.capacity.max_vcpus - h.used_vcpus).max(0);
            if left <= p.min_hosts
                || now - since < p.idle_seconds * 1000
                || free_left - its < p.free_vcpus_below
            {
                continue;
            }
            left -= 1;
            free_left -= its;
            self.sell_in_background(
                &b.host_name,
                format!(
                    "empty for {} s (idle time {} s)",
                    (now - since) / 1000,
                    p.idle_seconds
                ),
            );
        }
        Ok(())
    }

    /// Sells a host without holding up the upkeep pass (OVH takes its time to delete an
    /// instance); a host already being sold by this node is left to that sale.
    fn sell_in_background(&self, name: &str, why: String) {
        let selling = selling();
        if !selling.lock().unwrap().insert(name.to_string()) {
            return;
        }
        let (app, name) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            match app.sell_host(DEMAND, &name).await {
                Ok(()) => {
                    app.demand_audit("demand_sell", "success", &format!("sold {name}: {why}"))
                        .await
                }
                Err(e) => {
                    app.demand_audit(
                        "demand_sell",
                        "failure",
                        &format!("could not sell {name} ({why}): {e}"),
                    )
                    .await
                }
            }
            selling.lock().unwrap().remove(&name);
        });
    }

    async fn demand_buy(
        &self,
        p: &DemandPolicy,
        bought: &[hearth_store::BoughtHost],
        why: &str,
    ) -> anyhow::Result<()> {
        let count = bought.len() as i64;
        if count >= p.max_hosts {
            return self
                .demand_refuse(&format!(
                    "{why}, but {count} hosts are bought: the maximum is {}",
                    p.max_hosts
                ))
                .await;
        }
        let via = self.find_host(&p.via).await?;
        let price = self
            .ovh
            .hourly_price(&self.host_ref(&via)?, &p.flavor)
            .await?;
        // What every bought host costs, each at its own flavor's price.
        let mut total = price;
        for b in bought {
            let their_via = self.store.host(&b.via_host_id).await?;
            total += self
                .ovh
                .hourly_price(&self.host_ref(&their_via)?, &b.flavor)
                .await?;
        }
        if total > p.max_hourly_cost {
            return self
                .demand_refuse(&format!(
                    "{why}, but one more {} ({price:.4}/h) would make {total:.4}/h for all bought hosts, over the budget of {:.4}/h",
                    p.flavor, p.max_hourly_cost
                ))
                .await;
        }
        let name = format!(
            "demand-{}",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        match self
            .buy_host(
                DEMAND,
                &name,
                Some(&via.id),
                None,
                &p.flavor,
                &p.control_plane,
                true,
            )
            .await
        {
            Ok(b) => {
                self.store.set_setting(REFUSAL_KEY, "").await?;
                self.demand_audit(
                    "demand_buy",
                    "success",
                    &format!(
                        "bought {} ({}, {price:.4}/h, instance {}): {why}",
                        b.host_name, p.flavor, b.instance_id
                    ),
                )
                .await;
            }
            Err(e) => {
                self.demand_audit(
                    "demand_buy",
                    "failure",
                    &format!("{why}; buying failed: {e}"),
                )
                .await
            }
        }
        Ok(())
    }

    /// Audits a refusal when its reason differs from the last one's.
    async fn demand_refuse(&self, reason: &str) -> anyhow::Result<()> {
        if self.store.setting(REFUSAL_KEY).await?.as_deref() != Some(reason) {
            self.store.set_setting(REFUSAL_KEY, reason).await?;
            self.demand_audit("demand_buy", "refused", reason).await;
            tracing::warn!(reason, "the demand policy refused to buy a host");
        }
        Ok(())
    }

    async fn demand_audit(&self, action: &str, outcome: &str, reason: &str) {
        tracing::info!(action, outcome, reason, "demand policy");
        let _ = self
            .store
            .audit(DEMAND, action, None, outcome, Some(reason), None)
            .await;
    }
}
