//! A Docker host's `options`: how its containers are confined. Checked when a host is
//! added or changed, so a typo is an error then, not a failed create later.

use serde::Deserialize;

/// Processes one VM may hold when the host does not say (a fork bomb stops here).
pub const DEFAULT_PIDS_LIMIT: i64 = 4096;
/// Where each VM's own network comes from when the host does not say.
pub const DEFAULT_SUBNET_POOL: &str = "10.213.0.0/16";

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DockerOptions {
    /// The OCI runtime, as registered with the engine: `runsc` runs VMs under gVisor.
    #[serde(default)]
    pub runtime: Option<String>,
    /// Processes (and threads) one VM may hold.
    #[serde(default = "default_pids_limit")]
    pub pids_limit: i64,
    /// Sets `no-new-privileges`: setuid programs gain nothing, so `sudo` stops working.
    /// Off by default: a dev VM's user is expected to be root in it.
    #[serde(default)]
    pub no_new_privileges: bool,
    /// The IPv4 range (at most a /26) that each VM's own /29 network is carved from.
    #[serde(default = "default_subnet_pool")]
    pub subnet_pool: String,
}

fn default_pids_limit() -> i64 {
    DEFAULT_PIDS_LIMIT
}

fn default_subnet_pool() -> String {
    DEFAULT_SUBNET_POOL.into()
}

impl Default for DockerOptions {
    fn default() -> DockerOptions {
        DockerOptions {
            runtime: None,
            pids_limit: DEFAULT_PIDS_LIMIT,
            no_new_privileges: false,
            subnet_pool: DEFAULT_SUBNET_POOL.into(),
        }
    }
}

/// An IPv4 range: its first address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Range {
    pub base: u32,
    pub prefix: u8,
}

impl Ipv4Range {
    pub fn parse(text: &str) -> Option<Ipv4Range> {
        let (addr, prefix) = text.split_once('/')?;
        let addr: std::net::Ipv4Addr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
        let base = u32::from(addr) & Self::mask(prefix);
        Some(Ipv4Range { base, prefix })
    }

    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }

    pub fn size(&self) -> u64 {
        1u64 << (32 - self.prefix)
    }

    pub fn last(&self) -> u32 {
        self.base + (self.size() - 1) as u32
    }

    pub fn overlaps(&self, other: &Ipv4Range) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }

    /// The `index`-th block of `prefix` inside this range.
    pub fn block(&self, prefix: u8, index: u64) -> Ipv4Range {
        Ipv4Range {
            base: self.base + (index << (32 - prefix)) as u32,
            prefix,
        }
    }

    /// The address `offset` into the range.
    pub fn nth(&self, offset: u32) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::from(self.base + offset)
    }
}

impl std::fmt::Display for Ipv4Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", std::net::Ipv4Addr::from(self.base), self.prefix)
    }
}

impl DockerOptions {
    pub fn parse(options: &serde_json::Value) -> Result<DockerOptions, String> {
        if options.is_null() {
            return Ok(DockerOptions::default());
        }
        let o: DockerOptions = serde_json::from_value(options.clone())
            .map_err(|e| format!("options of a docker host are invalid: {e}"))?;
        if let Some(runtime) = &o.runtime {
            let well_formed = !runtime.is_empty()
                && runtime.len() <= 64
                && runtime
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !well_formed {
                return Err("options.runtime must be 1 to 64 letters, digits, '.', '_' or '-' (the name the engine knows it by)".into());
            }
        }
        if !(16..=1_000_000).contains(&o.pids_limit) {
            return Err("options.pidsLimit must be between 16 and 1000000".into());
        }
        let pool = o.pool()?;
        if pool.prefix > 26 {
            return Err(format!(
                "options.subnetPool {} is too small: it must hold several /29 networks (at most a /26)",
                o.subnet_pool
            ));
        }
        Ok(o)
    }

    pub fn pool(&self) -> Result<Ipv4Range, String> {
        Ipv4Range::parse(&self.subnet_pool).ok_or_else(|| {
            format!(
                "options.subnetPool must be an IPv4 range like 10.213.0.0/16, got {:?}",
                self.subnet_pool
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn options_default_and_refuse_nonsense() {
        assert_eq!(
            DockerOptions::parse(&json!({})).unwrap(),
            DockerOptions::default()
        );
        let o = DockerOptions::parse(
            &json!({"runtime": "runsc", "pidsLimit": 64, "noNewPrivileges": true}),
        )
        .unwrap();
        assert_eq!(
            (o.runtime.as_deref(), o.pids_limit, o.no_new_privileges),
            (Some("runsc"), 64, true)
        );
        for bad in [
            json!({"runtime": "runsc; rm -rf /"}),
            json!({"runtime": ""}),
            json!({"pidsLimit": 1}),
            json!({"subnetPool": "10.0.0.0/28"}),
            json!({"subnetPool": "nonsense"}),
            json!({"latencyMs": 5}),
        ] {
            assert!(DockerOptions::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges_overlap_and_split() {
        let pool = Ipv4Range::parse("10.213.0.0/16").unwrap();
        assert_eq!(pool.block(29, 1).to_string(), "10.213.0.8/29");
        assert_eq!(pool.block(29, 8191).to_string(), "10.213.255.248/29");
        let docker0 = Ipv4Range::parse("172.17.0.1/16").unwrap();
        assert_eq!(docker0.to_string(), "172.17.0.0/16");
        assert!(!pool.overlaps(&docker0));
        assert!(pool.overlaps(&Ipv4Range::parse("10.0.0.0/8").unwrap()));
        assert!(
            pool.block(29, 3)
                .overlaps(&Ipv4Range::parse("10.213.0.24/30").unwrap())
        );
        assert!(!pool.block(29, 3).overlaps(&pool.block(29, 4)));
    }
}
