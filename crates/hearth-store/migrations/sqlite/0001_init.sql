-- Times are milliseconds since the Unix epoch (BIGINT), ids are text, flags are 0/1:
-- the same columns on SQLite and PostgreSQL so one set of queries serves both.
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    tier TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Per-user overrides; a NULL column means the tier's default.
CREATE TABLE quotas (
    user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    max_environments BIGINT,
    max_concurrent_environments BIGINT,
    max_vcpus BIGINT,
    max_memory_mb BIGINT,
    max_disk_gb BIGINT,
    max_duration_hours BIGINT
);

CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    provider TEXT NOT NULL,
    status TEXT NOT NULL,
    max_vcpus BIGINT NOT NULL,
    max_memory_mb BIGINT NOT NULL,
    max_environments BIGINT NOT NULL,
    -- What the host's active environments hold: changed only in the transactions that
    -- change those environments' states; the reconciler re-sums them to catch drift.
    used_vcpus BIGINT NOT NULL DEFAULT 0,
    used_memory_mb BIGINT NOT NULL DEFAULT 0,
    used_environments BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE environments (
    id TEXT PRIMARY KEY,
    slug TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id),
    personal BIGINT NOT NULL,
    state TEXT NOT NULL,
    state_message TEXT,
    generation BIGINT NOT NULL,
    provider TEXT NOT NULL,
    host_id TEXT,
    vm_id TEXT,
    region TEXT,
    ip_address TEXT,
    ssh_host TEXT,
    ssh_port BIGINT,
    ssh_user TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_gb BIGINT NOT NULL,
    base_image TEXT NOT NULL,
    environment_vars TEXT NOT NULL,
    ssh_public_key TEXT NOT NULL,
    ssh_private_key_enc TEXT NOT NULL,
    auto_stop_minutes BIGINT,
    total_runtime_seconds BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    started_at BIGINT,
    stopped_at BIGINT,
    expires_at BIGINT,
    last_activity_at BIGINT,
    -- exec, terminal, ssh, keepalive, start
    last_activity_source TEXT,
    access_token_hash TEXT NOT NULL,
    init_script TEXT,
    repository_url TEXT
);
-- Covering: a host's use is summed from the index alone.
CREATE INDEX environments_host ON environments(host_id, state, vcpus, memory_mb);
-- Covering: quota usage is summed from the index alone.
CREATE INDEX environments_user ON environments(user_id, state, vcpus, memory_mb, disk_gb);
-- A user's list, newest first.
CREATE INDEX environments_user_id ON environments(user_id, id);
-- At most one live personal VM per user: concurrent provisions meet here.
CREATE UNIQUE INDEX environments_one_personal ON environments(user_id)
    WHERE personal = 1 AND state <> 'destroyed';

CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    kind TEXT NOT NULL,
    environment_id TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    max_attempts BIGINT NOT NULL,
    run_after BIGINT NOT NULL,
    lease_owner TEXT,
    lease_expires_at BIGINT,
    last_error TEXT,
    actor TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX jobs_ready ON jobs(state, queue, run_after);
CREATE INDEX jobs_environment ON jobs(environment_id, state);

CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    environment_id TEXT,
    previous_state TEXT,
    new_state TEXT,
    outcome TEXT NOT NULL,
    error TEXT,
    duration_ms BIGINT
);
CREATE INDEX audit_environment ON audit_log(environment_id, id);
CREATE INDEX audit_actor ON audit_log(actor, id);

CREATE TABLE executions (
    id TEXT PRIMARY KEY,
    environment_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    command TEXT NOT NULL,
    working_dir TEXT,
    status TEXT NOT NULL,
    exit_code BIGINT,
    stdout TEXT NOT NULL,
    stderr TEXT NOT NULL,
    truncated BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    finished_at BIGINT,
    duration_ms BIGINT
);
CREATE INDEX executions_environment ON executions(environment_id, started_at);

CREATE TABLE provision_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    environment_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX provision_logs_environment ON provision_logs(environment_id, id);
