-- What the fleet ran and held, one row per five-minute bucket (`at` is the bucket's start),
-- written by whichever node samples first; kept 7 days (at most 2,016 rows).
CREATE TABLE capacity_samples (
    at BIGINT PRIMARY KEY,
    running_vms BIGINT NOT NULL,
    running_vcpus BIGINT NOT NULL,
    running_memory_mb BIGINT NOT NULL,
    used_vcpus BIGINT NOT NULL,
    max_vcpus BIGINT NOT NULL,
    used_memory_mb BIGINT NOT NULL,
    max_memory_mb BIGINT NOT NULL
);
