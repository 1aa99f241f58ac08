-- Hosts in the foundation: an installation identity, hosts with an address, health,
-- region and GPUs, reservations that say what an environment holds, saga progress on
-- jobs, and the ledger of simulated hosts.

-- One row: who this installation is. Every VM is labelled with `id`; `key_check` tells a
-- node whether its master key is the installation's.
CREATE TABLE installation (
    singleton BIGINT PRIMARY KEY CHECK (singleton = 1),
    id TEXT NOT NULL,
    key_check TEXT,
    created_at BIGINT NOT NULL
);

ALTER TABLE hosts RENAME COLUMN provider TO kind;
-- unix:///path, tcp://host:port (TLS), ssh://user@host, sim://name; how a node reaches it.
ALTER TABLE hosts ADD COLUMN endpoint TEXT NOT NULL DEFAULT 'unix:///var/run/docker.sock';
-- Where guests answer, from the nodes (Docker publishes SSH ports on it).
ALTER TABLE hosts ADD COLUMN guest_address TEXT NOT NULL DEFAULT '127.0.0.1';
ALTER TABLE hosts ADD COLUMN region TEXT;
ALTER TABLE hosts ADD COLUMN gpu_model TEXT;
ALTER TABLE hosts ADD COLUMN gpu_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN used_gpus BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN health TEXT NOT NULL DEFAULT 'healthy';
ALTER TABLE hosts ADD COLUMN health_message TEXT;
ALTER TABLE hosts ADD COLUMN last_seen_at BIGINT;
-- tcp:// Docker endpoints: PEM text; the private key is sealed with the master key.
ALTER TABLE hosts ADD COLUMN tls_ca TEXT;
ALTER TABLE hosts ADD COLUMN tls_cert TEXT;
ALTER TABLE hosts ADD COLUMN tls_key_sealed TEXT;
-- Kind-specific settings as JSON (a simulated host's latency and faults).
ALTER TABLE hosts ADD COLUMN options TEXT NOT NULL DEFAULT '{}';
-- Which machine it is, as it says itself (a Docker engine's ID): one host row per machine,
-- or each host's reconciler would take the other's VMs for leftovers.
ALTER TABLE hosts ADD COLUMN identity TEXT;
CREATE UNIQUE INDEX hosts_identity ON hosts(identity) WHERE identity IS NOT NULL;

ALTER TABLE environments ADD COLUMN gpus BIGINT NOT NULL DEFAULT 0;
ALTER TABLE environments ADD COLUMN gpu_model TEXT;
-- 1 while the environment holds its quota and host room (see EnvState::reservation).
ALTER TABLE environments ADD COLUMN reserved BIGINT NOT NULL DEFAULT 0;
UPDATE environments SET reserved = 1
    WHERE state IN ('requested', 'provisioning', 'starting', 'running', 'stopping', 'destroying');
DROP INDEX environments_user;
DROP INDEX environments_host;
-- Covering: quota usage is summed from the index alone.
CREATE INDEX environments_user ON environments(user_id, state, reserved, vcpus, memory_mb, disk_gb);
-- Covering: a host's use is re-summed from the index alone; the reconciler walks a host.
CREATE INDEX environments_host ON environments(host_id, reserved, vcpus, memory_mb, gpus);

-- What a job's saga steps produced so far (JSON), so a retry resumes after the last one.
ALTER TABLE jobs ADD COLUMN progress TEXT NOT NULL DEFAULT '{}';
-- Claims that ended with the worker's death; counted apart from attempts.
ALTER TABLE jobs ADD COLUMN crashes BIGINT NOT NULL DEFAULT 0;

-- The VMs of simulated hosts: what a real host would remember, kept here so it survives
-- a node's death. Rows are marked destroyed, never deleted, so tests can count creations.
CREATE TABLE sim_vms (
    vm_id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL,
    name TEXT NOT NULL,
    installation_id TEXT NOT NULL,
    environment_id TEXT NOT NULL,
    state TEXT NOT NULL,
    init_state TEXT,
    init_runs BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX sim_vms_live_name ON sim_vms(host_id, name) WHERE state <> 'destroyed';
CREATE INDEX sim_vms_environment ON sim_vms(environment_id);

-- Retention (Store::prune) walks these by age.
CREATE INDEX executions_started ON executions(started_at);
CREATE INDEX audit_at ON audit_log(at);
CREATE INDEX jobs_finished ON jobs(state, updated_at);
-- The access token a create once returned was never checked by anything.
ALTER TABLE environments DROP COLUMN access_token_hash;

-- Terminal tickets already used: a ticket opens one terminal (rows go once expired).
CREATE TABLE used_tickets (
    ticket_hash TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
-- Named API tokens, so a user can hold several and revoke one.
CREATE INDEX api_tokens_user ON api_tokens(user_id);

-- Hosts of kind agent: the credential the control plane presents, sealed with the master key.
ALTER TABLE hosts ADD COLUMN credential_sealed TEXT;
-- One-time tokens an admin hands to an agent so it can join (stored hashed).
CREATE TABLE join_tokens (
    token_hash TEXT PRIMARY KEY,
    host_name TEXT NOT NULL,
    region TEXT,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
