//! Repositories cloned into environments, and the git credentials users store for them.
//!
//! A credential's secret is sealed with the master key as it arrives and opened only by
//! the provisioning job that clones with it (`jobs.rs`); answers, logs and the audit carry
//! its name and kind, never the secret.

use crate::{App, AppError, AppResult, service::CreateInput};
use hearth_core::validate::{self, GitTransport};
use hearth_store::{GitCredential, User};

/// Kinds of credential, as the API names them.
pub const HTTPS_TOKEN: &str = "https-token";
pub const SSH_KEY: &str = "ssh-key";

/// The largest secret accepted (an SSH key of any usual type fits).
pub const MAX_SECRET_BYTES: usize = 16 * 1024;

/// A credential to store, as received.
pub struct NewGitCredential {
    pub name: String,
    pub kind: String,
    pub username: Option<String>,
    pub secret: String,
}

fn check_secret(kind: &str, secret: &str) -> AppResult<()> {
    if secret.is_empty() || secret.len() > MAX_SECRET_BYTES {
        return Err(AppError::Invalid(format!(
            "secret must be 1 to {MAX_SECRET_BYTES} bytes"
        )));
    }
    match kind {
        HTTPS_TOKEN if secret.chars().any(|c| c.is_whitespace() || c.is_control()) => Err(
            AppError::Invalid("an HTTPS token has no spaces or control characters".into()),
        ),
        HTTPS_TOKEN => Ok(()),
        SSH_KEY if secret.trim_start().starts_with("-----BEGIN ")
            && secret.contains("PRIVATE KEY-----")
            && !secret.contains('\0') =>
        {
            Ok(())
        }
        SSH_KEY => Err(AppError::Invalid(
            "an SSH deploy key is a private key file without a passphrase (-----BEGIN OPENSSH PRIVATE KEY-----)".into(),
        )),
        other => Err(AppError::Invalid(format!(
            "kind must be {HTTPS_TOKEN} or {SSH_KEY}, got {other:?}"
        ))),
    }
}

impl App {
    /// Stores a credential of the caller's, its secret sealed.
    pub async fn add_git_credential(
        &self,
        user: &User,
        new: NewGitCredential,
    ) -> AppResult<GitCredential> {
        validate::credential_name(&new.name).map_err(AppError::Invalid)?;
        check_secret(&new.kind, &new.secret)?;
        if let Some(u) = &new.username {
            let plain = u
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | '+'));
            if u.is_empty() || u.len() > 255 || !plain || new.kind != HTTPS_TOKEN {
                return Err(AppError::Invalid(
                    "username goes with an https-token only: 1 to 255 letters, digits or . _ - @ +"
                        .into(),
                ));
            }
        }
        // A key pasted from elsewhere: OpenSSH reads LF line ends, and a last line ended.
        let secret = if new.kind == SSH_KEY {
            let mut key = new.secret.replace("\r\n", "\n");
            if !key.ends_with('\n') {
                key.push('\n');
            }
            key
        } else {
            new.secret
        };
        let sealed = self.master_key.seal(&secret);
        let stored = self
            .store
            .add_git_credential(user, &new.name, &new.kind, new.username.as_deref(), &sealed)
            .await?;
        let _ = self
            .store
            .audit(&user.id, "git_credential_add", None, "success", None, None)
            .await;
        Ok(stored)
    }

    pub async fn git_credentials(&self, user: &User) -> AppResult<Vec<GitCredential>> {
        Ok(self.store.git_credentials(&user.id).await?)
    }

    pub async fn delete_git_credential(&self, user: &User, name: &str) -> AppResult<()> {
        self.store
            .delete_git_credential(&user.id, name)
            .await
            .map_err(AppError::not_found("git credential"))?;
        let _ = self
            .store
            .audit(
                &user.id,
                "git_credential_delete",
                None,
                "success",
                None,
                None,
            )
            .await;
        Ok(())
    }

    /// Checks a create's repository fields; returns the id of the credential it names.
    pub(crate) async fn repository_credential(
        &self,
        user: &User,
        input: &CreateInput,
    ) -> AppResult<Option<String>> {
        let Some(url) = &input.repository_url else {
            if input.repository_ref.is_some() || input.git_credential.is_some() {
                return Err(AppError::Invalid(
                    "repositoryRef and gitCredential go with a repositoryUrl".into(),
                ));
            }
            return Ok(None);
        };
        let (transport, _) = validate::repository_url(url).map_err(AppError::Invalid)?;
        if let Some(r) = &input.repository_ref {
            validate::git_ref(r).map_err(AppError::Invalid)?;
        }
        let Some(name) = &input.git_credential else {
            return Ok(None);
        };
        let credential = self
            .store
            .git_credential_named(&user.id, name)
            .await
            .map_err(|e| match e {
                hearth_store::StoreError::NotFound => AppError::Invalid(format!(
                    "you have no git credential named {name:?} (POST /v1/me/git-credentials adds one)"
                )),
                other => other.into(),
            })?;
        if credential.kind == HTTPS_TOKEN
            && url.starts_with("http://")
            && !self.config.git_tokens_over_plain_http
        {
            return Err(AppError::Invalid(
                "a token is not sent over plain http:// (anyone on the way could read it): use https:// (an installation may allow it with HEARTH_GIT_TOKENS_OVER_PLAIN_HTTP=1)".into(),
            ));
        }
        let fits = match transport {
            GitTransport::Http => credential.kind == HTTPS_TOKEN,
            GitTransport::Ssh => credential.kind == SSH_KEY,
            GitTransport::Git => false,
        };
        if !fits {
            return Err(AppError::Invalid(format!(
                "git credential {name:?} is an {}, which does not go with this URL (an https-token with https://, an ssh-key with ssh:// or user@host:path, none with git://)",
                credential.kind
            )));
        }
        Ok(Some(credential.id))
    }
}
