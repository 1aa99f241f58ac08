//! Per-environment ed25519 key pairs, and AES-256-GCM sealing of private keys.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rand::RngCore;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, PrivateKey};

pub struct KeyPair {
    /// OpenSSH private key text: seal it before storing.
    pub private_openssh: String,
    /// `ssh-ed25519 AAAA... hearth`
    pub public_openssh: String,
}

impl KeyPair {
    pub fn generate() -> KeyPair {
        let mut key = PrivateKey::random(&mut rand_core_compat::Rng, Algorithm::Ed25519)
            .expect("ed25519 key generation");
        key.set_comment("hearth");
        let private_openssh = key
            .to_openssh(LineEnding::LF)
            .expect("encode private key")
            .to_string();
        let public_openssh = key.public_key().to_openssh().expect("encode public key");
        KeyPair {
            private_openssh,
            public_openssh,
        }
    }
}

/// russh's key generation wants the rand_core version ssh-key uses; adapt the OS RNG.
mod rand_core_compat {
    pub struct Rng;
    impl rand_core::TryRng for Rng {
        type Error = std::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            Ok(rand::RngCore::next_u32(&mut rand::rngs::OsRng))
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            Ok(rand::RngCore::next_u64(&mut rand::rngs::OsRng))
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, dst);
            Ok(())
        }
    }
    impl rand_core::TryCryptoRng for Rng {}
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the master key must be 32 bytes, given as 64 hex digits or base64")]
    BadKey,
    #[error("a sealed secret could not be opened: wrong master key or damaged data")]
    Open,
}

/// The key that seals secrets at rest (`HEARTH_MASTER_KEY`, or a file in the data directory).
/// It keeps its AES-256-GCM key schedule: opening each environment's variables on a page
/// of 100 expanded the key 100 times.
#[derive(Clone)]
pub struct MasterKey {
    key: [u8; 32],
    cipher: Aes256Gcm,
}

impl MasterKey {
    fn from_bytes(key: [u8; 32]) -> MasterKey {
        let cipher = Aes256Gcm::new_from_slice(&key).expect("32-byte key");
        MasterKey { key, cipher }
    }

    pub fn generate() -> MasterKey {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        MasterKey::from_bytes(k)
    }

    /// Accepts 64 hex digits or base64 of 32 bytes.
    pub fn parse(text: &str) -> Result<MasterKey, SealError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap())
                .collect()
        } else {
            B64.decode(text).map_err(|_| SealError::BadKey)?
        };
        let arr: [u8; 32] = bytes.try_into().map_err(|_| SealError::BadKey)?;
        Ok(MasterKey::from_bytes(arr))
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.key)
    }

    /// A one-way check value of the key: SHA-256 of a fixed label and the key. The
    /// database keeps it, so a node can tell whether its key is the installation's without
    /// the key ever being stored there.
    pub fn check_value(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"hearth master key check v1\0");
        h.update(self.key);
        hex::encode(h.finalize())
    }

    /// `v1:` + base64(nonce || ciphertext).
    pub fn seal(&self, plaintext: &str) -> String {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plaintext.as_bytes())
            .expect("AES-GCM encryption");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        format!("v1:{}", B64.encode(out))
    }

    pub fn open(&self, sealed: &str) -> Result<String, SealError> {
        let data = sealed.strip_prefix("v1:").ok_or(SealError::Open)?;
        let data = B64.decode(data).map_err(|_| SealError::Open)?;
        if data.len() < 12 {
            return Err(SealError::Open);
        }
        let pt = self
            .cipher
            .decrypt(Nonce::from_slice(&data[..12]), &data[12..])
            .map_err(|_| SealError::Open)?;
        String::from_utf8(pt).map_err(|_| SealError::Open)
    }
}

/// Checks an OpenSSH public key line a user gave; returns it re-encoded (type, key and
/// comment), so nothing but a key reaches `authorized_keys`.
pub fn check_public_key(line: &str) -> Result<String, String> {
    if line.len() > 16 * 1024 || line.contains('\n') || line.contains('\r') {
        return Err("sshPublicKey must be one OpenSSH public key line".into());
    }
    let key = russh::keys::PublicKey::from_openssh(line.trim())
        .map_err(|e| format!("sshPublicKey is not an OpenSSH public key: {e}"))?;
    key.to_openssh().map_err(|e| format!("sshPublicKey: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_tamper() {
        let k = MasterKey::generate();
        let sealed = k.seal("secret key text");
        assert!(!sealed.contains("secret"));
        assert_eq!(k.open(&sealed).unwrap(), "secret key text");
        assert!(MasterKey::generate().open(&sealed).is_err());
        let mut bad = sealed.clone();
        bad.pop();
        bad.push('A');
        assert!(k.open(&bad).is_err() || bad == sealed);
        let again = MasterKey::parse(&k.to_base64()).unwrap();
        assert_eq!(again.open(&sealed).unwrap(), "secret key text");
        assert!(MasterKey::parse("short").is_err());
        assert_eq!(again.check_value(), k.check_value());
        assert_ne!(MasterKey::generate().check_value(), k.check_value());
        assert!(!k.check_value().contains(&k.to_base64()));
    }

    #[test]
    fn key_pairs_are_openssh_ed25519() {
        let kp = KeyPair::generate();
        assert!(kp.public_openssh.starts_with("ssh-ed25519 "));
        assert!(kp.private_openssh.contains("BEGIN OPENSSH PRIVATE KEY"));
        assert_ne!(KeyPair::generate().public_openssh, kp.public_openssh);
        let parsed = russh::keys::decode_secret_key(&kp.private_openssh, None).unwrap();
        assert_eq!(parsed.public_key().to_openssh().unwrap(), kp.public_openssh);
    }
}
