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
use hearth_guest::russh_sftp::client::SftpSession;
use hearth_guest::russh_sftp::client::error::Error as SftpError;
use hearth_guest::russh_sftp::client::fs::File;
use hearth_guest::russh_sftp::protocol::{FileType, StatusCode};
use hearth_store::{Environment, User};
use tokio::io::AsyncWriteExt;

/// Entries a listing answers with (the rest are counted, not listed).
pub const MAX_LISTED: usize = 10_000;
/// How long an upload may go without a byte arriving.
pub const UPLOAD_STALL: std::time::Duration = std::time::Duration::from_secs(60);
/// The longest path accepted.
pub const MAX_PATH_CHARS: usize = 4096;

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
        /// Entries past `MAX_LISTED`, left out.
        left_out: usize,
    },
}

/// An open SFTP session into one of the caller's environments.
pub struct Files {
    pub environment: Environment,
    sftp: SftpSession,
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

fn entry(name: String, m: &hearth_guest::russh_sftp::protocol::FileAttributes) -> Entry {
    Entry {
        name,
        kind: kind(m.file_type()),
        size: m.len(),
        modified_at: m.mtime.map(i64::from),
        mode: m.permissions.unwrap_or(0) & 0o7777,
    }
}

/// A path as the API takes it: not empty, no NUL, bounded.
pub fn check_path(path: &str) -> AppResult<()> {
    if path.is_empty() || path.contains('\0') || path.chars().count() > MAX_PATH_CHARS {
        return Err(AppError::Invalid(format!(
            "path must be 1 to {MAX_PATH_CHARS} characters, without NUL"
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
        SftpError::Status(s) => AppError::Invalid(format!("{path}: {}", s.error_message)),
        _ => AppError::Unavailable(format!("the environment's SFTP server failed: {e}")),
    }
}

impl App {
    /// Opens the files of the caller's running environment; counts as one of the caller's
    /// connections into environments (see `tunnels`).
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
        let sftp = self
            .ssh
            .sftp(&target)
            .await
            .map_err(|e| AppError::Unavailable(format!("cannot reach the environment: {e}")))?;
        let activity = Activity::new(self, &env.id, "files", permit).await;
        Ok(Files {
            environment: env,
            sftp,
            activity,
        })
    }
}

impl Files {
    /// A directory's entries (by name), or a file's own.
    pub async fn list(&self, path: &str) -> AppResult<Listing> {
        check_path(path)?;
        self.activity.mark().await;
        let meta = self.sftp.metadata(path).await.map_err(sftp_error(path))?;
        if meta.file_type() != FileType::Dir {
            let name = path.rsplit('/').next().unwrap_or(path).to_string();
            return Ok(Listing::File(entry(name, &meta)));
        }
        let mut entries: Vec<Entry> = self
            .sftp
            .read_dir(path)
            .await
            .map_err(sftp_error(path))?
            .map(|e| entry(e.file_name(), &e.metadata()))
            .filter(|e| e.name != "." && e.name != "..")
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let left_out = entries.len().saturating_sub(MAX_LISTED);
        entries.truncate(MAX_LISTED);
        Ok(Listing::Directory { entries, left_out })
    }

    /// A file to read, and its size.
    pub async fn read(self, path: &str) -> AppResult<(u64, File, Activity)> {
        check_path(path)?;
        self.activity.mark().await;
        let meta = self.sftp.metadata(path).await.map_err(sftp_error(path))?;
        if meta.file_type() == FileType::Dir {
            return Err(AppError::Invalid(format!(
                "{path} is a directory; list it with GET .../files?path="
            )));
        }
        let file = self.sftp.open(path).await.map_err(sftp_error(path))?;
        Ok((meta.len(), file, self.activity))
    }

    /// Writes `body` to `path` whole or not at all: into a temporary file beside it, then
    /// renamed over it. More than `limit` bytes (said up front in `announced`, or found
    /// while reading) is refused, and the temporary file removed.
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
        let (dir, name) = match path.rsplit_once('/') {
            Some((dir, name)) => (format!("{dir}/"), name),
            None => (String::new(), path),
        };
        let temporary = format!(
            "{dir}.{name}.hearth-upload-{}",
            uuid::Uuid::now_v7().simple()
        );
        let mut file = self
            .sftp
            .create(temporary.as_str())
            .await
            .map_err(sftp_error(path))?;
        let mut written: u64 = 0;
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
                file.write_all(&chunk).await.map_err(|e| {
                    AppError::Unavailable(format!("writing {path} in the environment failed: {e}"))
                })?;
                self.activity.mark().await;
            }
            file.shutdown().await.map_err(|e| {
                AppError::Unavailable(format!("writing {path} in the environment failed: {e}"))
            })
        }
        .await;
        drop(file);
        if let Err(e) = copied {
            let _ = self.sftp.remove_file(temporary.as_str()).await;
            return Err(e);
        }
        // SFTP's rename will not replace a file; OpenSSH's posix-rename does.
        let renamed = match self.sftp.rename(temporary.as_str(), path).await {
            Ok(()) => Ok(()),
            Err(_) => {
                let _ = self.sftp.remove_file(path).await;
                self.sftp.rename(temporary.as_str(), path).await
            }
        };
        if let Err(e) = renamed {
            let _ = self.sftp.remove_file(temporary.as_str()).await;
            return Err(sftp_error(path)(e));
        }
        let meta = self.sftp.metadata(path).await.map_err(sftp_error(path))?;
        Ok(entry(name.to_string(), &meta))
    }

    /// Removes a file, a link, or an empty directory.
    pub async fn remove(&self, path: &str) -> AppResult<()> {
        check_path(path)?;
        self.activity.mark().await;
        let meta = self
            .sftp
            .symlink_metadata(path)
            .await
            .map_err(sftp_error(path))?;
        if meta.file_type() == FileType::Dir {
            self.sftp.remove_dir(path).await.map_err(|e| match e {
                SftpError::Status(s) if s.status_code == StatusCode::Failure => {
                    AppError::InvalidState(format!(
                        "{path} is a directory that is not empty; remove what it holds first"
                    ))
                }
                other => sftp_error(path)(other),
            })
        } else {
            self.sftp.remove_file(path).await.map_err(sftp_error(path))
        }
    }
}
