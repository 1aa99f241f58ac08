-- Repositories cloned into an environment while it is provisioned: the branch or tag, and
-- the owner's stored git credential to clone with. A credential's secret (an HTTPS token
-- or an SSH deploy key) is sealed with the master key; its name is unique per user.
ALTER TABLE environments ADD COLUMN repository_ref TEXT;
ALTER TABLE environments ADD COLUMN git_credential_id TEXT;
CREATE TABLE git_credentials (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    username TEXT,
    secret_enc TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (user_id, name)
);
