-- The part of a snapshot's size that is its VM's saved memory (an agent host's QEMU VM that
-- ran when it was taken): an environment made from it with the same sizes resumes where
-- its source was. 0: the disk only. NULL: not taken yet.
ALTER TABLE snapshots ADD COLUMN memory_bytes BIGINT;
