//! What admins may do with users, environments and jobs.

use crate::App;
use crate::error::{AppError, AppResult};
use hearth_core::{EnvState, JobKind, Quota, Role, Tier};
use hearth_store::{
    ApiToken, CapacitySample, Environment, Host, Job, JobState, QuotaOverrides, User,
};

/// Tokens one user may hold at once.
pub const MAX_TOKENS_PER_USER: usize = 100;

/// The seed's `getAllVms`: every personal VM, the hosts, and counts.
pub struct VmsOverview {
    pub vms: Vec<Environment>,
    pub hosts: Vec<Host>,
    pub stats: VmStats,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VmStats {
    pub total: usize,
    pub running: usize,
    pub stopped: usize,
    pub provisioning: usize,
    pub error: usize,
    pub vcpus_running: i64,
    pub vcpus_total: i64,
    pub memory_mb_running: i64,
    pub memory_mb_total: i64,
}

fn tier(t: &str) -> AppResult<Tier> {
    Tier::parse(t)
        .ok_or_else(|| AppError::Invalid(format!("tier must be free, pro or unlimited, got {t:?}")))
}

fn role(r: &str) -> AppResult<Role> {
    Role::parse(r)
        .ok_or_else(|| AppError::Invalid(format!("role must be user or admin, got {r:?}")))
}

impl App {
    /// A new user (free tier and `user` role unless given); returns its first token.
    pub async fn create_user(
        &self,
        email: &str,
        role_name: Option<&str>,
        tier_name: Option<&str>,
    ) -> AppResult<(User, String)> {
        let well_formed = match email.split_once('@') {
            Some((name, domain)) => !name.is_empty() && !domain.is_empty() && !domain.contains('@'),
            None => false,
        };
        if !well_formed
            || email.chars().count() > 254
            || email.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(AppError::Invalid(
                "email must look like name@domain, with one @, without spaces or control characters (at most 254 characters)"
                    .into(),
            ));
        }
        let role = role_name.map(role).transpose()?.unwrap_or(Role::User);
        let tier = tier_name.map(tier).transpose()?.unwrap_or(Tier::Free);
        Ok(self.store.create_user(email, role, tier).await?)
    }

    /// One user with the quota in force and the overrides.
    pub async fn user_quota(&self, id: &str) -> AppResult<(User, Quota, QuotaOverrides)> {
        let user = self
            .store
            .user(id)
            .await
            .map_err(AppError::not_found("user"))?;
        let quota = self.store.quota(&user).await?;
        let overrides = self.store.quota_overrides(&user.id).await?;
        Ok((user, quota, overrides))
    }

    /// Changes a user's tier, role or quota overrides; returns the user with the quota
    /// now in force and the overrides.
    pub async fn update_user(
        &self,
        admin: &User,
        id: &str,
        tier_name: Option<&str>,
        role_name: Option<&str>,
        quota: Option<QuotaOverrides>,
    ) -> AppResult<(User, Quota, QuotaOverrides)> {
        let user = self
            .store
            .user(id)
            .await
            .map_err(AppError::not_found("user"))?;
        let tier = tier_name.map(tier).transpose()?;
        let role = role_name.map(role).transpose()?;
        if let Some(q) = &quota {
            for (name, v) in [
                ("maxEnvironments", q.max_environments),
                ("maxConcurrentEnvironments", q.max_concurrent_environments),
                ("maxVcpus", q.max_vcpus),
                ("maxMemoryMb", q.max_memory_mb),
                ("maxDiskGb", q.max_disk_gb),
                ("maxDurationHours", q.max_duration_hours),
            ] {
                if let Some(v) = v
                    && !(0..=10_000_000).contains(&v)
                {
                    return Err(AppError::Invalid(format!(
                        "quota.{name} must be between 0 and 10000000, got {v}"
                    )));
                }
            }
        }
        if admin.id == user.id && role == Some(Role::User) {
            return Err(AppError::InvalidState(
                "an admin cannot take away their own admin role".into(),
            ));
        }
        let user = self.store.set_user_tier_role(&user.id, tier, role).await?;
        if let Some(q) = &quota {
            self.store.set_quota_overrides(&user.id, q).await?;
        }
        let _ = self
            .store
            .audit(&admin.id, "user_update", None, "success", None, None)
            .await;
        self.user_quota(&user.id).await
    }

    /// Removes a user who holds nothing: refused while any of their environments is not
    /// destroyed, and for the caller themselves (an installation keeps an admin).
    pub async fn delete_user(&self, admin: &User, id: &str) -> AppResult<()> {
        let user = self
            .store
            .user(id)
            .await
            .map_err(AppError::not_found("user"))?;
        if user.id == admin.id {
            return Err(AppError::InvalidState(
                "an admin cannot remove themselves".into(),
            ));
        }
        self.store
            .delete_user(&user.id)
            .await
            .map_err(|e| match e {
                hearth_store::StoreError::Conflict(m) => AppError::InvalidState(m),
                hearth_store::StoreError::NotFound => AppError::NotFound("user"),
                e => e.into(),
            })?;
        tracing::info!(admin = %admin.id, user = %user.id, "user removed");
        let _ = self
            .store
            .audit(&admin.id, "user_delete", None, "success", None, None)
            .await;
        Ok(())
    }

    /// Another token for the caller (at most `MAX_TOKENS_PER_USER`); the plaintext is
    /// returned this once.
    pub async fn create_token(&self, user: &User, name: &str) -> AppResult<(ApiToken, String)> {
        if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
            return Err(AppError::Invalid(
                "name must be 1 to 64 characters, without control characters".into(),
            ));
        }
        if self.store.list_tokens(&user.id).await?.len() >= MAX_TOKENS_PER_USER {
            return Err(AppError::InvalidState(format!(
                "a user holds at most {MAX_TOKENS_PER_USER} tokens; revoke one first"
            )));
        }
        let made = self.store.create_token(&user.id, name).await?;
        let _ = self
            .store
            .audit(&user.id, "token_create", None, "success", None, None)
            .await;
        Ok(made)
    }

    /// Revokes one of the caller's tokens (it stops working at once, on every node).
    pub async fn revoke_token(&self, user: &User, id: &str) -> AppResult<()> {
        self.store
            .revoke_token(&user.id, id)
            .await
            .map_err(AppError::not_found("token"))?;
        let _ = self
            .store
            .audit(&user.id, "token_revoke", None, "success", None, None)
            .await;
        Ok(())
    }

    pub async fn vms_overview(&self) -> AppResult<VmsOverview> {
        let vms: Vec<Environment> = self.store.personal_environments().await?;
        let running: Vec<&Environment> = vms
            .iter()
            .filter(|e| e.state == EnvState::Running)
            .collect();
        let count = |s: EnvState| vms.iter().filter(|e| e.state == s).count();
        let stats = VmStats {
            total: vms.len(),
            running: running.len(),
            stopped: count(EnvState::Stopped),
            provisioning: vms
                .iter()
                .filter(|e| matches!(e.state, EnvState::Requested | EnvState::Provisioning))
                .count(),
            error: count(EnvState::Error),
            vcpus_running: running.iter().map(|e| e.vcpus).sum(),
            vcpus_total: vms.iter().map(|e| e.vcpus).sum(),
            memory_mb_running: running.iter().map(|e| e.memory_mb).sum(),
            memory_mb_total: vms.iter().map(|e| e.memory_mb).sum(),
        };
        Ok(VmsOverview {
            vms,
            hosts: self.store.hosts().await?,
            stats,
        })
    }

    /// The fleet's samples over the last `hours` (1 to 168), oldest first, ending with the
    /// fleet now.
    pub async fn capacity(&self, hours: i64) -> AppResult<Vec<CapacitySample>> {
        if !(1..=168).contains(&hours) {
            return Err(AppError::Invalid(format!(
                "hours must be 1 to 168 (samples are kept 7 days), not {hours}"
            )));
        }
        let now = self.store.capacity_now().await?;
        let mut samples = self
            .store
            .capacity_samples(now.at - hours * 3_600_000)
            .await?;
        samples.push(now);
        Ok(samples)
    }

    /// Destroys anyone's environment.
    pub async fn admin_destroy(&self, admin: &User, id: &str) -> AppResult<Environment> {
        let env = self
            .store
            .environment(id)
            .await
            .map_err(AppError::not_found("environment"))?;
        self.request(&admin.id, &env, JobKind::Destroy).await?;
        Ok(env)
    }

    /// A page of jobs, newest first, all or in one state.
    pub async fn jobs(
        &self,
        state: Option<&str>,
        cursor: Option<i64>,
        limit: i64,
    ) -> AppResult<(Vec<Job>, Option<i64>)> {
        let state = state
            .map(|s| {
                JobState::parse(s).ok_or_else(|| {
                    AppError::Invalid(format!(
                        "state must be queued, running, succeeded or dead, got {s:?}"
                    ))
                })
            })
            .transpose()?;
        Ok(self.store.list_jobs(state, cursor, limit).await?)
    }

    /// Puts a dead job back in its queue.
    pub async fn retry_job(&self, admin: &User, id: &str) -> AppResult<Job> {
        let id: i64 = id.parse().map_err(|_| AppError::NotFound("job"))?;
        let job = self
            .store
            .retry_dead(id, &admin.id)
            .await
            .map_err(AppError::not_found("job"))?;
        self.wake(&job.queue);
        Ok(job)
    }
}
