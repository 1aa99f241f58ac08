-- What a host says of itself at its last check (an agent: its version, accelerator and
-- VMs), as JSON; NULL until a check answers or for kinds that report nothing.
ALTER TABLE hosts ADD COLUMN report TEXT;
