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
        .write_all(rules(uid).as_bytes())?;
    let out = restore.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let jump = ["OUTPUT", "-j", CHAIN];
    let present = Command::new("iptables")
        .arg("-w")
        .arg("-C")
        .args(jump)
        .status()
        .context("cannot run iptables")?
        .success();
    if !present {
        let out = Command::new("iptables")
            .args(["-w", "-I", "OUTPUT", "1", "-j", CHAIN])
            .output()?;
        if !out.status.success() {
            bail!(
                "iptables -I OUTPUT failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(VM_USER.to_string())
}

#[cfg(test)]
mod tests {
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
