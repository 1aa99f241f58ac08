-- Whether an environment's authorized keys hold one of its owner's after Hearth's own (two
-- lines that are not blank), as `holds_user_key` in environments.rs reads them. A page of
-- environments shows it: kept with the row when it is written, rather than each page
-- sending every row's keys, or working it out per row (BENCHMARKS.md, issue 16).
ALTER TABLE environments ADD COLUMN has_user_ssh_key BIGINT GENERATED ALWAYS AS (
    CASE WHEN strpos(btrim(ssh_public_key, ' ' || chr(9) || chr(13) || chr(10)), chr(10)) > 0
    THEN 1 ELSE 0 END
) STORED;
