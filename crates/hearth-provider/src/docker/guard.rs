//! The host's firewall for VM traffic, on a machine whose Docker engine runs VMs.
//!
//! Docker already drops traffic between its bridges, so VMs cannot reach each other. What
//! it allows is a VM reaching the host itself (any service listening on the host's
//! addresses, through the VM's gateway) and link-local addresses such as a cloud's
//! metadata service. The guard closes both for every VM bridge (`hz+`):
//! - chain `HEARTH-GUESTS`, jumped to from `INPUT` for `-i hz+`: replies and DNS pass,
//!   every other new connection to the host is rejected;
//! - in `DOCKER-USER` (which Docker consults before its own forwarding rules): traffic
//!   from `hz+` to 169.254.0.0/16 is rejected, and traffic from one VM bridge to another is
//!   dropped. Docker's own isolation chains already do that; this holds even while Docker
//!   rewrites them (each VM is alone on its bridge, so nothing legitimate goes bridge to
//!   bridge).
//!
//! It runs `iptables` with arguments (never a shell), is idempotent, and needs root.
//! Remote engines need the same rules on their own machine: `guard_commands` prints them.

use super::network::BRIDGE_PREFIX;
use std::process::Command;

const CHAIN: &str = "HEARTH-GUESTS";

/// The rules, as argument lists for `iptables -w`, in the order they are applied.
fn rules() -> Vec<Vec<String>> {
    let bridges = format!("{BRIDGE_PREFIX}+");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    vec![
        s(&[
            "-A",
            CHAIN,
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "RETURN",
        ]),
        s(&["-A", CHAIN, "-p", "udp", "--dport", "53", "-j", "RETURN"]),
        s(&["-A", CHAIN, "-p", "tcp", "--dport", "53", "-j", "RETURN"]),
        s(&["-A", CHAIN, "-p", "icmp", "-j", "RETURN"]),
        s(&[
            "-A",
            CHAIN,
            "-p",
            "tcp",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]),
        s(&[
            "-A",
            CHAIN,
            "-j",
            "REJECT",
            "--reject-with",
            "icmp-port-unreachable",
        ]),
        s(&["INPUT", "-i", &bridges, "-j", CHAIN]),
        s(&[
            "DOCKER-USER",
            "-i",
            &bridges,
            "-d",
            "169.254.0.0/16",
            "-j",
            "REJECT",
        ]),
        s(&["DOCKER-USER", "-i", &bridges, "-o", &bridges, "-j", "DROP"]),
    ]
}

/// The shell commands an operator runs on a remote engine's machine (for documentation
/// and error messages; Hearth itself never runs a shell).
pub fn guard_commands() -> Vec<String> {
    let mut out = vec![format!(
        "iptables -w -N {CHAIN} 2>/dev/null; iptables -w -F {CHAIN}"
    )];
    for rule in rules() {
        if rule[0] == "-A" {
            out.push(format!("iptables -w {}", rule.join(" ")));
        } else {
            out.push(format!(
                "iptables -w -C {0} || iptables -w -I {0}",
                rule.join(" ")
            ));
        }
    }
    out
}

fn iptables(args: &[&str]) -> Result<std::process::Output, String> {
    Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run iptables: {e}"))
}

fn must(args: &[&str]) -> Result<(), String> {
    let out = iptables(args)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The chain as `iptables-restore --noflush` input: declaring the chain empties it and the
/// rules follow in the same transaction, so there is no moment without them.
fn chain_restore() -> String {
    let mut text = format!("*filter\n:{CHAIN} - [0:0]\n");
    for rule in rules().into_iter().filter(|r| r[0] == "-A") {
        text.push_str(&rule.join(" "));
        text.push('\n');
    }
    text.push_str("COMMIT\n");
    text
}

/// Applies the guard on this machine; the error says what failed and how to do it by hand.
pub fn guard_local_host() -> Result<(), String> {
    use std::io::Write;
    let mut restore = Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run iptables-restore: {e}"))?;
    restore
        .stdin
        .take()
        .expect("piped")
        .write_all(chain_restore().as_bytes())
        .map_err(|e| format!("cannot feed iptables-restore: {e}"))?;
    let out = restore
        .wait_with_output()
        .map_err(|e| format!("iptables-restore: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "iptables-restore failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // Docker makes DOCKER-USER when it starts; make it first if Docker has not yet.
    let _ = iptables(&["-N", "DOCKER-USER"]);
    for rule in rules().into_iter().filter(|r| r[0] != "-A") {
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        let mut check = vec!["-C"];
        check.extend(&rule);
        if !iptables(&check)?.status.success() {
            let mut insert = vec!["-I", rule[0], "1"];
            insert.extend(&rule[1..]);
            must(&insert)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_chain_is_replaced_in_one_transaction() {
        let text = super::chain_restore();
        assert!(
            text.starts_with("*filter\n:HEARTH-GUESTS - [0:0]\n"),
            "{text}"
        );
        assert!(text.ends_with("COMMIT\n"));
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("-A HEARTH-GUESTS"))
                .count(),
            6
        );
        assert!(
            !text.contains("INPUT"),
            "jumps are added one by one, after the chain exists"
        );
    }
}
