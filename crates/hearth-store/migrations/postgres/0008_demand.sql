-- Installation-wide settings as JSON by key (the hosts-by-demand policy), and short leases
-- so only one node at a time acts on them.
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
-- A bought host with no environment since this time (NULL: it holds some, or has not
-- joined yet); whether the demand policy bought it.
ALTER TABLE bought_hosts ADD COLUMN empty_since BIGINT;
ALTER TABLE bought_hosts ADD COLUMN by_demand BIGINT NOT NULL DEFAULT 0;
