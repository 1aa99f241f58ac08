//! What an agent keeps to be itself, in its state directory (files 0600, directory 0700):
//! - `tls/ca.pem` and `tls/ca.key`: its own certificate authority, made on first start. The
//!   control plane pins `ca.pem` at join and trusts nothing else for this agent;
//! - `tls/cert.pem`, `tls/key.pem`: the server certificate for the advertised name, signed by
//!   that authority (remade when the advertised name changes);
//! - `joined.json`: the host id and name it joined as, and the SHA-256 of the credential the
//!   control plane presents (the credential itself is never written here).

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::path::{Path, PathBuf};

pub struct Tls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Joined {
    pub host_id: String,
    pub host_name: String,
    pub credential_sha256: String,
}

pub fn credential_hash(credential: &str) -> String {
    hex::encode(sha2::Sha256::digest(credential.as_bytes()))
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("write {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// The host part of `host:port` (an IP address or a DNS name), for the certificate.
fn host_of(advertise: &str) -> Result<String> {
    let host = match advertise.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => bail!("the advertised address {advertise:?} must be host:port"),
    };
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string())
}

/// Loads the agent's TLS material, making what is missing.
pub fn tls(state: &Path, advertise: &str) -> Result<Tls> {
    let dir = state.join("tls");
    let host = host_of(advertise)?;
    let read = |f: &str| std::fs::read_to_string(dir.join(f));
    let (ca_pem, ca_key) = match (read("ca.pem"), read("ca.key")) {
        (Ok(c), Ok(k)) => (c, k),
        _ => {
            let key = KeyPair::generate()?;
            let ca = ca_params()?.self_signed(&key)?;
            write_private(&dir.join("ca.key"), &key.serialize_pem())?;
            write_private(&dir.join("ca.pem"), &ca.pem())?;
            (ca.pem(), key.serialize_pem())
        }
    };
    let issued_for = read("host").unwrap_or_default();
    let (cert_pem, key_pem) = match (read("cert.pem"), read("key.pem")) {
        (Ok(c), Ok(k)) if issued_for == host => (c, k),
        _ => {
            let ca_key = KeyPair::from_pem(&ca_key).context("the agent's CA key is unreadable")?;
            let issuer = CertifiedIssuer::self_signed(ca_params()?, ca_key)?;
            // Signed by the same key and name as the pinned authority; the chain verifies
            // against `ca.pem` whichever of the two self-signatures it holds.
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(vec![host.clone()])?;
            params
                .distinguished_name
                .push(DnType::CommonName, host.clone());
            params.not_after = rcgen::date_time_ymd(2100, 1, 1);
            let cert = params.signed_by(&key, &issuer)?;
            write_private(&dir.join("key.pem"), &key.serialize_pem())?;
            write_private(&dir.join("cert.pem"), &cert.pem())?;
            write_private(&dir.join("host"), &host)?;
            (cert.pem(), key.serialize_pem())
        }
    };
    Ok(Tls {
        ca_pem,
        cert_pem,
        key_pem,
    })
}

fn ca_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "hearth agent authority");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    Ok(params)
}

pub fn joined_path(state: &Path) -> PathBuf {
    state.join("joined.json")
}

pub fn load_joined(state: &Path) -> Result<Option<Joined>> {
    match std::fs::read_to_string(joined_path(state)) {
        Ok(text) => Ok(Some(
            serde_json::from_str(&text).context("joined.json is unreadable")?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("read joined.json"),
    }
}

pub fn save_joined(state: &Path, joined: &Joined) -> Result<()> {
    write_private(&joined_path(state), &serde_json::to_string_pretty(joined)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn material_is_made_once_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = tls(dir.path(), "127.0.0.1:9443").unwrap();
        let again = tls(dir.path(), "127.0.0.1:9443").unwrap();
        assert_eq!(
            (first.ca_pem.clone(), first.cert_pem.clone()),
            (again.ca_pem, again.cert_pem)
        );
        for f in ["ca.key", "key.pem", "ca.pem"] {
            let mode = std::fs::metadata(dir.path().join("tls").join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        // A new name: a new server certificate from the same authority.
        let moved = tls(dir.path(), "agent.example:9443").unwrap();
        assert_eq!(moved.ca_pem, first.ca_pem);
        assert_ne!(moved.cert_pem, first.cert_pem);
        assert!(tls(dir.path(), "no-port").is_err());
    }
}
