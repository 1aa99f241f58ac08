//! API errors: `{"error": {"code", "message"}}` with the status DESIGN.md section 5 gives.
//! The one place application errors become HTTP status codes.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hearth_app::AppError;
use serde::Serialize;
use utoipa::ToSchema;

/// Every error answer: `{"error": {"code": ..., "message": ...}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// `invalid_input`, `unauthenticated`, `forbidden`, `not_found`, `invalid_state`,
    /// `conflict`, `quota_exceeded`, `timeout`, `no_capacity`, `unavailable`, `internal`,
    /// `method_not_allowed`.
    pub code: String,
    /// What went wrong and, where it helps, what to do.
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }
    pub fn unauthenticated(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> ApiError {
        let message = e.to_string();
        let (status, code) = match e {
            AppError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_input"),
            AppError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            AppError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            AppError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AppError::InvalidState(_) => (StatusCode::CONFLICT, "invalid_state"),
            AppError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            AppError::Quota(_) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            AppError::NoCapacity(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_capacity"),
            AppError::TooMany(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_attempts"),
            AppError::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            AppError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            AppError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            AppError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError {
            status,
            code,
            message,
        }
    }
}

impl From<hearth_store::StoreError> for ApiError {
    fn from(e: hearth_store::StoreError) -> ApiError {
        AppError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
