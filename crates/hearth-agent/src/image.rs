//! `hearth image build --vm`: the guest of a VM host, from Debian packages. `mmdebstrap`
//! makes a root file system with Debian's cloud kernel; Hearth adds the `dev` user,
//! key-only sshd and its init, then writes three files into the image directory:
//! - `vmlinuz`: the kernel, taken from the root file system's `/boot`;
//! - `initrd.gz`: a minimal initramfs (`initramfs.rs`): busybox and the virtio modules;
//! - `rootfs.ext4`: the root file system (`mkfs.ext4 -d`, no loop device or mount), the
//!   read-only base every VM's copy-on-write disk is layered on;
//! - `manifest.json`: the kernel version and the recipe, so a current image is not rebuilt.
//!
//! Per-VM data (the authorized key, the hostname, the network) reaches the guest on a
//! small second disk, the config drive (`/dev/vdb`, ext4, read-only): one mechanism that
//! works for QEMU and Firecracker alike.
//!
//! Every external program runs with an argument vector; nothing goes through a shell.

use hearth_provider::image::{ImageError, SSHD_CONFIG, SUDOERS, SUITE, run};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const VM_PACKAGES: &str = "linux-image-cloud-amd64,openssh-server,sudo,git,curl,ca-certificates,iproute2,procps,bash,less,kmod,e2fsprogs,tini";

/// The cloud kernel's virtio drivers are modules; these, in load order, give a disk and a NIC
/// on PCI (`pc`) or memory-mapped (`microvm`, Firecracker) transports.
pub const MODULES: [&str; 10] = [
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
];

/// The initramfs's `/init`: load the modules, mount the root disk, switch to its init. A
/// failure powers the VM off (it would otherwise hang, invisible, until a timeout).
pub const INITRAMFS_INIT: &str = r#"#!/bin/busybox sh
b=/bin/busybox
fail() { $b echo "hearth initramfs: $*" > /dev/console; $b poweroff -f; }
$b mount -t devtmpfs dev /dev || fail "no devtmpfs"
for m in virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk failover net_failover virtio_net; do
  $b insmod /modules/$m.ko || fail "cannot load $m"
done
n=0
while [ ! -b /dev/vda ]; do n=$((n + 1)); [ $n -gt 500 ] && fail "no root disk"; $b sleep 0.01; done
$b mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount the root disk"
$b mount --move /dev /newroot/dev
exec $b switch_root /newroot /sbin/hearth-init
"#;

/// `rdinit=/probe`: proves the accelerator runs a guest (see `qemu::probe_kvm`).
pub const PROBE: &str = "#!/bin/busybox sh\n/bin/busybox echo hearth-probe-ok > /dev/console\n/bin/busybox poweroff -f\n";

/// The guest's init: file systems, the disk grown to its size, the config drive, the VM's
/// identity, network, then sshd under tini (PID 1 must reap orphans).
///
/// The identity (hostname, MAC, machine id, SSH host key, a seed for the kernel's random
/// generator, the authorized keys) comes from the config drive, written by the agent. The
/// keys, host key and machine id are applied on the VM's first boot only (`/etc/hearth-machine`
/// remembers whose they are): later boots keep what is on the disk, such as the keys a warm
/// VM's claim put in place of its pool key.
///
/// Every VM runs `AWAIT_RESTORE` beside sshd: a VM restored from a snapshot of its memory
/// (a base snapshot, `base_snapshot.rs`, or a user's, `snapshots.rs`) wakes up in it and is
/// told who it is now. A base VM (its drive holds `base`) is booted once to be snapshotted,
/// and says `ready` on the port first. It is started in the background: the module load and
/// perl's start (about 0.2 s under software emulation) do not hold up sshd.
pub const VM_INIT: &str = r#"#!/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mkdir -p /dev/pts /dev/shm
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkdir -p /run/sshd /run/hearth
resize2fs /dev/vda >/dev/null 2>&1
mount -o ro /dev/vdb /run/hearth
cfg() { cat "/run/hearth/$1" 2>/dev/null || echo "$2"; }
nic=
for n in /sys/class/net/*; do
  i=${n##*/}
  [ "$i" = lo ] || { nic=$i; break; }
done
name=$(cfg hostname hearth)
hostname "$name"
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$name" > /etc/hosts
[ -n "$nic" ] && [ -s /run/hearth/mac ] && ip link set dev "$nic" address "$(cfg mac)"
[ -s /run/hearth/seed ] && cat /run/hearth/seed > /dev/urandom
install -d -o dev -g dev -m 700 /home/dev/.ssh
machine=$(cfg machine-id "")
if [ -z "$machine" ] || [ "$(cat /etc/hearth-machine 2>/dev/null)" != "$machine" ]; then
  install -o dev -g dev -m 600 /run/hearth/authorized_keys /home/dev/.ssh/authorized_keys
  if [ -s /run/hearth/ssh_host_ed25519_key ]; then
    install -m 600 /run/hearth/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key
    install -m 644 /run/hearth/ssh_host_ed25519_key.pub /etc/ssh/ssh_host_ed25519_key.pub
  fi
  if [ -n "$machine" ]; then
    echo "$machine" > /etc/machine-id
    echo "$machine" > /etc/hearth-machine
  fi
fi
[ -f /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
ip link set lo up
if [ -n "$nic" ]; then
  ip addr add "$(cfg address 10.0.2.15/24)" dev "$nic"
  ip link set "$nic" up
  ip route add default via "$(cfg gateway 10.0.2.2)"
fi
echo "nameserver $(cfg dns 10.0.2.3)" > /etc/resolv.conf
(modprobe virtio_console; modprobe vmw_vsock_virtio_transport; exec perl /usr/sbin/hearth-await-restore) </dev/null >/dev/null 2>&1 &
echo "hearth: sshd starting" > /dev/ttyS0
exec /usr/bin/tini -- /usr/sbin/sshd -D -e
"#;

/// `/usr/sbin/hearth-await-restore`, started in every VM: it waits for the agent for as
/// long as the VM lives, and every VM restored from a snapshot of its memory wakes up in it
/// (a base VM first says `ready`). QEMU's VMs reach it on the virtio port
/// `hearth.identity`; Firecracker's, which have no virtio console, on vsock port
/// `IDENTITY_VSOCK_PORT` (Firecracker resets vsock connections on a restore, so the agent
/// connects anew and the guest accepts again). The agent sends the VM's identity
/// (`name hex-value` lines, `clock <s> <ns>`, `end`), the same files its config drive holds
/// for later boots, and this process applies it with system calls (under software
/// emulation each program started costs about 0.1 s): the clock (the guest slept since the
/// snapshot), the seed mixed into the kernel's generator and a reseed forced
/// (`RNDRESEEDCRNG`: restores must not share random streams), hostname, machine id, MAC
/// (`SIOCSIFHWADDR`), authorized keys, SSH host key (sshd loads it for each connection),
/// and the config drive remounted so it shows this VM's. It answers `identified`, and waits
/// for the next restore: a VM restored from a snapshot may be snapshotted in turn. It
/// answers `ping` with `pong`: the agent asks before it saves a VM's memory, which only a
/// guest that will take its identity may have restored. While no agent holds the virtio
/// port's host end, reads end at once (the driver's answer to an unconnected port) and it
/// looks again every 0.1 s.
///
/// Not proven here: the vsock path. No Firecracker or `vhost-vsock` runs on these machines,
/// so the agent's side is tested against a fake guest (`tests/firecracker.rs`), and this
/// side's vsock code has run nowhere.
pub const AWAIT_RESTORE: &str = r#"#!/usr/bin/perl
use strict;
use warnings;

sub find_port {
    for (1 .. 500) {
        for my $name (glob "/sys/class/virtio-ports/*/name") {
            open(my $f, "<", $name) or next;
            my $n = <$f> // "";
            chomp $n;
            return "/dev/$1" if $n eq "hearth.identity" && $name =~ m{/([^/]+)/name$} && -c "/dev/$1";
        }
        select(undef, undef, undef, 0.01);
    }
    return undef;
}

sub put {
    my ($path, $text, $mode, $uid, $gid) = @_;
    open(my $f, ">", "$path.new") or die "hearth-await-restore: $path: $!\n";
    chmod $mode, "$path.new";
    chown $uid, $gid, "$path.new" if defined $uid;
    print $f $text;
    close $f or die "hearth-await-restore: $path: $!\n";
    rename "$path.new", $path or die "hearth-await-restore: $path: $!\n";
}

sub apply {
    my ($io, $id, $clock) = @_;
    syscall(227, 0, pack("q q", @$clock)) if @$clock == 2;
    if (open(my $r, ">", "/dev/urandom")) {
        print $r $id->{seed} // "";
        close $r;
        open($r, "<", "/dev/urandom") and ioctl($r, 0x5207, 0);
    }
    (my $name = $id->{hostname} // "hearth") =~ s/\s+$//;
    if (open(my $h, ">", "/proc/sys/kernel/hostname")) {
        print $h $name;
        close $h;
    }
    put("/etc/hosts", "127.0.0.1 localhost\n127.0.1.1 $name\n", 0644);
    if ($id->{"machine-id"}) {
        put("/etc/machine-id", $id->{"machine-id"}, 0444);
        put("/etc/hearth-machine", $id->{"machine-id"}, 0644);
    }
    if (my $mac = $id->{mac}) {
        $mac =~ s/\s+$//;
        my ($nic) = grep { $_ ne "lo" } map { m{([^/]+)$} } glob "/sys/class/net/*";
        # Announce the new address (a gratuitous ARP), or the host's side keeps sending to
        # the snapshot's until the guest next asks for its gateway.
        if ($nic && open(my $n, ">", "/proc/sys/net/ipv4/conf/$nic/arp_notify")) {
            print $n "1";
            close $n;
        }
        socket(my $s, 2, 2, 0);
        ioctl($s, 0x8924, pack("a16 S a14 x8", $nic, 1, pack("H12", join "", split /:/, $mac))) if $nic;
    }
    # A Firecracker VM's address is its tap's: a restored guest gets the new VM's.
    if (my $address = $id->{address}) {
        $address =~ s/\s+$//;
        (my $gateway = $id->{gateway} // "") =~ s/\s+$//;
        my ($nic) = grep { $_ ne "lo" } map { m{([^/]+)$} } glob "/sys/class/net/*";
        if ($nic) {
            system("ip", "addr", "flush", "dev", $nic);
            system("ip", "addr", "add", $address, "dev", $nic);
            system("ip", "route", "replace", "default", "via", $gateway) if $gateway;
        }
    }
    if (my $dns = $id->{dns}) {
        $dns =~ s/\s+$//;
        put("/etc/resolv.conf", "nameserver $dns\n", 0644);
    }
    my (undef, undef, $uid, $gid) = getpwnam("dev");
    put("/home/dev/.ssh/authorized_keys", $id->{authorized_keys} // "", 0600, $uid, $gid);
    if ($id->{ssh_host_ed25519_key}) {
        put("/etc/ssh/ssh_host_ed25519_key.pub", $id->{"ssh_host_ed25519_key.pub"} // "", 0644);
        put("/etc/ssh/ssh_host_ed25519_key", $id->{ssh_host_ed25519_key}, 0600);
    }
    # The config drive is now this VM's: show it, not the snapshot's.
    # (syscall wants writable strings, not literals.)
    my ($drive, $mountpoint, $type) = ("/dev/vdb", "/run/hearth", "ext4");
    syscall(166, $mountpoint, 0);
    if (open(my $d, "<", $drive)) { ioctl($d, 0x1261, 0); close $d }
    syscall(165, $drive, $mountpoint, $type, 1, 0);
    syswrite($io, "identified\n");
}

sub ready {
    my ($io) = @_;
    return unless -e "/run/hearth/base";
    select(undef, undef, undef, 0.05) until -s "/run/sshd.pid";
    syswrite($io, "ready\n");
}

# Answers the agent's lines on $io. A virtio port ($waits) is kept across the agent's
# connections; a vsock connection ends with the agent's.
sub serve {
    my ($io, $waits) = @_;
    my $buffer = "";
    my (%id, @clock);
    while (1) {
        while ($buffer !~ /\n/) {
            my $n = sysread($io, $buffer, 65536, length $buffer);
            next if $n;
            return unless $waits;
            # Nothing connected on the host's side: wait for the agent.
            select(undef, undef, undef, 0.1);
        }
        $buffer =~ s/^([^\n]*)\n//;
        my ($key, @values) = split / /, $1;
        next unless defined $key;
        if ($key eq "end") { apply($io, \%id, \@clock); %id = (); @clock = () }
        elsif ($key eq "ping") { syswrite($io, "pong\n") }
        elsif ($key eq "clock") { @clock = @values }
        elsif ($key eq "identify") { %id = (); @clock = () }
        else { $id{$key} = pack("H*", $values[0] // "") }
    }
}

my $port = find_port();
if (defined $port) {
    open(my $io, "+<", $port) or die "hearth-await-restore: $port: $!\n";
    ready($io);
    serve($io, 1);
}
# AF_VSOCK, SOCK_STREAM; struct sockaddr_vm: family, reserved, port, VMADDR_CID_ANY.
socket(my $listener, 40, 1, 0) or die "hearth-await-restore: no port hearth.identity and no vsock: $!\n";
bind($listener, pack("S S L L x4", 40, 0, IDENTITY_VSOCK_PORT, 0xFFFFFFFF)) or die "hearth-await-restore: vsock: $!\n";
listen($listener, 4) or die "hearth-await-restore: vsock: $!\n";
my $said_ready = 0;
while (1) {
    accept(my $connection, $listener) or next;
    ready($connection) unless $said_ready++;
    serve($connection, 0);
    close $connection;
}
"#;

/// The vsock port a Firecracker guest's `AWAIT_RESTORE` listens on (it is written into
/// the script where it says `IDENTITY_VSOCK_PORT`).
pub const IDENTITY_VSOCK_PORT: u32 = 52;

/// `AWAIT_RESTORE` as installed: the vsock port filled in.
pub fn await_restore() -> String {
    AWAIT_RESTORE.replace("IDENTITY_VSOCK_PORT", &IDENTITY_VSOCK_PORT.to_string())
}

/// Identifies this recipe; an image directory with the same one needs no rebuild.
pub fn recipe_hash() -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for part in [
        SUITE,
        VM_PACKAGES,
        INITRAMFS_INIT,
        &MODULES.join(","),
        PROBE,
        VM_INIT,
        AWAIT_RESTORE,
        SSHD_CONFIG,
        SUDOERS,
    ] {
        for b in part.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

/// A built VM image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VmImage {
    #[serde(skip)]
    pub dir: PathBuf,
    pub kernel_version: String,
    pub recipe: String,
    /// Whether its initramfs loads `virtio_mmio`, so it boots on QEMU's `microvm` machine
    /// (images built before that boot on `pc` only).
    #[serde(default)]
    pub mmio: bool,
}

impl VmImage {
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.gz")
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }

    /// The image in `dir`, if one was built there.
    pub fn open(dir: &Path) -> Result<VmImage, ImageError> {
        let text = std::fs::read_to_string(dir.join("manifest.json")).map_err(|e| {
            ImageError::Failed(format!(
                "no VM image in {} ({e}); build it with `hearth image build --vm`",
                dir.display()
            ))
        })?;
        let mut image: VmImage = serde_json::from_str(&text).map_err(|e| {
            ImageError::Failed(format!(
                "{}/manifest.json is unreadable: {e}",
                dir.display()
            ))
        })?;
        image.dir = dir.to_path_buf();
        for file in [image.kernel(), image.initrd(), image.rootfs()] {
            if !file.is_file() {
                return Err(ImageError::Failed(format!(
                    "{} is missing; rebuild with `hearth image build --vm`",
                    file.display()
                )));
            }
        }
        Ok(image)
    }

    pub fn is_current(dir: &Path) -> bool {
        VmImage::open(dir).is_ok_and(|i| i.recipe == recipe_hash())
    }
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |e: std::io::Error| ImageError::Failed(format!("write {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    std::fs::write(path, contents).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(fail)
}

/// The initramfs for the kernel whose modules are under `modules` (`/lib/modules/<v>`).
fn initramfs(modules: &Path) -> Result<Vec<u8>, ImageError> {
    use crate::initramfs::{Entry, newc_gz};
    let busybox = std::fs::read("/bin/busybox").map_err(|e| ImageError::Missing {
        program: format!("/bin/busybox ({e})"),
        hint: "apt-get install busybox-static".into(),
    })?;
    let mut entries = vec![
        Entry::Dir("bin".into()),
        Entry::Dir("dev".into()),
        Entry::Dir("newroot".into()),
        Entry::Dir("modules".into()),
        Entry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            data: busybox,
        },
        Entry::File {
            path: "init".into(),
            mode: 0o755,
            data: INITRAMFS_INIT.as_bytes().to_vec(),
        },
        Entry::File {
            path: "probe".into(),
            mode: 0o755,
            data: PROBE.as_bytes().to_vec(),
        },
    ];
    let dep = std::fs::read_to_string(modules.join("modules.dep"))
        .map_err(|e| ImageError::Failed(format!("read {}/modules.dep: {e}", modules.display())))?;
    for name in MODULES {
        let rel = dep
            .lines()
            .filter_map(|l| l.split(':').next())
            .find(|p| {
                Path::new(p)
                    .file_name()
                    .is_some_and(|f| f == format!("{name}.ko").as_str())
            })
            .ok_or_else(|| {
                ImageError::Failed(format!(
                    "the kernel has no module {name}.ko (uncompressed) in modules.dep"
                ))
            })?;
        let data = std::fs::read(modules.join(rel))
            .map_err(|e| ImageError::Failed(format!("read {rel}: {e}")))?;
        entries.push(Entry::File {
            path: format!("modules/{name}.ko"),
            mode: 0o644,
            data,
        });
    }
    newc_gz(&entries).map_err(|e| ImageError::Failed(format!("pack the initramfs: {e}")))
}

/// Builds the image into `out` (replacing what is there), working in `work`, calling `step`
/// before each stage. Needs root (mmdebstrap, chroot).
pub fn build(out: &Path, work: &Path, step: &mut dyn FnMut(&str)) -> Result<VmImage, ImageError> {
    let root = work.join("rootfs");
    step("debootstrapping Debian with its cloud kernel (about 30 s)");
    run(
        Command::new("mmdebstrap")
            .args(["--variant=minbase", "--quiet"])
            .arg(format!("--include={VM_PACKAGES}"))
            .arg(SUITE)
            .arg(&root),
        "mmdebstrap",
    )?;
    step("adding the dev user, sshd configuration and init");
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
    run(
        Command::new("chroot")
            .arg(&root)
            .args(["usermod", "--password", "*", "dev"]),
        "usermod",
    )?;
    fit_for_vm(&root)?;
    let modules_dir = root.join("lib/modules");
    let kernel_version = std::fs::read_dir(&modules_dir)
        .map_err(|e| ImageError::Failed(format!("read {}: {e}", modules_dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .max()
        .ok_or_else(|| ImageError::Failed("the root file system has no kernel modules".into()))?;
    step("packing the initramfs (busybox and the virtio modules)");
    let initrd = initramfs(&modules_dir.join(&kernel_version))?;
    let staging = work.join("image");
    std::fs::create_dir_all(&staging)
        .map_err(|e| ImageError::Failed(format!("mkdir {}: {e}", staging.display())))?;
    std::fs::copy(
        root.join(format!("boot/vmlinuz-{kernel_version}")),
        staging.join("vmlinuz"),
    )
    .map_err(|e| ImageError::Failed(format!("copy the kernel: {e}")))?;
    write(&staging.join("initrd.gz"), &initrd, 0o644)?;
    // The kernel and Debian's initrd stay out of the disk: the VM boots the ones beside it.
    for entry in std::fs::read_dir(root.join("boot"))
        .map_err(|e| ImageError::Failed(format!("read boot: {e}")))?
    {
        let path = entry.map_err(|e| ImageError::Failed(e.to_string()))?.path();
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_dir_all(root.join("var/cache/apt/archives"));
    step("writing the root file system (mkfs.ext4 -d)");
    write_rootfs(&root, &staging.join("rootfs.ext4"))?;
    let image = VmImage {
        dir: out.to_path_buf(),
        kernel_version,
        recipe: recipe_hash(),
        mmio: MODULES.contains(&"virtio_mmio"),
    };
    write(
        &staging.join("manifest.json"),
        serde_json::to_string_pretty(&image)
            .expect("serializable")
            .as_bytes(),
        0o644,
    )?;
    // Replaced whole: a VM never boots a half-written image.
    let _ = std::fs::remove_dir_all(out);
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| ImageError::Failed(format!("mkdir {}: {e}", parent.display())))?;
    }
    std::fs::rename(&staging, out)
        .or_else(|_| copy_dir(&staging, out))
        .map_err(|e| ImageError::Failed(format!("move the image into {}: {e}", out.display())))?;
    let _ = std::fs::remove_dir_all(&root);
    VmImage::open(out)
}

/// What makes a Debian root file system with the `dev` user and sshd (this recipe's, or a
/// custom image's built `FROM hearth/base`, `images.rs`) a VM's: the init and the
/// base-snapshot helper, no SSH host keys (each VM gets its own), sshd's and sudo's
/// configuration, and no `pam_motd`. Files are written only below real directories of
/// `root` and replace what was there, links included: a custom image's links cannot make
/// the agent write, or read, outside it.
pub fn fit_for_vm(root: &Path) -> Result<(), ImageError> {
    let ssh = within(root, "etc/ssh").ok_or_else(|| {
        ImageError::Failed("the file system has no directory /etc/ssh (no sshd)".into())
    })?;
    for entry in
        std::fs::read_dir(&ssh).map_err(|e| ImageError::Failed(format!("read etc/ssh: {e}")))?
    {
        let entry = entry.map_err(|e| ImageError::Failed(e.to_string()))?;
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            std::fs::remove_file(entry.path())
                .map_err(|e| ImageError::Failed(format!("remove host key: {e}")))?;
        }
    }
    // `/sbin` is `usr/sbin` on Debian since bookworm; a real `/sbin` gets the init too.
    put(root, "usr/sbin/hearth-init", VM_INIT.as_bytes(), 0o755)?;
    if within(root, "sbin").is_some() {
        put(root, "sbin/hearth-init", VM_INIT.as_bytes(), 0o755)?;
    }
    put(
        root,
        "usr/sbin/hearth-await-restore",
        await_restore().as_bytes(),
        0o755,
    )?;
    // pam_motd runs programs at every SSH session: about 0.3 s of each first command
    // under software emulation, for a banner nobody reads (sshd prints no motd here).
    let pam = read_small(root, "etc/pam.d/sshd")
        .map_err(|e| ImageError::Failed(format!("read /etc/pam.d/sshd: {e}")))?
        .ok_or_else(|| ImageError::Failed("the file system has no /etc/pam.d/sshd".into()))?;
    let pam: String = pam
        .lines()
        .filter(|l| !l.contains("pam_motd.so"))
        .map(|l| format!("{l}\n"))
        .collect();
    put(root, "etc/pam.d/sshd", pam.as_bytes(), 0o644)?;
    put(
        root,
        "etc/ssh/sshd_config.d/hearth.conf",
        SSHD_CONFIG.as_bytes(),
        0o644,
    )?;
    put(root, "etc/sudoers.d/dev", SUDOERS.as_bytes(), 0o440)?;
    Ok(())
}

/// The text of the regular file `root/rel` (reached through no link, `within`), `None` when
/// there is none; refused past 1 MiB.
pub fn read_small(root: &Path, rel: &str) -> Result<Option<String>, String> {
    use std::io::Read;
    const MAX: u64 = 1 << 20;
    let Some(path) = within(root, rel).filter(|p| p.is_file()) else {
        return Ok(None);
    };
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX + 1).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX {
        return Err(format!("larger than {MAX} bytes"));
    }
    Ok(Some(text))
}

/// `root/rel` when neither it nor any directory on the way is a link (and it exists).
pub fn within(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut path = root.to_path_buf();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return None;
        }
        path.push(part);
        if std::fs::symlink_metadata(&path)
            .ok()?
            .file_type()
            .is_symlink()
        {
            return None;
        }
    }
    Some(path)
}

/// Writes `root/rel` anew (whatever was there, a link included, is removed first), in a
/// directory that must be a real one of `root` (made when absent under one).
fn put(root: &Path, rel: &str, contents: &[u8], mode: u32) -> Result<(), ImageError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (dir, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    let refused = || {
        ImageError::Failed(format!(
            "/{dir} is a link or not a directory in the file system; /{rel} cannot be written"
        ))
    };
    let mut at = root.to_path_buf();
    for part in dir.split('/').filter(|p| !p.is_empty()) {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(refused()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(&at)
                .map_err(|e| ImageError::Failed(format!("mkdir {}: {e}", at.display())))?,
            Err(e) => return Err(ImageError::Failed(format!("{}: {e}", at.display()))),
        }
    }
    let path = at.join(name);
    let fail = |e: std::io::Error| ImageError::Failed(format!("write /{rel}: {e}"));
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => return Err(refused()),
        Ok(_) => std::fs::remove_file(&path).map_err(fail)?,
        Err(_) => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(fail)?;
    file.write_all(contents).map_err(fail)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(fail)
}

/// Writes the ext4 file system `out` holding `root` (`mkfs.ext4 -d`: no loop device, no
/// mount): a quarter and 256 MiB larger than the blocks its files take, with a quarter more
/// inodes than it has files (and the inode tables' room), since each VM's disk grows to its
/// own size at boot. Returns its size in bytes.
pub fn write_rootfs(root: &Path, out: &Path) -> Result<u64, ImageError> {
    let (used, files) = tree_usage(root);
    let inodes = files + files / 4 + 16_384;
    let size_mb = (used + used / 4 + inodes * 256) / (1 << 20) + 256;
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "hearth-root", "-N"])
            .arg(inodes.to_string())
            .arg("-d")
            .arg(root)
            .arg(out)
            .arg(format!("{size_mb}M")),
        "mkfs.ext4",
    )?;
    Ok(size_mb << 20)
}

/// The bytes the files under `dir` take on disk (whole blocks; a file with several names
/// once) and how many there are, directories included; links are not followed.
fn tree_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut files) = (0u64, 0u64);
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            files += 1;
            bytes += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, files)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}
