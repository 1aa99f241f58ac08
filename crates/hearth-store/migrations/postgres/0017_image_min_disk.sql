-- The smallest disk a VM of an image may have: an agent host's image is a file system of a
-- size, and a VM's disk must hold it whole. NULL: any disk.
ALTER TABLE images ADD COLUMN min_disk_gb BIGINT;
