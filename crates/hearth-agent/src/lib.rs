//! `hearth agent`: runs VMs on a VM host for the control plane.
//!
//! Architecture invariant: the agent knows nothing of users, quotas or the database. It
//! keeps its own durable records of the VMs it runs (one directory per VM), so after a
//! restart it adopts what still runs and reports what died, and it never makes a second
//! VM for one name.
//!
//! - `image.rs`: the VM guest (kernel, minimal initramfs, ext4 root) from Debian packages.
//! - `initramfs.rs`: the cpio writer for that initramfs.
//! - `qmp.rs`: a client of QEMU's machine protocol.
//! - `vmm.rs`: the trait every VMM backend implements, and the VM records they share.
//! - `qemu.rs`: the `qemu` backend; `base_snapshot.rs`: the snapshots its new VMs restore.
//! - `snapshots.rs`: users' snapshots of VM disks, and new VMs' disks made from them.
//! - `firecracker.rs`: the Firecracker API driver (tested against a spec-checking fake);
//!   `firecracker_host.rs`: the `firecracker` backend (processes, tap devices, SSH forwarding).
//! - `guard.rs`: QEMU as a user of its own, and a firewall that keeps VMs off this host.
//! - `identity.rs`: the agent's certificate authority and the credential it accepts.
//! - `server.rs`: its HTTPS API; `run.rs`: start-up, joining, serving.

pub mod base_snapshot;
pub mod firecracker;
pub mod firecracker_host;
pub mod guard;
pub mod identity;
pub mod image;
pub mod images;
pub mod initramfs;
pub mod qemu;
pub mod qmp;
pub mod run;
pub mod server;
pub mod snapshots;
pub mod vmm;

/// Where `hearth image build --vm` puts the VM image, and where the agent looks for it.
pub const DEFAULT_VM_IMAGE_DIR: &str = "/var/lib/hearth/vm-image";
