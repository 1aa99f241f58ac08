//! Hosts: the machines (or cloud projects) VMs run on, the unit the control plane
//! places on and reconciles. What a host is made of, and the rules for its names.

use serde::{Deserialize, Serialize};

/// Which provider drives a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum HostKind {
    /// A Docker engine, local or remote (`unix://`, `tcp://` with TLS, `ssh://`).
    Docker,
    /// A machine running `hearth agent` (QEMU, Firecracker).
    Agent,
    /// An OVH Public Cloud project and region.
    Ovh,
    /// Simulated: makes no VMs; latency and failures are injected per step. For tests
    /// and load measurements.
    Sim,
}

impl HostKind {
    pub const ALL: [HostKind; 4] = [
        HostKind::Docker,
        HostKind::Agent,
        HostKind::Ovh,
        HostKind::Sim,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HostKind::Docker => "docker",
            HostKind::Agent => "agent",
            HostKind::Ovh => "ovh",
            HostKind::Sim => "sim",
        }
    }

    pub fn parse(s: &str) -> Option<HostKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for HostKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The operator's intent for a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum HostStatus {
    /// Takes new environments.
    Ready,
    /// Keeps what it runs, takes nothing new.
    Draining,
}

impl HostStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Ready => "ready",
            HostStatus::Draining => "draining",
        }
    }

    pub fn parse(s: &str) -> Option<HostStatus> {
        [HostStatus::Ready, HostStatus::Draining]
            .into_iter()
            .find(|h| h.as_str() == s)
    }
}

/// What the last checks of a host found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum HostHealth {
    Healthy,
    /// Not answering for longer than the stated time: placement skips it and the
    /// reconciler does not judge its VMs.
    Unhealthy,
}

impl HostHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            HostHealth::Healthy => "healthy",
            HostHealth::Unhealthy => "unhealthy",
        }
    }

    pub fn parse(s: &str) -> Option<HostHealth> {
        [HostHealth::Healthy, HostHealth::Unhealthy]
            .into_iter()
            .find(|h| h.as_str() == s)
    }
}

/// A host name: 1 to 100 of `[A-Za-z0-9._@:/-]`, so it reads well in logs and URLs.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=100).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@:/-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "host name {name:?} must be 1 to 100 of A-Z a-z 0-9 . _ @ : / -"
        ))
    }
}

/// A region or GPU model: 1 to 64 of `[A-Za-z0-9._-]` (OVH's `GRA9`, `nvidia-a100`).
pub fn check_label(what: &str, value: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {value:?} must be 1 to 64 of A-Z a-z 0-9 . _ -"
        ))
    }
}

/// GPUs one environment may ask for.
pub const MAX_GPUS: i64 = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        for k in HostKind::ALL {
            assert_eq!(HostKind::parse(k.as_str()), Some(k));
        }
        assert!(check_name("docker@node-1/default").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_label("region", "GRA9").is_ok());
        assert!(check_label("region", "gra;rm").is_err());
        assert_eq!(HostStatus::parse("draining"), Some(HostStatus::Draining));
        assert_eq!(HostHealth::parse("healthy"), Some(HostHealth::Healthy));
    }
}
