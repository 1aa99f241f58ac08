-- Mail received for commands (by SMTP or the webhook): who sent it, what proved it was
-- them, the command, and what came of it. A message is processed once per sender: the
-- unique (user_id, message_id) makes a second delivery a no-op (rejected mail has no user
-- and is kept only as a record).
CREATE TABLE inbound_mail (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    via TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    user_id TEXT,
    proof TEXT,
    command TEXT,
    status TEXT NOT NULL,
    outcome TEXT,
    environment_id TEXT,
    exec_started_at BIGINT,
    reply_subject TEXT,
    reply_message_id TEXT,
    replied_at BIGINT,
    received_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX inbound_mail_once ON inbound_mail(user_id, message_id);
CREATE INDEX inbound_mail_received ON inbound_mail(received_at);
CREATE INDEX inbound_mail_status ON inbound_mail(status, received_at);
-- The SHA-256 of the secret in a user's sub-address (agent+<secret>@domain); NULL: none.
ALTER TABLE users ADD COLUMN mail_token_hash TEXT;
