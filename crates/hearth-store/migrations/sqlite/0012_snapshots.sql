-- Snapshots users keep of their environments' disks: taken on the environment's host (on
-- Docker, a committed image named after the snapshot's id), listed, sized, counted against
-- the tier's snapshot quota, and deleted. state: taking (being made; a node that dies
-- mid-take leaves it to the reaper, which finds the image or drops the row), ready,
-- deleting (its image is being removed).
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    environment_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    image TEXT,
    size_bytes BIGINT,
    vcpus BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_gb BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX snapshots_name ON snapshots(user_id, name);
CREATE INDEX snapshots_state ON snapshots(state, updated_at);
