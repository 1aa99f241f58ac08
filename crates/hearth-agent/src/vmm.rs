//! What every VMM backend of the agent offers (`Vmm`), and what they share: the durable
//! record of a VM and its directory.
//!
//! Each VM has a directory `<state>/vms/<name>/`, made whole under a hidden name and renamed
//! into place, so a record never appears half-written and a create that died half-way
//! leaves only a hidden directory that the next listing removes. It holds `record.json`
//! (what was asked, and what the backend chose: the SSH port, the network slot), the
//! config drive `config.ext4` (authorized keys, hostname, and for tap networking the
//! guest's address), the VM's disk and the backend's own files.

use crate::snapshots::{Snapshot, Snapshots};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("no VM {0}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
}

/// What to make.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VmSpec {
    /// The VM's name (`hearth-<environment id>`): one VM per name, ever.
    pub name: String,
    pub environment_id: String,
    pub hostname: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    /// OpenSSH public keys, one per line, for the guest's `dev` user.
    pub authorized_keys: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The user snapshot (`snapshots.rs`) its disk is made from; `None`: the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The custom image (`images.rs`) its disk is made from, when no snapshot is; `None`:
    /// the host's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// What the agent keeps of a VM, on disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VmRecord {
    pub spec: VmSpec,
    pub ssh_port: u16,
    pub accel: Accel,
    pub created_at_ms: i64,
    /// The VM's network slot on this host (tap networking only): its tap device and /30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_slot: Option<u16>,
    /// The MAC address of its network card, chosen here (when the backend does not choose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The base snapshot it was restored from (`base_snapshot.rs`), whose disk its own is
    /// layered on; `None` for a VM that booted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmStatus {
    Running,
    Paused,
    Stopped,
}

/// A VMM backend: the agent's API calls these and nothing else.
#[async_trait]
pub trait Vmm: Send + Sync {
    /// `qemu` or `firecracker`.
    fn backend(&self) -> &'static str;
    fn accel(&self) -> Accel;
    fn record(&self, name: &str) -> Result<Option<VmRecord>, VmmError>;
    /// Makes the VM and starts it, or finds the one made before under that name (started
    /// if it is not running): never a second VM for one name.
    async fn create(&self, spec: &VmSpec) -> Result<VmRecord, VmmError>;
    /// `None` when there is no such VM.
    async fn status(&self, name: &str) -> Result<Option<VmStatus>, VmmError>;
    async fn start(&self, name: &str) -> Result<(), VmmError>;
    /// Powers the VM off (its disk stays).
    async fn stop(&self, name: &str) -> Result<(), VmmError>;
    async fn pause(&self, name: &str) -> Result<(), VmmError>;
    async fn resume(&self, name: &str) -> Result<(), VmmError>;
    /// Stops the VM and removes everything it had; a VM that does not exist counts as removed.
    async fn destroy(&self, name: &str) -> Result<(), VmmError>;
    /// Every VM kept here, with its status: after an agent restart the ones still running
    /// are adopted as they are, the ones that died while it was down report `stopped`.
    async fn list(&self) -> Result<Vec<(VmRecord, VmStatus)>, VmmError>;
    /// The agent is stopping: end background work that would outlive it (VMs keep running).
    fn shutdown(&self) {}

    /// At start, before anything else: undo what an agent killed mid-way left (a VM it
    /// paused to copy its disk is resumed).
    async fn recover(&self) {}

    /// Saves VM `name`'s disk as snapshot `id` (a running VM is paused while it is copied),
    /// or returns the one made before under that id.
    async fn snapshot(&self, name: &str, id: &str) -> Result<Snapshot, VmmError> {
        let _ = (name, id);
        Err(VmmError::Failed(format!(
            "the {} backend takes no snapshots yet",
            self.backend()
        )))
    }

    /// The snapshots kept here (none for a backend that takes none).
    fn snapshots(&self) -> Option<&Snapshots> {
        None
    }

    /// Deletes snapshot `id` (one that is absent counts as deleted); its file stays while
    /// VMs layered on it do. Whether it is gone now.
    async fn remove_snapshot(&self, id: &str) -> Result<bool, VmmError> {
        let _ = id;
        Ok(true)
    }

    /// The custom images kept here (`images.rs`); `None` for a backend that takes none.
    fn images(&self) -> Option<&std::sync::Arc<Snapshots>> {
        None
    }

    /// Deletes image `id` as `remove_snapshot` deletes a snapshot.
    async fn remove_image(&self, id: &str) -> Result<bool, VmmError> {
        let _ = id;
        Ok(true)
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) fn fail(what: &str) -> impl Fn(std::io::Error) -> VmmError + '_ {
    move |e| VmmError::Failed(format!("{what}: {e}"))
}

pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<(), VmmError> {
    hearth_provider::image::run(cmd, what)
        .map(|_| ())
        .map_err(|e| VmmError::Failed(e.to_string()))
}

/// `n` bytes from the kernel's generator, as hex.
pub(crate) fn random_hex(n: usize) -> Result<String, VmmError> {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(fail("read /dev/urandom"))?;
    Ok(hex::encode(bytes))
}

/// A random MAC address, locally administered and unicast (`02:…`).
pub(crate) fn random_mac() -> Result<String, VmmError> {
    let hex = random_hex(5)?;
    let octets: Vec<&str> = (0..5).map(|i| &hex[i * 2..i * 2 + 2]).collect();
    Ok(format!("02:{}", octets.join(":")))
}

pub(crate) fn free_port(address: &str) -> Result<u16, VmmError> {
    let l = std::net::TcpListener::bind((address, 0)).map_err(fail("pick a port"))?;
    Ok(l.local_addr().map_err(fail("pick a port"))?.port())
}

/// Whether `pid` is alive and its command line has `marker` as one argument (so a recycled
/// pid is never taken for a VM's process).
pub(crate) fn process_has_argument(pid: u32, marker: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => String::from_utf8_lossy(&cmdline)
            .split('\0')
            .any(|arg| arg == marker),
        Err(_) => false,
    }
}

/// Sizes a backend accepts.
pub(crate) fn check_sizes(spec: &VmSpec) -> Result<(), VmmError> {
    if !(1..=2048).contains(&spec.disk_gb)
        || !(1..=64).contains(&spec.vcpus)
        || !(128..=262_144).contains(&spec.memory_mb)
    {
        return Err(VmmError::Failed(
            "sizes out of range: 1-64 vCPUs, 128-262144 MB, 1-2048 GB".into(),
        ));
    }
    Ok(())
}

pub(crate) fn write_record(dir: &Path, record: &VmRecord) -> Result<(), VmmError> {
    let tmp = dir.join("record.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(record).expect("serializable"),
    )
    .map_err(fail("write the VM's record"))?;
    std::fs::rename(&tmp, dir.join("record.json")).map_err(fail("write the VM's record"))
}

/// What the config drive tells a guest about who it is: its keys and hostname, a machine id,
/// an SSH host key and a seed for its random generator (fresh for every VM, made here where
/// it is quick, not in the guest), and its MAC address if chosen here.
pub(crate) fn identity_files(
    spec: &VmSpec,
    mac: Option<&str>,
) -> Result<Vec<(&'static str, String)>, VmmError> {
    let mut files = vec![
        (
            "authorized_keys",
            format!("{}\n", spec.authorized_keys.trim()),
        ),
        ("hostname", format!("{}\n", spec.hostname)),
        ("machine-id", format!("{}\n", random_hex(16)?)),
        ("seed", format!("{}\n", random_hex(64)?)),
    ];
    let host_key = hearth_guest::KeyPair::generate();
    files.push(("ssh_host_ed25519_key", host_key.private_openssh));
    files.push((
        "ssh_host_ed25519_key.pub",
        format!("{}\n", host_key.public_openssh),
    ));
    if let Some(mac) = mac {
        files.push(("mac", format!("{mac}\n")));
    }
    Ok(files)
}

/// Writes `files` onto `<dir>/config.ext4`, the read-only second disk the guest's init reads.
pub(crate) fn config_drive(dir: &Path, files: &[(&str, String)]) -> Result<(), VmmError> {
    let config = dir.join("config");
    std::fs::create_dir_all(&config).map_err(fail("create the config drive"))?;
    for (file, text) in files {
        use std::os::unix::fs::OpenOptionsExt;
        // The drive's files keep these modes: secrets are for the guest's root only.
        let mode = if matches!(*file, "seed" | "ssh_host_ed25519_key") {
            0o600
        } else {
            0o644
        };
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(config.join(file))
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
            .map_err(fail("write the config drive"))?;
    }
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "hearth-config", "-d"])
            .arg(&config)
            .arg(dir.join("config.ext4"))
            .arg("4M"),
        "mkfs.ext4 (config drive)",
    )?;
    // The drive holds all of it; the seed should not also lie around in the clear.
    std::fs::remove_dir_all(&config).map_err(fail("remove the config drive's files"))
}

/// The VM directories under `<state>/vms`.
pub(crate) struct VmDirs {
    root: PathBuf,
}

impl VmDirs {
    /// Opens `<state>/vms`. Creates that died half-way (with an agent before this one) left
    /// a hidden directory: `leftover` is given each (to stop what the backend started from
    /// it, such as a restore that never finished) before it is removed.
    pub fn new(state: &Path, leftover: impl Fn(&Path)) -> Result<VmDirs, VmmError> {
        let root = state.join("vms");
        std::fs::create_dir_all(&root).map_err(fail("create the state directory"))?;
        for entry in std::fs::read_dir(&root)
            .map_err(fail("read the state directory"))?
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with('.') {
                leftover(&entry.path());
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(VmDirs { root })
    }

    pub fn dir(&self, name: &str) -> Result<PathBuf, VmmError> {
        let well_formed = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !well_formed {
            return Err(VmmError::Failed(format!(
                "VM name {name:?} must be letters, digits and '-' (at most 64)"
            )));
        }
        Ok(self.root.join(name))
    }

    pub fn record(&self, name: &str) -> Result<Option<VmRecord>, VmmError> {
        match std::fs::read_to_string(self.dir(name)?.join("record.json")) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| VmmError::Failed(format!("the record of {name} is unreadable: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(VmmError::Failed(format!("read the record of {name}: {e}"))),
        }
    }

    /// Makes the VM's directory whole: `make_disk` writes the disk into the directory it is
    /// given, the config drive gets the VM's identity plus `extra_config` files, then the
    /// record, then the rename that commits it all.
    pub fn build(
        &self,
        record: &VmRecord,
        extra_config: &[(&str, String)],
        make_disk: impl FnOnce(&Path) -> Result<(), VmmError>,
    ) -> Result<(), VmmError> {
        let mut files = identity_files(&record.spec, record.mac.as_deref())?;
        files.extend(extra_config.iter().map(|(k, v)| (*k, format!("{v}\n"))));
        let building = self.prepare(record, &files, make_disk)?;
        self.commit(&building, &record.spec.name)
    }

    /// `build` without the commit, with the config drive's `files` given: the directory
    /// stays hidden (a restore starts its VM there, and commits only once the VM has taken
    /// its identity).
    /// Where `prepare` builds the VM `name`.
    pub fn building_dir(&self, name: &str) -> Result<PathBuf, VmmError> {
        self.dir(name)?;
        Ok(self.root.join(format!(".{name}.new")))
    }

    pub fn prepare(
        &self,
        record: &VmRecord,
        files: &[(&str, String)],
        make_disk: impl FnOnce(&Path) -> Result<(), VmmError>,
    ) -> Result<PathBuf, VmmError> {
        let building = self.building_dir(&record.spec.name)?;
        let _ = std::fs::remove_dir_all(&building);
        std::fs::create_dir_all(&building).map_err(fail("create the VM's directory"))?;
        make_disk(&building)?;
        config_drive(&building, files)?;
        write_record(&building, record)?;
        Ok(building)
    }

    /// The rename that makes a prepared directory the VM's: its record appears whole or
    /// not at all.
    pub fn commit(&self, building: &Path, name: &str) -> Result<(), VmmError> {
        std::fs::rename(building, self.dir(name)?).map_err(fail("commit the VM's directory"))
    }

    /// The names of the VMs kept here (not the hidden directories of creates under way).
    pub fn names(&self) -> Result<Vec<String>, VmmError> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(fail("read the state directory"))? {
            let name = entry
                .map_err(fail("read the state directory"))?
                .file_name()
                .to_string_lossy()
                .to_string();
            if !name.starts_with('.') {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// The user snapshots the VMs kept here were made from.
    pub fn snapshots_in_use(&self) -> Result<HashSet<String>, VmmError> {
        self.in_use(|spec| spec.snapshot)
    }

    /// The custom images the VMs kept here were made from.
    pub fn images_in_use(&self) -> Result<HashSet<String>, VmmError> {
        self.in_use(|spec| spec.image)
    }

    fn in_use(&self, from: impl Fn(VmSpec) -> Option<String>) -> Result<HashSet<String>, VmmError> {
        let mut in_use = HashSet::new();
        for name in self.names()? {
            if let Some(id) = self.record(&name)?.and_then(|r| from(r.spec)) {
                in_use.insert(id);
            }
        }
        Ok(in_use)
    }

    pub fn remove(&self, name: &str) -> Result<(), VmmError> {
        let dir = self.dir(name)?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VmmError::Failed(format!("remove {}: {e}", dir.display()))),
        }
    }
}
