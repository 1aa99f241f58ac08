//! The kinds of work a job does for an environment, and which queue runs each.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Provision,
    Start,
    Stop,
    Destroy,
}

impl JobKind {
    pub const ALL: [JobKind; 4] = [
        JobKind::Provision,
        JobKind::Start,
        JobKind::Stop,
        JobKind::Destroy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Provision => "provision",
            JobKind::Start => "start",
            JobKind::Stop => "stop",
            JobKind::Destroy => "destroy",
        }
    }

    pub fn parse(s: &str) -> Option<JobKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Provisioning is slow and has its own, smaller pool; the rest share `control`.
    pub fn queue(self) -> &'static str {
        match self {
            JobKind::Provision => "provision",
            _ => "control",
        }
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_queues() {
        for k in JobKind::ALL {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(JobKind::Provision.queue(), "provision");
        assert_eq!(JobKind::Destroy.queue(), "control");
        assert_eq!(JobKind::parse("reboot"), None);
    }
}
