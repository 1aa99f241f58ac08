//! Choosing a host for a VM: the one with the most room left that fits.

use crate::Resources;

/// A host's capacity and what its active environments use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoom {
    pub id: String,
    pub max_vcpus: i64,
    pub max_memory_mb: i64,
    pub max_environments: i64,
    pub used_vcpus: i64,
    pub used_memory_mb: i64,
    pub used_environments: i64,
}

impl HostRoom {
    pub fn fits(&self, need: &Resources) -> bool {
        self.used_vcpus + need.vcpus <= self.max_vcpus
            && self.used_memory_mb + need.memory_mb <= self.max_memory_mb
            && self.used_environments < self.max_environments
    }

    /// Share of the host left free after placing `need`, averaged over vCPUs and memory.
    fn room_after(&self, need: &Resources) -> f64 {
        let cpu = (self.max_vcpus - self.used_vcpus - need.vcpus) as f64 / self.max_vcpus.max(1) as f64;
        let mem = (self.max_memory_mb - self.used_memory_mb - need.memory_mb) as f64 / self.max_memory_mb.max(1) as f64;
        (cpu + mem) / 2.0
    }
}

/// The fitting host with the most room; ties go to the first listed (stable).
pub fn place<'a>(hosts: &'a [HostRoom], need: &Resources) -> Option<&'a HostRoom> {
    let mut best: Option<(&HostRoom, f64)> = None;
    for h in hosts.iter().filter(|h| h.fits(need)) {
        let room = h.room_after(need);
        if best.is_none_or(|(_, r)| room > r) {
            best = Some((h, room));
        }
    }
    best.map(|(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, vcpus: i64, mem: i64, used_vcpus: i64, used_mem: i64) -> HostRoom {
        HostRoom {
            id: id.into(),
            max_vcpus: vcpus,
            max_memory_mb: mem,
            max_environments: 10,
            used_vcpus,
            used_memory_mb: used_mem,
            used_environments: 0,
        }
    }

    const SMALL: Resources = Resources { vcpus: 2, memory_mb: 2048, disk_gb: 10 };

    #[test]
    fn most_room_wins_and_full_hosts_are_skipped() {
        let hosts = [host("a", 4, 8192, 0, 0), host("b", 16, 65536, 0, 0)];
        assert_eq!(place(&hosts, &SMALL).unwrap().id, "b");
        let hosts = [host("a", 4, 8192, 0, 0), host("b", 16, 65536, 15, 0)];
        assert_eq!(place(&hosts, &SMALL).unwrap().id, "a");
        let hosts = [host("a", 4, 8192, 3, 0), host("b", 16, 65536, 15, 0)];
        assert!(place(&hosts, &SMALL).is_none());
    }

    #[test]
    fn environment_count_limits_too() {
        let mut h = host("a", 64, 65536, 0, 0);
        h.used_environments = 10;
        assert!(!h.fits(&SMALL));
    }
}
