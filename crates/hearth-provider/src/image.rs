//! Builds the guest base image from Debian packages: `mmdebstrap` makes a root
//! filesystem, Hearth adds the `dev` user, key-only sshd and a small start-up script,
//! and `docker import` turns it into an image. No registry is needed.
//!
//! Every external program runs with an argument vector; nothing goes through a shell.

use std::path::Path;
use std::process::Command;

pub const DEFAULT_IMAGE: &str = "hearth/base:latest";
pub const SUITE: &str = "bookworm";
/// `tini` is for VMs: a custom image for agent hosts is built `FROM` this one, and a VM's
/// init runs sshd under it.
pub const PACKAGES: &str =
    "openssh-server,sudo,git,curl,ca-certificates,iproute2,procps,bash,less,python3,rsync,tini";

/// The guest's PID 1 child (under docker-init): host key, the authorized key, then sshd.
pub const INIT_SCRIPT: &str = r#"#!/bin/sh
# Hearth guest start-up: a host key, the dev user's authorized keys, then sshd.
# A new machine (its hostname, which Hearth sets per environment, is not the one recorded)
# gets a host key and authorized keys of its own and forgets a copied init script: a VM
# made from a snapshot of another must not share its identity. The same machine restarted
# keeps them (a warm VM's keys were replaced when an environment claimed it).
set -eu
mkdir -p /run/sshd /etc/hearth
if [ "$(cat /etc/hearth/identity 2>/dev/null || true)" != "$(hostname)" ]; then
  rm -f /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key.pub /home/dev/.ssh/authorized_keys
  rm -rf /home/dev/.hearth/init
  hostname > /etc/hearth/identity
fi
[ -f /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
install -d -m 700 -o dev -g dev /home/dev/.ssh
if [ ! -s /home/dev/.ssh/authorized_keys ]; then
  printf '%s\n' "${HEARTH_AUTHORIZED_KEYS:-}" > /home/dev/.ssh/authorized_keys
  chown dev:dev /home/dev/.ssh/authorized_keys
  chmod 600 /home/dev/.ssh/authorized_keys
fi
unset HEARTH_AUTHORIZED_KEYS
exec /usr/sbin/sshd -D -e
"#;

/// Keys only, no root login. `AcceptEnv *` lets Hearth hand a command its environment
/// variables as SSH `env` requests, as data rather than shell text.
pub const SSHD_CONFIG: &str = "\
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
PubkeyAuthentication yes
AcceptEnv *
UseDNS no
PrintMotd no
";

pub const SUDOERS: &str = "dev ALL=(ALL) NOPASSWD:ALL\n";

/// Identifies this recipe; an image carrying the same label needs no rebuild.
pub fn recipe_hash() -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for part in [SUITE, PACKAGES, INIT_SCRIPT, SSHD_CONFIG, SUDOERS] {
        for b in part.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{program} is not installed: {hint}")]
    Missing { program: String, hint: String },
    #[error("{0}")]
    Failed(String),
}

/// Runs a program (an argument vector, never a shell); its stderr's tail is the error.
pub fn run(cmd: &mut Command, what: &str) -> Result<String, ImageError> {
    let out = cmd.output().map_err(|e| {
        let program = cmd.get_program().to_string_lossy().to_string();
        if e.kind() == std::io::ErrorKind::NotFound {
            let hint = match program.as_str() {
                "mmdebstrap" => "apt-get install mmdebstrap",
                "docker" => "apt-get install docker.io",
                "mkfs.ext4" => "apt-get install e2fsprogs",
                "qemu-img" | "qemu-system-x86_64" => {
                    "apt-get install qemu-system-x86 qemu-utils (in one command)"
                }
                _ => "install it with apt-get",
            };
            ImageError::Missing {
                program,
                hint: hint.into(),
            }
        } else {
            ImageError::Failed(format!("{what}: could not run {program}: {e}"))
        }
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(ImageError::Failed(format!(
            "{what} failed ({}):\n{}",
            out.status,
            tail.join("\n")
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The recipe label of `tag` in the local engine, if the image exists.
pub fn existing_recipe(tag: &str) -> Option<String> {
    let out = Command::new("docker")
        .args([
            "image",
            "inspect",
            "--format",
            "{{index .Config.Labels \"hearth.recipe\"}}",
            tag,
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn is_current(tag: &str) -> bool {
    existing_recipe(tag).is_some_and(|r| r == recipe_hash())
}

fn write(root: &Path, rel: &str, contents: &str, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let path = root.join(rel);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| ImageError::Failed(format!("mkdir {}: {e}", dir.display())))?;
    }
    std::fs::write(&path, contents)
        .map_err(|e| ImageError::Failed(format!("write {}: {e}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| ImageError::Failed(format!("chmod {}: {e}", path.display())))
}

/// Builds `tag`, calling `step` with a short description before each stage.
/// Needs root (mmdebstrap and chroot) and a running Docker engine.
pub fn build(tag: &str, work: &Path, step: &mut dyn FnMut(&str)) -> Result<(), ImageError> {
    let root = work.join("rootfs");
    let tar = work.join("rootfs.tar");
    if root.exists() {
        std::fs::remove_dir_all(&root)
            .map_err(|e| ImageError::Failed(format!("clean {}: {e}", root.display())))?;
    }
    step("debootstrapping Debian with mmdebstrap (about 20 s)");
    run(
        Command::new("mmdebstrap")
            .args(["--variant=minbase", "--quiet"])
            .arg(format!("--include={PACKAGES}"))
            .arg(SUITE)
            .arg(&root),
        "mmdebstrap",
    )?;
    step("adding the dev user, sshd configuration and start-up script");
    run(
        Command::new("chroot").arg(&root).args([
            "useradd",
            "--create-home",
            "--shell",
            "/bin/bash",
            "dev",
        ]),
        "useradd",
    )?;
    // '*' means "no password" without marking the account locked, which sshd would refuse.
    run(
        Command::new("chroot")
            .arg(&root)
            .args(["usermod", "--password", "*", "dev"]),
        "usermod",
    )?;
    for entry in std::fs::read_dir(root.join("etc/ssh"))
        .map_err(|e| ImageError::Failed(format!("read etc/ssh: {e}")))?
    {
        let entry = entry.map_err(|e| ImageError::Failed(e.to_string()))?;
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            std::fs::remove_file(entry.path())
                .map_err(|e| ImageError::Failed(format!("remove host key: {e}")))?;
        }
    }
    write(&root, "usr/local/sbin/hearth-init", INIT_SCRIPT, 0o755)?;
    write(
        &root,
        "etc/ssh/sshd_config.d/hearth.conf",
        SSHD_CONFIG,
        0o644,
    )?;
    write(&root, "etc/sudoers.d/dev", SUDOERS, 0o440)?;
    step("packing the root filesystem");
    run(
        Command::new("tar")
            .arg("--numeric-owner")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
        "tar",
    )?;
    step("importing into Docker");
    run(
        Command::new("docker")
            .arg("import")
            .args(["--change", "CMD [\"/usr/local/sbin/hearth-init\"]"])
            .args(["--change", "EXPOSE 22"])
            .args([
                "--change",
                &format!("LABEL hearth.recipe={}", recipe_hash()),
            ])
            .arg(&tar)
            .arg(tag),
        "docker import",
    )?;
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_file(&tar);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn recipe_hash_is_stable_and_sensitive() {
        assert_eq!(super::recipe_hash(), super::recipe_hash());
        assert_eq!(super::recipe_hash().len(), 16);
    }
}
