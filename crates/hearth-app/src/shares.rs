//! Ports shared beyond their environment's owner: with whoever holds a token (its hash is
//! kept; the token is shown once), or with everyone. Every share expires (24 hours unless
//! asked, a week at most) and ends at once when deleted. A visitor reaches the port through
//! the proxy like its owner, never the environment's other ports, terminal or files.

use crate::{App, AppError, AppResult};
use hearth_store::{PortShare, StoreError, User, generate_token, hash_token};

/// The longest a share may last.
pub const MAX_SHARE_HOURS: i64 = 168;
const DEFAULT_SHARE_HOURS: i64 = 24;

impl App {
    /// Shares `port` of the caller's environment; returns the share and, for one that is
    /// not public, its token (shown this once).
    pub async fn share_port(
        &self,
        user: &User,
        id_or_slug: &str,
        port: u16,
        public: bool,
        hours: Option<i64>,
    ) -> AppResult<(PortShare, Option<String>)> {
        if port == 0 {
            return Err(AppError::Invalid("port must be 1 to 65535".into()));
        }
        let hours = hours.unwrap_or(DEFAULT_SHARE_HOURS);
        if !(1..=MAX_SHARE_HOURS).contains(&hours) {
            return Err(AppError::Invalid(format!(
                "expiresInHours must be 1 to {MAX_SHARE_HOURS}"
            )));
        }
        let env = self.owned_environment(user, id_or_slug).await?;
        let token = (!public).then(generate_token);
        let share = self
            .store
            .add_port_share(
                &env.id,
                i64::from(port),
                token.as_deref().map(hash_token).as_deref(),
                self.now() + hours * 3_600_000,
            )
            .await?;
        let _ = self
            .store
            .audit(&user.id, "port_share", Some(&env.id), "success", None, None)
            .await;
        Ok((share, token))
    }

    pub async fn port_shares(&self, user: &User, id_or_slug: &str) -> AppResult<Vec<PortShare>> {
        let env = self.owned_environment(user, id_or_slug).await?;
        Ok(self.store.port_shares(&env.id).await?)
    }

    pub async fn unshare_port(
        &self,
        user: &User,
        id_or_slug: &str,
        share_id: &str,
    ) -> AppResult<()> {
        let env = self.owned_environment(user, id_or_slug).await?;
        self.store
            .delete_port_share(&env.id, share_id)
            .await
            .map_err(AppError::not_found("share"))?;
        let _ = self
            .store
            .audit(
                &user.id,
                "port_unshare",
                Some(&env.id),
                "success",
                None,
                None,
            )
            .await;
        Ok(())
    }

    /// A visitor's use of the port a share token opens, if the share is live.
    pub async fn shared_by_token(&self, token: &str) -> AppResult<crate::tunnels::PortUse> {
        let share = self
            .store
            .port_share_by_token(&hash_token(token))
            .await
            .map_err(|e| match e {
                StoreError::NotFound => {
                    AppError::Unauthenticated("the share is unknown, deleted or expired".into())
                }
                other => other.into(),
            })?;
        let env = self
            .store
            .environment(&share.environment_id)
            .await
            .map_err(AppError::not_found("environment"))?;
        self.use_shared_port(env, share.port as u16).await
    }

    /// Anyone's use of `port` of environment `id_or_slug`, when it is shared with
    /// everyone; `None` when it is not (the caller's own refusal then stands).
    pub async fn use_public_port(
        &self,
        id_or_slug: &str,
        port: u16,
    ) -> AppResult<Option<crate::tunnels::PortUse>> {
        let env = match self.store.environment_for_user_any(id_or_slug).await {
            Ok(env) => env,
            Err(StoreError::NotFound) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if !self.store.port_is_public(&env.id, i64::from(port)).await? {
            return Ok(None);
        }
        Ok(Some(self.use_shared_port(env, port).await?))
    }
}
