//! Environments: creation under quota (with its first job, in one transaction) and
//! conditional state writes guarded by state and generation, which also reserve and
//! release quota and host room as `EnvState::reservation` says.

use crate::hosts::{Placement, release};
use crate::jobs::{NewJob, insert_job};
use crate::records::insert_audit;
use crate::users::{User, quota_and_usage};
use crate::{Backend, Result, Store, StoreError, Tx};
use hearth_core::{EnvState, HostKind, Reservation, Resources};
use rand::Rng;
use sqlx::any::AnyRow;
use sqlx::{FromRow, Row};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    pub id: String,
    pub slug: String,
    pub name: String,
    pub user_id: String,
    pub personal: bool,
    pub state: EnvState,
    pub state_message: Option<String>,
    pub generation: i64,
    /// The kind of host it runs on (and so its provider).
    pub provider: HostKind,
    pub host_id: Option<String>,
    /// The name of that host, read with the row (not a column of it).
    pub host_name: Option<String>,
    /// The provider's id of its VM, saved as soon as the VM exists.
    pub vm_id: Option<String>,
    pub region: Option<String>,
    pub ip_address: Option<String>,
    pub ssh_host: Option<String>,
    pub ssh_port: Option<i64>,
    pub ssh_user: String,
    /// The guest's SSH host key, recorded at the first contact after the VM was made.
    pub ssh_host_key: Option<String>,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    pub gpus: i64,
    pub gpu_model: Option<String>,
    /// Holds its quota and host room now.
    pub reserved: bool,
    pub base_image: String,
    pub environment_vars: BTreeMap<String, String>,
    pub ssh_public_key: String,
    pub ssh_private_key_enc: String,
    pub auto_stop_minutes: Option<i64>,
    pub total_runtime_seconds: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    pub stopped_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub last_activity_at: Option<i64>,
    pub last_activity_source: Option<String>,
    pub init_script: Option<String>,
    pub repository_url: Option<String>,
    /// The branch or tag to clone (the remote's default branch when `None`).
    pub repository_ref: Option<String>,
    /// The owner's stored git credential to clone with.
    pub git_credential_id: Option<String>,
}

/// Whether authorized keys hold one of the owner's after Hearth's own. A page reads the
/// same from a generated column (`0019_has_user_ssh_key.sql`);
/// `a_page_shows_what_a_get_shows` checks both agree.
fn holds_user_key(authorized: &str) -> bool {
    authorized.lines().filter(|l| !l.trim().is_empty()).count() > 1
}

/// An environment as a page lists it: what its view shows. A page leaves out what only
/// the jobs that reach its guest read (its sealed private key, its init script): with them,
/// a page of 100 built, copied and parsed about twice the bytes (BENCHMARKS.md, issue 16).
#[derive(Debug, Clone, PartialEq)]
pub struct EnvironmentSummary {
    pub id: String,
    pub slug: String,
    pub name: String,
    pub user_id: String,
    pub personal: bool,
    pub state: EnvState,
    pub state_message: Option<String>,
    pub generation: i64,
    pub provider: HostKind,
    pub host_id: Option<String>,
    pub host_name: Option<String>,
    pub vm_id: Option<String>,
    pub region: Option<String>,
    pub ip_address: Option<String>,
    pub ssh_host: Option<String>,
    pub ssh_port: Option<i64>,
    pub ssh_user: String,
    pub ssh_host_key: Option<String>,
    /// See `Environment::has_user_ssh_key`.
    pub has_user_ssh_key: bool,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    pub gpus: i64,
    pub gpu_model: Option<String>,
    pub base_image: String,
    pub environment_vars: BTreeMap<String, String>,
    pub auto_stop_minutes: Option<i64>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub stopped_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub last_activity_at: Option<i64>,
    pub repository_url: Option<String>,
    pub repository_ref: Option<String>,
}

impl From<&Environment> for EnvironmentSummary {
    fn from(e: &Environment) -> EnvironmentSummary {
        EnvironmentSummary {
            id: e.id.clone(),
            slug: e.slug.clone(),
            name: e.name.clone(),
            user_id: e.user_id.clone(),
            personal: e.personal,
            state: e.state,
            state_message: e.state_message.clone(),
            generation: e.generation,
            provider: e.provider,
            host_id: e.host_id.clone(),
            host_name: e.host_name.clone(),
            vm_id: e.vm_id.clone(),
            region: e.region.clone(),
            ip_address: e.ip_address.clone(),
            ssh_host: e.ssh_host.clone(),
            ssh_port: e.ssh_port,
            ssh_user: e.ssh_user.clone(),
            ssh_host_key: e.ssh_host_key.clone(),
            has_user_ssh_key: e.has_user_ssh_key(),
            vcpus: e.vcpus,
            memory_mb: e.memory_mb,
            disk_gb: e.disk_gb,
            gpus: e.gpus,
            gpu_model: e.gpu_model.clone(),
            base_image: e.base_image.clone(),
            environment_vars: e.environment_vars.clone(),
            auto_stop_minutes: e.auto_stop_minutes,
            created_at: e.created_at,
            started_at: e.started_at,
            stopped_at: e.stopped_at,
            expires_at: e.expires_at,
            last_activity_at: e.last_activity_at,
            repository_url: e.repository_url.clone(),
            repository_ref: e.repository_ref.clone(),
        }
    }
}

impl Environment {
    /// Whether its owner gave an SSH key of their own (authorized after Hearth's key), so
    /// `ssh` works from their machine.
    pub fn has_user_ssh_key(&self) -> bool {
        holds_user_key(&self.ssh_public_key)
    }

    pub fn resources(&self) -> Resources {
        Resources {
            vcpus: self.vcpus,
            memory_mb: self.memory_mb,
            disk_gb: self.disk_gb,
        }
    }

    /// What it needs from a host. A region asked for at creation stays asked for; the
    /// region it was given (`region`) is that of its host.
    fn placement(&self) -> Placement {
        Placement {
            kind: self.provider,
            resources: self.resources(),
            gpus: self.gpus,
            gpu_model: self.gpu_model.clone(),
            region: self.region.clone(),
        }
    }

    /// A copy moved to `to`, with the timestamps that transition implies. Refuses
    /// transitions the state machine does not allow.
    pub fn moved_to(&self, to: EnvState, message: Option<String>, now: i64) -> Result<Environment> {
        self.state
            .check(to)
            .map_err(|e| StoreError::Conflict(e.to_string()))?;
        let mut next = self.clone();
        next.state = to;
        next.state_message = message;
        if self.state == EnvState::Running
            && let Some(started) = self.started_at
        {
            next.total_runtime_seconds += ((now - started) / 1000).max(0);
        }
        match to {
            EnvState::Running => {
                next.started_at = Some(now);
                next.last_activity_at = Some(now);
                next.last_activity_source = Some("start".into());
            }
            EnvState::Stopped | EnvState::Destroyed => next.stopped_at = Some(now),
            _ => {}
        }
        Ok(next)
    }
}

/// What the API asks for; the store adds ids, slug, host and timestamps.
#[derive(Debug, Clone)]
pub struct NewEnvironment {
    pub name: String,
    pub personal: bool,
    pub placement: Placement,
    pub base_image: String,
    pub ssh_user: String,
    pub environment_vars: BTreeMap<String, String>,
    pub ssh_public_key: String,
    pub ssh_private_key_enc: String,
    pub auto_stop_minutes: Option<i64>,
    pub expires_at: Option<i64>,
    pub init_script: Option<String>,
    pub repository_url: Option<String>,
    pub repository_ref: Option<String>,
    pub git_credential_id: Option<String>,
    /// The received mail this environment is made for: noted on the mail in the same
    /// transaction, which fails (`Conflict`) if the mail already made one, so two workers
    /// holding one mail job never make two environments.
    pub for_mail: Option<i64>,
    /// The host it must go on (a snapshot's, whose image only that host has); `None`:
    /// wherever placement finds room (or a warm VM).
    pub on_host: Option<String>,
}

#[derive(Debug)]
pub enum PersonalOutcome {
    Created(Environment),
    Existing(Environment),
}

const COLUMNS: &str = "id, slug, name, user_id, personal, state, state_message, generation, provider, \
    host_id, vm_id, region, ip_address, ssh_host, ssh_port, ssh_user, vcpus, memory_mb, disk_gb, \
    base_image, environment_vars, ssh_public_key, ssh_private_key_enc, auto_stop_minutes, \
    total_runtime_seconds, created_at, updated_at, started_at, stopped_at, expires_at, last_activity_at, \
    last_activity_source, init_script, repository_url, gpus, gpu_model, reserved, ssh_host_key, \
    repository_ref, git_credential_id";

macro_rules! select_env {
    ($where:expr) => {
        concat!(
            "SELECT id, slug, name, user_id, personal, state, state_message, generation, provider, \
             host_id, vm_id, region, ip_address, ssh_host, ssh_port, ssh_user, vcpus, memory_mb, disk_gb, \
             base_image, environment_vars, ssh_public_key, ssh_private_key_enc, auto_stop_minutes, \
             total_runtime_seconds, created_at, updated_at, started_at, stopped_at, expires_at, last_activity_at, \
             last_activity_source, init_script, repository_url, gpus, gpu_model, reserved, ssh_host_key, \
             repository_ref, git_credential_id, \
             (SELECT h.name FROM hosts h WHERE h.id = environments.host_id) AS host_name \
             FROM environments ",
            $where
        )
    };
}

/// The columns of an environment's summary, with its host's name: the inner query of a
/// page, which reads no other column. The host's name is a join: on PostgreSQL a subquery
/// per row made the page query 13-15% slower (BENCHMARKS.md, issue 16, fifth measurements).
/// Whether the owner gave a key of their own is a generated column
/// (`0019_has_user_ssh_key.sql`), not every row's authorized keys, Hearth's and the
/// user's, sent to be counted.
///
/// `SummaryRow`'s fields are in this order: both backends' pages are decoded by position.
macro_rules! select_summary {
    ($where:expr) => {
        concat!(
            "SELECT e.id, e.slug, e.name, e.user_id, e.personal, e.state, e.state_message, \
             e.generation, e.provider, e.host_id, e.vm_id, e.region, e.ip_address, e.ssh_host, \
             e.ssh_port, e.ssh_user, e.ssh_host_key, e.vcpus, e.memory_mb, e.disk_gb, e.gpus, \
             e.gpu_model, e.base_image, e.environment_vars, e.has_user_ssh_key, \
             e.auto_stop_minutes, e.created_at, e.started_at, e.stopped_at, e.expires_at, \
             e.last_activity_at, e.repository_url, e.repository_ref, h.name AS host_name \
             FROM environments e LEFT JOIN hosts h ON h.id = e.host_id ",
            $where
        )
    };
}

/// `select_summary!`'s columns, in its order, as `json_array` arguments: on SQLite a page
/// is read as one JSON array of arrays, one value from the driver. Row by row, through
/// `sqlx::Any`, each environment cost a hop between SQLite's connection thread and the
/// caller's and a copy of every column (BENCHMARKS.md, issue 16). Arrays, not objects:
/// serde reads a struct from an array by position, and SQLite neither writes nor serde
/// matches 34 names per row. `a_page_shows_what_a_get_shows` sets every column to a value
/// of its own, so two columns out of order fail it.
macro_rules! summary_array {
    () => {
        "id, slug, name, user_id, personal, state, state_message, generation, provider, \
         host_id, vm_id, region, ip_address, ssh_host, ssh_port, ssh_user, ssh_host_key, \
         vcpus, memory_mb, disk_gb, gpus, gpu_model, base_image, environment_vars, \
         has_user_ssh_key, auto_stop_minutes, created_at, started_at, stopped_at, expires_at, \
         last_activity_at, repository_url, repository_ref, host_name"
    };
}

/// A page's filter: `$1` the owner (`''` for everyone's, which only the admin reads), `$2`
/// a state or `''`, `$3` 1 to include destroyed ones, `$4` the cursor (the last id of the
/// page before, or `AFTER_EVERY_ID`), `$5` how many.
///
/// Each form walks an index from the cursor on, so a page costs the same at any depth and
/// any size of table: a user's `(user_id, id)`, everyone's the primary key, everyone's in
/// one state `(state, id)`. The cursor is a plain bound (`id < $4`), never `$4 = '' OR …`,
/// which no planner can seek with.
macro_rules! page_where {
    (one_user) => {
        "WHERE e.user_id = $1 AND ($2 = '' OR e.state = $2) AND ($3 = 1 OR e.state <> 'destroyed') \
         AND e.id < $4 ORDER BY e.id DESC LIMIT $5"
    };
    (every_user) => {
        "WHERE $1 = '' AND $2 = '' AND ($3 = 1 OR e.state <> 'destroyed') \
         AND e.id < $4 ORDER BY e.id DESC LIMIT $5"
    };
    (every_user_in_state) => {
        "WHERE $1 = '' AND e.state = $2 AND ($3 = 1 OR e.state <> 'destroyed') \
         AND e.id < $4 ORDER BY e.id DESC LIMIT $5"
    };
}

/// The background sweeps' and the admin's queries over everyone's environments, each led
/// by an index (`0014_list_indexes.sql`): `$1` is now (minus an age for `transitional`).
/// The personal VMs are at most one per user, in a partial index of their own.
macro_rules! sweep_where {
    (idle) => {
        "WHERE state = 'running' AND auto_stop_minutes IS NOT NULL AND auto_stop_minutes > 0 \
         AND COALESCE(last_activity_at, started_at, created_at) + auto_stop_minutes * 60000 < $1"
    };
    (expired) => {
        "WHERE expires_at IS NOT NULL AND expires_at < $1 AND state NOT IN ('destroying', 'destroyed')"
    };
    (transitional) => {
        "WHERE state IN ('requested', 'provisioning', 'starting', 'stopping', 'destroying') \
         AND updated_at < $1 AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.environment_id = environments.id \
         AND j.state IN ('queued', 'running'))"
    };
    (personal) => {
        "WHERE personal = 1 AND state <> 'destroyed' ORDER BY created_at, id"
    };
}

/// Greater than every environment id (a UUIDv7's version digit is 7, never `f`), in any
/// collation: the cursor of a first page.
const AFTER_EVERY_ID: &str = "ffffffff-ffff-ffff-ffff-ffffffffffff";

/// `select_summary!($where)` (which picks by id, newest first) as one JSON array in column
/// `v`, on SQLite; `[]` when nothing matches. The array's
/// order is the store's to restore (`list_environments` sorts it): an `ORDER BY` inside the
/// aggregate sorted the page's JSON values again in a temporary b-tree, though they came
/// in order, a tenth of a page's cost on SQLite (BENCHMARKS.md, issue 16).
macro_rules! page_of_envs {
    (sqlite, $where:expr) => {
        concat!(
            "SELECT json_group_array(json_array(",
            summary_array!(),
            ")) AS v FROM (",
            select_summary!($where),
            ")"
        )
    };
}

/// The page form for everyone's or one user's environments, in one state or all: which
/// index it walks (`page_where!`). SQLite's is read as one JSON value (`page_of_envs!`);
/// PostgreSQL's as rows, which its driver decodes on the caller's task: there, building a
/// page's JSON (`json_agg` of `json_build_object`, or of the rows themselves) cost the
/// database server three times what sending the rows does (BENCHMARKS.md, issue 16).
fn page_sql(backend: Backend, one_user: bool, in_state: bool) -> &'static str {
    match (backend, one_user, in_state) {
        (Backend::Sqlite, true, _) => page_of_envs!(sqlite, page_where!(one_user)),
        (Backend::Sqlite, false, false) => page_of_envs!(sqlite, page_where!(every_user)),
        (Backend::Sqlite, false, true) => page_of_envs!(sqlite, page_where!(every_user_in_state)),
        (Backend::Postgres, true, _) => select_summary!(page_where!(one_user)),
        (Backend::Postgres, false, false) => select_summary!(page_where!(every_user)),
        (Backend::Postgres, false, true) => select_summary!(page_where!(every_user_in_state)),
    }
}

/// An environment's row as `env_from_row` reads it.
#[derive(sqlx::FromRow)]
struct EnvRow {
    id: String,
    slug: String,
    name: String,
    user_id: String,
    personal: i64,
    state: String,
    state_message: Option<String>,
    generation: i64,
    provider: String,
    host_id: Option<String>,
    host_name: Option<String>,
    vm_id: Option<String>,
    region: Option<String>,
    ip_address: Option<String>,
    ssh_host: Option<String>,
    ssh_port: Option<i64>,
    ssh_user: String,
    ssh_host_key: Option<String>,
    vcpus: i64,
    memory_mb: i64,
    disk_gb: i64,
    gpus: i64,
    gpu_model: Option<String>,
    reserved: i64,
    base_image: String,
    environment_vars: String,
    ssh_public_key: String,
    ssh_private_key_enc: String,
    auto_stop_minutes: Option<i64>,
    total_runtime_seconds: i64,
    created_at: i64,
    updated_at: i64,
    started_at: Option<i64>,
    stopped_at: Option<i64>,
    expires_at: Option<i64>,
    last_activity_at: Option<i64>,
    last_activity_source: Option<String>,
    init_script: Option<String>,
    repository_url: Option<String>,
    repository_ref: Option<String>,
    git_credential_id: Option<String>,
}

impl EnvRow {
    /// The environment; its variables are still as kept at rest (returned beside it).
    fn into_environment(self) -> Result<(Environment, String)> {
        let env = Environment {
            state: EnvState::parse(&self.state)
                .ok_or_else(|| StoreError::Corrupt(format!("state {}", self.state)))?,
            provider: HostKind::parse(&self.provider)
                .ok_or_else(|| StoreError::Corrupt(format!("provider {}", self.provider)))?,
            id: self.id,
            slug: self.slug,
            name: self.name,
            user_id: self.user_id,
            personal: self.personal != 0,
            state_message: self.state_message,
            generation: self.generation,
            host_id: self.host_id,
            host_name: self.host_name,
            vm_id: self.vm_id,
            region: self.region,
            ip_address: self.ip_address,
            ssh_host: self.ssh_host,
            ssh_port: self.ssh_port,
            ssh_user: self.ssh_user,
            ssh_host_key: self.ssh_host_key,
            vcpus: self.vcpus,
            memory_mb: self.memory_mb,
            disk_gb: self.disk_gb,
            gpus: self.gpus,
            gpu_model: self.gpu_model,
            reserved: self.reserved != 0,
            base_image: self.base_image,
            environment_vars: BTreeMap::new(),
            ssh_public_key: self.ssh_public_key,
            ssh_private_key_enc: self.ssh_private_key_enc,
            auto_stop_minutes: self.auto_stop_minutes,
            total_runtime_seconds: self.total_runtime_seconds,
            created_at: self.created_at,
            updated_at: self.updated_at,
            started_at: self.started_at,
            stopped_at: self.stopped_at,
            expires_at: self.expires_at,
            last_activity_at: self.last_activity_at,
            last_activity_source: self.last_activity_source,
            init_script: self.init_script,
            repository_url: self.repository_url,
            repository_ref: self.repository_ref,
            git_credential_id: self.git_credential_id,
        };
        Ok((env, self.environment_vars))
    }
}

/// A page's row, its fields in `select_summary!`'s column order: as serde reads each of
/// `summary_array!`'s arrays (SQLite) and `FromRow` PostgreSQL's rows, both by position.
#[derive(serde::Deserialize)]
struct SummaryRow {
    id: String,
    slug: String,
    name: String,
    user_id: String,
    personal: i64,
    state: String,
    state_message: Option<String>,
    generation: i64,
    provider: String,
    host_id: Option<String>,
    vm_id: Option<String>,
    region: Option<String>,
    ip_address: Option<String>,
    ssh_host: Option<String>,
    ssh_port: Option<i64>,
    ssh_user: String,
    ssh_host_key: Option<String>,
    vcpus: i64,
    memory_mb: i64,
    disk_gb: i64,
    gpus: i64,
    gpu_model: Option<String>,
    base_image: String,
    environment_vars: String,
    has_user_ssh_key: i64,
    auto_stop_minutes: Option<i64>,
    created_at: i64,
    started_at: Option<i64>,
    stopped_at: Option<i64>,
    expires_at: Option<i64>,
    last_activity_at: Option<i64>,
    repository_url: Option<String>,
    repository_ref: Option<String>,
    host_name: Option<String>,
}

/// PostgreSQL's page rows, column by column in `select_summary!`'s order. The derived
/// `FromRow` finds each of a page's 3,400 values by name in a map, about 8% of the
/// server's CPU on a page (BENCHMARKS.md, issue 16, fifth measurements). Tests (debug
/// builds) check every column's name against the field it fills.
impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for SummaryRow {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> sqlx::Result<SummaryRow> {
        use sqlx::Column;
        let mut next = 0..;
        macro_rules! in_order {
            ($($field:ident),* $(,)?) => {
                SummaryRow { $($field: {
                    let i = next.next().expect("an endless range");
                    debug_assert_eq!(row.columns()[i].name(), stringify!($field));
                    row.try_get(i)?
                },)* }
            };
        }
        let summary = in_order!(
            id,
            slug,
            name,
            user_id,
            personal,
            state,
            state_message,
            generation,
            provider,
            host_id,
            vm_id,
            region,
            ip_address,
            ssh_host,
            ssh_port,
            ssh_user,
            ssh_host_key,
            vcpus,
            memory_mb,
            disk_gb,
            gpus,
            gpu_model,
            base_image,
            environment_vars,
            has_user_ssh_key,
            auto_stop_minutes,
            created_at,
            started_at,
            stopped_at,
            expires_at,
            last_activity_at,
            repository_url,
            repository_ref,
            host_name,
        );
        debug_assert_eq!(next.start, row.columns().len(), "a column no field reads");
        Ok(summary)
    }
}

impl Store {
    fn summary_from(&self, row: SummaryRow) -> Result<EnvironmentSummary> {
        Ok(EnvironmentSummary {
            state: EnvState::parse(&row.state)
                .ok_or_else(|| StoreError::Corrupt(format!("state {}", row.state)))?,
            provider: HostKind::parse(&row.provider)
                .ok_or_else(|| StoreError::Corrupt(format!("provider {}", row.provider)))?,
            environment_vars: self.open_vars(&row.environment_vars)?,
            has_user_ssh_key: row.has_user_ssh_key != 0,
            id: row.id,
            slug: row.slug,
            name: row.name,
            user_id: row.user_id,
            personal: row.personal != 0,
            state_message: row.state_message,
            generation: row.generation,
            host_id: row.host_id,
            host_name: row.host_name,
            vm_id: row.vm_id,
            region: row.region,
            ip_address: row.ip_address,
            ssh_host: row.ssh_host,
            ssh_port: row.ssh_port,
            ssh_user: row.ssh_user,
            ssh_host_key: row.ssh_host_key,
            vcpus: row.vcpus,
            memory_mb: row.memory_mb,
            disk_gb: row.disk_gb,
            gpus: row.gpus,
            gpu_model: row.gpu_model,
            base_image: row.base_image,
            auto_stop_minutes: row.auto_stop_minutes,
            created_at: row.created_at,
            started_at: row.started_at,
            stopped_at: row.stopped_at,
            expires_at: row.expires_at,
            last_activity_at: row.last_activity_at,
            repository_url: row.repository_url,
            repository_ref: row.repository_ref,
        })
    }
}

impl Store {
    /// Environment variables as kept at rest: sealed JSON when the store has a key.
    fn seal_vars(&self, vars: &BTreeMap<String, String>) -> Result<String> {
        let json =
            serde_json::to_string(vars).map_err(|err| StoreError::Corrupt(err.to_string()))?;
        Ok(match &self.secrets {
            Some(s) => s.seal(&json),
            None => json,
        })
    }

    fn open_vars(&self, kept: &str) -> Result<BTreeMap<String, String>> {
        let json = match (&self.secrets, kept.starts_with('{')) {
            (_, true) => kept.to_string(),
            (Some(s), false) => s
                .open(kept)
                .map_err(|e| StoreError::Corrupt(format!("environment_vars: {e}")))?,
            (None, false) => {
                return Err(StoreError::Corrupt(
                    "environment_vars are sealed and this store has no key".into(),
                ));
            }
        };
        serde_json::from_str(&json)
            .map_err(|e| StoreError::Corrupt(format!("environment_vars: {e}")))
    }

    fn env_from_row(&self, row: &AnyRow) -> Result<Environment> {
        self.env_from(EnvRow::from_row(row)?)
    }

    fn env_from(&self, row: EnvRow) -> Result<Environment> {
        let (mut env, vars) = row.into_environment()?;
        env.environment_vars = self.open_vars(&vars)?;
        Ok(env)
    }
}

/// `env_` and 8 characters of `[a-z0-9]` from the OS CSPRNG.
pub fn new_slug() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    let s: String = (0..8)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("env_{s}")
}

impl Store {
    /// Creates the user's personal VM with its provision job, or returns the live one.
    /// Quota is checked in the same transaction; a concurrent twin meets the unique index.
    pub async fn create_personal_environment(
        &self,
        user: &User,
        new: NewEnvironment,
        provision: NewJob,
    ) -> Result<PersonalOutcome> {
        if let Some(existing) = self.personal_environment(&user.id).await? {
            return Ok(PersonalOutcome::Existing(existing));
        }
        match self.create_environment(user, new, provision).await {
            // A concurrent twin won: it holds the quota or the unique personal slot.
            Err(StoreError::Quota(q)) => match self.personal_environment(&user.id).await? {
                Some(existing) => Ok(PersonalOutcome::Existing(existing)),
                None => Err(StoreError::Quota(q)),
            },
            Err(StoreError::Db(e)) if crate::is_unique_violation(&e) => {
                let existing = self
                    .personal_environment(&user.id)
                    .await?
                    .ok_or(StoreError::NotFound)?;
                Ok(PersonalOutcome::Existing(existing))
            }
            Err(e) => Err(e),
            Ok(env) => Ok(PersonalOutcome::Created(env)),
        }
    }

    /// Inserts an environment in `requested` on the host placement chose, its first job,
    /// its first log line and the audit line, in one transaction, after checking the quota against current
    /// usage.
    pub async fn create_environment(
        &self,
        user: &User,
        new: NewEnvironment,
        first_job: NewJob,
    ) -> Result<Environment> {
        let now = self.now();
        let mut env = Environment {
            id: uuid::Uuid::now_v7().to_string(),
            slug: new_slug(),
            name: new.name,
            user_id: user.id.clone(),
            personal: new.personal,
            state: EnvState::Requested,
            state_message: Some("queued for provisioning".into()),
            generation: 1,
            provider: new.placement.kind,
            host_id: None,
            host_name: None,
            vm_id: None,
            region: new.placement.region.clone(),
            ip_address: None,
            ssh_host: None,
            ssh_port: None,
            ssh_user: new.ssh_user,
            ssh_host_key: None,
            vcpus: new.placement.resources.vcpus,
            memory_mb: new.placement.resources.memory_mb,
            disk_gb: new.placement.resources.disk_gb,
            gpus: new.placement.gpus,
            gpu_model: new.placement.gpu_model.clone(),
            reserved: true,
            base_image: new.base_image,
            environment_vars: new.environment_vars,
            ssh_public_key: new.ssh_public_key,
            ssh_private_key_enc: new.ssh_private_key_enc,
            auto_stop_minutes: new.auto_stop_minutes,
            total_runtime_seconds: 0,
            created_at: now,
            updated_at: now,
            started_at: None,
            stopped_at: None,
            expires_at: new.expires_at,
            last_activity_at: None,
            last_activity_source: None,
            init_script: new.init_script,
            repository_url: new.repository_url,
            repository_ref: new.repository_ref,
            git_credential_id: new.git_credential_id,
        };
        let mut tx = self.begin().await?;
        // Lock the user row so concurrent creates by one user queue up on PostgreSQL. On
        // SQLite `begin` already holds the one writer (and the environment's foreign key
        // still refuses a user that is gone).
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT id FROM users WHERE id = $1 FOR UPDATE")
                .bind(&user.id)
                .fetch_one(&mut *tx)
                .await?;
        }
        let (quota, usage) = quota_and_usage(&mut tx, user).await?;
        quota
            .admit(&usage, &env.resources())
            .map_err(StoreError::Quota)?;
        // A warm VM of this exact shape, if a pool has one: the environment takes its id,
        // slug and VM, and its room (see `pools`); otherwise a host is chosen as usual.
        let claimed = match &new.on_host {
            Some(_) => None,
            None => {
                self.claim_pooled(&mut tx, &new.placement, &env.base_image)
                    .await?
            }
        };
        let host_id = match claimed {
            Some(pooled) => {
                env.id = pooled.id;
                env.slug = pooled.slug;
                env.vm_id = pooled.vm_id;
                pooled.host_id
            }
            None => {
                self.place_in(&mut tx, &new.placement, new.on_host.as_deref())
                    .await?
            }
        };
        (env.region, env.host_name) = host_region_and_name(&mut tx, &host_id).await?;
        env.host_id = Some(host_id);
        let vars = self.seal_vars(&env.environment_vars)?;
        insert_env(&mut tx, &env, &vars).await?;
        if let Some(mail) = new.for_mail {
            let noted = sqlx::query(
                "UPDATE inbound_mail SET environment_id = $1, updated_at = $2 WHERE id = $3 AND environment_id IS NULL",
            )
            .bind(&env.id)
            .bind(now)
            .bind(mail)
            .execute(&mut *tx)
            .await?;
            if noted.rows_affected() != 1 {
                return Err(StoreError::Conflict(format!(
                    "mail {mail} made an environment already"
                )));
            }
        }
        insert_job(&mut tx, &first_job.for_environment(&env.id), now).await?;
        // The first log line, in the same transaction: on SQLite a write of its own after
        // the commit met the next create's transaction and waited in the busy handler.
        crate::records::insert_first_log(&mut tx, &env.id, now, "provisioning requested; queued")
            .await?;
        insert_audit(
            &mut tx,
            now,
            &first_job.actor,
            "create",
            Some(&env.id),
            None,
            Some(EnvState::Requested),
            "success",
            None,
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(env)
    }

    pub async fn environment(&self, id: &str) -> Result<Environment> {
        let row = sqlx::query(select_env!("WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        self.env_from_row(&row)
    }

    /// The user's live (not destroyed) personal environment.
    pub async fn personal_environment(&self, user_id: &str) -> Result<Option<Environment>> {
        let row = sqlx::query(select_env!(
            "WHERE user_id = $1 AND personal = 1 AND state <> 'destroyed'"
        ))
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(|r| self.env_from_row(r)).transpose()
    }

    /// The caller's environment by id or slug. Someone else's is `NotFound`, never shown.
    pub async fn environment_for_user(
        &self,
        user_id: &str,
        id_or_slug: &str,
    ) -> Result<Environment> {
        const SQL: &str = select_env!("WHERE user_id = $1 AND (id = $2 OR slug = $2)");
        let row: Option<EnvRow> = fetch_read!(
            self,
            sqlx::query_as(SQL).bind(user_id).bind(id_or_slug),
            fetch_optional
        )?;
        self.env_from(row.ok_or(StoreError::NotFound)?)
    }

    /// Any user's environment by id or slug. Only for checks that then verify ownership
    /// (a terminal ticket names its user).
    pub async fn environment_for_user_any(&self, id_or_slug: &str) -> Result<Environment> {
        let row = sqlx::query(select_env!("WHERE id = $1 OR slug = $1"))
            .bind(id_or_slug)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        self.env_from_row(&row)
    }

    /// A page of environments, newest first (ids are time-ordered UUIDv7). Filters are
    /// optional; `cursor` is the last id of the previous page.
    pub async fn list_environments(
        &self,
        user_id: Option<&str>,
        state: Option<EnvState>,
        include_destroyed: bool,
        cursor: Option<&str>,
        limit: i64,
    ) -> Result<(Vec<EnvironmentSummary>, Option<String>)> {
        let sql = page_sql(self.backend, user_id.is_some(), state.is_some());
        macro_rules! bind_filter {
            ($query:expr) => {
                $query
                    .bind(user_id.unwrap_or(""))
                    .bind(state.map(EnvState::as_str).unwrap_or(""))
                    .bind(include_destroyed as i64)
                    .bind(cursor.unwrap_or(AFTER_EVERY_ID))
                    .bind(limit + 1)
            };
        }
        let rows: Vec<SummaryRow> = match &self.reads {
            Some(reads) => bind_filter!(sqlx::query_as(sql)).fetch_all(reads).await?,
            None => {
                let page: String = bind_filter!(sqlx::query(sql))
                    .fetch_one(&self.pool)
                    .await?
                    .try_get("v")?;
                serde_json::from_str(&page)
                    .map_err(|e| StoreError::Corrupt(format!("a page of environments: {e}")))?
            }
        };
        let mut items = rows
            .into_iter()
            .map(|r| self.summary_from(r))
            .collect::<Result<Vec<_>>>()?;
        // Newest first (see `page_of_envs!`); they come so, and then this is one pass.
        items.sort_unstable_by(|a, b| b.id.cmp(&a.id));
        let next = crate::finish_page(&mut items, limit, |e| e.id.clone());
        Ok((items, next))
    }

    /// Every environment on a host that is not destroyed, for the reconciler.
    pub async fn environments_on_host(&self, host_id: &str) -> Result<Vec<Environment>> {
        let rows = sqlx::query(select_env!("WHERE host_id = $1 AND state <> 'destroyed'"))
            .bind(host_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| self.env_from_row(r)).collect()
    }

    /// Running environments idle for longer than their auto-stop time.
    pub async fn idle_environments(&self) -> Result<Vec<Environment>> {
        let rows = sqlx::query(select_env!(sweep_where!(idle)))
            .bind(self.now())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| self.env_from_row(r)).collect()
    }

    /// Environments past `expiresAt` that are not yet on their way out.
    pub async fn expired_environments(&self) -> Result<Vec<Environment>> {
        let rows = sqlx::query(select_env!(sweep_where!(expired)))
            .bind(self.now())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| self.env_from_row(r)).collect()
    }

    /// Environments in a transitional state whose last write is older than `age_ms` and
    /// that no job owns (none queued or running for them): those nothing will finish.
    pub async fn transitional_for(&self, age_ms: i64) -> Result<Vec<Environment>> {
        let rows = sqlx::query(select_env!(sweep_where!(transitional)))
            .bind(self.now() - age_ms)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| self.env_from_row(r)).collect()
    }

    /// Every user's personal VM that is not destroyed, oldest first, for the admin view: at
    /// most one per user (`environments_one_personal`, whose partial index this walks).
    pub async fn personal_environments(&self) -> Result<Vec<Environment>> {
        let rows = sqlx::query(select_env!(sweep_where!(personal)))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| self.env_from_row(r)).collect()
    }

    /// Every environment that is not destroyed (tests' invariant checks).
    pub async fn live_environments(&self) -> Result<Vec<Environment>> {
        let rows = sqlx::query(select_env!(
            "WHERE state <> 'destroyed' ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| self.env_from_row(r)).collect()
    }

    /// Writes `next` if the row still has `prev`'s state and generation; bumps the
    /// generation, reserves or releases quota and host room as the transition says, and
    /// records it in the audit log, in one transaction.
    pub async fn save_transition(
        &self,
        prev: &Environment,
        next: Environment,
        actor: &str,
    ) -> Result<Environment> {
        self.write_transition(prev, next, actor, false).await
    }

    /// As `save_transition`, into a state at rest (`error`), but holding on to the quota
    /// and host room: its VM may still exist and must stay counted until an undo removes
    /// it (then `release_held`).
    pub async fn save_transition_holding(
        &self,
        prev: &Environment,
        next: Environment,
        actor: &str,
    ) -> Result<Environment> {
        self.write_transition(prev, next, actor, true).await
    }

    /// Gives back what an environment at rest still holds (see `save_transition_holding`).
    pub async fn release_held(&self, env: &Environment) -> Result<Environment> {
        if !env.reserved || env.state.is_transitional() || env.state == EnvState::Running {
            return Ok(env.clone());
        }
        let mut next = env.clone();
        next.generation = env.generation + 1;
        next.updated_at = self.now();
        next.reserved = false;
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE environments SET reserved = 0, generation = $1, updated_at = $2 WHERE id = $3 AND generation = $4 AND reserved = 1",
        )
        .bind(next.generation)
        .bind(next.updated_at)
        .bind(&env.id)
        .bind(env.generation)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Stale);
        }
        if let Some(host) = &env.host_id {
            release(&mut tx, host, &env.resources(), env.gpus).await?;
        }
        tx.commit().await?;
        Ok(next)
    }

    async fn write_transition(
        &self,
        prev: &Environment,
        mut next: Environment,
        actor: &str,
        holding: bool,
    ) -> Result<Environment> {
        let now = self.now();
        next.generation = prev.generation + 1;
        next.updated_at = now;
        let mut tx = self.begin().await?;
        let reservation = match prev.state.reservation(next.state, prev.reserved) {
            Reservation::Release if holding => Reservation::Keep,
            r => r,
        };
        match reservation {
            Reservation::Reserve => {
                let user = crate::users::user_in(&mut tx, &prev.user_id, self.for_update()).await?;
                let (quota, usage) = quota_and_usage(&mut tx, &user).await?;
                quota
                    .admit_existing(&usage, &next.resources())
                    .map_err(StoreError::Quota)?;
                // A VM that exists lives on its host; one never made may go anywhere.
                let pinned = if prev.vm_id.is_some() {
                    prev.host_id.as_deref()
                } else {
                    None
                };
                let host_id = self.place_in(&mut tx, &next.placement(), pinned).await?;
                (next.region, next.host_name) = host_region_and_name(&mut tx, &host_id).await?;
                next.host_id = Some(host_id);
                next.reserved = true;
            }
            Reservation::Release => {
                if let Some(host) = &prev.host_id {
                    release(&mut tx, host, &prev.resources(), prev.gpus).await?;
                }
                next.reserved = false;
            }
            Reservation::Keep => next.reserved = prev.reserved,
        }
        let done = sqlx::query(
            "UPDATE environments SET state = $1, state_message = $2, generation = $3, host_id = $4, vm_id = $5, \
             ip_address = $6, ssh_host = $7, ssh_port = $8, total_runtime_seconds = $9, updated_at = $10, \
             started_at = $11, stopped_at = $12, last_activity_at = $13, last_activity_source = $17, reserved = $18, \
             region = $19, ssh_host_key = $20 WHERE id = $14 AND state = $15 AND generation = $16",
        )
        .bind(next.state.as_str())
        .bind(&next.state_message)
        .bind(next.generation)
        .bind(&next.host_id)
        .bind(&next.vm_id)
        .bind(&next.ip_address)
        .bind(&next.ssh_host)
        .bind(next.ssh_port)
        .bind(next.total_runtime_seconds)
        .bind(next.updated_at)
        .bind(next.started_at)
        .bind(next.stopped_at)
        .bind(next.last_activity_at)
        .bind(&prev.id)
        .bind(prev.state.as_str())
        .bind(prev.generation)
        .bind(&next.last_activity_source)
        .bind(next.reserved as i64)
        .bind(&next.region)
        .bind(&next.ssh_host_key)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Stale);
        }
        if prev.state != next.state {
            let outcome = if next.state == EnvState::Error {
                "failed"
            } else {
                "success"
            };
            let error = if next.state == EnvState::Error {
                next.state_message.as_deref()
            } else {
                None
            };
            let action = format!("state_{}", next.state);
            // How long the environment spent in the state it leaves.
            let in_previous = (now - prev.updated_at).max(0);
            insert_audit(
                &mut tx,
                now,
                actor,
                &action,
                Some(&prev.id),
                Some(prev.state),
                Some(next.state),
                outcome,
                error,
                Some(in_previous),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(next)
    }

    /// Saves the VM a job just made (its reference and, once known, its address) without
    /// a state change, so it is known from the moment it exists. Conditional on the
    /// generation, like every write of a job.
    pub async fn save_vm(&self, env: &Environment) -> Result<Environment> {
        let mut next = env.clone();
        next.generation = env.generation + 1;
        next.updated_at = self.now();
        let done = sqlx::query(
            "UPDATE environments SET vm_id = $1, ip_address = $2, ssh_host = $3, ssh_port = $4, generation = $5, \
             updated_at = $6 WHERE id = $7 AND generation = $8",
        )
        .bind(&next.vm_id)
        .bind(&next.ip_address)
        .bind(&next.ssh_host)
        .bind(next.ssh_port)
        .bind(next.generation)
        .bind(next.updated_at)
        .bind(&env.id)
        .bind(env.generation)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Stale);
        }
        Ok(next)
    }

    /// Records activity (an exec, a session, a keep-alive) without touching state or
    /// generation.
    pub async fn touch_activity(&self, id: &str, at: i64, source: &str) -> Result<()> {
        sqlx::query("UPDATE environments SET last_activity_at = $1, last_activity_source = $2 WHERE id = $3")
            .bind(at)
            .bind(source)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

async fn host_region_and_name(
    tx: &mut Tx,
    host_id: &str,
) -> Result<(Option<String>, Option<String>)> {
    let row = sqlx::query("SELECT region, name FROM hosts WHERE id = $1")
        .bind(host_id)
        .fetch_one(&mut **tx)
        .await?;
    Ok((row.try_get("region")?, row.try_get("name")?))
}

/// Writes a new environment row; `vars` are its variables as kept at rest.
async fn insert_env(tx: &mut Tx, e: &Environment, vars: &str) -> Result<()> {
    let sql = format!(
        "INSERT INTO environments ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
         $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, $33, $34, $35, $36, $37, $38, $39, $40)"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&e.id)
        .bind(&e.slug)
        .bind(&e.name)
        .bind(&e.user_id)
        .bind(e.personal as i64)
        .bind(e.state.as_str())
        .bind(&e.state_message)
        .bind(e.generation)
        .bind(e.provider.as_str())
        .bind(&e.host_id)
        .bind(&e.vm_id)
        .bind(&e.region)
        .bind(&e.ip_address)
        .bind(&e.ssh_host)
        .bind(e.ssh_port)
        .bind(&e.ssh_user)
        .bind(e.vcpus)
        .bind(e.memory_mb)
        .bind(e.disk_gb)
        .bind(&e.base_image)
        .bind(vars)
        .bind(&e.ssh_public_key)
        .bind(&e.ssh_private_key_enc)
        .bind(e.auto_stop_minutes)
        .bind(e.total_runtime_seconds)
        .bind(e.created_at)
        .bind(e.updated_at)
        .bind(e.started_at)
        .bind(e.stopped_at)
        .bind(e.expires_at)
        .bind(e.last_activity_at)
        .bind(&e.last_activity_source)
        .bind(&e.init_script)
        .bind(&e.repository_url)
        .bind(e.gpus)
        .bind(&e.gpu_model)
        .bind(e.reserved as i64)
        .bind(&e.ssh_host_key)
        .bind(&e.repository_ref)
        .bind(&e.git_credential_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testdb::each_backend;
    use hearth_core::{Role, Tier};

    pub(crate) fn sample(personal: bool) -> NewEnvironment {
        NewEnvironment {
            for_mail: None,
            on_host: None,
            name: "Personal VM".into(),
            personal,
            placement: Placement {
                kind: HostKind::Docker,
                resources: Tier::Free.default_resources(),
                gpus: 0,
                gpu_model: None,
                region: None,
            },
            base_image: "hearth/base:latest".into(),
            ssh_user: "dev".into(),
            environment_vars: BTreeMap::from([("X".to_string(), "$(id) 'q'".to_string())]),
            ssh_public_key: "ssh-ed25519 AAAA".into(),
            ssh_private_key_enc: "enc".into(),
            auto_stop_minutes: Some(60),
            expires_at: None,
            init_script: None,
            repository_url: None,
            repository_ref: None,
            git_credential_id: None,
        }
    }

    /// A Docker host with room for anything the tests ask.
    pub(crate) async fn roomy_host(store: &Store) -> crate::Host {
        store
            .add_host(&crate::hosts::tests::host(
                "roomy",
                HostKind::Docker,
                100_000,
                100_000_000,
            ))
            .await
            .unwrap()
    }

    pub(crate) fn provision_job(actor: &str) -> NewJob {
        NewJob {
            queue: "provision".into(),
            kind: "provision".into(),
            environment_id: String::new(),
            max_attempts: 3,
            actor: actor.into(),
        }
    }

    #[tokio::test]
    async fn personal_vm_is_created_once_even_concurrently() {
        each_backend(|store| async move {
            roomy_host(&store).await;
            let (user, _) = store
                .create_user("p@example.com", Role::User, Tier::Free)
                .await
                .unwrap();
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let (store, user) = (store.clone(), user.clone());
                tasks.push(tokio::spawn(async move {
                    store
                        .create_personal_environment(&user, sample(true), provision_job(&user.id))
                        .await
                }));
            }
            let mut created = 0;
            let mut ids = std::collections::HashSet::new();
            for t in tasks {
                match t.await.unwrap().unwrap() {
                    PersonalOutcome::Created(e) => {
                        created += 1;
                        ids.insert(e.id);
                    }
                    PersonalOutcome::Existing(e) => {
                        ids.insert(e.id);
                    }
                }
            }
            assert_eq!(created, 1);
            assert_eq!(ids.len(), 1);
            let env = store.personal_environment(&user.id).await.unwrap().unwrap();
            assert_eq!(env.environment_vars["X"], "$(id) 'q'");
            assert_eq!(store.jobs_for_environment(&env.id).await.unwrap().len(), 1);
        })
        .await;
    }

    #[tokio::test]
    async fn quota_is_enforced_in_the_transaction() {
        each_backend(|store| async move {
            roomy_host(&store).await;
            let (user, _) = store
                .create_user("q@example.com", Role::User, Tier::Free)
                .await
                .unwrap();
            let mut big = sample(false);
            big.placement.resources.vcpus = 3;
            let err = store
                .create_environment(&user, big, provision_job(&user.id))
                .await
                .unwrap_err();
            assert!(
                matches!(err, StoreError::Quota(ref q) if q.limit == "maxVcpus"),
                "{err}"
            );
            store
                .create_environment(&user, sample(false), provision_job(&user.id))
                .await
                .unwrap();
            let err = store
                .create_environment(&user, sample(false), provision_job(&user.id))
                .await
                .unwrap_err();
            assert!(
                matches!(err, StoreError::Quota(ref q) if q.limit == "maxEnvironments"),
                "{err}"
            );
        })
        .await;
    }

    /// A page is read apart from a single environment (its own columns, by position, as one
    /// JSON value on SQLite): every summary on it must be what a read of that environment
    /// summarises, newest first, across pages. One environment has each column set to a
    /// value of its own, so two columns read out of order differ; the others' keys have
    /// blank lines and line ends that `holds_user_key` and the page's SQL must read alike.
    /// The create's first log line is written with it.
    #[tokio::test]
    async fn a_page_shows_what_a_get_shows() {
        each_backend(|store| async move {
            roomy_host(&store).await;
            let (user, _) = store
                .create_user("page@example.com", Role::User, Tier::Unlimited)
                .await
                .unwrap();
            let mut ids = Vec::new();
            for n in 0..5 {
                let mut new = sample(false);
                new.name = format!("env {n}");
                new.ssh_public_key = match n {
                    1 => "ssh-ed25519 AAAA hearth\n \n\t\n".into(),
                    3 => " \nssh-ed25519 AAAA hearth\r\n".into(),
                    _ => "ssh-ed25519 AAAA hearth\r\n\nssh-ed25519 BBBB mine\n".into(),
                };
                if n % 2 == 0 {
                    new.environment_vars
                        .insert(format!("N{n}"), "\"quoted\" é".into());
                    new.repository_url = Some("https://example.com/r.git".into());
                }
                let env = store
                    .create_environment(&user, new, provision_job(&user.id))
                    .await
                    .unwrap();
                let logs = store.logs(&env.id).await.unwrap();
                assert_eq!(logs.len(), 1, "{logs:?}");
                assert_eq!(logs[0].message, "provisioning requested; queued");
                ids.push(env.id);
            }
            // One with its VM and address saved, so the optional columns are set.
            let mut first = store.environment(&ids[0]).await.unwrap();
            first.vm_id = Some("vm-1".into());
            first.ip_address = Some("10.0.0.2".into());
            first.ssh_host = Some("127.0.0.1".into());
            first.ssh_port = Some(2222);
            store.save_vm(&first).await.unwrap();
            let set = store
                .exec_sql_for_tests(
                    "UPDATE environments SET state_message = 'message ' || $2, \
                     region = 'region ' || $2, ssh_host_key = 'host key ' || $2, gpus = 3, \
                     gpu_model = 'gpu ' || $2, started_at = $1 + 1, stopped_at = $1 + 2, \
                     expires_at = $1 + 3, last_activity_at = $1 + 4, \
                     repository_url = 'url ' || $2, repository_ref = 'ref ' || $2 WHERE id = $2",
                    1_000_000,
                    &ids[0],
                )
                .await
                .unwrap();
            assert_eq!(set, 1);
            let mut seen = Vec::new();
            let mut cursor = None;
            loop {
                let (items, next) = store
                    .list_environments(Some(&user.id), None, false, cursor.as_deref(), 2)
                    .await
                    .unwrap();
                for item in items {
                    let get = store.environment(&item.id).await.unwrap();
                    assert_eq!(item, EnvironmentSummary::from(&get));
                    seen.push(item.id);
                }
                match next {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            ids.reverse();
            assert_eq!(seen, ids);
            let even = store.environment(&ids[4]).await.unwrap();
            assert!(EnvironmentSummary::from(&even).has_user_ssh_key);
            assert!(
                !EnvironmentSummary::from(&store.environment(&ids[3]).await.unwrap())
                    .has_user_ssh_key
            );
        })
        .await;
    }

    #[tokio::test]
    async fn stale_writers_lose() {
        each_backend(|store| async move {
            roomy_host(&store).await;
            let (user, _) = store
                .create_user("s@example.com", Role::User, Tier::Free)
                .await
                .unwrap();
            let env = store
                .create_environment(&user, sample(true), provision_job(&user.id))
                .await
                .unwrap();
            let a = env
                .moved_to(EnvState::Provisioning, None, store.now())
                .unwrap();
            let b = env
                .moved_to(EnvState::Error, Some("x".into()), store.now())
                .unwrap();
            let saved = store.save_transition(&env, a, "system:test").await.unwrap();
            assert_eq!(saved.generation, env.generation + 1);
            assert!(matches!(
                store.save_transition(&env, b, "system:test").await,
                Err(StoreError::Stale)
            ));
            assert_eq!(
                store.environment(&env.id).await.unwrap().state,
                EnvState::Provisioning
            );
            // Not in the table: refused before any write.
            assert!(
                saved
                    .moved_to(EnvState::Stopped, None, store.now())
                    .is_err()
            );
            let audit = store.audit_for_environment(&env.id).await.unwrap();
            let last = audit.last().unwrap();
            assert_eq!(
                (last.previous_state.as_deref(), last.new_state.as_deref()),
                (Some("requested"), Some("provisioning"))
            );
            assert!(last.duration_ms.is_some_and(|d| d >= 0));
        })
        .await;
    }
}

/// Issue 16: paging at scale, the same on both backends.
#[cfg(test)]
mod paging_tests {
    use crate::hosts::tests::host;
    use crate::testdb::{BulkEnvironment, each_backend};
    use hearth_core::{EnvState, HostKind, Role, Tier};
    use rand::{Rng, SeedableRng};
    use std::sync::{Arc, Mutex};

    const ROWS: usize = 100_000;
    const USERS: usize = 4;
    const STATES: [&str; 5] = ["running", "stopped", "destroyed", "error", "requested"];

    /// A random filter and cursor walk over 100,000 environments: every walk returns exactly
    /// the rows that matched when it began, newest first, none skipped or repeated, though
    /// rows are inserted between its page reads; and both backends return the same walks.
    #[tokio::test]
    async fn pages_never_skip_or_repeat_over_a_hundred_thousand_environments() {
        // One data set for both backends: ids, owners (by index) and states.
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        let data: Vec<(String, usize, &'static str)> = (0..ROWS)
            .map(|_| {
                (
                    uuid::Uuid::now_v7().to_string(),
                    rng.gen_range(0..USERS),
                    STATES[rng.gen_range(0..STATES.len())],
                )
            })
            .collect();
        // Ids for the rows inserted during walks: newer than all of the data, in order.
        let later: Vec<String> = (0..2_000)
            .map(|_| uuid::Uuid::now_v7().to_string())
            .collect();
        let walks: Arc<Mutex<Vec<Vec<Vec<String>>>>> = Arc::default();
        each_backend(|store| {
            let data = data.clone();
            let mut later = later.clone().into_iter();
            let walks = walks.clone();
            async move {
                let h = store
                    .add_host(&host("h", HostKind::Sim, 1_000_000, 1_000_000_000))
                    .await
                    .unwrap();
                let mut users = Vec::new();
                for i in 0..USERS {
                    let (u, _) = store
                        .create_user(&format!("p{i}@example.com"), Role::User, Tier::Unlimited)
                        .await
                        .unwrap();
                    users.push(u.id);
                }
                let bulk = |(id, user, state): &(String, usize, &'static str)| BulkEnvironment {
                    id: id.clone(),
                    user_id: users[*user].clone(),
                    host_id: h.id.clone(),
                    state,
                };
                store
                    .insert_environments_for_tests(&data.iter().map(bulk).collect::<Vec<_>>())
                    .await
                    .unwrap();
                super::plan_tests::pages_seek_an_index(&store, &users[0]).await;
                // Newest first, as the model of what a walk must return.
                let mut model = data.clone();
                model.sort_by(|a, b| b.0.cmp(&a.0));
                let mut rng = rand::rngs::StdRng::seed_from_u64(61);
                let mut results = Vec::new();
                for trial in 0..40 {
                    let user = (rng.gen_range(0..5) < 4).then(|| rng.gen_range(0..USERS));
                    let state = (rng.gen_range(0..3) == 0)
                        .then(|| STATES[rng.gen_range(0..STATES.len())]);
                    let include_destroyed = rng.gen_bool(0.5);
                    // Two walks read everything; the others a few pages from anywhere.
                    let (limit, max_pages, start) = if trial < 2 {
                        (500, usize::MAX, None)
                    } else {
                        let start = rng
                            .gen_bool(0.7)
                            .then(|| data[rng.gen_range(0..data.len())].0.clone());
                        (rng.gen_range(1..=200), rng.gen_range(1..=8), start)
                    };
                    let expected: Vec<String> = model
                        .iter()
                        .filter(|(id, u, s)| {
                            user.is_none_or(|want| *u == want)
                                && state.is_none_or(|want| *s == want)
                                && (include_destroyed || *s != "destroyed")
                                && start.as_ref().is_none_or(|c| id < c)
                        })
                        .map(|(id, _, _)| id.clone())
                        .collect();
                    let mut got: Vec<String> = Vec::new();
                    let mut cursor = start.clone();
                    let mut pages = 0;
                    loop {
                        let (items, next) = store
                            .list_environments(
                                user.map(|u| users[u].as_str()),
                                state.map(|s| EnvState::parse(s).unwrap()),
                                include_destroyed,
                                cursor.as_deref(),
                                limit,
                            )
                            .await
                            .unwrap();
                        assert!(items.len() as i64 <= limit);
                        got.extend(items.iter().map(|e| e.id.clone()));
                        pages += 1;
                        // Rows come and go between page reads (new ones are newer than
                        // any cursor, so this walk must not see them).
                        if rng.gen_range(0..4) == 0 {
                            let new: Vec<(String, usize, &'static str)> = (0..rng
                                .gen_range(1..=3))
                                .map(|_| {
                                    (
                                        later.next().expect("enough later ids"),
                                        rng.gen_range(0..USERS),
                                        STATES[rng.gen_range(0..STATES.len())],
                                    )
                                })
                                .collect();
                            store
                                .insert_environments_for_tests(
                                    &new.iter().map(bulk).collect::<Vec<_>>(),
                                )
                                .await
                                .unwrap();
                            // Ascending ids: each goes before the one made just before it.
                            for row in new {
                                model.insert(0, row);
                            }
                        }
                        match next {
                            Some(n) if pages < max_pages => cursor = Some(n),
                            Some(_) => break,
                            None => {
                                assert_eq!(got.len(), expected.len(), "trial {trial}: a walk's end came early or late");
                                break;
                            }
                        }
                    }
                    assert!(got.len() <= expected.len(), "trial {trial}: more than matched");
                    assert_eq!(
                        got[..],
                        expected[..got.len()],
                        "trial {trial}: user {user:?}, state {state:?}, destroyed {include_destroyed}, limit {limit}"
                    );
                    if trial < 2 {
                        assert_eq!(got.len(), expected.len(), "a whole walk");
                    }
                    results.push(got);
                }
                walks.lock().unwrap().push(results);
            }
        })
        .await;
        let walks = walks.lock().unwrap();
        assert_eq!(walks.len(), 2);
        assert!(walks[0] == walks[1], "the backends' walks differ");
        assert!(walks[0].iter().map(Vec::len).sum::<usize>() > 50_000);
    }
}

#[cfg(test)]
mod plan_tests {
    use crate::{Backend, Store};

    /// The page forms (one user's, in a state), their arguments for PostgreSQL's plan
    /// (`owner` the user's), and SQLite's index walk.
    fn pages(owner: &str) -> [(&'static str, bool, bool, Vec<String>, &'static str); 3] {
        let args = |user: &str, state: &str| {
            vec![
                format!("'{user}'"),
                format!("'{state}'"),
                "0".into(),
                format!("'{}'", super::AFTER_EVERY_ID),
                "101".into(),
            ]
        };
        [
            (
                "a user's page",
                true,
                false,
                args(owner, ""),
                "environments_user_id (user_id=? AND id<?)",
            ),
            (
                "everyone's page",
                false,
                false,
                args("", ""),
                "sqlite_autoindex_environments_1 (id<?)",
            ),
            (
                "everyone's page in one state",
                false,
                true,
                args("", "error"),
                "environments_state_id (state=? AND id<?)",
            ),
        ]
    }

    fn assert_seeks(what: &str, plan: &[String], index: &str) {
        crate::testdb::assert_seeks(what, "environments", plan, index);
    }

    /// On SQLite a page query is prepared once per connection, then only bound and run.
    /// Built without the query planner stability guarantee (`.cargo/config.toml`), SQLite
    /// re-prepared it at every run, since its `LIMIT $5` is bound again each time: a tenth
    /// of a page's CPU. `sqlite_stmt` counts each statement's runs and re-preparations.
    #[tokio::test]
    async fn a_page_query_is_prepared_once_and_not_at_every_run() {
        use sqlx::Row;
        let (_dir, store) = crate::testdb::sqlite().await;
        let sql = super::page_sql(Backend::Sqlite, true, false);
        let mut conn = store.pool.acquire().await.unwrap();
        for limit in [101_i64, 101, 51] {
            sqlx::query(sql)
                .bind("someone")
                .bind("")
                .bind(0_i64)
                .bind(super::AFTER_EVERY_ID)
                .bind(limit)
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        }
        let row = sqlx::query("SELECT run, reprep FROM sqlite_stmt WHERE sql = $1")
            .bind(sql)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(
            row.try_get::<i64, _>("run").unwrap(),
            3,
            "the page query's runs"
        );
        assert_eq!(
            row.try_get::<i64, _>("reprep").unwrap(),
            0,
            "the page query was prepared again: is SQLITE_ENABLE_QPSG in LIBSQLITE3_FLAGS?"
        );
    }

    /// Called by the paging test once its 100,000 environments are in: with that many rows
    /// (and PostgreSQL's statistics of them), no page form reads the whole table.
    pub(super) async fn pages_seek_an_index(store: &Store, owner: &str) {
        if store.backend == Backend::Postgres {
            store.execute_for_tests("ANALYZE environments").await;
        }
        for (what, one_user, in_state, args, index) in pages(owner) {
            let sql = super::page_sql(store.backend, one_user, in_state);
            match store.backend {
                Backend::Sqlite => {
                    // `e`: a page reads environments as `e`, joined to their hosts.
                    let plan = store.query_plan(sql, &[]).await;
                    crate::testdb::assert_seeks_in_order(what, "e", &plan, index);
                }
                Backend::Postgres => {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let plan = store.query_plan(sql, &args).await;
                    assert!(
                        plan.iter().any(|l| l.contains("Index Scan"))
                            && !plan.iter().any(|l| l.contains("Seq Scan on environments")),
                        "{what} must walk an index, not read the table; its plan: {plan:#?}"
                    );
                }
            }
        }
    }

    /// The sweeps and the admin's VM list: SQLite's planner chooses by the schema alone,
    /// so an empty database shows the plan a full one gets.
    #[tokio::test]
    async fn the_sweeps_seek_an_index() {
        let (_dir, store) = crate::testdb::sqlite().await;
        for (what, sql, index) in [
            (
                "the idle sweep",
                select_env!(sweep_where!(idle)),
                "environments_state_id (state=?)",
            ),
            (
                "the expiry sweep",
                select_env!(sweep_where!(expired)),
                "environments_expires (expires_at>? AND expires_at<?)",
            ),
            (
                "the transitional sweep",
                select_env!(sweep_where!(transitional)),
                "environments_state_id (state=?)",
            ),
        ] {
            assert_seeks(what, &store.query_plan(sql, &[]).await, index);
        }
        // At most one personal VM per user: their partial index is read whole, and sorted.
        let plan = store
            .query_plan(select_env!(sweep_where!(personal)), &[])
            .await;
        assert!(
            plan.iter()
                .any(|l| l == "SCAN environments USING INDEX environments_one_personal"),
            "{plan:#?}"
        );
    }
}
