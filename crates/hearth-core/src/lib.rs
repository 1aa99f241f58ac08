//! Hearth's domain: the environment state machine, tiers, quotas and input rules.
//!
//! Pure code, no I/O and no async, so every rule here is cheap to test and the same
//! for the server, the workers and the CLI.

pub mod placement;
pub mod state;
pub mod tier;
pub mod validate;

pub use state::{EnvState, TransitionError};
pub use tier::{Quota, QuotaExceeded, Resources, Role, Tier, Usage};
