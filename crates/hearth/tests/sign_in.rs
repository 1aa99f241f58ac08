//! Signing in from a browser, as a browser would: an admin's invitation link, a password,
//! the session cookie (HTTP-only, SameSite), the CSRF token on every changing call (a
//! cross-site form post is refused), sign-out, a password reset that ends old sessions,
//! and failed sign-ins limited per email.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery";

struct Browser {
    base: String,
    http: reqwest::Client,
    cookie: Option<String>,
}

impl Browser {
    fn new(server: &Server) -> Browser {
        Browser {
            base: server.base.clone(),
            http: reqwest::Client::new(),
            cookie: None,
        }
    }

    /// A request with the cookie (if any) and optional extra headers.
    async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (StatusCode, Value, Option<String>) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            req = req.header("cookie", format!("hearth_session={c}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let set_cookie = resp
            .headers()
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_string());
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null), set_cookie)
    }

    /// Signs in; keeps the cookie; returns the CSRF token and the raw Set-Cookie.
    async fn sign_in(
        &mut self,
        email: &str,
        password: &str,
    ) -> Result<(String, String), (StatusCode, Value)> {
        let (status, body, set_cookie) = self
            .send(
                "POST",
                "/v1/auth/sign-in",
                &[],
                Some(json!({"email": email, "password": password})),
            )
            .await;
        if status != StatusCode::OK {
            return Err((status, body));
        }
        let set_cookie = set_cookie.expect("a cookie");
        let value = set_cookie
            .split(';')
            .next()
            .unwrap()
            .strip_prefix("hearth_session=")
            .unwrap()
            .to_string();
        self.cookie = Some(value);
        Ok((body["csrfToken"].as_str().unwrap().to_string(), set_cookie))
    }
}

async fn link(server: &Server, user_id: &str, purpose: &str) -> String {
    let r = server
        .call(
            "POST",
            &format!("/v1/admin/users/{user_id}/password-link"),
            Some(&server.admin_token),
            Some(json!({"purpose": purpose})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    r.body["token"].as_str().unwrap().to_string()
}

async fn a_user_is_invited_signs_in_and_is_held_to_csrf(db: Db) {
    let site = Site::new(db).await;
    let server = site.start().await;
    let token = server.user("ann@example.com", "pro").await;
    let id = server.user_id("ann@example.com").await;
    let mut browser = Browser::new(&server);

    // No password yet; a user may not make links.
    assert_eq!(
        browser
            .sign_in("ann@example.com", PASSWORD)
            .await
            .unwrap_err()
            .0,
        StatusCode::UNAUTHORIZED
    );
    let r = server
        .call(
            "POST",
            &format!("/v1/admin/users/{id}/password-link"),
            Some(&token),
            Some(json!({"purpose": "invite"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // The invitation sets a password once.
    let invite = link(&server, &id, "invite").await;
    let r = server
        .call(
            "POST",
            "/v1/auth/password",
            None,
            Some(json!({"token": invite, "password": "short"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    let r = server
        .call(
            "POST",
            "/v1/auth/password",
            None,
            Some(json!({"token": invite, "password": PASSWORD})),
        )
        .await;
    assert_eq!(
        (r.status, r.body["email"].as_str()),
        (StatusCode::OK, Some("ann@example.com")),
        "{:?}",
        r.body
    );
    let r = server
        .call(
            "POST",
            "/v1/auth/password",
            None,
            Some(json!({"token": invite, "password": "another long password"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "a link worked twice");

    // Signing in: a wrong password, an unknown email, then the right one.
    assert_eq!(
        browser
            .sign_in("ann@example.com", "not the password")
            .await
            .unwrap_err()
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        browser
            .sign_in("nobody@example.com", PASSWORD)
            .await
            .unwrap_err()
            .0,
        StatusCode::UNAUTHORIZED
    );
    let (csrf, set_cookie) = browser.sign_in("ann@example.com", PASSWORD).await.unwrap();
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(
        !set_cookie.contains("Secure"),
        "Secure on plain HTTP would make browsers drop it: {set_cookie}"
    );
    let (status, me, _) = browser.send("GET", "/v1/me", &[], None).await;
    assert_eq!(
        (status, me["user"]["email"].as_str()),
        (StatusCode::OK, Some("ann@example.com"))
    );
    let (_, session, _) = browser.send("GET", "/v1/auth/session", &[], None).await;
    assert_eq!(session["csrfToken"], csrf.as_str());

    // A changing call with the cookie needs the CSRF token: a cross-site form post has none.
    let tokens_before = server
        .call("GET", "/v1/me/tokens", Some(&token), None)
        .await
        .body["items"]
        .as_array()
        .unwrap()
        .len();
    let (status, body, _) = browser
        .send(
            "POST",
            "/v1/me/tokens",
            &[],
            Some(json!({"name": "laptop"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("csrf")),
        "{body}"
    );
    let form = reqwest::Client::new()
        .post(format!("{}/v1/me/tokens", server.base))
        .header(
            "cookie",
            format!("hearth_session={}", browser.cookie.as_ref().unwrap()),
        )
        .header("origin", "https://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("name=laptop")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), StatusCode::FORBIDDEN);
    let (status, _, _) = browser
        .send(
            "POST",
            "/v1/me/tokens",
            &[("x-csrf-token", "0000")],
            Some(json!({"name": "laptop"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        server
            .call("GET", "/v1/me/tokens", Some(&token), None)
            .await
            .body["items"]
            .as_array()
            .unwrap()
            .len(),
        tokens_before,
        "a refused call changed something"
    );
    let (status, made, _) = browser
        .send(
            "POST",
            "/v1/me/tokens",
            &[("x-csrf-token", &csrf)],
            Some(json!({"name": "laptop"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    // A token's last use is kept (to the minute) and shown; a new one was never used.
    let listed = |body: Value, name: &str| {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .cloned()
            .unwrap()
    };
    let (_, tokens, _) = browser.send("GET", "/v1/me/tokens", &[], None).await;
    assert!(listed(tokens, "laptop")["lastUsedAt"].is_null());
    assert_eq!(
        server
            .call("GET", "/v1/me", made["token"].as_str(), None)
            .await
            .status,
        StatusCode::OK
    );
    let (_, tokens, _) = browser.send("GET", "/v1/me/tokens", &[], None).await;
    assert!(
        listed(tokens, "laptop")["lastUsedAt"].is_string(),
        "the use was not kept"
    );
    // The cookie gives a user's rights, no more.
    let (status, _, _) = browser.send("GET", "/v1/admin/users", &[], None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Signing out needs the token too, then the cookie is dead.
    let (status, _, _) = browser.send("POST", "/v1/auth/sign-out", &[], None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a cross-site sign-out");
    let (status, _, cleared) = browser
        .send(
            "POST",
            "/v1/auth/sign-out",
            &[("x-csrf-token", &csrf)],
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(cleared.unwrap().contains("Max-Age=0"));
    assert_eq!(
        browser.send("GET", "/v1/me", &[], None).await.0,
        StatusCode::UNAUTHORIZED
    );

    // A reset ends every session and the old password.
    browser.sign_in("ann@example.com", PASSWORD).await.unwrap();
    let reset = link(&server, &id, "reset").await;
    let r = server
        .call(
            "POST",
            "/v1/auth/password",
            None,
            Some(json!({"token": reset, "password": "a brand new password"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        browser.send("GET", "/v1/me", &[], None).await.0,
        StatusCode::UNAUTHORIZED,
        "a session outlived a reset"
    );
    assert_eq!(
        browser
            .sign_in("ann@example.com", PASSWORD)
            .await
            .unwrap_err()
            .0,
        StatusCode::UNAUTHORIZED
    );
    browser
        .sign_in("ann@example.com", "a brand new password")
        .await
        .unwrap();

    // Ten failures for one email, and even the right password waits.
    let mut other = Browser::new(&server);
    for _ in 0..10 {
        assert_eq!(
            other
                .sign_in("ann@example.com", "guessing guessing")
                .await
                .unwrap_err()
                .0,
            StatusCode::UNAUTHORIZED
        );
    }
    let (status, body) = other
        .sign_in("ann@example.com", "a brand new password")
        .await
        .unwrap_err();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("try again"),
        "{body}"
    );
    // The session made before the guessing still works.
    assert_eq!(
        browser.send("GET", "/v1/me", &[], None).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_user_is_invited_signs_in_and_is_held_to_csrf_sqlite() {
    a_user_is_invited_signs_in_and_is_held_to_csrf(Db::Sqlite).await;
}

#[tokio::test]
async fn a_user_is_invited_signs_in_and_is_held_to_csrf_postgres() {
    a_user_is_invited_signs_in_and_is_held_to_csrf(Db::Postgres).await;
}
