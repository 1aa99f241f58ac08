-- Signing in with a password: its argon2id hash (PHC string), NULL until the user sets one
-- from an invitation link.
ALTER TABLE users ADD COLUMN password_hash TEXT;

-- Browser sessions: the cookie's value is never stored, only its SHA-256; `csrf` must come
-- back in X-CSRF-Token on every call that changes something.
CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    csrf TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id, created_at);

-- One-time links to set a password: `invite` for a new user, `reset` for an existing one.
CREATE TABLE password_links (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    purpose TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- When a token was last used (kept to the minute: written at most once a minute per token).
ALTER TABLE api_tokens ADD COLUMN last_used_at BIGINT;
