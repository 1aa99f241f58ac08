//! Files in an environment: listed, read, written and removed over SFTP on the
//! environment's streams connection (`SshPool::sftp`), as the `dev` user, with its
//! permissions. Bodies stream both ways, a chunk at a time, so a transfer of any size holds
//! a bounded amount of memory here. Paths are the guest's: relative ones start in the home
//! directory, absolute ones are used as given, and symbolic links are followed as the
//! guest's file system follows them. Nothing reaches further than SSH as that user would.

use crate::tunnels::{Activity, take_permit};
use crate::{App, AppError, AppResult};
use futures::{Stream, StreamExt};
use hearth_core::EnvState;
use hearth_guest::russh_sftp::client::RawSftpSession;
use hearth_guest::russh_sftp::client::error::Error as SftpError;
use hearth_guest::russh_sftp::extensions::HardlinkExtension;
use hearth_guest::russh_sftp::protocol::{FileAttributes, FileType, OpenFlags, Packet, StatusCode};
use hearth_guest::{SshPool, Target};
use hearth_store::{Environment, User};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Entries a listing answers with (the rest are counted, not listed or kept).
pub const MAX_LISTED: usize = 10_000;
/// How long an upload may go without a byte arriving, or the guest without taking one.
pub const UPLOAD_STALL: Duration = Duration::from_secs(60);
/// The longest path accepted.
pub const MAX_PATH_CHARS: usize = 4096;
/// Bytes a download asks the guest's SFTP server for in one read. OpenSSH's sftp-server
/// answers at most 255 KiB a read; a shorter answer is completed by a further read.
const READ_BYTES: u32 = 64 * 1024;
/// Reads a download keeps in flight. One at a time, each waited a round trip through the
/// guest's sshd and downloads ran at about 0.8 of scp, which keeps 64 (BENCHMARKS.md,
/// issue 17). A download holds at most this many reads' bytes here.
const READS_IN_FLIGHT: usize = 8;

/// One file, directory or link.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    /// `file`, `directory`, `symlink` or `other`.
    pub kind: &'static str,
    pub size: u64,
    /// Seconds since the epoch.
    pub modified_at: Option<i64>,
    /// The permission bits (`0o644`).
    pub mode: u32,
}

pub enum Listing {
    File(Entry),
    Directory {
        entries: Vec<Entry>,
        /// Entries past `MAX_LISTED`, counted and left out.
        left_out: usize,
    },
}

/// The files of one of the caller's running environments. Each operation opens its own
/// SFTP session; all of them hold one of the caller's connections into environments.
pub struct Files {
    pub environment: Environment,
    ssh: SshPool,
    target: Target,
    activity: Activity,
}

fn kind(t: FileType) -> &'static str {
    match t {
        FileType::File => "file",
        FileType::Dir => "directory",
        FileType::Symlink => "symlink",
        FileType::Other => "other",
    }
}

fn entry(name: String, m: &FileAttributes) -> Entry {
    Entry {
        name,
        kind: kind(m.file_type()),
        size: m.len(),
        modified_at: m.mtime.map(i64::from),
        mode: m.permissions.unwrap_or(0) & 0o7777,
    }
}

/// A path as the API takes it: not empty, no NUL or line break, bounded.
pub fn check_path(path: &str) -> AppResult<()> {
    if path.is_empty() || path.contains(['\0', '\n', '\r']) || path.chars().count() > MAX_PATH_CHARS
    {
        return Err(AppError::Invalid(format!(
            "path must be 1 to {MAX_PATH_CHARS} characters, without NUL or line breaks"
        )));
    }
    Ok(())
}

/// The guest's answer in the API's terms.
fn sftp_error(path: &str) -> impl Fn(SftpError) -> AppError + '_ {
    move |e| match &e {
        SftpError::Status(s) if s.status_code == StatusCode::NoSuchFile => {
            AppError::NotFound("file or directory")
        }
        SftpError::Status(s) if s.status_code == StatusCode::PermissionDenied => {
            AppError::Forbidden(format!(
                "{path}: permission denied (files are read and written as the dev user)"
            ))
        }
        SftpError::Status(s) if s.status_code == StatusCode::OpUnsupported => {
            AppError::Invalid(format!("{path}: the guest's SFTP server does not do that"))
        }
        SftpError::Status(s) => AppError::InvalidState(format!(
            "{path}: the guest refused ({}: a full disk, a read-only file system, or a directory in the way)",
            s.error_message
        )),
        _ => AppError::Unavailable(format!("the environment's SFTP server failed: {e}")),
    }
}

fn unreachable(e: hearth_guest::GuestError) -> AppError {
    AppError::Unavailable(format!("cannot reach the environment: {e}"))
}

impl App {
    /// The files of the caller's running environment; counts as one of the caller's
    /// connections into environments (see `tunnels`) until dropped.
    pub async fn open_files(&self, user: &User, id_or_slug: &str) -> AppResult<Files> {
        let env = self.owned_environment(user, id_or_slug).await?;
        if env.state != EnvState::Running {
            return Err(AppError::InvalidState(format!(
                "the environment is {}; its files are reached while it runs",
                env.state
            )));
        }
        let target = self.target(&env)?;
        let permit = take_permit(self, &user.id)?;
        let activity = Activity::new(self, &env.id, "files", permit).await;
        Ok(Files {
            environment: env,
            ssh: self.ssh.clone(),
            target,
            activity,
        })
    }
}

impl Files {
    /// A directory's entries (by name, at most `MAX_LISTED`, read a batch at a time so a
    /// huge directory costs no more), or a file's own.
    pub async fn list(&self, path: &str) -> AppResult<Listing> {
        check_path(path)?;
        self.activity.mark().await;
        let raw = self.ssh.sftp_raw(&self.target).await.map_err(unreachable)?;
        let meta = raw.stat(path).await.map_err(sftp_error(path))?.attrs;
        if meta.file_type() != FileType::Dir {
            let name = path.rsplit('/').next().unwrap_or(path).to_string();
            return Ok(Listing::File(entry(name, &meta)));
        }
        let handle = raw.opendir(path).await.map_err(sftp_error(path))?.handle;
        let (mut entries, mut left_out) = (Vec::new(), 0);
        loop {
            match raw.readdir(handle.as_str()).await {
                Ok(batch) => {
                    for f in batch.files {
                        if f.filename == "." || f.filename == ".." {
                            continue;
                        }
                        if entries.len() < MAX_LISTED {
                            entries.push(entry(f.filename, &f.attrs));
                        } else {
                            left_out += 1;
                        }
                    }
                }
                Err(SftpError::Status(s)) if s.status_code == StatusCode::Eof => break,
                Err(e) => {
                    let _ = raw.close(handle.as_str()).await;
                    return Err(sftp_error(path)(e));
                }
            }
        }
        let _ = raw.close(handle.as_str()).await;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Listing::Directory { entries, left_out })
    }

    /// A file opened to be read (a link is followed).
    pub async fn read(self, path: &str) -> AppResult<Download> {
        check_path(path)?;
        self.activity.mark().await;
        let raw = self.ssh.sftp_raw(&self.target).await.map_err(unreachable)?;
        let meta = raw.stat(path).await.map_err(sftp_error(path))?.attrs;
        if meta.file_type() == FileType::Dir {
            return Err(AppError::Invalid(format!(
                "{path} is a directory; list it with GET .../files?path="
            )));
        }
        let handle = raw
            .open(path, OpenFlags::READ, FileAttributes::default())
            .await
            .map_err(sftp_error(path))?
            .handle;
        Ok(Download {
            size: meta.size.unwrap_or(0),
            raw: Arc::new(raw),
            handle: handle.into(),
            activity: self.activity,
        })
    }

    /// Writes `body` to `path` whole or not at all: into a temporary file (0600) beside
    /// it, which takes the old file's mode (0644 for a new one) and is then renamed over
    /// it (OpenSSH's `posix-rename`: the target never goes missing). A link is followed.
    /// More than `limit` bytes (said up front in `announced`, or found while reading), or
    /// fewer than announced, is refused and the temporary file removed.
    pub async fn write<S, E>(
        &self,
        path: &str,
        announced: Option<u64>,
        limit: u64,
        mut body: S,
    ) -> AppResult<Entry>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        check_path(path)?;
        let too_large =
            || AppError::TooLarge(format!("an upload is at most {limit} bytes for your tier"));
        if announced.is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        if path.ends_with('/') {
            return Err(AppError::Invalid(format!(
                "{path} names a directory, not a file"
            )));
        }
        let sftp = self.ssh.sftp(&self.target).await.map_err(unreachable)?;
        // What is there now: a directory is refused before a byte is read; a link leads
        // to its target; a file's mode is kept.
        let (target, mode) = match sftp.metadata(path).await {
            Ok(m) if m.file_type() == FileType::Dir => {
                return Err(AppError::Invalid(format!(
                    "{path} is a directory; name the file to write"
                )));
            }
            Ok(m) => (
                sftp.canonicalize(path).await.map_err(sftp_error(path))?,
                m.permissions.unwrap_or(0o644) & 0o7777,
            ),
            Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => {
                (path.to_string(), 0o644)
            }
            Err(e) => return Err(sftp_error(path)(e)),
        };
        let dir = match target.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/"),
            None => String::new(),
        };
        let name = target.rsplit('/').next().unwrap_or(&target).to_string();
        let temporary = format!("{dir}.hearth-upload-{}", uuid::Uuid::now_v7().simple());
        let private = FileAttributes {
            permissions: Some(0o600),
            ..FileAttributes::empty()
        };
        let mut file = sftp
            .open_with_flags_and_attributes(
                temporary.as_str(),
                OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE,
                private,
            )
            .await
            .map_err(sftp_error(path))?;
        let mut written: u64 = 0;
        let guest_stalled = || {
            AppError::Unavailable(format!(
                "the environment took nothing for {} s while writing {path}",
                UPLOAD_STALL.as_secs()
            ))
        };
        let copied: AppResult<()> = async {
            loop {
                let Ok(next) = tokio::time::timeout(UPLOAD_STALL, body.next()).await else {
                    return Err(AppError::Timeout(format!(
                        "the upload stalled: nothing arrived for {} s",
                        UPLOAD_STALL.as_secs()
                    )));
                };
                let Some(chunk) = next else { break };
                let chunk = chunk.map_err(|e| {
                    AppError::Invalid(format!("the upload broke off after {written} bytes: {e}"))
                })?;
                written += chunk.len() as u64;
                if written > limit {
                    return Err(too_large());
                }
                tokio::time::timeout(UPLOAD_STALL, file.write_all(&chunk))
                    .await
                    .map_err(|_| guest_stalled())?
                    .map_err(|e| {
                        AppError::Unavailable(format!(
                            "writing {path} in the environment failed: {e}"
                        ))
                    })?;
                self.activity.mark().await;
            }
            if announced.is_some_and(|n| n != written) {
                return Err(AppError::Invalid(format!(
                    "the upload ended after {written} of the {} bytes announced",
                    announced.unwrap_or(0)
                )));
            }
            tokio::time::timeout(UPLOAD_STALL, file.shutdown())
                .await
                .map_err(|_| guest_stalled())?
                .map_err(|e| {
                    AppError::Unavailable(format!("writing {path} in the environment failed: {e}"))
                })
        }
        .await;
        drop(file);
        let placed = match copied {
            Ok(()) => self.place(&sftp, &temporary, &target, mode).await,
            Err(e) => Err(e),
        };
        if let Err(e) = placed {
            let _ = sftp.remove_file(temporary.as_str()).await;
            return Err(e);
        }
        let meta = sftp
            .metadata(target.as_str())
            .await
            .map_err(sftp_error(path))?;
        Ok(entry(name, &meta))
    }

    /// Gives the written temporary file its mode, then renames it over `target` at once.
    async fn place(
        &self,
        sftp: &hearth_guest::russh_sftp::client::SftpSession,
        temporary: &str,
        target: &str,
        mode: u32,
    ) -> AppResult<()> {
        let with_mode = FileAttributes {
            permissions: Some(mode),
            ..FileAttributes::empty()
        };
        sftp.set_metadata(temporary, with_mode)
            .await
            .map_err(sftp_error(target))?;
        let raw = self.ssh.sftp_raw(&self.target).await.map_err(unreachable)?;
        let paths: Vec<u8> = HardlinkExtension {
            oldpath: temporary.to_string(),
            newpath: target.to_string(),
        }
        .try_into()
        .map_err(|e| AppError::Internal(format!("cannot encode a rename: {e}")))?;
        match raw.extended("posix-rename@openssh.com", paths).await {
            Ok(Packet::Status(s)) if s.status_code == StatusCode::Ok => Ok(()),
            Ok(Packet::Status(s)) => Err(sftp_error(target)(SftpError::Status(s))),
            Ok(_) => Err(AppError::Unavailable(
                "the guest's SFTP server gave an unexpected answer to a rename".into(),
            )),
            Err(e) => Err(sftp_error(target)(e)),
        }
    }

    /// Removes a file, a link, or an empty directory.
    pub async fn remove(&self, path: &str) -> AppResult<()> {
        check_path(path)?;
        self.activity.mark().await;
        let sftp = self.ssh.sftp(&self.target).await.map_err(unreachable)?;
        let meta = sftp
            .symlink_metadata(path)
            .await
            .map_err(sftp_error(path))?;
        if meta.file_type() == FileType::Dir {
            sftp.remove_dir(path).await.map_err(|e| match e {
                SftpError::Status(s) if s.status_code == StatusCode::Failure => {
                    AppError::InvalidState(format!(
                        "{path} is a directory that is not empty; remove what it holds first"
                    ))
                }
                other => sftp_error(path)(other),
            })
        } else {
            sftp.remove_file(path).await.map_err(sftp_error(path))
        }
    }
}

/// A file being read: its size when opened, and its open handle on an SFTP session of its
/// own, which ends (closing the file) when the download is dropped.
pub struct Download {
    /// 0 for a file whose size is not known ahead (what /proc says).
    pub size: u64,
    raw: Arc<RawSftpSession>,
    handle: Arc<str>,
    activity: Activity,
}

impl Download {
    /// The file's bytes in order, `READS_IN_FLIGHT` reads ahead, each chunk marking the
    /// environment active. A file of known size is read to that size (one that grows
    /// meanwhile is cut there, so the length announced holds); one of size 0 a read at a
    /// time, to its end. A file that shrinks ends the stream early.
    pub fn into_stream(self) -> impl Stream<Item = std::io::Result<bytes::Bytes>> + Send {
        let Download {
            size,
            raw,
            handle,
            activity,
        } = self;
        let offsets = (0u64..).step_by(READ_BYTES as usize);
        let (in_flight, ranges): (usize, Box<dyn Iterator<Item = (u64, u32)> + Send>) = if size > 0
        {
            let ranges = offsets
                .take_while(move |&at| at < size)
                .map(move |at| (at, (size - at).min(READ_BYTES as u64) as u32));
            (READS_IN_FLIGHT, Box::new(ranges))
        } else {
            (1, Box::new(offsets.map(|at| (at, READ_BYTES))))
        };
        futures::stream::iter(ranges)
            .map(move |(at, len)| read_range(raw.clone(), handle.clone(), at, len))
            .buffered(in_flight)
            .take_while(|chunk| {
                let more = !matches!(chunk, Ok(c) if c.is_empty());
                async move { more }
            })
            .then(move |chunk| {
                let activity = activity.clone();
                async move {
                    activity.mark().await;
                    chunk
                }
            })
    }
}

/// `len` bytes at `at`, fewer only at the file's end (a short answer is followed by a
/// read of the rest).
async fn read_range(
    raw: Arc<RawSftpSession>,
    handle: Arc<str>,
    at: u64,
    len: u32,
) -> std::io::Result<bytes::Bytes> {
    let mut chunk: Vec<u8> = Vec::new();
    while chunk.len() < len as usize {
        let got = chunk.len() as u32;
        match raw.read(&*handle, at + got as u64, len - got).await {
            Ok(data) if data.data.is_empty() => break,
            Ok(data) if chunk.is_empty() => chunk = data.data,
            Ok(data) => chunk.extend_from_slice(&data.data),
            Err(SftpError::Status(s)) if s.status_code == StatusCode::Eof => break,
            Err(e) => {
                return Err(std::io::Error::other(format!(
                    "reading from the guest: {e}"
                )));
            }
        }
    }
    Ok(chunk.into())
}
