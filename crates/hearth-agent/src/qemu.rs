//! The `qemu` backend: one `qemu-system-x86_64` per VM, started detached (`-daemonize`)
//! so it outlives the agent, and driven over QMP (`qmp.rs`). The machine is `microvm`
//! (virtio over MMIO: no PCI bus or BIOS tables to enumerate, about 0.4 s less to SSH under
//! TCG here) when the image's initramfs loads `virtio_mmio`, `pc` for older images.
//!
//! Each VM has a directory under the agent's state directory:
//! - `record.json`: what was asked (sizes, SSH port, the accelerator) — the durable record
//!   an agent reads back after a restart to adopt the VMs still running;
//! - `disk.qcow2`: copy-on-write over the image's `rootfs.ext4` (or a user snapshot's disk,
//!   `snapshots.rs`, or a custom image's file system, `images.rs`), with the VM's disk size as its virtual size (the guest grows its file
//!   system to it at boot, and cannot exceed it);
//! - `config.ext4`: the config drive (the VM's identity: keys, hostname, MAC, machine id,
//!   host key, a random seed), read-only in the guest;
//! - `qmp.sock`, `qemu.pid`, `console.log` (the serial console, for diagnosis), and
//!   `identity.sock`, the host's end of the virtio port a restored guest is told its
//!   identity on (`base_snapshot.rs`; every VM has the port, so every VM matches a snapshot).
//!
//! Network: QEMU user-mode networking with SSH forwarded from a port on the agent's guest
//! address (127.0.0.1 unless configured). Each VM
//! has its own network stack inside its QEMU process, so VMs cannot address each other.
//!
//! Stop is a power-off (QMP `quit`): the guest's ext4 journal makes the next boot
//! consistent. Pause and resume are QMP `stop` and `cont`.
//!
//! The accelerator is decided by outcome, not by `/dev/kvm` existing (on some machines it
//! opens and guests then hang): `probe_kvm` boots the initramfs's `/probe` under KVM and
//! uses KVM only if it prints its marker in time; software emulation (TCG) otherwise.

use crate::base_snapshot::{BaseSnapshots, connect_identity_port, restore_into, save_state};
use crate::image::VmImage;
use crate::qmp::Qmp;
use crate::snapshots::{Pausable, SavedMemory, Snapshot, Snapshots, VmLocks, paused_by_snapshot};
pub use crate::vmm::{Accel, VmRecord, VmSpec, VmStatus, VmmError};
use crate::vmm::{
    VmDirs, Vmm, check_sizes, fail, free_port, identity_files, now_ms, process_has_argument,
    random_mac, run,
};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const QEMU: &str = "qemu-system-x86_64";
/// How long a QEMU process may take to stop after `quit` before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(5);
/// How long the KVM probe may take; a working KVM prints its marker in well under a second.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Printed by the initramfs's `/probe`.
pub const PROBE_MARKER: &str = "hearth-probe-ok";

impl From<crate::qmp::QmpError> for VmmError {
    fn from(e: crate::qmp::QmpError) -> VmmError {
        VmmError::Failed(e.to_string())
    }
}

pub struct QemuHost {
    dirs: VmDirs,
    launcher: Arc<Launcher>,
    /// Serializes changes to one VM at a time on this host (creates race on ports and names).
    lock: tokio::sync::Mutex<()>,
    /// One change to a VM at a time: a snapshot holds its VM's while it copies.
    vm_locks: VmLocks,
    /// Users' snapshots of VM disks.
    snapshots: Arc<Snapshots>,
    /// Custom images (`images.rs`), raw file systems VMs' disks are layered on.
    images: Arc<Snapshots>,
    /// Base snapshots new VMs restore, when enabled (`with_base_snapshots`).
    base: Option<Arc<BaseSnapshots>>,
    /// What a VM's saved memory depends on here (`base_snapshot::fingerprint`); `None` when
    /// QEMU's version could not be read, and then no memory is saved.
    fingerprint: Option<String>,
}

/// How this host starts QEMU: shared by its VMs and its base snapshots' builds.
#[derive(Clone)]
pub struct Launcher {
    pub(crate) image: VmImage,
    pub(crate) accel: Accel,
    /// Where guests' SSH ports are forwarded from (127.0.0.1, or an address the nodes reach).
    guest_address: String,
    /// The user QEMU drops to once it has opened its files (`guard.rs`), if confined.
    pub(crate) runas: Option<String>,
    /// The host's TSC rate, for guests that cannot calibrate theirs (see `kernel_args`).
    tsc_khz: Option<u64>,
}

/// How a VM starts.
pub(crate) enum Boot<'a> {
    /// Its kernel boots.
    Cold,
    /// QEMU waits, paused, for a base snapshot's state (`-incoming defer`); the kernel
    /// arguments are the ones the snapshot booted with.
    Restore { kernel_args: &'a str },
}

/// A QEMU VM as a snapshot pauses it: QMP `stop` (QEMU flushes its caches to the disk
/// file when it pauses) and `cont`.
struct QmpPause {
    dir: PathBuf,
    name: String,
    /// Set when this VM's memory can be saved (the `microvm` machine, whose VMs have the
    /// identity port and run the guest's side of it): what its restore must match, but
    /// the kernel arguments, read from its QEMU.
    memory: Option<SavedMemory>,
}

#[async_trait]
impl Pausable for QmpPause {
    async fn is_running(&mut self) -> Result<bool, VmmError> {
        if pid_in(&self.dir, &self.name).is_none() {
            return Ok(false);
        }
        let mut qmp = Qmp::connect(&self.dir.join("qmp.sock")).await?;
        Ok(qmp.status().await? == "running")
    }

    async fn pause(&mut self) -> Result<(), VmmError> {
        Qmp::connect(&self.dir.join("qmp.sock"))
            .await?
            .execute("stop", None)
            .await?;
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), VmmError> {
        Qmp::connect(&self.dir.join("qmp.sock"))
            .await?
            .execute("cont", None)
            .await?;
        Ok(())
    }

    async fn save_memory(&mut self, to: &Path) -> Result<Option<SavedMemory>, VmmError> {
        let Some(memory) = self.memory.take() else {
            return Ok(None);
        };
        let pid = pid_in(&self.dir, &self.name)
            .ok_or_else(|| VmmError::Failed(format!("{} is not running", self.name)))?;
        let kernel_args = argument_after(pid, "-append")
            .ok_or_else(|| VmmError::Failed(format!("the QEMU of {} has no -append", self.name)))?;
        let file = std::fs::File::create(to).map_err(fail("create the memory's file"))?;
        let mut qmp = Qmp::connect(&self.dir.join("qmp.sock")).await?;
        save_state(&mut qmp, &file).await?;
        Ok(Some(SavedMemory {
            kernel_args,
            ..memory
        }))
    }
}

/// Whether the guest in `dir` answers on its identity port (`image::AWAIT_RESTORE`): a VM
/// restored from its memory would wait for it in vain (an image without perl, or a user
/// who ended it), so without it a snapshot keeps the disk only.
async fn guest_listens(dir: &Path) -> bool {
    crate::base_snapshot::answers_ping(async {
        Ok(tokio::io::BufReader::new(
            tokio::net::UnixStream::connect(dir.join("identity.sock")).await?,
        ))
    })
    .await
}

/// The argument after `flag` on the command line of process `pid`.
fn argument_after(pid: u32, flag: &str) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text = String::from_utf8_lossy(&cmdline);
    let mut args = text.split('\0');
    args.by_ref().find(|a| *a == flag)?;
    args.next().map(str::to_string)
}

/// What a VM is restored from: a base snapshot, or a user's snapshot that kept memory.
struct SavedVm {
    /// The disk the VM's own is layered on.
    disk: PathBuf,
    /// QEMU's migration stream.
    memory: PathBuf,
    kernel_args: String,
    /// The base snapshot's id (the VM's `restored_from`); `None` for a user's snapshot,
    /// which the VM's `spec.snapshot` names.
    base: Option<String>,
    /// For the log.
    label: String,
}

/// The QEMU fd set a VM's disk is handed over in.
const DISK_FDSET: u32 = 1;

/// Hands `dir`'s `disk.qcow2` to `command`'s QEMU in `DISK_FDSET`.
fn add_disk(command: &mut Command, dir: &Path) -> Result<(), VmmError> {
    for fd in disk_descriptors(command, &dir.join("disk.qcow2"))? {
        command.args(["-add-fd", &format!("fd={fd},set={DISK_FDSET}")]);
    }
    Ok(())
}

/// Opens `disk` read-write and read-only and has `command`'s process inherit the two (their
/// close-on-exec flag cleared in the child only); returns their numbers for `-add-fd`.
/// QEMU takes from the set whichever mode it needs, now or when it reopens.
fn disk_descriptors(command: &mut Command, disk: &Path) -> Result<[i32; 2], VmmError> {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let open = |write: bool| -> Result<OwnedFd, VmmError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(disk)
            .map(OwnedFd::from)
            .map_err(fail("open the VM's disk"))
    };
    let (read_write, read_only) = (open(true)?, open(false)?);
    let fds = [read_write.as_raw_fd(), read_only.as_raw_fd()];
    // SAFETY: between fork and exec only fcntl runs (async-signal-safe); the descriptors
    // stay open in the parent until the closure is dropped with the command.
    unsafe {
        command.pre_exec(move || {
            let _keep = (&read_write, &read_only);
            for fd in fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(fds)
}

/// Whether `pid` is a live QEMU process of VM `name` (not a recycled pid).
fn is_our_process(pid: u32, name: &str) -> bool {
    process_has_argument(pid, &format!("{name},process={name}"))
}

/// The pid of VM `name`'s QEMU, from the pid file in `dir`, if it runs.
fn pid_in(dir: &Path, name: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    is_our_process(pid, name).then_some(pid)
}

/// A VM directory not committed yet: dropped armed, its QEMU is killed and it is removed.
struct HalfMade {
    dir: PathBuf,
    name: String,
    armed: bool,
}

impl Drop for HalfMade {
    fn drop(&mut self) {
        if self.armed {
            kill_qemu(&self.dir, &self.name);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Kills the QEMU of `name` started from `dir`, if it runs (for half-made VMs: nothing in
/// them is worth a clean stop).
pub(crate) fn kill_qemu(dir: &Path, name: &str) {
    if let Some(pid) = pid_in(dir, name) {
        // SAFETY: kill(2) with a pid checked to be this VM's QEMU a moment ago.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let started = Instant::now();
        while is_our_process(pid, name) && started.elapsed() < QUIT_GRACE {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What the files of `disk`'s backing chain take on the host's disk: at most what a copy
/// that folds the chain in takes.
fn chain_bytes(disk: &Path) -> Result<u64, VmmError> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(disk)
        .output()
        .map_err(fail("run qemu-img info"))?;
    if !out.status.success() {
        return Err(VmmError::Failed(format!(
            "qemu-img info {}: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let chain: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .map_err(|e| VmmError::Failed(format!("qemu-img info's answer: {e}")))?;
    Ok(chain
        .iter()
        .filter_map(|file| file["actual-size"].as_u64())
        .sum())
}

/// Powers off the QEMU of `name` started from `dir`: QMP `quit`, a kill after a grace period.
pub(crate) async fn stop_qemu(dir: &Path, name: &str) {
    let Some(pid) = pid_in(dir, name) else {
        return;
    };
    if let Ok(mut qmp) = Qmp::connect(&dir.join("qmp.sock")).await {
        // QEMU may close the connection before answering; either way it is going.
        let _ = qmp.execute("quit", None).await;
    }
    let started = Instant::now();
    while is_our_process(pid, name) {
        if started.elapsed() > QUIT_GRACE {
            // SAFETY: kill(2) with a pid checked to be this VM's QEMU a moment ago.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The host's TSC rate in kHz, counted over 100 ms of wall time; `None` off x86_64.
fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(unused_unsafe)]
        // SAFETY: RDTSC reads a counter; it has no memory effects.
        let read = || unsafe { core::arch::x86_64::_rdtsc() };
        let (started, first) = (Instant::now(), read());
        std::thread::sleep(Duration::from_millis(100));
        let (ticks, elapsed) = (read().wrapping_sub(first), started.elapsed());
        let khz = ticks as f64 / elapsed.as_secs_f64() / 1000.0;
        (khz > 100_000.0).then_some(khz as u64)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// `qemu-system-x86_64 --version`'s first line.
fn qemu_version() -> Result<String, VmmError> {
    let out = Command::new(QEMU).arg("--version").output().map_err(|e| {
        VmmError::Failed(format!(
            "cannot run {QEMU} ({e}); apt-get install qemu-system-x86 qemu-utils (in one command)"
        ))
    })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

impl QemuHost {
    /// A host keeping its VMs under `dir`, booting `image`.
    pub fn new(
        dir: PathBuf,
        image: VmImage,
        accel: Accel,
        guest_address: &str,
    ) -> Result<QemuHost, VmmError> {
        let mmio = image.mmio;
        // A restore that never finished left a hidden directory whose QEMU may still run.
        let dirs = VmDirs::new(&dir, |leftover| {
            let name = leftover
                .file_name()
                .map(|n| n.to_string_lossy().to_string());
            if let Some(name) = name
                .as_deref()
                .and_then(|n| n.strip_prefix('.'))
                .and_then(|n| n.strip_suffix(".new"))
            {
                kill_qemu(leftover, name);
            }
        })?;
        let snapshots = Snapshots::open(&dir, "disk.qcow2")?;
        snapshots.sweep(&dirs.snapshots_in_use()?);
        let images = Snapshots::open_images(&dir, &snapshots)?;
        images.sweep(&dirs.images_in_use()?);
        Ok(QemuHost {
            dirs,
            snapshots: Arc::new(snapshots),
            images: Arc::new(images),
            vm_locks: VmLocks::default(),
            launcher: Arc::new(Launcher {
                image,
                accel,
                guest_address: guest_address.to_string(),
                runas: None,
                tsc_khz: mmio.then(host_tsc_khz).flatten(),
            }),
            lock: tokio::sync::Mutex::new(()),
            base: None,
            fingerprint: None,
        }
        .with_fingerprint())
    }

    fn with_fingerprint(mut self) -> QemuHost {
        match qemu_version() {
            Ok(version) => {
                self.fingerprint = Some(crate::base_snapshot::fingerprint(&self.launcher, &version))
            }
            Err(e) => {
                tracing::warn!(error = %e, "snapshots keep VMs' disks only")
            }
        }
        self
    }

    /// QEMU drops to `user` once its files are open (see `guard.rs`). Call it before
    /// `with_base_snapshots`, whose builds start QEMU the same way.
    pub fn run_as(mut self, user: Option<String>) -> QemuHost {
        Arc::make_mut(&mut self.launcher).runas = user;
        self
    }

    /// New VMs restore a base snapshot of their size when there is one, and the first VM
    /// of a size starts building one (`base_snapshot.rs`). Needs the `microvm` machine
    /// (an image whose initramfs has the MMIO transport); a no-op otherwise.
    pub fn with_base_snapshots(mut self, state: &Path) -> Result<QemuHost, VmmError> {
        if !self.launcher.image.mmio {
            tracing::warn!(
                "base snapshots need an image built for the microvm machine; rebuild it with `hearth image build --vm`"
            );
            return Ok(self);
        }
        let Some(fingerprint) = self.fingerprint.clone() else {
            return Err(VmmError::Failed(format!(
                "base snapshots need {QEMU}'s version, which could not be read (the warning \
                 logged at start says why); apt-get install qemu-system-x86 qemu-utils"
            )));
        };
        let mut in_use = std::collections::HashSet::new();
        for name in self.dirs.names()? {
            if let Some(from) = self.dirs.record(&name)?.and_then(|r| r.restored_from) {
                in_use.insert(from);
            }
        }
        self.base = Some(Arc::new(BaseSnapshots::open(
            state,
            self.launcher.clone(),
            fingerprint,
            &in_use,
        )?));
        Ok(self)
    }

    /// The base snapshots, if enabled.
    pub fn base_snapshots(&self) -> Option<&Arc<BaseSnapshots>> {
        self.base.as_ref()
    }

    fn vm_dir(&self, name: &str) -> Result<PathBuf, VmmError> {
        self.dirs.dir(name)
    }

    fn pid(&self, name: &str) -> Option<u32> {
        pid_in(&self.vm_dir(name).ok()?, name)
    }

    async fn create_vm(&self, spec: &VmSpec) -> Result<VmRecord, VmmError> {
        let _guard = self.lock.lock().await;
        if let Some(record) = self.dirs.record(&spec.name)? {
            if self.pid(&spec.name).is_some() {
                return Ok(record);
            }
            return self
                .launcher
                .launch(&record, &self.vm_dir(&spec.name)?, Boot::Cold)
                .await;
        }
        check_sizes(spec)?;
        let from_snapshot = match &spec.snapshot {
            Some(id) => Some(self.snapshots.disk(id, spec.disk_gb)?),
            None => None,
        };
        let from_image = match (&spec.image, &from_snapshot) {
            (Some(id), None) => Some(self.images.disk(id, spec.disk_gb)?),
            _ => None,
        };
        let record = VmRecord {
            spec: spec.clone(),
            ssh_port: free_port(&self.launcher.guest_address)?,
            accel: self.launcher.accel,
            created_at_ms: now_ms(),
            net_slot: None,
            mac: Some(random_mac()?),
            restored_from: None,
        };
        if let (Some(id), Some(disk)) = (&spec.snapshot, &from_snapshot)
            && let Some(saved) = self.saved_memory(id, spec, disk)?
        {
            match self.restore(&record, &saved).await {
                Ok(record) => return Ok(record),
                Err(e) => {
                    tracing::warn!(vm = %spec.name, snapshot = %id, error = %e, "restoring the snapshot's memory failed; this VM boots from its disk")
                }
            }
        }
        // Base snapshots are of the host's image.
        let from_host_image = from_snapshot.is_none() && from_image.is_none();
        if let Some(base) = self.base.as_ref().filter(|_| from_host_image) {
            match base.ready(spec) {
                Some(snapshot) => match self
                    .restore(
                        &record,
                        &SavedVm {
                            disk: snapshot.disk(),
                            memory: snapshot.memory(),
                            kernel_args: snapshot.info.kernel_args.clone(),
                            base: Some(snapshot.id.clone()),
                            label: format!("its base snapshot {}", snapshot.id),
                        },
                    )
                    .await
                {
                    Ok(record) => return Ok(record),
                    Err(e) => {
                        tracing::warn!(vm = %spec.name, snapshot = %snapshot.id, error = %e, "restoring the base snapshot failed; it is not used again, and this VM boots");
                        base.refuse(&snapshot, &e.to_string());
                    }
                },
                None => base.build_in_background(spec),
            }
        }
        self.dirs.build(&record, &[], |dir| {
            let mut create = Command::new("qemu-img");
            create.args(["create", "-q", "-f", "qcow2"]);
            match (&from_snapshot, &from_image) {
                (Some(disk), _) => create.args(["-F", "qcow2", "-b"]).arg(disk),
                (None, Some(rootfs)) => create.args(["-F", "raw", "-b"]).arg(rootfs),
                (None, None) => create
                    .args(["-F", "raw", "-b"])
                    .arg(self.launcher.image.rootfs()),
            };
            run(
                create
                    .arg(dir.join("disk.qcow2"))
                    .arg(format!("{}G", spec.disk_gb)),
                "qemu-img create",
            )
        })?;
        let dir = self.vm_dir(&spec.name)?;
        let record = self.launcher.launch(&record, &dir, Boot::Cold).await?;
        if !dir.join("record.json").is_file() {
            // Never seen here; CI once saw creates answered "no VM" three times in a row.
            tracing::error!(vm = %spec.name, dir = %dir.display(), "the VM's record is gone right after its start");
        }
        Ok(record)
    }

    /// The saved memory of user snapshot `id` (whose disk is `disk`), if it kept any and a
    /// VM of `spec` can restore it here: the same sizes, and this host's QEMU, accelerator,
    /// machine and image. `None` otherwise: the VM boots from the disk.
    fn saved_memory(
        &self,
        id: &str,
        spec: &VmSpec,
        disk: &Path,
    ) -> Result<Option<SavedVm>, VmmError> {
        let fingerprint = self.fingerprint.as_deref();
        let Some((memory, saved)) = self.snapshots.memory_for(id, spec, fingerprint)? else {
            return Ok(None);
        };
        Ok(Some(SavedVm {
            disk: disk.to_path_buf(),
            memory,
            kernel_args: saved.kernel_args,
            base: None,
            label: format!("the memory of snapshot {id}"),
        }))
    }

    /// Makes the VM from `saved`: its disk layered on the saved one, QEMU loading the
    /// saved state, the guest taking the VM's identity. All of it happens in the VM's
    /// hidden directory, committed only at the end: an agent that dies half-way leaves a
    /// directory the next start removes, with its QEMU.
    async fn restore(&self, record: &VmRecord, snapshot: &SavedVm) -> Result<VmRecord, VmmError> {
        let record = VmRecord {
            restored_from: snapshot.base.clone(),
            ..record.clone()
        };
        let name = &record.spec.name;
        let started = Instant::now();
        let identity = identity_files(&record.spec, record.mac.as_deref())?;
        // A restore of this name cut short before (its caller gave up) may have left a QEMU.
        kill_qemu(&self.dirs.building_dir(name)?, name);
        let building = self.dirs.prepare(&record, &identity, |dir| {
            run(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                    .arg(&snapshot.disk)
                    .arg(dir.join("disk.qcow2"))
                    .arg(format!("{}G", record.spec.disk_gb)),
                "qemu-img create",
            )
        })?;
        // Whatever ends this restore early, an error or the caller giving up (a dropped
        // future), stops its QEMU and removes its directory.
        let mut guard = HalfMade {
            dir: building.clone(),
            name: name.clone(),
            armed: true,
        };
        let restored = async {
            let record = self
                .launcher
                .launch(
                    &record,
                    &building,
                    Boot::Restore {
                        kernel_args: &snapshot.kernel_args,
                    },
                )
                .await?;
            let launched_ms = started.elapsed().as_millis() as u64;
            let mut port = connect_identity_port(&building).await?;
            let steps = restore_into(&building, &snapshot.memory, &mut port, &identity).await?;
            tracing::info!(
                vm = %name,
                from = %snapshot.label,
                launched_ms,
                loaded_ms = steps.loaded_ms,
                identified_ms = steps.identified_ms,
                "{}",
                if snapshot.base.is_some() {
                    "VM restored from its base snapshot"
                } else {
                    "VM restored from a snapshot's memory"
                }
            );
            Ok::<_, VmmError>(record)
        }
        .await;
        let record = restored?;
        self.dirs.commit(&building, name)?;
        guard.armed = false;
        Ok(record)
    }

    async fn qmp(&self, name: &str) -> Result<Qmp, VmmError> {
        Ok(Qmp::connect(&self.vm_dir(name)?.join("qmp.sock")).await?)
    }

    async fn qmp_status(&self, name: &str) -> Result<Option<VmStatus>, VmmError> {
        if self.dirs.record(name)?.is_none() {
            return Ok(None);
        }
        if self.pid(name).is_none() {
            return Ok(Some(VmStatus::Stopped));
        }
        match self.qmp(name).await?.status().await?.as_str() {
            // A snapshot's pause is seconds long and undone after: still running. After
            // its memory is saved QEMU says `postmigrate` until `cont`.
            "paused" | "postmigrate" if paused_by_snapshot(&self.vm_dir(name)?) => {
                Ok(Some(VmStatus::Running))
            }
            "paused" | "postmigrate" => Ok(Some(VmStatus::Paused)),
            "running" => Ok(Some(VmStatus::Running)),
            // Shutting down, crashed, or still starting: not usable.
            _ => Ok(Some(VmStatus::Stopped)),
        }
    }

    async fn power_off(&self, name: &str) -> Result<(), VmmError> {
        stop_qemu(&self.vm_dir(name)?, name).await;
        Ok(())
    }

    async fn qmp_running(&self, name: &str, command: &str) -> Result<(), VmmError> {
        self.dirs
            .record(name)?
            .ok_or_else(|| VmmError::NotFound(name.into()))?;
        if self.pid(name).is_none() {
            return Err(VmmError::Failed(format!("{name} is not running")));
        }
        self.qmp(name).await?.execute(command, None).await?;
        Ok(())
    }
}

impl Launcher {
    pub(crate) fn guest_address(&self) -> &str {
        &self.guest_address
    }

    /// Starts QEMU for `record` from `dir`, detached; a port taken meanwhile gets another
    /// (written to the record in `dir`). Returns the record as started.
    pub(crate) async fn launch(
        &self,
        record: &VmRecord,
        dir: &Path,
        boot: Boot<'_>,
    ) -> Result<VmRecord, VmmError> {
        let name = &record.spec.name;
        let mut record = record.clone();
        for attempt in 0..5 {
            for socket in ["qmp.sock", "identity.sock"] {
                let _ = std::fs::remove_file(dir.join(socket));
            }
            let mut command = Command::new(QEMU);
            command.args(self.arguments(&record, dir, &boot));
            add_disk(&mut command, dir)?;
            let out = command
                .output()
                .map_err(|e| VmmError::Failed(format!("cannot run {QEMU} ({e}); apt-get install qemu-system-x86 qemu-utils (in one command)")))?;
            if out.status.success() {
                tracing::info!(vm = %name, port = record.ssh_port, accel = record.accel.as_str(), "VM started");
                return Ok(record);
            }
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            if stderr.contains("hostfwd") && attempt < 4 {
                record.ssh_port = free_port(&self.guest_address)?;
                if dir.join("record.json").exists() {
                    crate::vmm::write_record(dir, &record)?;
                }
                continue;
            }
            return Err(VmmError::Failed(format!(
                "{QEMU} failed to start {name}: {}",
                stderr.trim()
            )));
        }
        Err(VmmError::Failed(format!(
            "no free port for the SSH of {name}"
        )))
    }

    /// Starts QEMU for `record` from `dir` as a child of the agent that dies with it
    /// (`PR_SET_PDEATHSIG`), not detached: for a base snapshot's build, which must not
    /// outlive the agent that would save it. Returns once QMP answers.
    /// `spawned` gets each QEMU's pid as soon as it exists, so it can be killed while it
    /// starts.
    pub(crate) async fn launch_attached(
        &self,
        record: &VmRecord,
        dir: &Path,
        spawned: &std::sync::Mutex<Option<u32>>,
    ) -> Result<std::process::Child, VmmError> {
        use std::os::unix::process::CommandExt;
        let mut record = record.clone();
        for attempt in 0..5 {
            let _ = std::fs::remove_file(dir.join("qmp.sock"));
            let _ = std::fs::remove_file(dir.join("identity.sock"));
            let errors =
                std::fs::File::create(dir.join("qemu.err")).map_err(fail("create qemu.err"))?;
            let mut args = self.arguments(&record, dir, &Boot::Cold);
            args.retain(|a| a != "-daemonize");
            let mut command = Command::new(QEMU);
            add_disk(&mut command, dir)?;
            command
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(errors);
            // SAFETY: prctl is async-signal-safe; it only sets this process's parent-death
            // signal. The thread that spawns is a runtime worker, alive as long as the agent.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = command.spawn().map_err(|e| VmmError::Failed(format!("cannot run {QEMU} ({e}); apt-get install qemu-system-x86 qemu-utils (in one command)")))?;
            *spawned.lock().expect("not poisoned") = Some(child.id());
            let started = Instant::now();
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    // Reaped: its pid may be anyone's now.
                    *spawned.lock().expect("not poisoned") = None;
                    break;
                }
                if dir.join("qmp.sock").exists() {
                    return Ok(child);
                }
                if started.elapsed() > Duration::from_secs(30) {
                    let _ = child.kill();
                    let _ = child.wait();
                    *spawned.lock().expect("not poisoned") = None;
                    return Err(VmmError::Failed(format!(
                        "{QEMU} did not open its QMP socket within 30 s"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let stderr = std::fs::read_to_string(dir.join("qemu.err")).unwrap_or_default();
            if stderr.contains("hostfwd") && attempt < 4 {
                record.ssh_port = free_port(&self.guest_address)?;
                continue;
            }
            return Err(VmmError::Failed(format!(
                "{QEMU} failed to start {}: {}",
                record.spec.name,
                stderr.trim()
            )));
        }
        Err(VmmError::Failed(format!(
            "no free port for the SSH of {}",
            record.spec.name
        )))
    }

    fn arguments(&self, record: &VmRecord, dir: &Path, boot: &Boot<'_>) -> Vec<String> {
        let s = &record.spec;
        let path = |f: &str| dir.join(f).display().to_string();
        let kernel_args = match boot {
            Boot::Cold => self.kernel_args(),
            Boot::Restore { kernel_args } => kernel_args.to_string(),
        };
        let mac = record
            .mac
            .as_ref()
            .map(|m| format!(",mac={m}"))
            .unwrap_or_default();
        // The disk is handed over open (`disk_descriptors`): QEMU reopens it read-only
        // when it saves the VM's memory and for writing when the VM resumes (after a save
        // or a restore), and a confined QEMU could not by its path. QEMU's own file locks
        // are off for it: they are taken on open file descriptions, which the fd set keeps
        // open after QEMU lets go of its copies, so the read-only one's locks would refuse
        // the write reopen. One QEMU per VM is the agent's to keep (its pid file, the VM's
        // lock), and copies read it with `-U` anyway.
        let disk = format!("/dev/fdset/{DISK_FDSET}");
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("{},process={}", s.name, s.name),
            "-machine".into(),
            self.machine().into(),
            "-accel".into(),
            record.accel.as_str().into(),
            "-m".into(),
            s.memory_mb.to_string(),
            "-smp".into(),
            s.vcpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-serial".into(),
            format!("file:{}", path("console.log")),
            "-kernel".into(),
            self.image.kernel().display().to_string(),
            "-initrd".into(),
            self.image.initrd().display().to_string(),
            "-append".into(),
            kernel_args,
            "-drive".into(),
            format!("id=disk,file={disk},if=none,format=qcow2,file.locking=off"),
            "-device".into(),
            format!("{},drive=disk", self.virtio("blk")),
            "-drive".into(),
            format!(
                "id=config,file={},if=none,format=raw,readonly=on",
                path("config.ext4")
            ),
            "-device".into(),
            format!("{},drive=config", self.virtio("blk")),
            "-netdev".into(),
            format!(
                "user,id=n0,hostfwd=tcp:{}:{}-:22",
                self.guest_address, record.ssh_port
            ),
            "-device".into(),
            format!("{},netdev=n0{mac}", self.virtio("net")),
        ];
        if self.image.mmio {
            // The port a base VM waits on to be told, once restored, who it is. Every VM has
            // it, so every VM's devices match the snapshot's.
            args.extend([
                "-chardev".into(),
                format!(
                    "socket,id=identity,path={},server=on,wait=off",
                    path("identity.sock")
                ),
                "-device".into(),
                "virtio-serial-device".into(),
                "-device".into(),
                "virtserialport,chardev=identity,name=hearth.identity".into(),
            ]);
        }
        args.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", path("qmp.sock")),
            "-pidfile".into(),
            path("qemu.pid"),
            "-daemonize".into(),
        ]);
        if let Boot::Restore { .. } = boot {
            args.extend(["-incoming".to_string(), "defer".to_string()]);
        }
        if let Some(user) = &self.runas {
            args.extend(["-runas".to_string(), user.clone()]);
        }
        args
    }

    /// `microvm` (no PCI, no firmware tables to walk: it boots faster) when the image's
    /// initramfs has the MMIO transport, else `pc`.
    pub(crate) fn machine(&self) -> &'static str {
        if self.image.mmio {
            "microvm,acpi=on"
        } else {
            "pc"
        }
    }

    /// On `microvm` the guest has no HPET or ACPI PM timer to calibrate its TSC against,
    /// and under TCG on a busy host the PIT calibration fails: the kernel then marks the
    /// TSC unstable and can hang in early boot (seen with three VMs booting at once on two
    /// cores). So the guest is told the TSC's rate, measured here, and to trust it. Under
    /// TCG the guest's TSC is the host's, so its clock keeps time (checked: 10.77 s in the
    /// guest over 10.77 s on the host).
    pub(crate) fn kernel_args(&self) -> String {
        match (self.image.mmio, self.tsc_khz) {
            (true, Some(khz)) => {
                format!("console=ttyS0 quiet panic=-1 tsc_early_khz={khz} tsc=reliable")
            }
            _ => "console=ttyS0 quiet panic=-1".into(),
        }
    }

    /// The virtio device of `kind` (`blk`, `net`) on the machine's transport.
    fn virtio(&self, kind: &str) -> String {
        if self.image.mmio {
            format!("virtio-{kind}-device")
        } else {
            format!("virtio-{kind}-pci")
        }
    }
}

#[async_trait]
impl Vmm for QemuHost {
    fn backend(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> Accel {
        self.launcher.accel
    }

    fn record(&self, name: &str) -> Result<Option<VmRecord>, VmmError> {
        self.dirs.record(name)
    }

    async fn create(&self, spec: &VmSpec) -> Result<VmRecord, VmmError> {
        self.create_vm(spec).await
    }

    async fn status(&self, name: &str) -> Result<Option<VmStatus>, VmmError> {
        self.qmp_status(name).await
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
            if self.qmp_status(name).await? == Some(VmStatus::Paused) {
                self.qmp_running(name, "cont").await?;
            }
            return Ok(());
        }
        self.launcher
            .launch(&record, &self.vm_dir(name)?, Boot::Cold)
            .await
            .map(|_| ())
    }

    /// A power-off: QMP `quit`, and a kill after a grace period.
    async fn stop(&self, name: &str) -> Result<(), VmmError> {
        let _vm = self.vm_locks.lock(name).await;
        let _guard = self.lock.lock().await;
        self.dirs
            .record(name)?
            .ok_or_else(|| VmmError::NotFound(name.into()))?;
        self.power_off(name).await
    }

    async fn pause(&self, name: &str) -> Result<(), VmmError> {
        let _vm = self.vm_locks.lock(name).await;
        self.qmp_running(name, "stop").await
    }

    async fn resume(&self, name: &str) -> Result<(), VmmError> {
        let _vm = self.vm_locks.lock(name).await;
        self.qmp_running(name, "cont").await
    }

    async fn destroy(&self, name: &str) -> Result<(), VmmError> {
        let _vm = self.vm_locks.lock(name).await;
        let _guard = self.lock.lock().await;
        self.vm_dir(name)?;
        self.power_off(name).await?;
        self.dirs.remove(name)?;
        self.vm_locks.forget(name);
        self.snapshots.sweep(&self.dirs.snapshots_in_use()?);
        self.images.sweep(&self.dirs.images_in_use()?);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<(VmRecord, VmStatus)>, VmmError> {
        let mut out = Vec::new();
        for name in self.dirs.names()? {
            if let (Some(record), Some(status)) =
                (self.dirs.record(&name)?, self.qmp_status(&name).await?)
            {
                out.push((record, status));
            }
        }
        Ok(out)
    }

    async fn recover(&self) {
        let Ok(names) = self.dirs.names() else {
            return;
        };
        for name in names {
            let Ok(dir) = self.vm_dir(&name) else {
                continue;
            };
            if !paused_by_snapshot(&dir) {
                continue;
            }
            // QEMU's own word: `qmp_status` reads a VM with the marker as running.
            let paused = match self.pid(&name).map(|_| self.qmp(&name)) {
                Some(connecting) => match connecting.await {
                    Ok(mut qmp) => qmp
                        .status()
                        .await
                        .is_ok_and(|s| s == "paused" || s == "postmigrate"),
                    Err(_) => false,
                },
                None => false,
            };
            if paused {
                match self.qmp_running(&name, "cont").await {
                    Ok(()) => {
                        tracing::info!(vm = %name, "resumed a VM an agent killed mid-snapshot left paused")
                    }
                    Err(e) => {
                        tracing::warn!(vm = %name, error = %e, "could not resume a VM left paused by a snapshot");
                        continue;
                    }
                }
            }
            let _ = std::fs::remove_file(dir.join(crate::snapshots::PAUSED_FOR_SNAPSHOT));
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
        let dir = self.vm_dir(name)?;
        let disk = dir.join("disk.qcow2");
        let memory = match (&self.fingerprint, self.launcher.image.mmio) {
            (Some(fingerprint), true) if guest_listens(&dir).await => Some(SavedMemory {
                kernel_args: String::new(),
                vcpus: record.spec.vcpus,
                memory_mb: record.spec.memory_mb,
                fingerprint: fingerprint.clone(),
            }),
            _ => None,
        };
        // Its memory takes at most the guest's RAM (QEMU skips pages of zeros).
        let memory_bytes = if memory.is_some() {
            record.spec.memory_mb as u64 * (1 << 20)
        } else {
            0
        };
        let vm = QmpPause {
            dir: dir.clone(),
            name: name.to_string(),
            memory,
        };
        let needed = {
            let disk = disk.clone();
            tokio::task::spawn_blocking(move || chain_bytes(&disk))
                .await
                .map_err(|e| VmmError::Failed(format!("qemu-img info: {e}")))??
                + memory_bytes
        };
        crate::snapshots::take(
            self.snapshots.clone(),
            id,
            crate::snapshots::VmDisk {
                vm_dir: dir,
                disk_gb: record.spec.disk_gb,
                copy_bytes: needed,
            },
            lock,
            vm,
            move |to| {
                // The VM's QEMU holds the disk's lock (paused or not): `-U` reads beside it.
                // The copy folds the backing chain in: it depends on nothing else here.
                run(
                    Command::new("qemu-img")
                        .args(["convert", "-U", "-O", "qcow2"])
                        .arg(&disk)
                        .arg(to),
                    "qemu-img convert",
                )
            },
        )
        .await
    }

    fn snapshots(&self) -> Option<&Snapshots> {
        Some(&self.snapshots)
    }

    async fn remove_snapshot(&self, id: &str) -> Result<bool, VmmError> {
        // Not under a create that is layering a disk on it.
        let _guard = self.lock.lock().await;
        self.snapshots.remove(id, &self.dirs.snapshots_in_use()?)
    }

    fn images(&self) -> Option<&Arc<Snapshots>> {
        Some(&self.images)
    }

    async fn remove_image(&self, id: &str) -> Result<bool, VmmError> {
        // Not under a create that is layering a disk on it.
        let _guard = self.lock.lock().await;
        self.images.remove(id, &self.dirs.images_in_use()?)
    }

    /// A base snapshot being built is abandoned with its QEMU (the next create that needs
    /// it starts another build).
    fn shutdown(&self) {
        if let Some(base) = &self.base {
            base.stop_build();
        }
    }
}

/// Whether KVM really runs a guest here: boots the image's initramfs `/probe` under KVM and
/// waits for its marker. `false` when `/dev/kvm` is missing, QEMU refuses, or the guest
/// hangs (as under nested virtualization that does not work).
pub fn probe_kvm(image: &VmImage, work: &Path) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    probe(Accel::Kvm, image, work)
}

/// Whether a guest boots to the probe's marker under `accel` within `PROBE_TIMEOUT`.
pub fn probe(accel: Accel, image: &VmImage, work: &Path) -> bool {
    let log = work.join(format!("{}-probe.log", accel.as_str()));
    let _ = std::fs::remove_file(&log);
    let child = Command::new(QEMU)
        .args([
            "-machine",
            "pc",
            "-accel",
            accel.as_str(),
            "-m",
            "256",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(image.kernel())
        .arg("-initrd")
        .arg(image.initrd())
        .args(["-append", "console=ttyS0 rdinit=/probe panic=-1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    let started = Instant::now();
    let mut works = false;
    while started.elapsed() < PROBE_TIMEOUT {
        if std::fs::read_to_string(&log).is_ok_and(|l| l.contains(PROBE_MARKER)) {
            works = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            works = std::fs::read_to_string(&log).is_ok_and(|l| l.contains(PROBE_MARKER));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    works
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_counts_every_file_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 4 << 20]).unwrap();
        let overlay = dir.path().join("disk.qcow2");
        run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&base)
                .arg(&overlay),
            "qemu-img create",
        )
        .unwrap();
        let bytes = chain_bytes(&overlay).unwrap();
        assert!(bytes >= 4 << 20, "{bytes}");
        assert!(bytes < 16 << 20, "{bytes}");
    }
}
