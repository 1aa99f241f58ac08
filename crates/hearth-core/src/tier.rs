//! Tiers, roles and quotas, with the seed's numbers.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Tier {
    Free,
    Pro,
    Unlimited,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Role {
    User,
    Admin,
}

/// What one VM gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Resources {
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
}

/// A user's limits. Active means anything not stopped, destroyed or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Quota {
    pub max_environments: i64,
    pub max_concurrent_environments: i64,
    pub max_vcpus: i64,
    pub max_memory_mb: i64,
    pub max_disk_gb: i64,
    pub max_duration_hours: i64,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Pro => "pro",
            Tier::Unlimited => "unlimited",
        }
    }

    /// Unknown names are refused here; the original silently treated them as free.
    pub fn parse(s: &str) -> Option<Tier> {
        match s {
            "free" => Some(Tier::Free),
            "pro" => Some(Tier::Pro),
            "unlimited" => Some(Tier::Unlimited),
            _ => None,
        }
    }

    /// How many snapshots a user of the tier may keep (each is a copy of a disk on its host).
    pub fn max_snapshots(self) -> i64 {
        match self {
            Tier::Free => 2,
            Tier::Pro => 10,
            Tier::Unlimited => 100,
        }
    }

    /// How many bytes a user's snapshots may take on their hosts in all. A snapshot being
    /// taken counts as the most it can take (its environment's disk and memory) until its
    /// host says what it took. The default sizes fit: two, ten or a hundred snapshots of
    /// the tier's default environment, memory included.
    pub fn max_snapshot_bytes(self) -> i64 {
        const GIB: i64 = 1 << 30;
        match self {
            Tier::Free => 32 * GIB,
            Tier::Pro => 640 * GIB,
            Tier::Unlimited => 12_800 * GIB,
        }
    }

    /// The largest file one upload may write into an environment
    /// (`PUT /v1/environments/{id}/files/content`).
    pub fn max_upload_bytes(self) -> u64 {
        match self {
            Tier::Free => 100 << 20,
            Tier::Pro => 2 << 30,
            Tier::Unlimited => 20 << 30,
        }
    }

    /// How many custom images a user of the tier may register.
    pub fn max_images(self) -> i64 {
        match self {
            Tier::Free => 1,
            Tier::Pro => 5,
            Tier::Unlimited => 50,
        }
    }

    pub fn default_resources(self) -> Resources {
        match self {
            Tier::Free => Resources {
                vcpus: 2,
                memory_mb: 4096,
                disk_gb: 10,
            },
            Tier::Pro => Resources {
                vcpus: 4,
                memory_mb: 8192,
                disk_gb: 50,
            },
            Tier::Unlimited => Resources {
                vcpus: 8,
                memory_mb: 16384,
                disk_gb: 100,
            },
        }
    }

    /// Minutes of idleness before the VM stops itself; `None` means never.
    pub fn auto_stop_minutes(self) -> Option<i64> {
        match self {
            Tier::Free => Some(60),
            Tier::Pro | Tier::Unlimited => None,
        }
    }

    /// Quota defaults. Free is the seed's; the others are sized so the tier's own
    /// personal VM and a few environments fit.
    pub fn default_quota(self) -> Quota {
        match self {
            Tier::Free => Quota {
                max_environments: 1,
                max_concurrent_environments: 1,
                max_vcpus: 2,
                max_memory_mb: 4096,
                max_disk_gb: 10,
                max_duration_hours: 24,
            },
            Tier::Pro => Quota {
                max_environments: 5,
                max_concurrent_environments: 3,
                max_vcpus: 12,
                max_memory_mb: 24576,
                max_disk_gb: 250,
                max_duration_hours: 168,
            },
            Tier::Unlimited => Quota {
                max_environments: 50,
                max_concurrent_environments: 20,
                max_vcpus: 64,
                max_memory_mb: 131072,
                max_disk_gb: 2000,
                max_duration_hours: 720,
            },
        }
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "user" => Some(Role::User),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Current use of a quota, counted over the user's environments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    pub environments: i64,
    pub concurrent_environments: i64,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
}

/// Which limit a request would break, with the numbers to show the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaExceeded {
    pub limit: &'static str,
    pub max: i64,
    pub used: i64,
    pub requested: i64,
}

impl std::fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "quota {} is {}; {} in use and this request needs {} more",
            self.limit, self.max, self.used, self.requested
        )?;
        if self.limit.ends_with("Bytes") {
            let gib = |b: i64| b as f64 / f64::from(1u32 << 30);
            write!(
                f,
                " ({:.1} GiB of {:.1} GiB in use, {:.1} GiB more needed)",
                gib(self.used),
                gib(self.max),
                gib(self.requested)
            )?;
        }
        if self.limit == "maxSnapshotBytes" {
            write!(
                f,
                "; a snapshot being taken counts as its environment's whole disk and memory until it is taken: delete snapshots you no longer need"
            )?;
        }
        Ok(())
    }
}

impl Quota {
    /// Checks a new active environment of size `r` against this quota and `usage`.
    pub fn admit(&self, usage: &Usage, r: &Resources) -> Result<(), QuotaExceeded> {
        let checks: [(&'static str, i64, i64, i64); 5] = [
            (
                "maxEnvironments",
                self.max_environments,
                usage.environments,
                1,
            ),
            (
                "maxConcurrentEnvironments",
                self.max_concurrent_environments,
                usage.concurrent_environments,
                1,
            ),
            ("maxVcpus", self.max_vcpus, usage.vcpus, r.vcpus),
            (
                "maxMemoryMb",
                self.max_memory_mb,
                usage.memory_mb,
                r.memory_mb,
            ),
            ("maxDiskGb", self.max_disk_gb, usage.disk_gb, r.disk_gb),
        ];
        for (limit, max, used, requested) in checks {
            if used + requested > max {
                return Err(QuotaExceeded {
                    limit,
                    max,
                    used,
                    requested,
                });
            }
        }
        Ok(())
    }

    /// Checks bringing back an existing environment (start, retry): it already counts
    /// toward `maxEnvironments`, so only the active limits apply.
    pub fn admit_existing(&self, usage: &Usage, r: &Resources) -> Result<(), QuotaExceeded> {
        let relaxed = Quota {
            max_environments: i64::MAX,
            ..*self
        };
        relaxed.admit(usage, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_tiers() {
        assert_eq!(
            Tier::Free.default_resources(),
            Resources {
                vcpus: 2,
                memory_mb: 4096,
                disk_gb: 10
            }
        );
        assert_eq!(
            Tier::Pro.default_resources(),
            Resources {
                vcpus: 4,
                memory_mb: 8192,
                disk_gb: 50
            }
        );
        assert_eq!(
            Tier::Unlimited.default_resources(),
            Resources {
                vcpus: 8,
                memory_mb: 16384,
                disk_gb: 100
            }
        );
        assert_eq!(Tier::Free.auto_stop_minutes(), Some(60));
        assert_eq!(Tier::Pro.auto_stop_minutes(), None);
        assert_eq!(Tier::parse("gold"), None);
    }

    #[test]
    fn every_tier_fits_its_own_personal_vm() {
        for t in [Tier::Free, Tier::Pro, Tier::Unlimited] {
            let q = t.default_quota();
            assert!(
                q.admit(&Usage::default(), &t.default_resources()).is_ok(),
                "{t:?}"
            );
        }
    }

    #[test]
    fn free_quota_is_the_seeds() {
        let q = Tier::Free.default_quota();
        assert_eq!(
            (
                q.max_environments,
                q.max_concurrent_environments,
                q.max_duration_hours
            ),
            (1, 1, 24)
        );
        assert_eq!((q.max_vcpus, q.max_memory_mb, q.max_disk_gb), (2, 4096, 10));
    }

    #[test]
    fn admit_names_the_broken_limit() {
        let q = Tier::Free.default_quota();
        let r = Tier::Free.default_resources();
        let used = Usage {
            environments: 1,
            ..Usage::default()
        };
        let e = q.admit(&used, &r).unwrap_err();
        assert_eq!(e.limit, "maxEnvironments");
        let big = Resources { vcpus: 3, ..r };
        assert_eq!(
            q.admit(&Usage::default(), &big).unwrap_err().limit,
            "maxVcpus"
        );
        assert!(e.to_string().contains("1 in use"));
    }
}
