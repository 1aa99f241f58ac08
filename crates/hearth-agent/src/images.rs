//! Custom images on this host (the control plane's `POST /v1/images` with
//! `"provider": "agent"`). The control plane builds the image's Dockerfile `FROM hearth/base`
//! on a Docker host and sends its file system here as a tarball (`docker export`); this
//! module makes it a VM's root file system: unpacked, checked against what a VM's init
//! needs, fitted with the VM image's init and configuration (`image::fit_for_vm`), and
//! written as a raw ext4 file (`mkfs.ext4 -d`) under `<state>/images/<id>/rootfs.ext4`.
//!
//! Images are kept the way users' snapshots are (`snapshots.rs`): made in a hidden directory
//! and renamed into place, so an image exists whole or not at all; an agent killed mid-import
//! leaves a hidden directory its next start removes; a deleted image stays while VMs made
//! from it do. A QEMU VM's disk is layered on the image's file; a Firecracker VM's is a copy.
//!
//! Bounds: a tarball of at most `MAX_TARBALL_BYTES`, with its length announced; an unpacked
//! tree of at most `TREE_FACTOR` times it (files counted in 4 KiB blocks, and a block per
//! entry, so a tarball of many tiny files cannot take far more than it says); room on the
//! host's disk for `room_needed` of it, promised before a byte is written, from the account
//! the host's snapshots share. The unpacking skips members that would land outside its
//! directory (through `..` or a link); files it reads from the image (`/etc/passwd`, sshd's
//! PAM configuration) are read up to 1 MiB; nothing in the image is run on this host.

use crate::snapshots::{Snapshot, Snapshots};
use crate::vmm::{VmmError, fail};
use hearth_provider::image::ImageError;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

/// The file an image's directory holds.
pub const DISK_FILE: &str = "rootfs.ext4";

/// The largest tarball an image may come as.
pub const MAX_TARBALL_BYTES: u64 = 20_000_000_000;

/// The unpacked tree may take this many times the tarball's length.
const TREE_FACTOR: u64 = 2;

/// The most an unpacked tree of a `tarball_bytes` tarball may take.
fn tree_budget(tarball_bytes: u64) -> u64 {
    tarball_bytes * TREE_FACTOR + (64 << 20)
}

/// What an import of a `tarball_bytes` tarball may take on the host's disk at its peak: the
/// unpacked tree, and the file system made of it (`image::write_rootfs`: a quarter more,
/// 256 MiB, and the inode tables; counted generously as the tree once more and 512 MiB).
pub fn room_needed(tarball_bytes: u64) -> u64 {
    tree_budget(tarball_bytes) * 2 + (512 << 20)
}

/// Programs a VM's init runs: an image without them would boot and never answer.
const NEEDED: [(&str, &str); 4] = [
    ("usr/sbin/sshd", "sshd, which lets Hearth in"),
    ("usr/bin/tini", "tini, which the VM's init runs sshd under"),
    ("usr/bin/ip", "ip (iproute2), which brings the network up"),
    (
        "usr/sbin/resize2fs",
        "resize2fs (e2fsprogs), which grows the disk",
    ),
];

/// Makes image `id` from the file system in `tarball` (or returns the one made before under
/// that id). The tarball must be `length` bytes, no fewer and no more. The caller has
/// promised the room (`Snapshots::promise`).
pub fn import(
    images: &Arc<Snapshots>,
    id: &str,
    tarball: impl Read,
    length: u64,
) -> Result<Snapshot, VmmError> {
    if let Some(found) = images.find(id)? {
        return Ok(found);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(VmmError::Failed(
            "importing an image needs the agent to run as root: its files keep their owners".into(),
        ));
    }
    let work = images.work_dir(id)?;
    let started = std::time::Instant::now();
    let made = images.make_sized(id, |disk| {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).map_err(fail("create the image's work directory"))?;
        unpack(tarball, length, &work)?;
        check(&work)?;
        let _ = std::fs::remove_file(work.join(".dockerenv"));
        crate::image::fit_for_vm(&work).map_err(failed)?;
        let bytes = crate::image::write_rootfs(&work, disk).map_err(failed)?;
        // The smallest disk a VM of it may have: its file system, whole.
        Ok(bytes.div_ceil(1 << 30) as i64)
    });
    let _ = std::fs::remove_dir_all(&work);
    if let Ok(image) = &made {
        tracing::info!(image = %id, bytes = image.size_bytes, disk_gb = image.disk_gb, ms = started.elapsed().as_millis() as u64, "image imported");
    }
    made
}

fn failed(e: ImageError) -> VmmError {
    VmmError::Failed(format!("the image's file system: {e}"))
}

/// Unpacks the tarball, which must be `length` bytes (one cut short can still end where
/// an entry does and look whole), into at most `tree_budget` of it. Directories are made
/// last, as `tar::Archive::unpack` does, so their modes do not stop what goes in them.
fn unpack(tarball: impl Read, length: u64, root: &Path) -> Result<(), VmmError> {
    let mut archive = tar::Archive::new(Counted {
        inner: tarball.take(length.saturating_add(1)),
        bytes: 0,
    });
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    // File capabilities (`security.capability`, as `docker export` writes them) are kept;
    // attributes are set without following links (`lsetxattr`).
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    let unreadable = |e: std::io::Error| {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        VmmError::Failed(format!(
            "the image's file system could not be unpacked: {text}"
        ))
    };
    let budget = tree_budget(length);
    let mut taken = 0u64;
    let mut directories = Vec::new();
    for entry in archive.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        taken += entry.size().div_ceil(4096) * 4096 + 4096;
        if taken > budget {
            return Err(VmmError::Failed(format!(
                "the image's files take more than {TREE_FACTOR} times its tarball ({} MB) once unpacked",
                length / 1_000_000
            )));
        }
        if entry.header().entry_type() == tar::EntryType::Directory {
            directories.push(entry);
        } else {
            entry.unpack_in(root).map_err(unreadable)?;
        }
    }
    // Deepest first: a directory's mode never stops the making of one inside it.
    directories.sort_by_key(|d| std::cmp::Reverse(d.path_bytes().len()));
    for mut directory in directories {
        directory.unpack_in(root).map_err(unreadable)?;
    }
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(unreadable)?;
    if rest.bytes != length {
        return Err(VmmError::Failed(format!(
            "the image's tarball was announced as {length} bytes and is {} or more",
            rest.bytes
        )));
    }
    Ok(())
}

/// A reader that counts what it read.
struct Counted<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// What a VM's init needs of the file system, said plainly: the alternative is a VM that
/// never answers.
fn check(root: &Path) -> Result<(), VmmError> {
    for (path, what) in NEEDED {
        if !crate::image::within(root, path).is_some_and(|p| p.is_file()) {
            return Err(VmmError::Failed(format!(
                "the image has no /{path} ({what}); build it FROM hearth/base"
            )));
        }
    }
    let passwd = crate::image::read_small(root, "etc/passwd")
        .map_err(|e| VmmError::Failed(format!("the image's /etc/passwd: {e}")))?
        .unwrap_or_default();
    if !passwd.lines().any(|l| l.starts_with("dev:")) {
        return Err(VmmError::Failed(
            "the image has no user dev, whom Hearth logs in as; build it FROM hearth/base and keep dev"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(entries: &[(&str, &[u8])], links: &[(&str, &str)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o755);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_cksum();
            builder.append_data(&mut header, path, *data).unwrap();
        }
        for (path, target) in links {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_mode(0o777);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            builder.append_link(&mut header, path, target).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn a_file_system_without_what_a_vm_needs_is_refused_with_the_reason() {
        let state = tempfile::tempdir().unwrap();
        let snapshots = Snapshots::open(state.path(), "disk.qcow2").unwrap();
        let images = Arc::new(Snapshots::open_images(state.path(), &snapshots).unwrap());
        let no_tini = tarball(
            &[
                ("usr/sbin/sshd", b"x"),
                ("usr/bin/ip", b"x"),
                ("usr/sbin/resize2fs", b"x"),
                ("etc/passwd", b"dev:x:1000:1000::/home/dev:/bin/bash\n"),
            ],
            &[],
        );
        let e = import(&images, "img_1", no_tini.as_slice(), no_tini.len() as u64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/usr/bin/tini"), "{e}");
        assert_eq!(images.find("img_1").unwrap(), None);
        assert_eq!(
            std::fs::read_dir(state.path().join("images"))
                .unwrap()
                .count(),
            0
        );

        let no_dev = tarball(
            &[
                ("usr/sbin/sshd", b"x"),
                ("usr/bin/tini", b"x"),
                ("usr/bin/ip", b"x"),
                ("usr/sbin/resize2fs", b"x"),
                ("etc/passwd", b"root:x:0:0::/root:/bin/bash\n"),
            ],
            &[],
        );
        let e = import(&images, "img_2", no_dev.as_slice(), no_dev.len() as u64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no user dev"), "{e}");

        // A tarball shorter than announced (it ended where an entry did), or cut inside its
        // end blocks.
        let announced = no_dev.len() as u64 + 512;
        let e = import(&images, "img_5", no_dev.as_slice(), announced)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("announced as {announced} bytes")),
            "{e}"
        );
        let cut = &no_dev[..no_dev.len() - 1000];
        let e = import(&images, "img_5", cut, cut.len() as u64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("could not be unpacked"), "{e}");
        assert_eq!(images.find("img_5").unwrap(), None);
    }

    #[test]
    fn a_tarball_of_many_tiny_files_cannot_take_far_more_room_than_it_says() {
        let state = tempfile::tempdir().unwrap();
        let snapshots = Snapshots::open(state.path(), "disk.qcow2").unwrap();
        let images = Arc::new(Snapshots::open_images(state.path(), &snapshots).unwrap());
        // 40,000 empty files: 20 MB of tarball, 160 MB of 4 KiB blocks once unpacked.
        let names: Vec<String> = (0..40_000).map(|i| format!("f/{i}")).collect();
        let entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b""[..])).collect();
        let tiny = tarball(&entries, &[]);
        let e = import(&images, "img_6", tiny.as_slice(), tiny.len() as u64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 2 times its tarball"), "{e}");
        assert_eq!(
            std::fs::read_dir(state.path().join("images"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn links_cannot_take_the_import_outside_its_directory() {
        let state = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let snapshots = Snapshots::open(state.path(), "disk.qcow2").unwrap();
        let images = Arc::new(Snapshots::open_images(state.path(), &snapshots).unwrap());
        // A link to a directory outside, then a file through it.
        let escape = tarball(
            &[("evil/planted", b"x")],
            &[("evil", outside.path().to_str().unwrap())],
        );
        let _ = import(&images, "img_3", escape.as_slice(), escape.len() as u64);
        assert!(!outside.path().join("planted").exists());
        // A program a VM needs that is a link to the host's is not the image's own.
        let linked = tarball(
            &[
                ("usr/bin/ip", b"x"),
                ("usr/sbin/resize2fs", b"x"),
                ("usr/bin/tini", b"x"),
                ("etc/passwd", b"dev:x:1000:1000::/home/dev:/bin/bash\n"),
            ],
            &[("usr/sbin/sshd", "/usr/sbin/sshd")],
        );
        let e = import(&images, "img_4", linked.as_slice(), linked.len() as u64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/usr/sbin/sshd"), "{e}");
    }

    #[test]
    fn fitting_for_a_vm_replaces_links_instead_of_writing_through_them() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("sudoers");
        std::fs::write(&target, "untouched").unwrap();
        for dir in ["etc/ssh", "etc/pam.d", "etc/sudoers.d", "usr/sbin"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        std::fs::write(
            root.path().join("etc/pam.d/sshd"),
            "session optional pam_motd.so\nauth x\n",
        )
        .unwrap();
        std::os::unix::fs::symlink(&target, root.path().join("etc/sudoers.d/dev")).unwrap();
        crate::image::fit_for_vm(root.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
        let written = root.path().join("etc/sudoers.d/dev");
        assert!(!written.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(
            std::fs::read_to_string(root.path().join("etc/pam.d/sshd")).unwrap(),
            "auth x\n"
        );
        // A directory that is a link is refused, not followed.
        let other = tempfile::tempdir().unwrap();
        for dir in ["etc/ssh", "etc/pam.d", "usr/sbin"] {
            std::fs::create_dir_all(other.path().join(dir)).unwrap();
        }
        std::fs::write(other.path().join("etc/pam.d/sshd"), "auth x\n").unwrap();
        std::os::unix::fs::symlink(outside.path(), other.path().join("etc/sudoers.d")).unwrap();
        let e = crate::image::fit_for_vm(other.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/sudoers.d is a link"), "{e}");
        assert!(!outside.path().join("dev").exists());
    }
}
