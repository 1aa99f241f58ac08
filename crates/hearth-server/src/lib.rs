//! The HTTP face of Hearth (`hearth serve`): routes, authentication, JSON shapes, server-sent
//! events, the terminal WebSocket, and the listener.
//!
//! Architecture invariant: handlers only translate. They parse, authorize, call one
//! function of `hearth_app::App`, and map its result (and its `AppError`) to HTTP; rules
//! and store calls that hold business rules live in `hearth-app`.

pub mod api;
pub mod error;
pub mod serve;
mod smtp;
mod ui;
pub mod views;

pub use hearth_app::{App, Config};
