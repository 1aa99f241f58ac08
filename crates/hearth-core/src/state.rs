//! The one state machine every environment (and so every personal VM) follows.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
/// or destroyed; `destroyed` is final. Destroy is possible from every other state: a
/// transitional state whose job died for good goes straight to `destroying`.
pub const TRANSITIONS: &[(EnvState, EnvState)] = &[
    (Requested, Provisioning),
    (Requested, Destroying),
    (Requested, Error),
    (Provisioning, Running),
    (Provisioning, Destroying),
    (Provisioning, Error),
    (Running, Stopping),
    (Running, Destroying),
    (Running, Error),
    (Stopping, Stopped),
    // The stop failed for good and the VM still runs.
    (Stopping, Running),
    (Stopping, Destroying),
    (Stopping, Error),
    (Stopped, Starting),
    (Stopped, Destroying),
    // Its VM vanished behind Hearth's back.
    (Stopped, Error),
    (Starting, Running),
    (Starting, Destroying),
    (Starting, Error),
    (Destroying, Destroyed),
    (Destroying, Error),
    (Error, Provisioning),
    (Error, Starting),
    (Error, Destroying),
];

/// See [`EnvState::reservation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Check quota and host room, then hold them.
    Reserve,
    /// Give them back.
    Release,
    Keep,
}

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

    /// What moving from `self` to `to` does to the quota and host room the environment
    /// holds (`reserved`). Coming to life (`provisioning`, `starting`) reserves; coming to
    /// rest (`stopped`, `error`, `destroyed`) releases; everything else keeps what it
    /// had. `destroying` never reserves, so destroy is possible at full quota or on a
    /// draining host, and it keeps a running VM counted until the VM is gone.
    pub fn reservation(self, to: EnvState, reserved: bool) -> Reservation {
        match to {
            Provisioning | Starting if !reserved => Reservation::Reserve,
            Stopped | Error | Destroyed if reserved => Reservation::Release,
            _ => Reservation::Keep,
        }
    }

    /// A job is under way and will move the state on by itself.
    pub fn is_transitional(self) -> bool {
        matches!(
            self,
            Requested | Provisioning | Starting | Stopping | Destroying
        )
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
            Err(TransitionError {
                from: Stopped,
                to: Running
            })
        );
        assert!(Running.check(Stopping).is_ok());
        assert!(!Running.can_become(Running));
    }

    #[test]
    fn reservations() {
        use Reservation::*;
        assert_eq!(Stopped.reservation(Starting, false), Reserve);
        assert_eq!(Error.reservation(Provisioning, false), Reserve);
        assert_eq!(Running.reservation(Stopping, true), Keep);
        assert_eq!(Stopping.reservation(Stopped, true), Release);
        assert_eq!(Provisioning.reservation(Error, true), Release);
        // Destroy never needs room, and a running VM stays counted until it is gone.
        assert_eq!(Stopped.reservation(Destroying, false), Keep);
        assert_eq!(Running.reservation(Destroying, true), Keep);
        assert_eq!(Destroying.reservation(Destroyed, true), Release);
        assert_eq!(Destroying.reservation(Destroyed, false), Keep);
        // Every state but `destroyed` can reach `destroying` in one step.
        for from in EnvState::ALL {
            assert_eq!(
                from.can_become(Destroying),
                !matches!(from, Destroying | Destroyed),
                "{from}"
            );
        }
    }
}
