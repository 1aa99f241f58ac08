//! Hearth's domain: the environment state machine, job kinds, tiers, quotas and input
//! rules.
//!
//! Architecture invariant: pure code, no I/O and no async (the one reading of the
//! system clock sits behind `Clock`), so every rule here is cheap to test and the same
//! for the server, the workers and the CLI.

pub mod clock;
pub mod host;
pub mod job;
pub mod state;
pub mod tier;
pub mod validate;

pub use clock::Clock;
pub use host::{HostHealth, HostKind, HostStatus};
pub use job::JobKind;
pub use state::{EnvState, Reservation, TransitionError};
pub use tier::{Quota, QuotaExceeded, Resources, Role, Tier, Usage};
