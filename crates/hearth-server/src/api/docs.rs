//! The OpenAPI document, generated from the handlers' annotations and the views' types
//! (utoipa): routes are registered together with their documentation in `api::router`,
//! so the document lists exactly what is served. `GET /openapi.json` serves it.
//!
//! The error answers each route can give are the response sets below, named for what
//! causes them.

use crate::error::ErrorBody;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Hearth",
        description = "Development VMs and sandboxes, self-hosted. Errors are `{\"error\": {\"code\", \"message\"}}`.",
        license(name = "Apache-2.0")
    ),
    modifiers(&Bearer),
    security(("bearer" = [])),
    tags(
        (name = "auth", description = "Signing in from a browser: sessions, passwords"),
        (name = "me", description = "The caller and their personal VM"),
        (name = "environments", description = "Environments: several per user, under quota"),
        (name = "files", description = "Files in an environment: listed, downloaded, uploaded, removed (as the `dev` user)"),
        (name = "images", description = "Custom images: built from a Dockerfile, checked against the guest contract, private or for everyone"),
        (name = "snapshots", description = "Saved disks of environments: taken, listed, made into new environments, deleted"),
        (name = "mail", description = "Commands by mail: the SendGrid webhook, secret sub-addresses, what arrived"),
        (name = "admin", description = "Administration (role `admin`)"),
        (name = "hosts", description = "Hosts VMs run on (role `admin`)"),
        (name = "operations", description = "Health, readiness, metrics, this document")
    )
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Any route that needs a token: it may be missing or unknown, and the database may be down.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum Authed {
    /// No `Authorization: Bearer <token>` (or session cookie), or an unknown one.
    #[response(status = 401)]
    Unauthenticated(ErrorBody),
    /// The database (or another service Hearth depends on) does not answer.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// Admin routes: a token without the `admin` role.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum AdminOnly {
    /// The caller is not an admin.
    #[response(status = 403)]
    Forbidden(ErrorBody),
}

/// Routes that act in a guest as its user, whose permissions may refuse.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum Forbidden {
    /// The guest's user may not do that there (`permission denied`).
    #[response(status = 403)]
    Forbidden(ErrorBody),
}

/// Routes that open a connection into an environment (64 per user per node).
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum Busy {
    /// The caller has 64 connections into environments open on this node.
    #[response(status = 429)]
    TooMany(ErrorBody),
}

/// A body or query that does not parse, or values out of bounds.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum Invalid {
    /// Bad input: says what was wrong; nothing was changed.
    #[response(status = 400)]
    Invalid(ErrorBody),
}

/// Routes naming something by id.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum Missing {
    /// No such thing (or it is someone else's).
    #[response(status = 404)]
    NotFound(ErrorBody),
}

/// Routes that act on something whose state may not allow it now.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum Refused {
    /// Not in this state (`invalid_state`), or it clashes with what exists (`conflict`).
    #[response(status = 409)]
    Conflict(ErrorBody),
}

/// Routes that take a large body.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum TooLarge {
    /// The body is larger than allowed (the message says the limit).
    #[response(status = 413)]
    TooLarge(ErrorBody),
}

/// Routes that take quota.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum OverQuota {
    /// Over the caller's quota: names the limit, its value and the usage.
    #[response(status = 429)]
    QuotaExceeded(ErrorBody),
}

/// Routes that place an environment on a host (a 503 `no_capacity` when none has room).
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum NoRoom {
    /// No host has room now, or the database does not answer.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}
