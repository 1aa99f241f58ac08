-- Every list query walks an index from its cursor on, so a page costs the same at any depth
-- and at any size of table (issue 16; BENCHMARKS.md, "At 100,000 environments").
-- Everyone's environments in one state, newest first (the admin's filter), and the sweeps
-- by state (idle running ones, transitional ones).
CREATE INDEX environments_state_id ON environments(state, id);
-- The sweep of environments past their expiry: the few that have one.
CREATE INDEX environments_expires ON environments(expires_at) WHERE expires_at IS NOT NULL;
-- The admin's newest jobs in one state.
CREATE INDEX jobs_state_id ON jobs(state, id);
-- The audit log of one action, newest first.
CREATE INDEX audit_action ON audit_log(action, id);
-- One user's received mail, newest first.
CREATE INDEX inbound_mail_user ON inbound_mail(user_id, id);
