-- A port of an environment shared beyond its owner: with whoever holds a token (its hash
-- kept here), or with everyone (public). Every share expires.
CREATE TABLE port_shares (
    id TEXT PRIMARY KEY,
    environment_id TEXT NOT NULL,
    port INTEGER NOT NULL,
    token_hash TEXT UNIQUE,
    public INTEGER NOT NULL,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX port_shares_environment ON port_shares(environment_id, port);
