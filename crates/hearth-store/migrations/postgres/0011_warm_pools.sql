-- Warm pools: per host and per (image, size), how many booted VMs to keep ready with no
-- user's key or data in them. A pooled VM's id is the id of the environment that will
-- claim it, and its slug that environment's slug: the VM's name, labels, network and
-- hostname are right from boot, so a claim renames and relabels nothing.
CREATE TABLE warm_pools (
    id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL REFERENCES hosts(id),
    base_image TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_gb BIGINT NOT NULL,
    size BIGINT NOT NULL,
    -- Why the last fill failed, and until when the pool waits before filling again.
    last_error TEXT,
    paused_until BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX warm_pools_shape ON warm_pools(host_id, base_image, vcpus, memory_mb, disk_gb);

-- state: filling (being booted), ready (claimable), draining (being removed), claimed (an
-- environment holds it and is taking it over). Every state but claimed holds its host's
-- room; a claimed VM's room is held by its environment. lease_owner/lease_until: the node
-- filling or draining it, so a dead node's work is taken over and never done twice at once.
CREATE TABLE pooled_vms (
    id TEXT PRIMARY KEY,
    pool_id TEXT NOT NULL REFERENCES warm_pools(id),
    host_id TEXT NOT NULL,
    slug TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    ssh_public_key TEXT NOT NULL,
    ssh_private_key_enc TEXT NOT NULL,
    vm_id TEXT,
    ssh_host TEXT,
    ssh_port BIGINT,
    ssh_host_key TEXT,
    lease_owner TEXT,
    lease_until BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX pooled_vms_pool ON pooled_vms(pool_id, state);
CREATE INDEX pooled_vms_host ON pooled_vms(host_id);
