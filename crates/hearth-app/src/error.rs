//! The application's errors, in its own terms. The HTTP crate maps each to a status code;
//! workers log them.

use hearth_core::QuotaExceeded;
use hearth_store::StoreError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AppError {
    /// The request is wrong and no retry will fix it.
    #[error("{0}")]
    Invalid(String),
    #[error("missing or unknown credentials: {0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    /// What was asked for does not exist (or is someone else's).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// Not now: the environment is in a state that does not allow it.
    #[error("{0}")]
    InvalidState(String),
    /// Clashes with what exists (a taken name, a concurrent change).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Quota(QuotaExceeded),
    /// No host has room now; later may work.
    #[error("{0}")]
    NoCapacity(String),
    /// Too many tries in a short time (signing in); later works.
    #[error("{0}")]
    TooMany(String),
    /// The request's body is larger than allowed.
    #[error("{0}")]
    TooLarge(String),
    /// Waited as long as allowed.
    #[error("{0}")]
    Timeout(String),
    /// Something Hearth depends on (the database, a host) is not answering.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

pub type AppResult<T> = Result<T, AppError>;

impl AppError {
    /// A `NotFound` from the store becomes "`what` not found".
    pub fn not_found(what: &'static str) -> impl Fn(StoreError) -> AppError {
        move |e| match e {
            StoreError::NotFound => AppError::NotFound(what),
            other => other.into(),
        }
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> AppError {
        match e {
            StoreError::NotFound => AppError::NotFound("object"),
            StoreError::Quota(q) => AppError::Quota(q),
            StoreError::Conflict(m) => AppError::Conflict(m),
            StoreError::NoCapacity(m) => AppError::NoCapacity(m),
            StoreError::NoSuchHost(m) => AppError::Invalid(m),
            StoreError::Stale => AppError::Conflict(e.to_string()),
            other => {
                tracing::error!(error = %other, "database error");
                AppError::Unavailable(format!("the database failed: {other}"))
            }
        }
    }
}
