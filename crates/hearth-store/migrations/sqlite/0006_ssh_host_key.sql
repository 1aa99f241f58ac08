-- The guest's SSH host key (OpenSSH "type base64"), recorded at the first contact after the
-- VM was made and checked on every connection after it; NULL until then.
ALTER TABLE environments ADD COLUMN ssh_host_key TEXT;
