//! Base snapshots: a VM booted once per image and size, saved while it waits to be told who
//! it is, so that new VMs of that size restore it instead of booting (`qemu` backend, on
//! the `microvm` machine).
//!
//! Under software emulation a boot to the first command takes about 6 s; a restore loads
//! the saved memory (about 100 MB for a 512 MB guest) and resumes a guest whose sshd
//! already runs: about 1 s. The restored guest wakes up in `image::AWAIT_RESTORE`, started
//! before the save, blocked on the virtio port `hearth.identity`; the agent sends it the
//! VM's identity (the files of its config drive: keys, hostname, MAC, machine id, a seed
//! for its random generator, an SSH host key made here) and the time, and waits for
//! `identified`. The state and the disk are handed to QEMU as open descriptors, so a QEMU
//! confined to its own user (`guard.rs`) needs no access to their paths.
//!
//! On disk, `<state>/base-snapshots/<key>-<made at ms>/` holds `disk.qcow2` (the base VM's
//! disk when it was saved: never written again, the backing file of every VM restored from
//! it), `memory` (QEMU's migration stream) and `snapshot.json`. The key names the sizes and
//! a fingerprint of everything a restore must match: the image, the QEMU version, the
//! accelerator. A snapshot is built under a hidden name and renamed into place whole.
//!
//! Bounds: one build at a time, at most `MAX_BASE_SNAPSHOTS` kept per host; a build runs
//! one VM of the size it saves (its memory and CPU are not counted in the host's capacity
//! for the minute it runs). A snapshot that fails to restore is marked `refused` and is not
//! used again; an agent start removes builds that died half-way (stopping their QEMU) and
//! snapshots that are refused, outdated or replaced once no VM's disk is layered on them.

use crate::qemu::{Launcher, stop_qemu};
use crate::qmp::Qmp;
use crate::vmm::{VmRecord, VmSpec, VmmError, config_drive, fail, free_port, now_ms};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Base snapshots kept per host (each about the size of its guest's used memory, plus the
/// few MB its boot wrote to disk).
pub const MAX_BASE_SNAPSHOTS: usize = 8;
/// How long a base VM may take to boot and say it is ready (a TCG boot takes about 8 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long saving or loading the memory may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a restored guest may take to take its identity.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(60);

/// What a restore needs to know of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    /// The kernel command line the base VM booted with (the restored VM is given the same).
    pub kernel_args: String,
    pub memory_bytes: u64,
    pub made_at_ms: i64,
    /// How long the base VM took from start to ready, for the log.
    pub boot_ms: u64,
}

/// A base snapshot ready to restore.
#[derive(Debug, Clone)]
pub struct BaseSnapshot {
    /// Its directory's name: `<key>-<made at ms>`.
    pub id: String,
    pub dir: PathBuf,
    pub info: SnapshotInfo,
}

impl BaseSnapshot {
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }

    pub fn memory(&self) -> PathBuf {
        self.dir.join("memory")
    }
}

pub struct BaseSnapshots {
    root: PathBuf,
    launcher: Arc<Launcher>,
    /// Everything a restore must match besides the sizes (see `fingerprint`).
    fingerprint: String,
    /// The key being built, if any: one build at a time.
    building: Mutex<Option<String>>,
    /// Keys whose build failed since this agent started: not tried again until a restart.
    failed: Mutex<HashSet<String>>,
    /// The directory of the build under way, removed when the agent stops.
    build_dir: Mutex<Option<PathBuf>>,
    /// The pid of the build's QEMU, this process's child (not reaped before the build
    /// ends, so the pid cannot be another process's): killed when the agent stops.
    build_pid: Mutex<Option<u32>>,
    /// Set when the agent stops: a build under way starts no QEMU after it.
    stopped: std::sync::atomic::AtomicBool,
}

/// A hash of what a snapshot depends on: the image (its recipe covers the guest's init, and
/// its files as built), the kernel, the QEMU binary's version, the accelerator and the machine.
pub fn fingerprint(launcher: &Launcher, qemu_version: &str) -> String {
    let image = &launcher.image;
    let mut hash = sha2::Sha256::new();
    // The image's files as built (a rebuild with the same recipe has other blocks under
    // the snapshot's disk).
    hash_files(&mut hash, &[image.kernel(), image.initrd(), image.rootfs()]);
    for part in [
        image.recipe.as_str(),
        image.kernel_version.as_str(),
        qemu_version,
        launcher.accel.as_str(),
        launcher.machine(),
    ] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hex::encode(&hash.finalize()[..6])
}

/// Adds each of `files`' path, size and modification time to `hash`: what tells one build
/// of a file from another.
pub(crate) fn hash_files(hash: &mut sha2::Sha256, files: &[PathBuf]) {
    for file in files {
        if let Ok(meta) = std::fs::metadata(file) {
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            hash.update(format!("{}:{}:{modified}", file.display(), meta.len()).as_bytes());
        }
    }
}

fn key(fingerprint: &str, spec: &VmSpec) -> String {
    format!(
        "{}c{}m{}g-{fingerprint}",
        spec.vcpus, spec.memory_mb, spec.disk_gb
    )
}

/// The QEMU process name of a base VM being built.
fn process_name(key: &str) -> String {
    format!("hearth-base-{key}")
}

impl BaseSnapshots {
    /// Opens `<state>/base-snapshots`, cleaning it: builds that died half-way (their QEMU
    /// stopped), and snapshots refused, outdated or replaced that no VM in `in_use` (the
    /// `restored_from` of every VM kept here) is layered on. `fingerprint` is the host's
    /// (`fingerprint`), which the host has already computed: it reads the image's files.
    pub fn open(
        state: &Path,
        launcher: Arc<Launcher>,
        fingerprint: String,
        in_use: &HashSet<String>,
    ) -> Result<BaseSnapshots, VmmError> {
        let root = state.join("base-snapshots");
        std::fs::create_dir_all(&root).map_err(fail("create the base snapshot directory"))?;
        let snapshots = BaseSnapshots {
            fingerprint,
            root,
            launcher,
            building: Mutex::new(None),
            failed: Mutex::new(HashSet::new()),
            build_dir: Mutex::new(None),
            build_pid: Mutex::new(None),
            stopped: Default::default(),
        };
        let mut newest: std::collections::HashMap<String, (String, i64)> = Default::default();
        let mut kept = Vec::new();
        for entry in std::fs::read_dir(&snapshots.root)
            .map_err(fail("read the base snapshot directory"))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(key) = name.strip_prefix(".build-") {
                crate::qemu::kill_qemu(&entry.path(), &process_name(key));
                let _ = std::fs::remove_dir_all(entry.path());
                continue;
            }
            let current = name.contains(&format!("-{}-", snapshots.fingerprint));
            let usable = current
                && entry.path().join("snapshot.json").is_file()
                && !entry.path().join("refused").exists();
            if let (true, Some((key, made))) = (usable, split_id(&name)) {
                let slot = newest
                    .entry(key.to_string())
                    .or_insert_with(|| (name.clone(), made));
                if made > slot.1 {
                    *slot = (name.clone(), made);
                }
            }
            kept.push((name, usable));
        }
        for (name, usable) in kept {
            let newest_of_key = newest.values().any(|(n, _)| *n == name);
            let keep = (usable && newest_of_key) || in_use.contains(&name);
            if !keep {
                tracing::info!(snapshot = %name, "removed a base snapshot no VM uses");
                let _ = std::fs::remove_dir_all(snapshots.root.join(&name));
            }
        }
        Ok(snapshots)
    }

    /// The newest usable snapshot for `spec`'s sizes.
    pub fn ready(&self, spec: &VmSpec) -> Option<BaseSnapshot> {
        let wanted = key(&self.fingerprint, spec);
        let mut best: Option<BaseSnapshot> = None;
        for entry in std::fs::read_dir(&self.root).ok()?.flatten() {
            let id = entry.file_name().to_string_lossy().to_string();
            if split_id(&id).is_none_or(|(key, _)| key != wanted)
                || entry.path().join("refused").exists()
            {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(entry.path().join("snapshot.json")) else {
                continue;
            };
            let Ok(info) = serde_json::from_str::<SnapshotInfo>(&text) else {
                continue;
            };
            if best
                .as_ref()
                .is_none_or(|b| b.info.made_at_ms < info.made_at_ms)
            {
                best = Some(BaseSnapshot {
                    id,
                    dir: entry.path(),
                    info,
                });
            }
        }
        best
    }

    /// Marks a snapshot that failed to restore: it is not used again, and is removed at the
    /// next agent start once no VM is layered on it.
    pub fn refuse(&self, snapshot: &BaseSnapshot, reason: &str) {
        let _ = std::fs::write(snapshot.dir.join("refused"), reason);
        // Not rebuilt until the agent restarts: a restore that fails once would likely fail
        // again, and each build costs a VM's boot.
        if let Some((key, _)) = split_id(&snapshot.id) {
            self.failed
                .lock()
                .expect("not poisoned")
                .insert(key.to_string());
        }
    }

    fn usable_count(&self) -> usize {
        std::fs::read_dir(&self.root)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| {
                        !e.file_name().to_string_lossy().starts_with('.')
                            && !e.path().join("refused").exists()
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// Starts building the snapshot for `spec`'s sizes in the background, unless one is
    /// being built, this key failed before, or the host keeps its maximum already.
    pub fn build_in_background(self: &Arc<Self>, spec: &VmSpec) {
        let key = key(&self.fingerprint, spec);
        if self.failed.lock().expect("not poisoned").contains(&key)
            || self.usable_count() >= MAX_BASE_SNAPSHOTS
        {
            return;
        }
        {
            let mut building = self.building.lock().expect("not poisoned");
            if building.is_some() {
                return;
            }
            *building = Some(key.clone());
        }
        let this = self.clone();
        let spec = spec.clone();
        tokio::spawn(async move {
            tracing::info!(snapshot = %key, "building a base snapshot (a VM boots once, then is saved)");
            match this.build(&key, &spec).await {
                Ok(snapshot) => tracing::info!(
                    snapshot = %snapshot.id,
                    boot_ms = snapshot.info.boot_ms,
                    memory_bytes = snapshot.info.memory_bytes,
                    "base snapshot ready: VMs of this size now restore it"
                ),
                Err(e) => {
                    tracing::warn!(snapshot = %key, error = %e, "building a base snapshot failed; VMs of this size boot (a restart of the agent tries again)");
                    this.failed.lock().expect("not poisoned").insert(key);
                }
            }
            *this.building.lock().expect("not poisoned") = None;
        });
    }

    /// Whether a build is under way (for tests and the log).
    pub fn is_building(&self) -> bool {
        self.building.lock().expect("not poisoned").is_some()
    }

    /// Stops the QEMU of a build under way (the agent is stopping).
    pub fn stop_build(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(pid) = *self.build_pid.lock().expect("not poisoned") {
            // SAFETY: kill(2) on this process's unreaped child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let Some(dir) = self.build_dir.lock().expect("not poisoned").take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// Boots a base VM of `spec`'s sizes, waits until it says it is ready, saves it, and
    /// commits the snapshot.
    pub async fn build(&self, key: &str, spec: &VmSpec) -> Result<BaseSnapshot, VmmError> {
        let dir = self.root.join(format!(".build-{key}"));
        *self.build_dir.lock().expect("not poisoned") = Some(dir.clone());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(fail("create the base snapshot's directory"))?;
        let name = process_name(key);
        let result = self.boot_and_save(&dir, &name, spec).await;
        *self.build_dir.lock().expect("not poisoned") = None;
        let info = match result {
            Ok(info) => info,
            Err(e) => {
                crate::qemu::kill_qemu(&dir, &name);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let id = format!("{key}-{}", info.made_at_ms);
        let done = self.root.join(&id);
        std::fs::rename(&dir, &done).map_err(fail("commit the base snapshot"))?;
        Ok(BaseSnapshot {
            id,
            dir: done,
            info,
        })
    }

    async fn boot_and_save(
        &self,
        dir: &Path,
        name: &str,
        spec: &VmSpec,
    ) -> Result<SnapshotInfo, VmmError> {
        let started = Instant::now();
        crate::vmm::run(
            std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(self.launcher.image.rootfs())
                .arg(dir.join("disk.qcow2"))
                .arg(format!("{}G", spec.disk_gb)),
            "qemu-img create",
        )?;
        // No key: nobody can log in to the base VM, and every restore replaces all of this.
        config_drive(
            dir,
            &[
                ("authorized_keys", "\n".into()),
                ("hostname", "hearth-base\n".into()),
                ("base", "1\n".into()),
            ],
        )?;
        let record = VmRecord {
            spec: VmSpec {
                name: name.to_string(),
                environment_id: String::new(),
                hostname: "hearth-base".into(),
                authorized_keys: String::new(),
                labels: Default::default(),
                snapshot: None,
                image: None,
                ..spec.clone()
            },
            ssh_port: free_port(self.launcher.guest_address())?,
            accel: self.launcher.accel,
            created_at_ms: now_ms(),
            net_slot: None,
            mac: None,
            restored_from: None,
        };
        if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(VmmError::Failed("the agent is stopping".into()));
        }
        // Confined like every VM: its disk is handed over open, so QEMU reopens it without
        // its path when the state is saved.
        let mut child = self
            .launcher
            .launch_attached(&record, dir, &self.build_pid)
            .await?;
        let saved = self.save(dir, name, started).await;
        // Its QEMU is this process's child: reaped here, whatever happened.
        let _ = child.kill();
        let _ = child.wait();
        *self.build_pid.lock().expect("not poisoned") = None;
        saved
    }

    /// Waits for the base VM in `dir` to be ready, then saves it and stops it.
    async fn save(
        &self,
        dir: &Path,
        name: &str,
        started: Instant,
    ) -> Result<SnapshotInfo, VmmError> {
        let mut port = connect_identity_port(dir).await?;
        let said = read_line(&mut port, BOOT_TIMEOUT, "the base VM to boot").await?;
        if said != "ready" {
            return Err(VmmError::Failed(format!(
                "the base VM said {said:?} instead of ready"
            )));
        }
        let boot_ms = started.elapsed().as_millis() as u64;
        let mut qmp = Qmp::connect(&dir.join("qmp.sock")).await?;
        // Paused first: the state is saved in one pass, and restores come up paused.
        qmp.execute("stop", None).await?;
        let memory = std::fs::File::create(dir.join("memory"))
            .map_err(fail("create the snapshot's memory file"))?;
        save_state(&mut qmp, &memory).await?;
        drop(port);
        // QEMU takes one QMP client at a time: this one goes before `quit` is sent.
        drop(qmp);
        stop_qemu(dir, name).await;
        let info = SnapshotInfo {
            kernel_args: self.launcher.kernel_args(),
            memory_bytes: memory.metadata().map(|m| m.len()).unwrap_or(0),
            made_at_ms: now_ms(),
            boot_ms,
        };
        for leftover in ["qmp.sock", "identity.sock", "qemu.pid", "qemu.err"] {
            let _ = std::fs::remove_file(dir.join(leftover));
        }
        std::fs::write(
            dir.join("snapshot.json"),
            serde_json::to_vec_pretty(&info).expect("serializable"),
        )
        .map_err(fail("write snapshot.json"))?;
        Ok(info)
    }
}

/// Writes the paused VM's state (its memory and devices) to `file` with QEMU's migration,
/// at full speed (QEMU's default caps a migration at 128 MiB/s, for networks), and waits
/// until it is on disk. QEMU then holds the VM in `postmigrate`, its disks let go; `cont`
/// takes them back and runs it again.
pub(crate) async fn save_state(qmp: &mut Qmp, file: &std::fs::File) -> Result<(), VmmError> {
    qmp.execute(
        "migrate-set-parameters",
        Some(serde_json::json!({"max-bandwidth": 1u64 << 40})),
    )
    .await?;
    qmp.send_fd("snapshot", std::os::fd::AsFd::as_fd(file))
        .await?;
    qmp.execute("migrate", Some(serde_json::json!({"uri": "fd:snapshot"})))
        .await?;
    wait_migration(qmp).await?;
    file.sync_all().map_err(fail("write the saved memory"))
}

/// Polls an outgoing migration until it completes.
async fn wait_migration(qmp: &mut Qmp) -> Result<(), VmmError> {
    let started = Instant::now();
    loop {
        let state = qmp.execute("query-migrate", None).await?;
        match state["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                return Err(VmmError::Failed(format!(
                    "saving the VM failed: {}",
                    state["error-desc"]
                        .as_str()
                        .unwrap_or("QEMU gave no reason")
                )));
            }
            _ if started.elapsed() > MIGRATION_TIMEOUT => {
                return Err(VmmError::Failed(format!(
                    "saving the VM took more than {} s",
                    MIGRATION_TIMEOUT.as_secs()
                )));
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Loads the saved `memory` into the QEMU in `dir` (started with `Boot::Restore`), resumes
/// it, and has the guest take the identity on its config drive. `port` is connected before
/// the load: a base VM was saved with its port connected, and a VM saved without (a user's
/// snapshot) is told at the load that the host's end is there now.
pub(crate) async fn restore_into(
    dir: &Path,
    memory: &Path,
    port: &mut BufReader<UnixStream>,
    identity: &[(&str, String)],
) -> Result<Restored, VmmError> {
    let mut qmp = Qmp::connect(&dir.join("qmp.sock")).await?;
    let memory = std::fs::File::open(memory).map_err(fail("open the snapshot's memory"))?;
    qmp.send_fd("snapshot", std::os::fd::AsFd::as_fd(&memory))
        .await?;
    qmp.execute(
        "migrate-incoming",
        Some(serde_json::json!({"uri": "fd:snapshot"})),
    )
    .await?;
    let started = Instant::now();
    loop {
        let status = qmp.status().await?;
        match status.as_str() {
            "inmigrate" if started.elapsed() < MIGRATION_TIMEOUT => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            "paused" => break,
            other => {
                let migrate = qmp.execute("query-migrate", None).await.ok();
                let reason = migrate
                    .as_ref()
                    .and_then(|m| m["error-desc"].as_str())
                    .unwrap_or("QEMU gave no reason");
                return Err(VmmError::Failed(format!(
                    "loading the snapshot left the VM {other}: {reason}"
                )));
            }
        }
    }
    let loaded_ms = started.elapsed().as_millis() as u64;
    qmp.execute("cont", None).await?;
    identify(port, identity).await?;
    Ok(Restored {
        loaded_ms,
        identified_ms: started.elapsed().as_millis() as u64 - loaded_ms,
    })
}

/// Tells a restored guest, waiting in `image::AWAIT_RESTORE` on the other end of `port`,
/// the VM's `identity` and the time, and waits for its answer that it took them.
pub(crate) async fn identify(
    port: &mut BufReader<UnixStream>,
    identity: &[(&str, String)],
) -> Result<(), VmmError> {
    let mut message = String::from("identify\n");
    for (name, value) in identity {
        message.push_str(&format!("{name} {}\n", hex::encode(value)));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    message.push_str(&format!(
        "clock {} {}\nend\n",
        now.as_secs(),
        now.subsec_nanos()
    ));
    port.get_mut()
        .write_all(message.as_bytes())
        .await
        .map_err(fail("write to the guest's identity port"))?;
    let said = read_line(
        port,
        IDENTIFY_TIMEOUT,
        "the restored guest to take its identity",
    )
    .await?;
    if said != "identified" {
        return Err(VmmError::Failed(format!(
            "the restored guest said {said:?} instead of identified"
        )));
    }
    Ok(())
}

/// Whether the guest's identity listener on the port `connecting` opens answers `ping`
/// with `pong` within 3 s (a QEMU guest looks every 0.1 s while nobody holds its port).
pub(crate) async fn answers_ping(
    connecting: impl std::future::Future<Output = std::io::Result<BufReader<UnixStream>>>,
) -> bool {
    let asked = async {
        let mut port = connecting.await?;
        port.get_mut().write_all(b"ping\n").await?;
        let mut line = String::new();
        port.read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line.trim() == "pong")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), asked).await,
        Ok(Ok(true))
    )
}

/// How long a restore's steps took, for the log.
pub(crate) struct Restored {
    /// Loading the saved state.
    pub loaded_ms: u64,
    /// From resuming the guest to its answer that it took its identity.
    pub identified_ms: u64,
}

/// Connects to the guest's `hearth.identity` port (QEMU's socket in `dir`).
pub(crate) async fn connect_identity_port(dir: &Path) -> Result<BufReader<UnixStream>, VmmError> {
    let path = dir.join("identity.sock");
    let started = Instant::now();
    loop {
        match UnixStream::connect(&path).await {
            Ok(stream) => return Ok(BufReader::new(stream)),
            Err(e) if started.elapsed() > Duration::from_secs(5) => {
                return Err(VmmError::Failed(format!(
                    "cannot reach the guest's identity port {}: {e}",
                    path.display()
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

pub(crate) async fn read_line(
    port: &mut BufReader<UnixStream>,
    within: Duration,
    waiting_for: &str,
) -> Result<String, VmmError> {
    let mut line = String::new();
    match tokio::time::timeout(within, port.read_line(&mut line)).await {
        Err(_) => Err(VmmError::Failed(format!(
            "waited {} s for {waiting_for}",
            within.as_secs()
        ))),
        Ok(Err(e)) => Err(VmmError::Failed(format!(
            "reading the guest's identity port: {e}"
        ))),
        Ok(Ok(0)) => Err(VmmError::Failed(format!(
            "the guest's identity port closed while waiting for {waiting_for}"
        ))),
        Ok(Ok(_)) => Ok(line.trim().to_string()),
    }
}

/// A snapshot's id, `<key>-<made at ms>`, split into its key and time.
fn split_id(id: &str) -> Option<(&str, i64)> {
    let (key, made) = id.rsplit_once('-')?;
    Some((key, made.parse().ok()?))
}
