//! Users' snapshots of their VMs' disks (the control plane's
//! `POST /v1/environments/{id}/snapshots`), kept under `<state>/snapshots/<id>/`, and the
//! disks of new VMs made from them.
//!
//! A snapshot is the VM's disk copied whole into one file of the backend's format (QEMU:
//! qcow2 with the whole backing chain folded in; Firecracker: a sparse raw copy), so it
//! depends on nothing else here: not the image a later `hearth image build --vm` replaces,
//! nor a base snapshot that gets outdated. It is written in a hidden directory and renamed
//! into place, so it exists whole or not at all: a control plane whose call was cut short
//! asks again (`find`), and an agent killed mid-copy leaves a hidden directory the next
//! start removes.
//!
//! Memory is kept where the backend can save it: a running QEMU VM on the `microvm`
//! machine has its memory saved too (QEMU's migration stream, `memory`, with what a restore
//! must match in `memory.json`), during the same pause as the disk's copy, so the two agree.
//! A VM made from such a snapshot with the same sizes, on a host whose QEMU, accelerator
//! and image match, is restored: its processes run on from where they were, and it is told
//! its own identity on its virtio port as a base snapshot's VMs are (`base_snapshot.rs`).
//! Otherwise (another size, a stopped VM, Firecracker, a save that failed) the VM boots from
//! the disk and takes an identity of its own on that first boot (the image's init applies
//! the config drive's keys, host key and machine id when the machine id differs from the
//! one the disk remembers).
//!
//! A QEMU VM made from a snapshot has its disk layered on the snapshot's file. Deleting a
//! snapshot such a VM still uses marks it `removed` (the control plane no longer sees it)
//! and the file goes with the last VM that uses it (`sweep`).

use crate::vmm::{VmmError, fail};
use async_trait::async_trait;
pub use hearth_provider::agent::wire::Snapshot;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// In a VM's directory while a snapshot has it paused: an agent killed meanwhile leaves it,
/// and the next start resumes the VM (`Vmm::recover`). Meanwhile the VM is reported
/// running: the pause is the snapshot's, not a state the control plane should act on.
pub(crate) const PAUSED_FOR_SNAPSHOT: &str = "paused-for-snapshot";

/// How often a snapshot tries to resume the VM it paused before it gives up.
const RESUME_TRIES: u32 = 3;

/// Room a snapshot leaves free on the agent's disk beyond its copy: the VMs' own disks grow
/// into it, and a full disk would stop them all.
pub(crate) const RESERVE_BYTES: u64 = 2 << 30;

/// Bytes an unprivileged writer may still use on the file system holding `path`.
fn free_bytes(path: &Path) -> Result<u64, VmmError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| VmmError::Failed(format!("{} holds a NUL byte", path.display())))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a struct statvfs to fill, both alive for the call.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(fail("measure the free space for snapshots")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Refuses a copy of up to `needed` bytes into `dir` (`what`: "this snapshot", ...) that
/// would leave less than `RESERVE_BYTES` free once copies under way (`pending` bytes) are
/// done, before anything is paused or written.
pub(crate) fn check_room(
    dir: &Path,
    needed: u64,
    pending: u64,
    what: &str,
) -> Result<(), VmmError> {
    let free = free_bytes(dir)?;
    if free.saturating_sub(RESERVE_BYTES).saturating_sub(pending) < needed {
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        return Err(VmmError::Failed(format!(
            "not enough disk space on the host for {what}: it needs up to {:.1} GiB; \
             {:.1} GiB are free, {:.1} GiB of them promised to copies under way, and \
             {:.0} GiB are kept free for the VMs' disks; delete snapshots or images, or free space on the host",
            gib(needed),
            gib(free),
            gib(pending),
            gib(RESERVE_BYTES)
        )));
    }
    Ok(())
}

/// The room a copy under way was promised; given back when the copy ends either way.
pub(crate) struct Promised {
    snapshots: Arc<Snapshots>,
    bytes: u64,
}

impl Drop for Promised {
    fn drop(&mut self) {
        *self.snapshots.pending.lock().expect("not poisoned") -= self.bytes;
    }
}

impl Snapshots {
    /// Bytes promised to copies under way (snapshots' and images' alike).
    pub(crate) fn pending(&self) -> u64 {
        *self.pending.lock().expect("not poisoned")
    }

    /// Checks and promises room for a copy of up to `needed` bytes: copies of different VMs
    /// (and images' imports) run at once, and each must count what the others will still
    /// write.
    pub(crate) fn promise(self: &Arc<Self>, needed: u64) -> Result<Promised, VmmError> {
        let mut pending = self.pending.lock().expect("not poisoned");
        check_room(&self.root, needed, *pending, &format!("this {}", self.what))?;
        *pending += needed;
        Ok(Promised {
            snapshots: self.clone(),
            bytes: needed,
        })
    }
}

/// The bytes `path` takes on its disk (a sparse file's holes take none).
pub(crate) fn allocated_bytes(path: &Path) -> Result<u64, VmmError> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)
        .map_err(fail("measure the VM's disk"))?
        .blocks()
        * 512)
}

/// A VM as a snapshot sees it: paused for the copy when it runs, resumed after.
#[async_trait]
pub(crate) trait Pausable: Send + 'static {
    async fn is_running(&mut self) -> Result<bool, VmmError>;
    /// Pauses it (the backend's caches written to the disk file).
    async fn pause(&mut self) -> Result<(), VmmError>;
    async fn resume(&mut self) -> Result<(), VmmError>;
    /// Saves the paused VM's memory to the file `to`, if the backend can, and says what a
    /// restore of it must match; `None` when it cannot. Other files the backend saves
    /// with it (Firecracker's `vmstate`) go beside `to`, and are kept with it.
    async fn save_memory(&mut self, _to: &Path) -> Result<Option<SavedMemory>, VmmError> {
        Ok(None)
    }
}

/// The file a snapshot's memory is kept in, beside its disk.
pub(crate) const MEMORY_FILE: &str = "memory";
/// What a restore of that memory must match (`SavedMemory`).
const MEMORY_INFO: &str = "memory.json";

/// What a VM restored from a snapshot's memory must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SavedMemory {
    /// The kernel command line the VM had booted with.
    pub kernel_args: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    /// The saving host's QEMU, accelerator, machine and image (`base_snapshot::fingerprint`).
    pub fingerprint: String,
}

/// One change to a VM at a time (a snapshot's copy, a start, a stop, a pause, a destroy),
/// without holding up the host's other VMs.
#[derive(Default)]
pub(crate) struct VmLocks(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl VmLocks {
    pub async fn lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .0
            .lock()
            .expect("not poisoned")
            .entry(name.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Forgets a destroyed VM's lock (a new VM of the name gets a new one).
    pub fn forget(&self, name: &str) {
        self.0.lock().expect("not poisoned").remove(name);
    }
}

/// Whether the VM in `vm_dir`, which its backend says is paused, was paused by a snapshot.
pub(crate) fn paused_by_snapshot(vm_dir: &Path) -> bool {
    vm_dir.join(PAUSED_FOR_SNAPSHOT).exists()
}

/// The disk a snapshot copies.
pub(crate) struct VmDisk {
    /// The VM's directory (where the paused-for-snapshot marker goes).
    pub vm_dir: PathBuf,
    /// Its size as the VM sees it.
    pub disk_gb: i64,
    /// The most its copy can take on the host's disk.
    pub copy_bytes: u64,
}

/// Copies the disk of the VM in `disk.vm_dir` into snapshot `id` with `copy`, the VM paused
/// meanwhile if it runs (a marker in its directory says so until it is resumed). It runs
/// as a task of its own holding `lock` (the VM's): a caller that gives up cannot leave the
/// VM paused, and nothing starts, stops or pauses the VM under the copy. A copy that could
/// fill the host's disk is refused first (`check_room`).
pub(crate) async fn take(
    snapshots: Arc<Snapshots>,
    id: &str,
    disk: VmDisk,
    lock: tokio::sync::OwnedMutexGuard<()>,
    vm: impl Pausable,
    copy: impl FnOnce(&Path) -> Result<(), VmmError> + Send + 'static,
) -> Result<Snapshot, VmmError> {
    let promised = match snapshots.find(id)? {
        None => Some(snapshots.promise(disk.copy_bytes)?),
        Some(_) => None,
    };
    let id = id.to_string();
    tokio::spawn(async move {
        let _lock = lock;
        let _promised = promised;
        pause_copy_resume(snapshots, id, disk.vm_dir, disk.disk_gb, vm, copy).await
    })
    .await
    .map_err(|e| VmmError::Failed(format!("the snapshot failed: {e}")))?
}

async fn pause_copy_resume(
    snapshots: Arc<Snapshots>,
    id: String,
    vm_dir: PathBuf,
    disk_gb: i64,
    mut vm: impl Pausable,
    copy: impl FnOnce(&Path) -> Result<(), VmmError> + Send + 'static,
) -> Result<Snapshot, VmmError> {
    let started = Instant::now();
    let marker = vm_dir.join(PAUSED_FOR_SNAPSHOT);
    let work = snapshots.work_dir(&id)?;
    let paused = vm.is_running().await?;
    if paused {
        // Before the pause: a VM paused by us is never without its marker.
        std::fs::write(&marker, b"").map_err(fail("mark the VM paused for a snapshot"))?;
        if let Err(e) = vm.pause().await {
            let _ = std::fs::remove_file(&marker);
            return Err(e);
        }
    }
    // The memory first, while the VM is paused: the disk's copy then holds what the saved
    // memory expects. A save that fails leaves a snapshot of the disk alone.
    let mut memory = None;
    if paused {
        let _ = std::fs::remove_dir_all(&work);
        let file = work.join(MEMORY_FILE);
        let saved = match std::fs::create_dir_all(&work) {
            Ok(()) => vm.save_memory(&file).await,
            Err(e) => Err(fail("create the snapshot's work directory")(e)),
        };
        match saved {
            Ok(Some(saved)) => memory = Some(saved),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(dir = %vm_dir.display(), snapshot = %id, error = %e, "could not save the VM's memory; the snapshot keeps its disk only")
            }
        }
    }
    let saved_in = work.clone();
    let copy = move |disk: &Path| {
        copy(disk)?;
        if let Some(saved) = memory {
            let dir = disk
                .parent()
                .expect("a snapshot's disk is in its directory");
            for entry in std::fs::read_dir(&saved_in).map_err(fail("keep the VM's memory"))? {
                let file = entry.map_err(fail("keep the VM's memory"))?.path();
                let name = file.file_name().expect("a directory's entry has a name");
                std::fs::File::open(&file)
                    .and_then(|f| f.sync_all())
                    .and_then(|()| std::fs::rename(&file, dir.join(name)))
                    .map_err(fail("keep the VM's memory"))?;
            }
            std::fs::write(
                dir.join(MEMORY_INFO),
                serde_json::to_vec(&saved).expect("serializable"),
            )
            .and_then(|()| std::fs::File::open(dir.join(MEMORY_INFO))?.sync_all())
            .map_err(fail("keep the VM's memory"))?;
        }
        Ok(())
    };
    let snapshot_id = id.clone();
    let snapshots_for_copy = snapshots.clone();
    let made =
        tokio::task::spawn_blocking(move || snapshots_for_copy.make(&snapshot_id, disk_gb, copy))
            .await
            .map_err(|e| VmmError::Failed(format!("the snapshot's copy failed: {e}")))
            .and_then(|made| made);
    if paused {
        let mut resumed = vm.resume().await;
        for _ in 1..RESUME_TRIES {
            if resumed.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            resumed = vm.resume().await;
        }
        // Either way the marker goes: the VM reports what it is (paused, if the resume
        // failed: a start resumes it).
        let _ = std::fs::remove_file(&marker);
        let _ = std::fs::remove_dir_all(&work);
        if let Err(e) = resumed {
            tracing::error!(dir = %vm_dir.display(), error = %e, "could not resume the VM after its snapshot; it stays paused until started");
            return Err(VmmError::Failed(format!(
                "the snapshot was taken but its VM could not be resumed ({e}); start the environment"
            )));
        }
    }
    if let Ok(made) = &made {
        tracing::info!(dir = %vm_dir.display(), snapshot = %id, bytes = made.size_bytes, memory_bytes = made.memory_bytes, paused, ms = started.elapsed().as_millis() as u64, "snapshot taken");
    }
    made
}

/// Disks new VMs are made from, each one file named `disk_file`, kept whole under ids the
/// control plane gives: users' snapshots (`<state>/snapshots`), and custom images
/// (`<state>/images`, `images.rs`), which are kept the same way.
pub struct Snapshots {
    root: PathBuf,
    /// `snapshot` or `image`, for messages.
    what: &'static str,
    disk_file: &'static str,
    /// Bytes promised to copies under way (`promise`), shared by a host's snapshots and
    /// images: both write to its disk.
    pending: Arc<std::sync::Mutex<u64>>,
}

/// The marker of a snapshot deleted while a VM still uses it.
const REMOVED: &str = "removed";
/// The file holding the size of the disk a snapshot was taken of.
const DISK_GB: &str = "disk-gb";

impl Snapshots {
    /// Opens `<state>/snapshots`, removing the hidden directories of copies that an agent
    /// before this one did not finish.
    pub fn open(state: &Path, disk_file: &'static str) -> Result<Snapshots, VmmError> {
        Snapshots::open_in(state.join("snapshots"), "snapshot", disk_file)
    }

    /// Opens `<state>/images` (custom images, `images.rs`) the same way, promising room
    /// from the same account as `snapshots`.
    pub fn open_images(state: &Path, snapshots: &Snapshots) -> Result<Snapshots, VmmError> {
        let mut images =
            Snapshots::open_in(state.join("images"), "image", crate::images::DISK_FILE)?;
        images.pending = snapshots.pending.clone();
        Ok(images)
    }

    /// Opens `<state>/fc-base-snapshots` (a Firecracker host's base snapshots) the same
    /// way, promising room from the same account as `snapshots`.
    pub fn open_base(state: &Path, snapshots: &Snapshots) -> Result<Snapshots, VmmError> {
        let mut base = Snapshots::open_in(
            state.join("fc-base-snapshots"),
            "base snapshot",
            "disk.ext4",
        )?;
        base.pending = snapshots.pending.clone();
        Ok(base)
    }

    fn open_in(
        root: PathBuf,
        what: &'static str,
        disk_file: &'static str,
    ) -> Result<Snapshots, VmmError> {
        std::fs::create_dir_all(&root).map_err(fail("create the snapshots' directory"))?;
        for entry in std::fs::read_dir(&root)
            .map_err(fail("read the snapshots' directory"))?
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with('.') {
                tracing::info!(dir = %entry.path().display(), what, "removing a copy that was cut short");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(Snapshots {
            root,
            what,
            disk_file,
            pending: Arc::default(),
        })
    }

    /// The directory of snapshot `id`; ids are the control plane's (letters, digits, `_`, `-`).
    fn dir(&self, id: &str) -> Result<PathBuf, VmmError> {
        let well_formed = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !well_formed {
            return Err(VmmError::Failed(format!(
                "{} id {id:?} must be letters, digits, '_' and '-' (at most 64)",
                self.what
            )));
        }
        Ok(self.root.join(id))
    }

    /// A hidden directory beside the kept ones for the work of making `id` (removed, if
    /// left, by the next `open`).
    pub(crate) fn work_dir(&self, id: &str) -> Result<PathBuf, VmmError> {
        self.dir(id)?;
        Ok(self.root.join(format!(".{id}.work")))
    }

    /// The disk file of snapshot `id`, for a new VM's disk of `disk_gb` to be made from;
    /// an error that says why when there is no such snapshot (or it was deleted) or the
    /// disk would be smaller than the one it was taken of.
    pub fn disk(&self, id: &str, disk_gb: i64) -> Result<PathBuf, VmmError> {
        match self.find(id)? {
            Some(found) if found.disk_gb > disk_gb => Err(VmmError::Failed(format!(
                "{} {id} is of a {} GB disk; a VM made from it needs at least that, not {disk_gb} GB",
                self.what, found.disk_gb
            ))),
            Some(_) => Ok(self.dir(id)?.join(self.disk_file)),
            None => Err(VmmError::Failed(format!(
                "this host has no {} {id}; it was deleted or never finished",
                self.what
            ))),
        }
    }

    /// Snapshot `id`, unless it is absent or deleted.
    pub fn find(&self, id: &str) -> Result<Option<Snapshot>, VmmError> {
        let dir = self.dir(id)?;
        if dir.join(REMOVED).exists() {
            return Ok(None);
        }
        let disk_gb = match std::fs::read_to_string(dir.join(DISK_GB)) {
            Ok(text) => text.trim().parse::<i64>().map_err(|e| {
                VmmError::Failed(format!(
                    "{} {id}: its {DISK_GB} is unreadable: {e}",
                    self.what
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(VmmError::Failed(format!("read {} {id}: {e}", self.what))),
        };
        let meta = std::fs::metadata(dir.join(self.disk_file))
            .map_err(|e| VmmError::Failed(format!("read {} {id}: {e}", self.what)))?;
        use std::os::unix::fs::MetadataExt;
        let memory_bytes = std::fs::metadata(dir.join(MEMORY_FILE))
            .map(|m| (m.blocks() * 512) as i64)
            .unwrap_or(0);
        Ok(Some(Snapshot {
            id: id.to_string(),
            size_bytes: (meta.blocks() * 512) as i64 + memory_bytes,
            memory_bytes,
            disk_gb,
        }))
    }

    /// Snapshot `id`'s saved memory, if it kept any and a VM of `spec` can load it on a host
    /// whose hypervisor and image have `fingerprint`: the same vCPUs, memory and disk, saved
    /// by the same hypervisor and image. `None` otherwise, said in the log: the VM boots
    /// from the snapshot's disk.
    pub(crate) fn memory_for(
        &self,
        id: &str,
        spec: &crate::vmm::VmSpec,
        fingerprint: Option<&str>,
    ) -> Result<Option<(PathBuf, SavedMemory)>, VmmError> {
        let Some((memory, saved)) = self.memory(id)? else {
            return Ok(None);
        };
        let disk_gb = self.find(id)?.map(|s| s.disk_gb);
        if saved.vcpus != spec.vcpus
            || saved.memory_mb != spec.memory_mb
            || disk_gb != Some(spec.disk_gb)
        {
            tracing::info!(vm = %spec.name, snapshot = %id, "the snapshot's memory is of another size; this VM boots from its disk");
            return Ok(None);
        }
        if fingerprint != Some(saved.fingerprint.as_str()) {
            tracing::info!(vm = %spec.name, snapshot = %id, "the snapshot's memory was saved by another hypervisor or image; this VM boots from its disk");
            return Ok(None);
        }
        Ok(Some((memory, saved)))
    }

    /// Snapshot `id`'s saved memory and what a restore of it must match, if it kept any.
    fn memory(&self, id: &str) -> Result<Option<(PathBuf, SavedMemory)>, VmmError> {
        let dir = self.dir(id)?;
        let text = match std::fs::read(dir.join(MEMORY_INFO)) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(VmmError::Failed(format!("read {} {id}: {e}", self.what))),
        };
        let saved = serde_json::from_slice(&text).map_err(|e| {
            VmmError::Failed(format!(
                "{} {id}: {MEMORY_INFO} is unreadable: {e}",
                self.what
            ))
        })?;
        Ok(Some((dir.join(MEMORY_FILE), saved)))
    }

    /// Every snapshot kept here and not deleted.
    pub fn list(&self) -> Result<Vec<Snapshot>, VmmError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(fail("read the snapshots' directory"))? {
            let name = entry
                .map_err(fail("read the snapshots' directory"))?
                .file_name()
                .to_string_lossy()
                .to_string();
            if name.starts_with('.') {
                continue;
            }
            if let Some(found) = self.find(&name)? {
                out.push(found);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Makes snapshot `id`: `copy` writes the disk file at the path it is given (in a
    /// hidden directory), which is then renamed into place; `disk_gb` is the size of the
    /// disk it copies. One that exists is returned as
    /// it is: a second call with an id is the same snapshot.
    pub fn make(
        &self,
        id: &str,
        disk_gb: i64,
        copy: impl FnOnce(&Path) -> Result<(), VmmError>,
    ) -> Result<Snapshot, VmmError> {
        self.make_sized(id, |disk| copy(disk).map(|()| disk_gb))
    }

    /// `make` for a disk whose size `write` learns: it writes the file at the path it is
    /// given and returns the size in GB a VM made from it needs at least.
    pub fn make_sized(
        &self,
        id: &str,
        write: impl FnOnce(&Path) -> Result<i64, VmmError>,
    ) -> Result<Snapshot, VmmError> {
        if let Some(found) = self.find(id)? {
            return Ok(found);
        }
        let dir = self.dir(id)?;
        if dir.exists() {
            return Err(VmmError::Failed(format!(
                "{} {id} was deleted; a new one needs a new id",
                self.what
            )));
        }
        let building = self.root.join(format!(".{id}.new"));
        let _ = std::fs::remove_dir_all(&building);
        std::fs::create_dir_all(&building).map_err(fail("create the snapshot's directory"))?;
        let disk = building.join(self.disk_file);
        let made = write(&disk).and_then(|disk_gb| {
            // Durable before it is said to exist: the control plane records it as ready.
            std::fs::File::open(&disk)
                .and_then(|f| f.sync_all())
                .map_err(fail("write the snapshot to disk"))?;
            std::fs::write(building.join(DISK_GB), format!("{disk_gb}\n"))
                .and_then(|()| std::fs::File::open(building.join(DISK_GB))?.sync_all())
                .map_err(fail("write the snapshot's size"))?;
            std::fs::rename(&building, &dir).map_err(fail("commit the snapshot"))?;
            // The rename itself durable: the control plane records the snapshot as ready.
            std::fs::File::open(&self.root)
                .and_then(|d| d.sync_all())
                .map_err(fail("commit the snapshot"))
        });
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&building);
            return Err(e);
        }
        self.find(id)?
            .ok_or_else(|| VmmError::Failed(format!("{} {id} vanished after its copy", self.what)))
    }

    /// Deletes snapshot `id` (one that is absent counts as deleted). While a VM in `in_use`
    /// is layered on it, it is only marked, and `sweep` removes it later. Returns whether
    /// its file is gone now.
    pub fn remove(&self, id: &str, in_use: &HashSet<String>) -> Result<bool, VmmError> {
        let dir = self.dir(id)?;
        if !dir.exists() {
            return Ok(true);
        }
        if in_use.contains(id) {
            std::fs::write(dir.join(REMOVED), b"").map_err(fail("mark the snapshot deleted"))?;
            tracing::info!(snapshot = %id, "snapshot deleted; its file stays until the VMs made from it go");
            return Ok(false);
        }
        std::fs::remove_dir_all(&dir).map_err(fail("remove the snapshot"))?;
        tracing::info!(snapshot = %id, "snapshot removed");
        Ok(true)
    }

    /// Removes the deleted snapshots that no VM in `in_use` is layered on any more.
    pub fn sweep(&self, in_use: &HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().to_string();
            if entry.path().join(REMOVED).exists() && !in_use.contains(&id) {
                match std::fs::remove_dir_all(entry.path()) {
                    Ok(()) => {
                        tracing::info!(snapshot = %id, "removed a deleted snapshot its last VM no longer uses")
                    }
                    Err(e) => {
                        tracing::warn!(snapshot = %id, error = %e, "could not remove a deleted snapshot")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path) -> Result<(), VmmError> {
        std::fs::write(path, vec![7u8; 10_000]).map_err(fail("write"))
    }

    #[test]
    fn a_copy_that_would_fill_the_disk_is_refused_and_holes_take_no_room() {
        let state = tempfile::tempdir().unwrap();
        let free = free_bytes(state.path()).unwrap();
        assert!(free > 0);
        let refused = check_room(state.path(), free, 0, "this snapshot")
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("not enough disk space on the host for this snapshot"),
            "{refused}"
        );
        if free > RESERVE_BYTES + (8 << 30) {
            // Room promised to one copy is not promised again while it runs (the margins
            // leave room for other programs writing meanwhile).
            let snapshots = Arc::new(Snapshots::open(state.path(), "disk.qcow2").unwrap());
            let half = (free - RESERVE_BYTES) / 2 + (1 << 30);
            let first = snapshots.promise(half).unwrap();
            assert!(snapshots.promise(half).is_err());
            drop(first);
            snapshots.promise(half).unwrap();
            assert_eq!(*snapshots.pending.lock().unwrap(), 0);
        }
        let sparse = state.path().join("sparse");
        let file = std::fs::File::create(&sparse).unwrap();
        file.set_len(10 << 30).unwrap();
        assert!(allocated_bytes(&sparse).unwrap() < 1 << 20);
        std::fs::write(&sparse, vec![7u8; 1 << 20]).unwrap();
        assert!(allocated_bytes(&sparse).unwrap() >= 1 << 20);
    }

    #[test]
    fn a_snapshot_exists_whole_once_and_goes_after_its_last_user() {
        let state = tempfile::tempdir().unwrap();
        let snapshots = Snapshots::open(state.path(), "disk.qcow2").unwrap();
        assert_eq!(snapshots.find("snap_1").unwrap(), None);
        assert!(snapshots.disk("snap_1", 1).is_err());
        // A copy that fails leaves nothing.
        let failed = snapshots.make("snap_1", 1, |path| {
            write(path)?;
            Err(VmmError::Failed("disk full".into()))
        });
        assert!(failed.is_err());
        assert_eq!(snapshots.list().unwrap(), vec![]);
        let made = snapshots.make("snap_1", 1, write).unwrap();
        assert!(made.size_bytes >= 10_000, "{made:?}");
        // A second make is the same snapshot, not another copy.
        let again = snapshots
            .make("snap_1", 1, |_| panic!("copied twice"))
            .unwrap();
        assert_eq!(again, made);
        assert!(snapshots.disk("snap_1", 2).unwrap().is_file());
        assert!(
            snapshots.disk("snap_1", 0).is_err(),
            "a smaller disk is refused"
        );
        // Deleted while a VM uses it: marked, hidden, kept until swept unused.
        let users: HashSet<String> = ["snap_1".to_string()].into();
        assert!(!snapshots.remove("snap_1", &users).unwrap());
        assert_eq!(snapshots.find("snap_1").unwrap(), None);
        assert_eq!(snapshots.list().unwrap(), vec![]);
        let file = state.path().join("snapshots/snap_1/disk.qcow2");
        assert!(file.is_file());
        assert!(
            snapshots.make("snap_1", 1, write).is_err(),
            "a deleted id is not reused"
        );
        snapshots.sweep(&users);
        assert!(file.is_file());
        snapshots.sweep(&HashSet::new());
        assert!(!file.exists());
        // Unused: gone at once.
        snapshots.make("snap_2", 1, write).unwrap();
        assert!(snapshots.remove("snap_2", &HashSet::new()).unwrap());
        assert!(snapshots.remove("snap_2", &HashSet::new()).unwrap());
        assert!(snapshots.make("../x", 1, write).is_err());
    }

    #[test]
    fn a_copy_cut_short_is_removed_at_the_next_open() {
        let state = tempfile::tempdir().unwrap();
        let half = state.path().join("snapshots/.snap_3.new");
        std::fs::create_dir_all(&half).unwrap();
        std::fs::write(half.join("disk.qcow2"), b"half").unwrap();
        let snapshots = Snapshots::open(state.path(), "disk.qcow2").unwrap();
        assert!(!half.exists());
        assert_eq!(snapshots.find("snap_3").unwrap(), None);
    }
}
