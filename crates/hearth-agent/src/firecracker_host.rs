//! The `firecracker` backend: one Firecracker process per VM (or the jailer running it,
//! when configured), configured and started through its API (`firecracker.rs`).
//!
//! - Kernel: Firecracker on x86_64 boots an uncompressed ELF kernel, so the image's
//!   `vmlinuz` is unpacked once into `<state>/vmlinux-<kernel version>` (`vmlinux`).
//! - Disk: Firecracker takes raw disks only: a copy of the image's `rootfs.ext4` (a reflink
//!   where the file system has them, else a sparse copy) grown to the VM's size; the guest
//!   grows its file system to it at boot and cannot exceed it. A user's snapshot is a
//!   sparse copy of it, paused meanwhile (`snapshots.rs`); a VM made from one copies it.
//! - Network: a tap device per VM (`hzfc<slot>`, a /30 out of 10.234.0.0/16: the host is
//!   `.1`, the guest `.2`, told to it by the config drive), confined by `guard::confine_taps`
//!   (no new connection to this host or between VMs, NAT to the outside). The guest's SSH is
//!   reached through a TCP forwarder in the agent on `<guest address>:<ssh port>` (at most
//!   `MAX_FORWARDED` connections per VM), started with the VM and again when an agent adopts
//!   it; while the agent is down, running VMs keep running but their SSH port does not answer.
//! - Stop is `SendCtrlAltDel` (the guest reboots, Firecracker exits), and a kill after
//!   `STOP_GRACE`. Pause and resume are `PATCH /vm`.
//! - Memory: a user's snapshot of a running VM whose guest answers on vsock
//!   (`image::AWAIT_RESTORE`) keeps `vmstate` and `memory` (`PUT /snapshot/create`) with
//!   its disk. A VM of the same size made from it is a fresh process that loads them
//!   (`PUT /snapshot/load`, on its own tap device and vsock socket; the drives' paths are
//!   relative to its own directory, so they are its own files), then is told its identity
//!   and its address over vsock. A VM still marked `restoring` when an agent starts was cut
//!   short before it took its identity: it is stopped, and boots from its disk when started.
//! - Base snapshots (`with_base_snapshots`): the first VM of a size (vCPUs, memory, disk) on
//!   the host's image boots with a neutral identity (no key, a host key of its own making:
//!   `config-base.ext4`), is saved once its guest says `ready` (sshd runs) into
//!   `<state>/fc-base-snapshots/<key>` (memory and disk, as users' snapshots are), and then
//!   takes its own identity over vsock (its config drive switched to its own with
//!   `PATCH /drives/config`). Later VMs of that size copy the saved disk and load the saved
//!   memory. A base snapshot that fails to restore is removed, and its key is not built
//!   again until the agent restarts; at most `MAX_BASE_SNAPSHOTS` are kept, and those of
//!   another Firecracker or image are removed when the agent starts.
//!
//! What is not proven here: there is no Firecracker binary and no working KVM on these
//! machines, so this backend is tested with a fake Firecracker process that serves the API
//! and checks every request against the published spec (`tests/firecracker.rs`). That tests
//! the process handling, the records, adoption, the tap devices and the forwarder, but not
//! that a real Firecracker boots this kernel and image, that the guest's network comes up on
//! the tap, or the jailer's chroot handling (its command line is unit-tested).

use crate::firecracker::{self, BootSpec, FcClient};
use crate::guard::{TAP_PREFIX, VM_USER};
use crate::image::VmImage;
use crate::snapshots::{
    MEMORY_FILE, Pausable, SavedMemory, Snapshot, Snapshots, VmLocks, paused_by_snapshot,
};
use crate::vmm::{
    Accel, VmDirs, VmRecord, VmSpec, VmStatus, Vmm, VmmError, check_sizes, fail, free_port,
    identity_files, now_ms, process_has_argument, run,
};
use async_trait::async_trait;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a guest may take to reboot (and Firecracker to exit) after `SendCtrlAltDel`.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a new Firecracker process may take to open its API socket.
const SOCKET_WAIT: Duration = Duration::from_secs(5);
/// Connections forwarded to one VM's SSH at once.
const MAX_FORWARDED: usize = 64;
/// Tap slots: a /30 each in 10.234.0.0/16.
const SLOTS: u16 = 16384;
/// Firecracker's device state, kept beside a snapshot's `memory`.
const VMSTATE_FILE: &str = "vmstate";
/// In a VM's directory while it is restored from a snapshot's memory, or boots as a base
/// VM, and has not taken its identity yet.
const RESTORING: &str = "restoring";
/// The config drive a base VM boots with (no key, no host key: nothing of anyone's).
const BASE_CONFIG: &str = "config-base.ext4";
/// Base snapshots kept per host.
const MAX_BASE_SNAPSHOTS: usize = 8;
/// How long a base VM may take to boot until its guest says `ready`.
const BASE_BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// How a new VM starts.
enum Start {
    /// Its kernel boots.
    Boot,
    /// It loads saved memory from this snapshot directory (a user's or a base snapshot,
    /// the latter's key given) and is told its identity.
    Restore(PathBuf, Option<String>),
    /// It boots as the base VM of this key, is saved, then takes its identity.
    BuildBase(String),
}

/// How Firecracker is run.
#[derive(Debug, Clone)]
pub struct FirecrackerConfig {
    /// The `firecracker` binary.
    pub firecracker: PathBuf,
    /// The `jailer` binary: when set, each VM runs in its chroot as `VM_USER`.
    pub jailer: Option<PathBuf>,
    /// The jailer's `--chroot-base-dir`.
    pub chroot_base: PathBuf,
}

pub struct FirecrackerHost {
    dirs: VmDirs,
    state: PathBuf,
    image: VmImage,
    config: FirecrackerConfig,
    guest_address: String,
    /// Serializes creates and removals on this host (they race on slots and names).
    lock: tokio::sync::Mutex<()>,
    /// One change to a VM at a time: a snapshot holds its VM's while it copies.
    vm_locks: VmLocks,
    /// Users' snapshots of VM disks: whole sparse copies, so a VM made from one does not
    /// depend on it.
    snapshots: Arc<Snapshots>,
    /// Custom images (`images.rs`); a VM made from one has a copy of it too.
    images: Arc<Snapshots>,
    /// The SSH forwarder of each VM this agent serves.
    forwarders: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// What a VM's saved memory depends on here: the Firecracker binary and the image.
    fingerprint: String,
    /// Base snapshots, when enabled (`with_base_snapshots`).
    base: Option<Arc<Snapshots>>,
    /// Base snapshot keys that failed to build or restore since this agent started.
    base_failed: Mutex<std::collections::HashSet<String>>,
}

/// A hash of the Firecracker binary and the image's files as built (size and modification
/// time: a rebuild or an upgrade makes saved memory unusable) and the kernel's version.
fn fingerprint(config: &FirecrackerConfig, image: &VmImage) -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    crate::base_snapshot::hash_files(
        &mut hash,
        &[
            config.firecracker.clone(),
            image.kernel(),
            image.initrd(),
            image.rootfs(),
        ],
    );
    hash.update(image.kernel_version.as_bytes());
    hex::encode(&hash.finalize()[..6])
}

/// Connects to the guest's identity listener through Firecracker's vsock socket `uds` (its
/// host-initiated handshake: `CONNECT <port>`, answered `OK <host port>`), waiting up to
/// `within` for the socket and the guest.
async fn connect_vsock(
    uds: &Path,
    within: Duration,
) -> Result<tokio::io::BufReader<tokio::net::UnixStream>, VmmError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let started = Instant::now();
    loop {
        let attempt = async {
            let stream = tokio::net::UnixStream::connect(uds).await?;
            let mut port = tokio::io::BufReader::new(stream);
            port.get_mut()
                .write_all(format!("CONNECT {}\n", crate::image::IDENTITY_VSOCK_PORT).as_bytes())
                .await?;
            let mut line = String::new();
            port.read_line(&mut line).await?;
            if line.starts_with("OK ") {
                Ok(port)
            } else {
                Err(std::io::Error::other(format!(
                    "the guest did not take the connection ({:?})",
                    line.trim()
                )))
            }
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(port)) => return Ok(port),
            Ok(Err(e)) if started.elapsed() > within => {
                return Err(VmmError::Failed(format!(
                    "cannot reach the guest over vsock ({}): {e}",
                    uds.display()
                )));
            }
            Err(_) if started.elapsed() > within => {
                return Err(VmmError::Failed(format!(
                    "the guest did not answer over vsock ({})",
                    uds.display()
                )));
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Whether the guest behind `uds` answers `ping` on its identity listener.
async fn guest_listens(uds: &Path) -> bool {
    crate::base_snapshot::answers_ping(async {
        connect_vsock(uds, Duration::ZERO)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
    })
    .await
}

/// The host's and the guest's address on the tap of `slot`.
fn tap_addresses(slot: u16) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(Ipv4Addr::new(10, 234, 0, 0)) + u32::from(slot) * 4;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

fn tap_name(slot: u16) -> String {
    format!("{TAP_PREFIX}{slot}")
}

/// The uncompressed kernel inside a bzImage: the setup header says where the payload is,
/// its first bytes which compressor made it.
pub fn vmlinux(bzimage: &Path, out: &Path) -> Result<(), VmmError> {
    let data = std::fs::read(bzimage).map_err(fail("read the kernel"))?;
    let header = |at: usize| {
        data.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let setup_sectors = match data.get(0x1f1) {
        Some(0) => 4,
        Some(n) => *n as usize,
        None => return Err(VmmError::Failed("the kernel is not a bzImage".into())),
    };
    let (Some(offset), Some(length)) = (header(0x248), header(0x24c)) else {
        return Err(VmmError::Failed("the kernel is not a bzImage".into()));
    };
    let start = (setup_sectors + 1) * 512 + offset;
    let payload = data
        .get(start..start + length)
        .ok_or_else(|| VmmError::Failed("the kernel's payload is out of bounds".into()))?;
    let tool: &[&str] = match payload {
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        [0xfd, b'7', b'z', b'X', b'Z', ..] => &["xz", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dc"],
        [0x02, 0x21, 0x4c, 0x18, ..] => &["lz4", "-dc"],
        _ => {
            return Err(VmmError::Failed(
                "the kernel's compression is not one of gzip, xz, zstd, lz4".into(),
            ));
        }
    };
    let tmp = out.with_extension("tmp");
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&tmp).map_err(fail("write vmlinux"))?)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            VmmError::Failed(format!(
                "cannot run {} ({e}): apt-get install {}",
                tool[0], tool[0]
            ))
        })?;
    // The decompressor stops at the end of its stream; trailing bytes are the size field.
    let _ = std::io::Write::write_all(&mut child.stdin.take().expect("piped"), payload);
    let _ = child.wait();
    let head = std::fs::read(&tmp)
        .ok()
        .and_then(|b| b.get(..4).map(<[u8]>::to_vec));
    if head.as_deref() != Some(b"\x7fELF") {
        let _ = std::fs::remove_file(&tmp);
        return Err(VmmError::Failed(format!(
            "unpacking the kernel with {} gave no ELF file",
            tool[0]
        )));
    }
    std::fs::rename(&tmp, out).map_err(fail("write vmlinux"))
}

/// The command that runs Firecracker for VM `name` in `dir`: Firecracker itself, or the
/// jailer (which chroots into `<chroot base>/firecracker/<name>/root` and drops to `uid`).
pub fn command_line(
    config: &FirecrackerConfig,
    name: &str,
    dir: &Path,
    ids: Option<(u32, u32)>,
) -> Vec<String> {
    let firecracker = config.firecracker.display().to_string();
    match (&config.jailer, ids) {
        (Some(jailer), Some((uid, gid))) => vec![
            jailer.display().to_string(),
            "--id".into(),
            name.into(),
            "--exec-file".into(),
            firecracker,
            "--uid".into(),
            uid.to_string(),
            "--gid".into(),
            gid.to_string(),
            "--chroot-base-dir".into(),
            config.chroot_base.display().to_string(),
            "--".into(),
            "--api-sock".into(),
            "/fc.sock".into(),
        ],
        _ => vec![
            firecracker,
            "--api-sock".into(),
            dir.join("fc.sock").display().to_string(),
            "--id".into(),
            name.into(),
        ],
    }
}

fn ids_of(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user) && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

/// A nameserver a guest on a tap can use: the host's first one that is not on loopback.
fn nameserver() -> String {
    std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|t| {
            t.lines()
                .filter_map(|l| l.strip_prefix("nameserver "))
                .map(str::trim)
                .find(|a| a.parse::<Ipv4Addr>().is_ok_and(|ip| !ip.is_loopback()))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "1.1.1.1".into())
}

/// Copies a raw disk: a reflink where the file system has them, else sparse.
fn copy_disk(from: &Path, to: &Path) -> Result<(), VmmError> {
    run(
        Command::new("cp")
            .arg("--reflink=auto")
            .arg("--sparse=always")
            .arg(from)
            .arg(to),
        "copy the disk",
    )
}

fn ip(args: &[&str]) -> Result<(), VmmError> {
    run(
        Command::new("ip").args(args),
        &format!("ip {}", args.join(" ")),
    )
}

impl FirecrackerHost {
    pub fn new(
        state: PathBuf,
        image: VmImage,
        config: FirecrackerConfig,
        guest_address: &str,
    ) -> Result<FirecrackerHost, VmmError> {
        let snapshots = Snapshots::open(&state, "disk.ext4")?;
        let images = Snapshots::open_images(&state, &snapshots)?;
        let saved_with = fingerprint(&config, &image);
        Ok(FirecrackerHost {
            // A create that died half-way started nothing: Firecracker is started from a
            // committed directory only.
            dirs: VmDirs::new(&state, |_| {})?,
            snapshots: Arc::new(snapshots),
            images: Arc::new(images),
            state,
            image,
            config,
            guest_address: guest_address.to_string(),
            lock: tokio::sync::Mutex::new(()),
            vm_locks: VmLocks::default(),
            forwarders: Mutex::new(HashMap::new()),
            fingerprint: saved_with,
            base: None,
            base_failed: Mutex::default(),
        })
    }

    /// New VMs of the host's image start from a base snapshot of their size, the first of
    /// each size making it (see the module's comment). Base snapshots of another Firecracker
    /// or image are removed.
    pub fn with_base_snapshots(mut self) -> Result<FirecrackerHost, VmmError> {
        let base = Snapshots::open_base(&self.state, &self.snapshots)?;
        for kept in base.list()? {
            if !kept.id.ends_with(&format!("-{}", self.fingerprint)) {
                base.remove(&kept.id, &Default::default())?;
                tracing::info!(snapshot = %kept.id, "removed a base snapshot of another Firecracker or image");
            }
        }
        self.base = Some(Arc::new(base));
        Ok(self)
    }

    /// The base snapshot key of `spec`'s sizes on this host.
    fn base_key(&self, spec: &VmSpec) -> String {
        format!(
            "{}c{}m{}g-{}",
            spec.vcpus, spec.memory_mb, spec.disk_gb, self.fingerprint
        )
    }

    /// How a new VM of `spec` starts, and the disk its own is a copy of.
    fn start_of(&self, spec: &VmSpec) -> Result<(Start, PathBuf), VmmError> {
        if let Some(id) = &spec.snapshot {
            let disk = self.snapshots.disk(id, spec.disk_gb)?;
            return Ok(match self.saved_memory(id, spec)? {
                Some(dir) => (Start::Restore(dir, None), disk),
                None => (Start::Boot, disk),
            });
        }
        if let Some(id) = &spec.image {
            return Ok((Start::Boot, self.images.disk(id, spec.disk_gb)?));
        }
        let rootfs = self.image.rootfs();
        let Some(base) = &self.base else {
            return Ok((Start::Boot, rootfs));
        };
        let key = self.base_key(spec);
        if let Some(found) = base.find(&key)? {
            let dir = base.disk(&found.id, spec.disk_gb)?;
            let dir = dir.parent().map(Path::to_path_buf).unwrap_or_default();
            return Ok((
                Start::Restore(dir.clone(), Some(key)),
                dir.join("disk.ext4"),
            ));
        }
        let failed = self
            .base_failed
            .lock()
            .expect("not poisoned")
            .contains(&key);
        if failed || base.list()?.len() >= MAX_BASE_SNAPSHOTS {
            return Ok((Start::Boot, rootfs));
        }
        Ok((Start::BuildBase(key), rootfs))
    }

    /// Boots VM `record` as the base VM of `key` (its config drive `BASE_CONFIG`), saves it
    /// once its guest is ready, then has it take its own identity (`identity`, its own
    /// config drive's). On an error the caller stops it and boots it as itself.
    async fn build_base(
        &self,
        record: &VmRecord,
        key: &str,
        identity: &[(&str, String)],
    ) -> Result<(), VmmError> {
        let name = &record.spec.name;
        let dir = self.dirs.dir(name)?;
        let base = self
            .base
            .clone()
            .ok_or_else(|| VmmError::Failed("base snapshots are off".into()))?;
        let started = Instant::now();
        std::fs::write(dir.join(RESTORING), b"").map_err(fail("mark the VM restoring"))?;
        self.launch_with(record, BASE_CONFIG).await?;
        let (uds, _) = self.vsock(name)?;
        let mut port = connect_vsock(&uds, BASE_BOOT_TIMEOUT).await?;
        let said =
            crate::base_snapshot::read_line(&mut port, BASE_BOOT_TIMEOUT, "the base VM to boot")
                .await?;
        if said != "ready" {
            return Err(VmmError::Failed(format!(
                "the base VM said {said:?} instead of ready"
            )));
        }
        drop(port);
        let boot_ms = started.elapsed().as_millis() as u64;
        let lock = self.vm_locks.lock(name).await;
        let saved = self
            .save(record, base, key, lock, Some(self.client(name)?), true)
            .await?;
        if saved.memory_bytes == 0 {
            if let Some(base) = &self.base {
                let _ = base.remove(key, &Default::default());
            }
            return Err(VmmError::Failed(
                "the base VM's memory was not saved".into(),
            ));
        }
        // Now this VM's own: its config drive, then its identity.
        firecracker::set_drive(
            &self.client(name)?,
            "config",
            &self.path_for_firecracker(name, &dir.join("config.ext4"))?,
        )
        .await
        .map_err(|e| VmmError::Failed(e.to_string()))?;
        self.tell_identity(name, identity).await?;
        let _ = std::fs::remove_file(dir.join(BASE_CONFIG));
        tracing::info!(
            vm = %name,
            snapshot = %key,
            boot_ms,
            memory_bytes = saved.memory_bytes,
            ms = started.elapsed().as_millis() as u64,
            "base snapshot ready (made from this VM's first boot): VMs of this size now restore it"
        );
        Ok(())
    }

    /// Saves VM `record`'s disk (and its memory, when `with_memory` and it runs) into
    /// `into` as `id`, paused meanwhile: a user's snapshot, or a base snapshot.
    async fn save(
        &self,
        record: &VmRecord,
        into: Arc<Snapshots>,
        id: &str,
        lock: tokio::sync::OwnedMutexGuard<()>,
        client: Option<FcClient>,
        with_memory: bool,
    ) -> Result<Snapshot, VmmError> {
        let name = &record.spec.name;
        let dir = self.dirs.dir(name)?;
        let disk = dir.join("disk.ext4");
        let with_memory = with_memory && client.is_some();
        let (writes_in, prefix) = self.writes_in(name)?;
        // A sparse copy takes what the disk takes, and the memory at most the guest's.
        let copy_bytes = crate::snapshots::allocated_bytes(&disk)?
            + if with_memory {
                record.spec.memory_mb as u64 * (1 << 20)
            } else {
                0
            };
        let vm = FcPause {
            client,
            memory: with_memory.then(|| SavedMemory {
                kernel_args: String::new(),
                vcpus: record.spec.vcpus,
                memory_mb: record.spec.memory_mb,
                fingerprint: self.fingerprint.clone(),
            }),
            writes_in,
            prefix,
        };
        crate::snapshots::take(
            into,
            id,
            crate::snapshots::VmDisk {
                vm_dir: dir,
                disk_gb: record.spec.disk_gb,
                copy_bytes,
            },
            lock,
            vm,
            move |to| copy_disk(&disk, to),
        )
        .await
    }

    /// Tells VM `name`'s guest, over vsock, its `identity` (its config drive's files) and
    /// its MAC, then clears its `restoring` mark.
    async fn tell_identity(&self, name: &str, identity: &[(&str, String)]) -> Result<(), VmmError> {
        let mut port = connect_vsock(&self.vsock(name)?.0, Duration::from_secs(10)).await?;
        let mut told: Vec<(&str, String)> = identity.to_vec();
        told.push(("mac", format!("{}\n", firecracker::guest_mac(name))));
        crate::base_snapshot::identify(&mut port, &told).await?;
        std::fs::remove_file(self.dirs.dir(name)?.join(RESTORING))
            .map_err(fail("mark the VM identified"))
    }

    /// The root of VM `name`'s chroot, under the jailer.
    fn chroot_root(&self, name: &str) -> PathBuf {
        self.config
            .chroot_base
            .join("firecracker")
            .join(name)
            .join("root")
    }

    /// Where Firecracker writes the files it saves for VM `name` (its directory or its
    /// chroot), and the prefix it is given for them.
    fn writes_in(&self, name: &str) -> Result<(PathBuf, &'static str), VmmError> {
        Ok(match &self.config.jailer {
            Some(_) => (self.chroot_root(name), "/"),
            None => (self.dirs.dir(name)?, ""),
        })
    }

    /// The ELF kernel, unpacked once per kernel version.
    fn kernel(&self) -> Result<PathBuf, VmmError> {
        let path = self
            .state
            .join(format!("vmlinux-{}", self.image.kernel_version));
        if !path.is_file() {
            vmlinux(&self.image.kernel(), &path)?;
        }
        Ok(path)
    }

    fn pid(&self, name: &str) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.dirs.dir(name).ok()?.join("fc.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        process_has_argument(pid, name).then_some(pid)
    }

    fn client(&self, name: &str) -> Result<FcClient, VmmError> {
        let dir = self.dirs.dir(name)?;
        let socket = match &self.config.jailer {
            Some(_) => self.chroot_root(name).join("fc.sock"),
            None => dir.join("fc.sock"),
        };
        Ok(FcClient::new(&socket))
    }

    /// The lowest tap slot no VM here holds.
    fn free_slot(&self) -> Result<u16, VmmError> {
        let mut taken = std::collections::HashSet::new();
        for name in self.dirs.names()? {
            if let Some(slot) = self.dirs.record(&name)?.and_then(|r| r.net_slot) {
                taken.insert(slot);
            }
        }
        (0..SLOTS)
            .find(|s| !taken.contains(s))
            .ok_or_else(|| VmmError::Failed("every tap slot is taken".into()))
    }

    fn tap_up(&self, slot: u16) -> Result<(), VmmError> {
        let tap = tap_name(slot);
        let _ = Command::new("ip")
            .args(["link", "del", &tap])
            .stderr(Stdio::null())
            .status();
        let mut add = vec!["tuntap", "add", "dev", tap.as_str(), "mode", "tap"];
        let uid = ids_of(VM_USER).map(|(u, _)| u.to_string());
        if let (Some(_), Some(uid)) = (&self.config.jailer, &uid) {
            add.extend(["user", uid.as_str()]);
        }
        ip(&add)?;
        let (host, _) = tap_addresses(slot);
        ip(&["addr", "add", &format!("{host}/30"), "dev", &tap])?;
        ip(&["link", "set", &tap, "up"])
    }

    fn tap_down(slot: Option<u16>) {
        if let Some(slot) = slot {
            let _ = Command::new("ip")
                .args(["link", "del", &tap_name(slot)])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Serves `<guest address>:<ssh port>` by connecting each client to the guest's sshd.
    async fn forward(&self, record: &VmRecord) -> Result<(), VmmError> {
        let Some(slot) = record.net_slot else {
            return Ok(());
        };
        let name = record.spec.name.clone();
        if self
            .forwarders
            .lock()
            .expect("not poisoned")
            .get(&name)
            .is_some_and(|f| !f.is_finished())
        {
            return Ok(());
        }
        // A forwarder just aborted (by a host dropped in this process) lets go of its port
        // when the runtime next polls it.
        let address = (self.guest_address.as_str(), record.ssh_port);
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(address).await {
                Ok(listener) => break listener,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    return Err(VmmError::Failed(format!(
                        "listen for the SSH of {name} on port {}: {e}",
                        record.ssh_port
                    )));
                }
            }
        };
        let guest = (tap_addresses(slot).1, 22u16);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDED));
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    continue;
                };
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Ok(Ok(mut vm)) = tokio::time::timeout(
                        Duration::from_secs(5),
                        tokio::net::TcpStream::connect(guest),
                    )
                    .await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut vm).await;
                    }
                });
            }
        });
        self.forwarders
            .lock()
            .expect("not poisoned")
            .insert(name, task);
        Ok(())
    }

    fn stop_forwarding(&self, name: &str) {
        if let Some(task) = self.forwarders.lock().expect("not poisoned").remove(name) {
            task.abort();
        }
    }

    /// `path` as Firecracker sees it: as it is, or under the jailer hard-linked into the VM's
    /// chroot (the VM's own files given to the VM user, who must write the disk and log).
    fn path_for_firecracker(&self, name: &str, path: &Path) -> Result<String, VmmError> {
        if self.config.jailer.is_none() {
            // The VM's own files by their names: Firecracker runs in the VM's directory,
            // and a snapshot's state names them so, which makes them a restored VM's own.
            let dir = self.dirs.dir(name)?;
            return Ok(
                match (path.parent() == Some(dir.as_path()), path.file_name()) {
                    (true, Some(file)) => file.to_string_lossy().to_string(),
                    _ => path.display().to_string(),
                },
            );
        }
        let root = self.chroot_root(name);
        std::fs::create_dir_all(&root).map_err(fail("make the VM's chroot"))?;
        let file = path
            .file_name()
            .ok_or_else(|| VmmError::Failed(format!("{} has no file name", path.display())))?;
        let inside = root.join(file);
        if !inside.exists() {
            if !path.exists() {
                std::fs::write(path, b"").map_err(fail("make the VM's log"))?;
            }
            std::fs::hard_link(path, &inside).map_err(fail("link a file into the VM's chroot (it must be on the state directory's file system)"))?;
        }
        // The VM's own files only: the kernel and initrd are shared, and read-only to it.
        if let (Some((uid, gid)), true) = (ids_of(VM_USER), path.starts_with(self.dirs.dir(name)?))
        {
            std::os::unix::fs::chown(&inside, Some(uid), Some(gid))
                .map_err(fail("give a file to the VM user"))?;
        }
        Ok(format!("/{}", file.to_string_lossy()))
    }

    /// The vsock device's socket of VM `name`: where the agent connects, and the path
    /// Firecracker is given (in its directory or chroot).
    fn vsock(&self, name: &str) -> Result<(PathBuf, String), VmmError> {
        Ok(match &self.config.jailer {
            Some(_) => (
                self.chroot_root(name).join("vsock.sock"),
                "/vsock.sock".into(),
            ),
            None => (self.dirs.dir(name)?.join("vsock.sock"), "vsock.sock".into()),
        })
    }

    /// Starts a Firecracker process for `record`, configures it and starts the guest.
    async fn launch(&self, record: &VmRecord) -> Result<(), VmmError> {
        self.launch_with(record, "config.ext4").await
    }

    /// `launch` with the config drive `config` (a file in the VM's directory).
    async fn launch_with(&self, record: &VmRecord, config: &str) -> Result<(), VmmError> {
        let name = &record.spec.name;
        let dir = self.dirs.dir(name)?;
        let slot = record
            .net_slot
            .ok_or_else(|| VmmError::Failed(format!("{name} has no network slot")))?;
        let kernel = self.kernel()?;
        let client = self.spawn(record).await?;
        let in_vm = |p: PathBuf| self.path_for_firecracker(name, &p);
        let spec = BootSpec {
            kernel: in_vm(kernel)?,
            initrd: Some(in_vm(self.image.initrd())?),
            boot_args: "console=ttyS0 reboot=k panic=1 quiet".into(),
            vcpus: record.spec.vcpus,
            memory_mb: record.spec.memory_mb,
            root_disk: in_vm(dir.join("disk.ext4"))?,
            config_drive: in_vm(dir.join(config))?,
            tap: tap_name(slot),
            guest_mac: firecracker::guest_mac(name),
            log_path: in_vm(dir.join("firecracker.log"))?,
            vsock_uds: self.vsock(name)?.1,
        };
        if let Err(e) = firecracker::boot(&client, &spec).await {
            self.kill(name).await;
            return Err(VmmError::Failed(e.to_string()));
        }
        self.forward(record).await?;
        tracing::info!(vm = %name, port = record.ssh_port, tap = %tap_name(slot), "VM started");
        Ok(())
    }

    /// Makes VM `record` from the saved memory in snapshot directory `from`: a fresh
    /// process loads it on the VM's tap device and vsock socket, and the guest is told
    /// the VM's `identity` (its config drive's files). The VM is marked `restoring` until
    /// the guest has taken it. On an error the caller stops the process and boots the VM.
    async fn restore(
        &self,
        record: &VmRecord,
        from: &Path,
        identity: &[(&str, String)],
    ) -> Result<(), VmmError> {
        let name = &record.spec.name;
        let dir = self.dirs.dir(name)?;
        let slot = record
            .net_slot
            .ok_or_else(|| VmmError::Failed(format!("{name} has no network slot")))?;
        let started = Instant::now();
        std::fs::write(dir.join(RESTORING), b"").map_err(fail("mark the VM restoring"))?;
        let client = self.spawn(record).await?;
        // The snapshot's files under names of their own: a later snapshot of this VM
        // writes `vmstate` and `memory` where Firecracker runs.
        let mut saved = Vec::new();
        for file in [VMSTATE_FILE, MEMORY_FILE] {
            let path = from.join(file);
            saved.push(match &self.config.jailer {
                None => path.display().to_string(),
                Some(_) => {
                    let inside = self.chroot_root(name).join(format!("restore-{file}"));
                    let _ = std::fs::remove_file(&inside);
                    std::fs::hard_link(&path, &inside).map_err(fail(
                        "link a snapshot into the VM's chroot (it must be on the state directory's file system)",
                    ))?;
                    format!("/restore-{file}")
                }
            });
        }
        let (uds, uds_for_firecracker) = self.vsock(name)?;
        let _ = std::fs::remove_file(&uds);
        firecracker::load(
            &client,
            &self.path_for_firecracker(name, &dir.join("firecracker.log"))?,
            &saved[0],
            &saved[1],
            &tap_name(slot),
            &uds_for_firecracker,
        )
        .await
        .map_err(|e| VmmError::Failed(e.to_string()))?;
        let loaded_ms = started.elapsed().as_millis() as u64;
        self.tell_identity(name, identity).await?;
        self.forward(record).await?;
        tracing::info!(
            vm = %name,
            from = %from.display(),
            loaded_ms,
            identified_ms = started.elapsed().as_millis() as u64 - loaded_ms,
            "VM restored from a snapshot's memory"
        );
        Ok(())
    }

    /// The directory of user snapshot `id`, if it kept memory that a VM of `spec` can load
    /// here: the same sizes, the same Firecracker binary and image.
    fn saved_memory(&self, id: &str, spec: &VmSpec) -> Result<Option<PathBuf>, VmmError> {
        let fingerprint = Some(self.fingerprint.as_str());
        let Some((memory, _)) = self.snapshots.memory_for(id, spec, fingerprint)? else {
            return Ok(None);
        };
        Ok(memory.parent().map(Path::to_path_buf))
    }

    /// Starts a Firecracker process for `record` on its tap device, and waits for its API.
    async fn spawn(&self, record: &VmRecord) -> Result<FcClient, VmmError> {
        let name = &record.spec.name;
        let dir = self.dirs.dir(name)?;
        let slot = record
            .net_slot
            .ok_or_else(|| VmmError::Failed(format!("{name} has no network slot")))?;
        self.tap_up(slot)?;
        // Firecracker binds it anew.
        let _ = std::fs::remove_file(self.vsock(name)?.0);
        let ids = ids_of(VM_USER);
        let argv = command_line(&self.config, name, &dir, ids);
        let client = self.client(name)?;
        let _ = std::fs::remove_file(dir.join("fc.sock"));
        let log = std::fs::File::create(dir.join("firecracker.out"))
            .map_err(fail("open the VM's log"))?;
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(fail("open the VM's log"))?)
            .stderr(log);
        // Its own session: it outlives the agent, like QEMU's -daemonize.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        if self.config.jailer.is_none() {
            command.current_dir(&dir);
        }
        let child = command
            .spawn()
            .map_err(|e| VmmError::Failed(format!("cannot run {} ({e})", argv[0])))?;
        std::fs::write(dir.join("fc.pid"), child.id().to_string())
            .map_err(fail("write the VM's pid"))?;
        // The agent never waits on it: reap it in the background so it leaves no zombie.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        let started = Instant::now();
        while firecracker::state(&client).await.is_err() {
            if started.elapsed() > SOCKET_WAIT {
                self.kill(name).await;
                return Err(VmmError::Failed(format!(
                    "{} did not open its API socket within {} s",
                    argv[0],
                    SOCKET_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(client)
    }

    /// Ends the VM's process: a reboot request first when it runs, then a kill.
    async fn kill(&self, name: &str) {
        let Some(pid) = self.pid(name) else { return };
        if let Ok(client) = self.client(name) {
            let _ = firecracker::stop(&client).await;
        }
        let started = Instant::now();
        while process_has_argument(pid, name) {
            if started.elapsed() > STOP_GRACE {
                // SAFETY: kill(2) with a pid checked to be this VM's process a moment ago.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn power_off(&self, record: &VmRecord) {
        self.stop_forwarding(&record.spec.name);
        self.kill(&record.spec.name).await;
        Self::tap_down(record.net_slot);
    }

    async fn api_status(&self, name: &str) -> Result<Option<VmStatus>, VmmError> {
        if self.dirs.record(name)?.is_none() {
            return Ok(None);
        }
        if self.pid(name).is_none() {
            return Ok(Some(VmStatus::Stopped));
        }
        match firecracker::state(&self.client(name)?).await {
            Ok(s) if s == "running" => Ok(Some(VmStatus::Running)),
            // A snapshot's pause is seconds long and undone after: still running.
            Ok(s) if s == "paused" && paused_by_snapshot(&self.dirs.dir(name)?) => {
                Ok(Some(VmStatus::Running))
            }
            Ok(s) if s == "paused" => Ok(Some(VmStatus::Paused)),
            _ => Ok(Some(VmStatus::Stopped)),
        }
    }

    async fn running_record(&self, name: &str) -> Result<FcClient, VmmError> {
        self.dirs
            .record(name)?
            .ok_or_else(|| VmmError::NotFound(name.into()))?;
        if self.pid(name).is_none() {
            return Err(VmmError::Failed(format!("{name} is not running")));
        }
        self.client(name)
    }
}

/// A Firecracker VM as a snapshot pauses it (`PATCH /vm`); `None` when it does not run.
struct FcPause {
    client: Option<FcClient>,
    /// Set when its memory can be saved: what a restore must match.
    memory: Option<SavedMemory>,
    /// Where Firecracker writes the files it saves (the VM's directory or its chroot), and
    /// the prefix it is given for them.
    writes_in: PathBuf,
    prefix: &'static str,
}

#[async_trait]
impl Pausable for FcPause {
    async fn is_running(&mut self) -> Result<bool, VmmError> {
        let Some(client) = &self.client else {
            return Ok(false);
        };
        let state = firecracker::state(client)
            .await
            .map_err(|e| VmmError::Failed(e.to_string()))?;
        Ok(state == "running")
    }

    async fn pause(&mut self) -> Result<(), VmmError> {
        match &self.client {
            Some(client) => firecracker::pause(client)
                .await
                .map_err(|e| VmmError::Failed(e.to_string())),
            None => Ok(()),
        }
    }

    async fn resume(&mut self) -> Result<(), VmmError> {
        match &self.client {
            Some(client) => firecracker::resume(client)
                .await
                .map_err(|e| VmmError::Failed(e.to_string())),
            None => Ok(()),
        }
    }

    async fn save_memory(&mut self, to: &Path) -> Result<Option<SavedMemory>, VmmError> {
        let (Some(client), Some(memory)) = (&self.client, self.memory.take()) else {
            return Ok(None);
        };
        let prefix = self.prefix;
        for file in [VMSTATE_FILE, MEMORY_FILE] {
            let _ = std::fs::remove_file(self.writes_in.join(file));
        }
        firecracker::snapshot(
            client,
            &format!("{prefix}{VMSTATE_FILE}"),
            &format!("{prefix}{MEMORY_FILE}"),
        )
        .await
        .map_err(|e| VmmError::Failed(e.to_string()))?;
        std::fs::rename(self.writes_in.join(MEMORY_FILE), to)
            .and_then(|()| {
                std::fs::rename(
                    self.writes_in.join(VMSTATE_FILE),
                    to.with_file_name(VMSTATE_FILE),
                )
            })
            .map_err(fail("keep the VM's saved memory"))?;
        Ok(Some(memory))
    }
}

/// The forwarders end with the host (its VMs do not).
impl Drop for FirecrackerHost {
    fn drop(&mut self) {
        for (_, task) in self.forwarders.lock().expect("not poisoned").drain() {
            task.abort();
        }
    }
}

#[async_trait]
impl Vmm for FirecrackerHost {
    fn backend(&self) -> &'static str {
        "firecracker"
    }

    /// Firecracker runs on KVM only.
    fn accel(&self) -> Accel {
        Accel::Kvm
    }

    fn record(&self, name: &str) -> Result<Option<VmRecord>, VmmError> {
        self.dirs.record(name)
    }

    async fn create(&self, spec: &VmSpec) -> Result<VmRecord, VmmError> {
        let _guard = self.lock.lock().await;
        // How a new VM starts, and the identity to tell it after a restore or a base build.
        let mut start = (Start::Boot, Vec::new());
        let record = match self.dirs.record(&spec.name)? {
            Some(record) => record,
            None => {
                check_sizes(spec)?;
                let (how, source) = self.start_of(spec)?;
                let slot = self.free_slot()?;
                let (host, guest) = tap_addresses(slot);
                let record = VmRecord {
                    spec: spec.clone(),
                    ssh_port: free_port(&self.guest_address)?,
                    accel: Accel::Kvm,
                    created_at_ms: now_ms(),
                    net_slot: Some(slot),
                    // Firecracker's is derived from the name (`firecracker::guest_mac`).
                    mac: None,
                    restored_from: None,
                };
                let network = [
                    ("address", format!("{guest}/30")),
                    ("gateway", host.to_string()),
                    ("dns", nameserver()),
                ];
                // The copy (a reflink takes no room, but `cp` may not get one) must leave
                // room for the VMs' disks to grow, as a snapshot's does.
                crate::snapshots::check_room(
                    &self.state,
                    crate::snapshots::allocated_bytes(&source)?,
                    self.snapshots.pending(),
                    "this VM's disk (a copy of its image or snapshot)",
                )?;
                let mut files = identity_files(&record.spec, None)?;
                files.extend(network.iter().map(|(k, v)| (*k, format!("{v}\n"))));
                let building = self.dirs.prepare(&record, &files, |dir| {
                    let disk = dir.join("disk.ext4");
                    copy_disk(&source, &disk)?;
                    let file = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&disk)
                        .map_err(fail("size the root disk"))?;
                    file.set_len(spec.disk_gb as u64 * 1024 * 1024 * 1024)
                        .map_err(fail("size the root disk"))?;
                    if let Start::BuildBase(_) = how {
                        // Nothing of anyone's: no key, and the guest makes its host key.
                        let neutral = dir.join("base-config");
                        let mut base = vec![
                            ("authorized_keys", "\n".to_string()),
                            ("hostname", "hearth-base\n".to_string()),
                            ("base", "1\n".to_string()),
                        ];
                        base.extend(network.iter().map(|(k, v)| (*k, format!("{v}\n"))));
                        std::fs::create_dir_all(&neutral)
                            .map_err(fail("create the base config drive"))?;
                        crate::vmm::config_drive(&neutral, &base)?;
                        std::fs::rename(neutral.join("config.ext4"), dir.join(BASE_CONFIG))
                            .and_then(|()| std::fs::remove_dir(&neutral))
                            .map_err(fail("write the base config drive"))?;
                    }
                    Ok(())
                })?;
                self.dirs.commit(&building, &spec.name)?;
                start = (how, files);
                record
            }
        };
        if self.pid(&spec.name).is_none() {
            let (how, identity) = start;
            let tried = match &how {
                Start::Boot => None,
                Start::Restore(from, _) => Some(self.restore(&record, from, &identity).await),
                Start::BuildBase(key) => Some(self.build_base(&record, key, &identity).await),
            };
            match tried {
                None => {}
                Some(Ok(())) => return Ok(record),
                Some(Err(e)) => {
                    tracing::warn!(vm = %spec.name, error = %e, "this VM's restore or base snapshot failed; it boots from its disk");
                    self.kill(&spec.name).await;
                    let dir = self.dirs.dir(&spec.name)?;
                    let _ = std::fs::remove_file(dir.join(RESTORING));
                    let _ = std::fs::remove_file(dir.join(BASE_CONFIG));
                    if let (Start::Restore(_, Some(key)) | Start::BuildBase(key), Some(base)) =
                        (&how, &self.base)
                    {
                        self.base_failed
                            .lock()
                            .expect("not poisoned")
                            .insert(key.clone());
                        let _ = base.remove(key, &Default::default());
                    }
                }
            }
            self.launch(&record).await?;
        } else {
            self.forward(&record).await?;
        }
        Ok(record)
    }

    async fn status(&self, name: &str) -> Result<Option<VmStatus>, VmmError> {
        self.api_status(name).await
    }

    /// Boots a stopped VM; resumes one that runs paused (a snapshot that could not
    /// resume it says to start it).
    async fn start(&self, name: &str) -> Result<(), VmmError> {
        let _vm = self.vm_locks.lock(name).await;
        let _guard = self.lock.lock().await;
        let record = self
            .dirs
            .record(name)?
            .ok_or_else(|| VmmError::NotFound(name.into()))?;
        if self.pid(name).is_some() {
            if self.api_status(name).await? == Some(VmStatus::Paused) {
                firecracker::resume(&self.client(name)?)
                    .await
                    .map_err(|e| VmmError::Failed(e.to_string()))?;
            }
            return self.forward(&record).await;
        }
        self.launch(&record).await
    }

    async fn stop(&self, name: &str) -> Result<(), VmmError> {
        let _vm = self.vm_locks.lock(name).await;
        let _guard = self.lock.lock().await;
        let record = self
            .dirs
            .record(name)?
            .ok_or_else(|| VmmError::NotFound(name.into()))?;
        self.power_off(&record).await;
        Ok(())
    }

    async fn pause(&self, name: &str) -> Result<(), VmmError> {
        let _vm = self.vm_locks.lock(name).await;
        firecracker::pause(&self.running_record(name).await?)
            .await
            .map_err(|e| VmmError::Failed(e.to_string()))
    }

    async fn resume(&self, name: &str) -> Result<(), VmmError> {
        let _vm = self.vm_locks.lock(name).await;
        firecracker::resume(&self.running_record(name).await?)
            .await
            .map_err(|e| VmmError::Failed(e.to_string()))
    }

    async fn destroy(&self, name: &str) -> Result<(), VmmError> {
        let _vm = self.vm_locks.lock(name).await;
        let _guard = self.lock.lock().await;
        if let Some(record) = self.dirs.record(name)? {
            self.power_off(&record).await;
        }
        if self.config.jailer.is_some() {
            let _ = std::fs::remove_dir_all(self.config.chroot_base.join("firecracker").join(name));
        }
        self.dirs.remove(name)?;
        self.vm_locks.forget(name);
        Ok(())
    }

    async fn recover(&self) {
        let Ok(names) = self.dirs.names() else {
            return;
        };
        for name in names {
            // Restored from a snapshot's memory by an agent that died before the guest took
            // its identity: it still holds the snapshot's. Stopped: it boots from its disk,
            // and takes its own there (`image::VM_INIT`).
            if let Ok(restoring) = self.dirs.dir(&name).map(|d| d.join(RESTORING))
                && restoring.exists()
            {
                if let Ok(Some(record)) = self.dirs.record(&name) {
                    self.power_off(&record).await;
                }
                let _ = std::fs::remove_file(&restoring);
                let _ = std::fs::remove_file(restoring.with_file_name(BASE_CONFIG));
                tracing::warn!(vm = %name, "stopped a VM whose restore an agent left unfinished; it boots from its disk when started");
            }
            let Ok(marker) = self
                .dirs
                .dir(&name)
                .map(|d| d.join(crate::snapshots::PAUSED_FOR_SNAPSHOT))
            else {
                continue;
            };
            if !marker.exists() {
                continue;
            }
            let paused = match self.running_record(&name).await {
                Ok(client) => firecracker::state(&client)
                    .await
                    .is_ok_and(|s| s == "paused")
                    .then_some(client),
                Err(_) => None,
            };
            if let Some(client) = paused {
                if let Err(e) = firecracker::resume(&client).await {
                    tracing::warn!(vm = %name, error = %e, "could not resume a VM left paused by a snapshot");
                    continue;
                }
                tracing::info!(vm = %name, "resumed a VM an agent killed mid-snapshot left paused");
            }
            let _ = std::fs::remove_file(marker);
        }
    }

    async fn snapshot(&self, name: &str, id: &str) -> Result<Snapshot, VmmError> {
        if let Some(found) = self.snapshots.find(id)? {
            return Ok(found);
        }
        let record = self
            .dirs
            .record(name)?
            .ok_or_else(|| VmmError::NotFound(name.into()))?;
        let lock = self.vm_locks.lock(name).await;
        let client = self.pid(name).map(|_| self.client(name)).transpose()?;
        let listens = client.is_some() && guest_listens(&self.vsock(name)?.0).await;
        self.save(&record, self.snapshots.clone(), id, lock, client, listens)
            .await
    }

    fn snapshots(&self) -> Option<&Snapshots> {
        Some(&self.snapshots)
    }

    /// A VM made from a snapshot has a copy of its disk: nothing holds a snapshot back.
    async fn remove_snapshot(&self, id: &str) -> Result<bool, VmmError> {
        // Not under a create that is copying it.
        let _guard = self.lock.lock().await;
        self.snapshots.remove(id, &Default::default())
    }

    fn images(&self) -> Option<&Arc<Snapshots>> {
        Some(&self.images)
    }

    /// A VM made from an image has a copy of it: nothing holds an image back.
    async fn remove_image(&self, id: &str) -> Result<bool, VmmError> {
        // Not under a create that is copying it.
        let _guard = self.lock.lock().await;
        self.images.remove(id, &Default::default())
    }

    /// Adopts what still runs: its SSH forwarder starts again here.
    async fn list(&self) -> Result<Vec<(VmRecord, VmStatus)>, VmmError> {
        let mut out = Vec::new();
        for name in self.dirs.names()? {
            if let (Some(record), Some(status)) =
                (self.dirs.record(&name)?, self.api_status(&name).await?)
            {
                if status != VmStatus::Stopped {
                    self.forward(&record).await?;
                }
                out.push((record, status));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_disjoint_slash_30s() {
        assert_eq!(
            tap_addresses(0),
            (Ipv4Addr::new(10, 234, 0, 1), Ipv4Addr::new(10, 234, 0, 2))
        );
        assert_eq!(
            tap_addresses(64),
            (Ipv4Addr::new(10, 234, 1, 1), Ipv4Addr::new(10, 234, 1, 2))
        );
        assert_eq!(tap_addresses(SLOTS - 1).1, Ipv4Addr::new(10, 234, 255, 254));
        assert!(
            tap_name(SLOTS - 1).len() <= 15,
            "a Linux interface name has at most 15 bytes"
        );
    }

    #[test]
    fn the_jailer_runs_firecracker_in_its_chroot_as_the_vm_user() {
        let config = FirecrackerConfig {
            firecracker: "/usr/bin/firecracker".into(),
            jailer: Some("/usr/bin/jailer".into()),
            chroot_base: "/srv/jailer".into(),
        };
        let argv = command_line(
            &config,
            "hearth-x",
            Path::new("/state/vms/hearth-x"),
            Some((997, 996)),
        );
        assert_eq!(
            argv.join(" "),
            "/usr/bin/jailer --id hearth-x --exec-file /usr/bin/firecracker --uid 997 --gid 996 --chroot-base-dir /srv/jailer -- --api-sock /fc.sock"
        );
        let plain = FirecrackerConfig {
            jailer: None,
            ..config
        };
        assert_eq!(
            command_line(&plain, "hearth-x", Path::new("/d"), None).join(" "),
            "/usr/bin/firecracker --api-sock /d/fc.sock --id hearth-x"
        );
    }
}
