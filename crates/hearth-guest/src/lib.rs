//! Talking to a running guest: per-environment SSH keys (sealed with the master key at
//! rest) and commands over SSH with russh, on connections that are kept and reused.

pub mod keys;
pub mod ssh;

/// The SFTP client that `SshPool::sftp` sessions are of.
pub use russh_sftp;

pub use keys::{KeyPair, MasterKey, SealError};
pub use ssh::{
    ExecOutput, ExecRequest, GuestError, SshPool, StreamChunk, Target, TunnelChannel, TunnelError,
};
