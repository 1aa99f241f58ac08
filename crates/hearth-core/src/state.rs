//! The one state machine every environment (and so every personal VM) follows.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnvState {
    Requested,
    Provisioning,
    Starting,
    Running,
    Stopping,
    Stopped,
    Destroying,
    Destroyed,
    Error,
}

use EnvState::*;

/// Every allowed `(from, to)` pair. Anything not listed is refused.
///
/// `error` can be retried (`provisioning` when no VM was ever made, `starting` otherwise)
/// or destroyed; `destroyed` is final.
pub const TRANSITIONS: &[(EnvState, EnvState)] = &[
    (Requested, Provisioning),
    (Requested, Destroying),
    (Requested, Error),
    (Provisioning, Running),
    (Provisioning, Error),
    (Running, Stopping),
    (Running, Destroying),
    (Running, Error),
    (Stopping, Stopped),
    (Stopping, Error),
    (Stopped, Starting),
    (Stopped, Destroying),
    (Starting, Running),
    (Starting, Error),
    (Destroying, Destroyed),
    (Destroying, Error),
    (Error, Provisioning),
    (Error, Starting),
    (Error, Destroying),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an environment cannot go from {from} to {to}")]
pub struct TransitionError {
    pub from: EnvState,
    pub to: EnvState,
}

impl EnvState {
    pub const ALL: [EnvState; 9] = [
        Requested,
        Provisioning,
        Starting,
        Running,
        Stopping,
        Stopped,
        Destroying,
        Destroyed,
        Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Requested => "requested",
            Provisioning => "provisioning",
            Starting => "starting",
            Running => "running",
            Stopping => "stopping",
            Stopped => "stopped",
            Destroying => "destroying",
            Destroyed => "destroyed",
            Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<EnvState> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn can_become(self, to: EnvState) -> bool {
        TRANSITIONS.contains(&(self, to))
    }

    pub fn check(self, to: EnvState) -> Result<(), TransitionError> {
        if self.can_become(to) {
            Ok(())
        } else {
            Err(TransitionError { from: self, to })
        }
    }

    /// Holds quota: anything that is not stopped, destroyed or failed.
    pub fn is_active(self) -> bool {
        !matches!(self, Stopped | Destroyed | Error)
    }

    /// A job is under way and will move the state on by itself.
    pub fn is_transitional(self) -> bool {
        matches!(self, Requested | Provisioning | Starting | Stopping | Destroying)
    }
}

impl fmt::Display for EnvState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in EnvState::ALL {
            assert_eq!(EnvState::parse(s.as_str()), Some(s));
        }
        assert_eq!(EnvState::parse("Running"), None);
    }

    #[test]
    fn destroyed_is_final() {
        for to in EnvState::ALL {
            assert!(!Destroyed.can_become(to), "destroyed -> {to}");
        }
    }

    #[test]
    fn every_state_but_destroyed_can_be_left() {
        for from in EnvState::ALL {
            let leaves = EnvState::ALL.iter().any(|to| from.can_become(*to));
            assert_eq!(leaves, from != Destroyed, "{from}");
        }
    }

    #[test]
    fn destroy_reachable_from_every_live_state() {
        // From any state but `destroyed`, a path to `destroyed` exists.
        for from in EnvState::ALL {
            let mut seen = vec![from];
            let mut i = 0;
            while i < seen.len() {
                for (a, b) in TRANSITIONS {
                    if *a == seen[i] && !seen.contains(b) {
                        seen.push(*b);
                    }
                }
                i += 1;
            }
            assert!(seen.contains(&Destroyed), "{from}");
        }
    }

    #[test]
    fn refuses_skips() {
        assert_eq!(
            Stopped.check(Running),
            Err(TransitionError { from: Stopped, to: Running })
        );
        assert!(Running.check(Stopping).is_ok());
        assert!(!Running.can_become(Running));
    }

    #[test]
    fn active_states() {
        assert!(Running.is_active() && Provisioning.is_active());
        assert!(!Stopped.is_active() && !Error.is_active() && !Destroyed.is_active());
    }
}
