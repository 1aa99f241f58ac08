-- Custom images: built from a Dockerfile on a host's engine, named, owned, private or for
-- everyone, and checked against the guest contract before they are offered. state:
-- building (the row holds the name and the owner's count while the build runs), ready.
CREATE TABLE images (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    owner_id TEXT NOT NULL REFERENCES users(id),
    visibility TEXT NOT NULL,
    host_id TEXT NOT NULL,
    reference TEXT NOT NULL,
    size_bytes BIGINT,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX images_owner ON images(owner_id);
