//! Confinement of the QEMU VMs' network on an agent's host.
//!
//! VMs use QEMU's user-mode network: every connection a guest opens is made by its QEMU
//! process, on the host. So QEMU runs as a user of its own (`hearth-vm`, made when missing,
//! via `-runas`), and the firewall matches that user (iptables chain `HEARTH-VMS`, jumped to
//! from `OUTPUT`): a VM may not open connections to any address of this host (the agent's
//! API, other VMs' forwarded SSH ports, any private service) nor to link-local addresses
//! (a cloud's metadata service); DNS to the host passes, so name resolution works. The
//! internet and other machines stay reachable, as from a Docker VM. VMs cannot address
//! each other directly either: each has its own network stack inside its QEMU.
//!
//! Needs root; without it the agent runs VMs unconfined and says so in its log.

use anyhow::{Context, Result, bail};
use std::io::Write;
use std::process::{Command, Stdio};

/// The user QEMU runs as.
pub const VM_USER: &str = "hearth-vm";
const CHAIN: &str = "HEARTH-VMS";

fn rules(uid: u32) -> String {
    let owner = format!("-m owner --uid-owner {uid}");
    let new = "-m conntrack --ctstate NEW";
    format!(
        "*filter\n:{CHAIN} - [0:0]\n\
         -A {CHAIN} {owner} -p udp --dport 53 -j RETURN\n\
         -A {CHAIN} {owner} -p tcp --dport 53 -j RETURN\n\
         -A {CHAIN} {owner} {new} -m addrtype --dst-type LOCAL -p tcp -j REJECT --reject-with tcp-reset\n\
         -A {CHAIN} {owner} {new} -m addrtype --dst-type LOCAL -j REJECT\n\
         -A {CHAIN} {owner} {new} -d 169.254.0.0/16 -j REJECT\n\
         COMMIT\n"
    )
}

fn uid_of(user: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == user)
            .then(|| f.nth(1)?.parse().ok())
            .flatten()
    })
}

/// Makes the VM user if missing and applies the firewall; returns the user to run QEMU as.
pub fn confine() -> Result<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the agent does not run as root");
    }
    if uid_of(VM_USER).is_none() {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                VM_USER,
            ])
            .output()
            .context("cannot run useradd")?;
        if !out.status.success() && uid_of(VM_USER).is_none() {
            bail!(
                "useradd {VM_USER} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let uid = uid_of(VM_USER).context("the VM user has no uid")?;
    restore(&rules(uid))?;
    jump("filter", "OUTPUT", CHAIN)?;
    Ok(VM_USER.to_string())
}

/// The network of the `firecracker` backend's tap devices (`hzfc<slot>`, a /30 each).
pub const TAP_PREFIX: &str = "hzfc";
pub const TAP_NETWORK: &str = "10.234.0.0/16";

/// Rules for VMs on tap devices: no new connection from a tap to any address of this host
/// or to link-local addresses, nothing between two taps, and NAT to the outside.
fn tap_rules() -> String {
    let tap = format!("{TAP_PREFIX}+");
    format!(
        "*filter\n:HEARTH-TAPS-IN - [0:0]\n:HEARTH-TAPS-FWD - [0:0]\n\
         -A HEARTH-TAPS-IN -i {tap} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN\n\
         -A HEARTH-TAPS-IN -i {tap} -j DROP\n\
         -A HEARTH-TAPS-FWD -i {tap} -o {tap} -j DROP\n\
         -A HEARTH-TAPS-FWD -i {tap} -d 169.254.0.0/16 -j DROP\n\
         COMMIT\n\
         *nat\n:HEARTH-TAPS-NAT - [0:0]\n\
         -A HEARTH-TAPS-NAT -s {TAP_NETWORK} ! -d {TAP_NETWORK} -j MASQUERADE\n\
         COMMIT\n"
    )
}

fn restore(rules: &str) -> Result<()> {
    let mut restore = Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run iptables-restore (apt-get install iptables)")?;
    restore
        .stdin
        .take()
        .expect("piped")
        .write_all(rules.as_bytes())?;
    let out = restore.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `iptables [-t table] -I chain 1 -j target` unless that jump is there.
fn jump(table: &str, chain: &str, target: &str) -> Result<()> {
    let present = Command::new("iptables")
        .args(["-w", "-t", table, "-C", chain, "-j", target])
        .status()
        .context("cannot run iptables")?
        .success();
    if !present {
        let out = Command::new("iptables")
            .args(["-w", "-t", table, "-I", chain, "1", "-j", target])
            .output()?;
        if !out.status.success() {
            bail!(
                "iptables -I {chain} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// Confines VMs on tap devices (the `firecracker` backend) and lets them out through NAT
/// (turns on IPv4 forwarding, as Docker does).
pub fn confine_taps() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the agent does not run as root: tap devices need it");
    }
    restore(&tap_rules())?;
    jump("filter", "INPUT", "HEARTH-TAPS-IN")?;
    jump("filter", "FORWARD", "HEARTH-TAPS-FWD")?;
    jump("nat", "POSTROUTING", "HEARTH-TAPS-NAT")?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("turn on IPv4 forwarding")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tap_rules_drop_what_comes_from_taps_unasked() {
        let r = super::tap_rules();
        assert!(
            r.contains("-A HEARTH-TAPS-IN -i hzfc+ -j DROP")
                && r.contains("-A HEARTH-TAPS-FWD -i hzfc+ -o hzfc+ -j DROP"),
            "{r}"
        );
        assert_eq!(r.matches("COMMIT").count(), 2);
    }

    #[test]
    fn the_rules_name_the_vm_user_and_only_new_connections() {
        let r = super::rules(997);
        assert!(r.starts_with("*filter\n:HEARTH-VMS - [0:0]\n") && r.ends_with("COMMIT\n"));
        let rejects: Vec<&str> = r.lines().filter(|l| l.contains("REJECT")).collect();
        assert_eq!(rejects.len(), 3);
        assert!(
            rejects
                .iter()
                .all(|l| l.contains("--uid-owner 997") && l.contains("--ctstate NEW")),
            "{r}"
        );
    }
}
