//! Each VM has a bridge network of its own, so VMs cannot reach one another: Docker drops
//! traffic between its bridges. The network is named like the container, labelled like it,
//! and its /29 is carved from the host's `subnetPool` (Docker's default pools hold only
//! about 30 networks); its bridge device is `hz` and 12 characters of the environment id,
//! so a host firewall can match every VM's traffic with `-i hz+` (see `guard`).

use super::options::Ipv4Range;
use super::{classify, is_status};
use crate::{HostRef, LABEL_ENVIRONMENT, LABEL_INSTALLATION, LABEL_MANAGED, ProviderError};
use bollard::Docker;
use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::{InspectNetworkOptions, ListNetworksOptions};
use std::collections::HashMap;

/// Each VM's network: network address, gateway (the host), the VM, broadcast, and room.
const VM_PREFIX: u8 = 29;
/// Interface names of VM bridges start with this (for `iptables -i hz+`).
pub const BRIDGE_PREFIX: &str = "hz";

/// The bridge device of an environment's network: `hz` and the last 12 letters or digits
/// of its id (the random part of a UUIDv7), within Linux's 15-character limit.
pub fn bridge_name(environment_id: &str) -> String {
    let tail: Vec<char> = environment_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let tail: String = tail[tail.len().saturating_sub(12)..].iter().collect();
    format!("{BRIDGE_PREFIX}{tail}")
}

/// FNV-1a: where an environment starts looking for a free block, so concurrent creates
/// rarely try the same one.
fn spread(environment_id: &str) -> u64 {
    environment_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

async fn used_ranges(docker: &Docker, host: &HostRef) -> Result<Vec<Ipv4Range>, ProviderError> {
    let networks = docker
        .list_networks(None::<ListNetworksOptions>)
        .await
        .map_err(|e| classify(host, e))?;
    Ok(networks
        .iter()
        .filter_map(|n| n.ipam.as_ref()?.config.as_ref())
        .flatten()
        .filter_map(|c| Ipv4Range::parse(c.subnet.as_deref()?))
        .collect())
}

/// Ranges this machine already uses: routes in its main table as specific as a VM's /29
/// or more (`/proc/net/route`), and each of its IPv4 addresses. Docker checks a requested
/// subnet only against its own networks; a bridge another program (or an engine that died)
/// left on the machine with the same /29 takes the VM's traffic, and an address of the
/// machine inside the block is delivered to the machine: the VM's SSH never answers.
///
/// Only meaningful for an engine on this machine, and seen from this process's network
/// namespace (a control plane in a container sees its own). Policy-routing tables other
/// than main (a VPN's) are not read: give such hosts a `subnetPool` the VPN does not use.
fn used_here() -> Vec<Ipv4Range> {
    let mut used = match std::fs::read_to_string("/proc/net/route") {
        Ok(table) => specific_routes(&table),
        Err(e) => {
            tracing::warn!(error = %e, "could not read /proc/net/route; VM networks are checked only against the engine's own and this machine's addresses");
            Vec::new()
        }
    };
    match nix::ifaddrs::getifaddrs() {
        Ok(addresses) => used.extend(addresses.filter_map(|a| {
            let v4 = a.address?.as_sockaddr_in()?.ip();
            Some(Ipv4Range {
                base: u32::from(v4),
                prefix: 32,
            })
        })),
        Err(e) => {
            tracing::warn!(error = %e, "could not list this machine's addresses; VM networks are not checked against them")
        }
    }
    used
}

/// The destinations in a `/proc/net/route` table whose prefix is at least a VM's. A wider
/// route does not matter: the VM's /29 is more specific and wins.
fn specific_routes(table: &str) -> Vec<Ipv4Range> {
    // Addresses are printed as the native-endian value of network-order bytes.
    let address = |hex: &str| {
        u32::from_str_radix(hex, 16)
            .ok()
            .map(|raw| u32::from_be_bytes(raw.to_ne_bytes()))
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let destination = address(fields.get(1)?)?;
            let prefix = address(fields.get(7)?)?.count_ones() as u8;
            (prefix >= VM_PREFIX).then_some(Ipv4Range {
                base: destination,
                prefix,
            })
        })
        .collect()
}

/// Makes the environment's network, or finds the one an earlier attempt made.
pub async fn ensure(
    docker: &Docker,
    host: &HostRef,
    name: &str,
    environment_id: &str,
    extra_labels: &std::collections::BTreeMap<String, String>,
    pool: Ipv4Range,
) -> Result<(), ProviderError> {
    match docker
        .inspect_network(name, None::<InspectNetworkOptions>)
        .await
    {
        Ok(n) => {
            let labels = n.labels.unwrap_or_default();
            if labels.get(LABEL_INSTALLATION) == Some(&host.installation_id) {
                return Ok(());
            }
            return Err(ProviderError::Failed(format!(
                "a network named {name} exists on host {} but belongs to another installation; remove it",
                host.name
            )));
        }
        Err(e) if is_status(&e, 404) => {}
        Err(e) => return Err(classify(host, e)),
    }
    let blocks = pool.size() >> (32 - VM_PREFIX);
    let start = spread(environment_id) % blocks;
    let on_this_machine = host.endpoint.starts_with("unix://");
    let known = |mut used: Vec<Ipv4Range>| {
        if on_this_machine {
            used.extend(used_here());
        }
        used
    };
    let mut used = known(used_ranges(docker, host).await?);
    let mut tried = 0u64;
    while tried < blocks {
        let candidate = pool.block(VM_PREFIX, (start + tried) % blocks);
        tried += 1;
        if used.iter().any(|u| u.overlaps(&candidate)) {
            continue;
        }
        let mut labels: HashMap<String, String> = extra_labels.clone().into_iter().collect();
        labels.extend([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_INSTALLATION.to_string(), host.installation_id.clone()),
            (LABEL_ENVIRONMENT.to_string(), environment_id.to_string()),
        ]);
        let request = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            labels: Some(labels),
            ipam: Some(Ipam {
                driver: Some("default".into()),
                config: Some(vec![IpamConfig {
                    subnet: Some(candidate.to_string()),
                    gateway: Some(candidate.nth(1).to_string()),
                    ..Default::default()
                }]),
                options: None,
            }),
            options: Some(HashMap::from([(
                "com.docker.network.bridge.name".to_string(),
                bridge_name(environment_id),
            )])),
            ..Default::default()
        };
        match docker.create_network(request).await {
            Ok(_) => return Ok(()),
            // Another create took this block between the listing and ours: look again.
            Err(e) if e.to_string().contains("overlaps") => {
                used = known(used_ranges(docker, host).await?)
            }
            Err(e) => return Err(classify(host, e)),
        }
    }
    Err(ProviderError::Failed(format!(
        "host {} has no free /{VM_PREFIX} left in its subnet pool {pool}; give it a larger options.subnetPool",
        host.name
    )))
}

/// Removes the environment's network if it is this installation's; gone counts as removed.
pub async fn remove(docker: &Docker, host: &HostRef, name: &str) -> Result<(), ProviderError> {
    match docker
        .inspect_network(name, None::<InspectNetworkOptions>)
        .await
    {
        Ok(n)
            if n.labels.as_ref().and_then(|l| l.get(LABEL_INSTALLATION))
                == Some(&host.installation_id) => {}
        Ok(_) => return Ok(()),
        Err(e) if is_status(&e, 404) => return Ok(()),
        Err(e) => return Err(classify(host, e)),
    }
    match docker.remove_network(name).await {
        Ok(()) => Ok(()),
        Err(e) if is_status(&e, 404) => Ok(()),
        Err(e) => Err(classify(host, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names_fit_linux_and_match_the_firewall() {
        let name = bridge_name("0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(name, "hz0c1d2e3f4a5b");
        assert!(name.len() <= 15);
    }

    // The table's hex is this machine's byte order: the literals are little-endian's.
    #[cfg(target_endian = "little")]
    #[test]
    fn routes_as_specific_as_a_vm_network_are_taken() {
        // Read from this machine: a default route, docker0's /16, a stale VM bridge's /29,
        // a host route.
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
            hz3f33b3db0e7f\tF829D60A\t00000000\t0001\t0\t0\t0\tF8FFFFFF\t0\t0\t0\n\
            tun0\t0500000A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        let taken: Vec<String> = specific_routes(table)
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(taken, ["10.214.41.248/29", "10.0.0.5/32"]);
    }

    #[test]
    fn this_machines_addresses_are_taken() {
        let used = used_here();
        let loopback = Ipv4Range::parse("127.0.0.1/32").unwrap();
        assert!(used.contains(&loopback), "{used:?}");
    }
}
