//! The web UI in headless Chromium (`ui/test/e2e.mjs`, playwright-core with Debian's
//! `chromium`): a user invited by an admin sets a password from the link, signs in, provisions the
//! personal VM on the real Docker engine with their own SSH key (real OpenSSH then logs in
//! with the line the page shows), sees the log and the state change live, runs a command in
//! the terminal, makes API tokens and uses them with curl, revokes one, makes a secret mail
//! address and sees a command posted to the webhook for it listed, watches the
//! environment list follow a stop made with curl, is refused the admin page, stops and
//! destroys the VM; an admin sees the last day's chart, destroys the user's next VM from the
//! admin page and sets the user's quota, checked here through the API. `make test` builds
//! the UI first (`make ui`); screenshots land in `$CARGO_TARGET_TMPDIR/ui-screenshots`.

mod common;

use common::*;
use reqwest::StatusCode;
use std::path::Path;

fn ui_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../ui"))
}

#[tokio::test]
async fn a_user_signs_in_provisions_uses_the_terminal_and_destroys() {
    let ui = ui_dir();
    assert!(
        ui.join("dist/index.html").is_file() && ui.join("node_modules/playwright-core").is_dir(),
        "the UI is not built: run `make ui` (make test does)"
    );
    // Commands by mail on, through the webhook (the relay is never reached in this test).
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_MAIL_ADDRESS", "agent@hearth.test")
        .with_env(
            "HEARTH_MAIL_RELAY",
            &format!("smtp://127.0.0.1:{}", free_port()),
        )
        .with_env("HEARTH_MAIL_WEBHOOK_SECRET", "ui-webhook-secret-123456");
    let server = site.start().await;
    let page = reqwest::get(format!("{}/", server.base)).await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.text().await.unwrap().contains("<div id=\"app\">"),
        "/ does not serve the built page"
    );

    let password = "a long enough password";
    server.user("ui@example.com", "pro").await;
    let id = server.user_id("ui@example.com").await;
    // Invitation links, as `hearth admin password-link` prints them; the browser sets the passwords.
    let link_for = |user: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(["admin", "password-link", user])
            .env("HEARTH_URL", &server.base)
            .env("HEARTH_TOKEN", &server.admin_token)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let link = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap()
            .to_string();
        assert!(
            link.starts_with(&format!("{}/ui/password?token=", server.base)),
            "{link}"
        );
        link
    };
    let link = link_for(&id);
    let admin = server
        .call("GET", "/v1/me", Some(&server.admin_token), None)
        .await
        .body["user"]
        .clone();
    let admin_link = link_for(admin["id"].as_str().unwrap());

    // The user's own SSH key, given on the size picker; real OpenSSH uses it.
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("id_ed25519");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "ui-test", "-f"])
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let public_key = std::fs::read_to_string(key_file.with_extension("pub")).unwrap();
    let hosts = server
        .call("GET", "/v1/admin/hosts", Some(&server.admin_token), None)
        .await
        .body;
    let host_name = hosts["items"][0]["name"].as_str().unwrap().to_string();

    let screenshots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    let out = tokio::process::Command::new("node")
        .arg("test/e2e.mjs")
        .current_dir(ui)
        .env("HEARTH_URL", &server.base)
        .env("LINK", &link)
        .env("ADMIN_LINK", &admin_link)
        .env("ADMIN_EMAIL", admin["email"].as_str().unwrap())
        .env("EMAIL", "ui@example.com")
        .env("MAIL_SECRET", "ui-webhook-secret-123456")
        .env("PASSWORD", password)
        .env("SSH_PUBLIC_KEY", public_key.trim())
        .env("SSH_KEY_FILE", &key_file)
        .env("HOST_NAME", &host_name)
        .env("SCREENSHOTS", &screenshots)
        .output()
        .await
        .expect("node (make ui installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the browser test failed:\n{said}");
    assert!(said.contains("e2e: done"), "{said}");
    // The quota the admin set on the users tab is the one in force.
    let quota = server
        .call(
            "GET",
            &format!("/v1/admin/users/{id}"),
            Some(&server.admin_token),
            None,
        )
        .await
        .body;
    assert_eq!(quota["quotaOverrides"]["maxEnvironments"], 7, "{quota}");
    assert_eq!(quota["quota"]["maxEnvironments"], 7, "{quota}");
    for page in [
        "set-password",
        "sign-in",
        "size-picker",
        "my-vm",
        "terminal",
        "settings",
        "admin-refused",
        "admin",
        "admin-users",
        "environment",
    ] {
        for width in ["desktop", "phone"] {
            assert!(
                screenshots.join(format!("{page}-{width}.png")).is_file(),
                "no screenshot of {page} at {width} width"
            );
        }
    }
    println!("screenshots: {}", screenshots.display());
}

/// OpenID Connect sign-in against a real provider (the npm package oidc-provider, run here):
/// a callback with another state and an unverified email are refused; a verified email
/// signs in and makes the user with the configured tier.
#[tokio::test]
async fn openid_connect_sign_in_against_a_real_provider() {
    let ui = ui_dir();
    assert!(
        ui.join("node_modules/oidc-provider").is_dir(),
        "the UI's test tools are not installed: run `make ui` (make test does)"
    );
    let (op_port, port) = (free_port(), free_port());
    let callback = format!("http://127.0.0.1:{port}/v1/auth/oidc/callback");
    let mut provider = std::process::Command::new("node")
        .args(["test/oidc-provider.mjs", &op_port.to_string(), &callback])
        .current_dir(ui)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("node (make ui installs it)");
    let mut said = std::io::BufReader::new(provider.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut said, &mut line).unwrap();
    assert_eq!(line.trim(), "ready", "the OpenID provider did not start");

    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_OIDC_ISSUER", &format!("http://127.0.0.1:{op_port}"))
        .with_env("HEARTH_OIDC_CLIENT_ID", "hearth")
        .with_env("HEARTH_OIDC_CLIENT_SECRET", "hearth-test-secret")
        .with_env("HEARTH_OIDC_REDIRECT_URL", &callback)
        .with_env("HEARTH_OIDC_TIER", "pro")
        .with_env("HEARTH_OIDC_NAME", "Test provider");
    let server = site.start_on(port).await;
    let screenshots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    let out = tokio::process::Command::new("node")
        .arg("test/oidc.mjs")
        .current_dir(ui)
        .env("HEARTH_URL", &server.base)
        .env("SCREENSHOTS", &screenshots)
        .output()
        .await
        .unwrap();
    let _ = provider.kill();
    let _ = provider.wait();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.contains("oidc: done"),
        "the OpenID test failed:\n{said}\nserver log:\n{}",
        site.log()
    );
    let users = server
        .call("GET", "/v1/admin/users", Some(&server.admin_token), None)
        .await
        .body;
    let made: Vec<_> = users["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["email"].as_str().unwrap().ends_with("@example.com"))
        .collect();
    assert_eq!(
        made.len(),
        1,
        "only the verified email becomes a user: {users}"
    );
    assert_eq!(
        (made[0]["email"].as_str(), made[0]["tier"].as_str()),
        (Some("oidc@example.com"), Some("pro"))
    );
}
