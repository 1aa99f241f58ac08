-- Agent hosts bought as OVH instances: the instance behind each, so the host can be sold
-- (its instance deleted) once it holds nothing. `host_name` is the name the agent joins as.
CREATE TABLE bought_hosts (
    host_name TEXT PRIMARY KEY,
    via_host_id TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    flavor TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
