-- Whether an environment's authorized keys hold one of its owner's after Hearth's own (two
-- lines that are not blank), as `holds_user_key` in environments.rs reads them. A page of
-- environments shows it. SQLite adds a generated column only as VIRTUAL, worked out as
-- it is read: inside SQLite, where a page is built, this costs less than sending the keys.
ALTER TABLE environments ADD COLUMN has_user_ssh_key INTEGER GENERATED ALWAYS AS (
    CASE WHEN instr(trim(ssh_public_key, ' ' || char(9, 13, 10)), char(10)) > 0
    THEN 1 ELSE 0 END
) VIRTUAL;
