//! The seed's tRPC `vm.*` surface (`/api/trpc`), driven by the real `@trpc/client` v11 from
//! npm (`ui/test/trpc.mjs`): batched queries, mutations, a subscription over server-sent
//! events, BAD_REQUEST for invalid input and FORBIDDEN for a normal user's admin call, on a
//! real Docker VM. Here, over plain HTTP: the error shape, and a session cookie refused
//! when the request comes from another site.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;
use std::path::Path;

fn ui_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../ui"))
}

#[tokio::test]
async fn the_seeds_front_end_calls_work_through_trpc_client() {
    let ui = ui_dir();
    assert!(
        ui.join("node_modules/@trpc/client").is_dir()
            && ui.join("node_modules/eventsource").is_dir(),
        "the UI's test tools are not installed: run `make ui` (make test does)"
    );
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    let token = server.user("trpc@example.com", "pro").await;

    // The wire format itself, as @trpc/server answers: a single query's error shape.
    let r = reqwest::Client::new()
        .get(format!("{}/api/trpc/vm.getAllVms", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], -32003, "{body}");
    assert_eq!(
        body["error"]["data"],
        json!({"code": "FORBIDDEN", "httpStatus": 403, "path": "vm.getAllVms"})
    );
    let r = reqwest::Client::new()
        .get(format!(
            "{}/api/trpc/vm.getMyVm,vm.nothing?batch=1&input=%7B%7D",
            server.base
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        207,
        "a batch with a success and a failure"
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body[0], json!({"result": {"data": null}}));
    assert_eq!(body[1]["error"]["data"]["code"], "NOT_FOUND");
    let r = reqwest::Client::new()
        .get(format!("{}/api/trpc/vm.getMyVm", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // A session cookie works from this site's pages and is refused from another site's.
    let id = server.user_id("trpc@example.com").await;
    let invite = server
        .call(
            "POST",
            &format!("/v1/admin/users/{id}/password-link"),
            Some(&server.admin_token),
            Some(json!({"purpose": "invite"})),
        )
        .await
        .body["token"]
        .as_str()
        .unwrap()
        .to_string();
    let password = "a long enough password";
    let r = server
        .call(
            "POST",
            "/v1/auth/password",
            None,
            Some(json!({"token": invite, "password": password})),
        )
        .await;
    assert!(r.status.is_success(), "{:?}", r.body);
    let signed_in = reqwest::Client::new()
        .post(format!("{}/v1/auth/sign-in", server.base))
        .json(&json!({"email": "trpc@example.com", "password": password}))
        .send()
        .await
        .unwrap();
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let with_cookie = |site: &str, path: &str| {
        reqwest::Client::new()
            .get(format!("{}/api/trpc/{path}", server.base))
            .header("cookie", &cookie)
            .header("sec-fetch-site", site)
    };
    let r = with_cookie("same-origin", "vm.getMyVm")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = with_cookie("cross-site", "vm.getMyVm")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "a cross-site read with the cookie"
    );
    let r = with_cookie(
        "cross-site",
        "vm.executeCodeStream?input=%7B%22command%22%3A%22id%22%7D",
    )
    .send()
    .await
    .unwrap();
    let text = r.text().await.unwrap();
    assert!(
        text.contains("serialized-error") && text.contains("FORBIDDEN"),
        "a cross-site command with the cookie: {text}"
    );
    // A browser that does not say where a command comes from is not trusted with it.
    let r = reqwest::Client::new()
        .get(format!(
            "{}/api/trpc/vm.executeCodeStream?input=%7B%22command%22%3A%22id%22%7D",
            server.base
        ))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(
        text.contains("serialized-error") && text.contains("FORBIDDEN"),
        "a command with the cookie and no Sec-Fetch-Site: {text}"
    );
    let r = reqwest::Client::new()
        .post(format!("{}/api/trpc/vm.provisionMyVm", server.base))
        .header("sec-fetch-site", "same-origin")
        .header("cookie", &cookie)
        // What a cross-site form can send: text/plain, with a body that happens to be JSON.
        .header("content-type", "text/plain")
        .body(r#"{"vcpus": 1, "memoryMb": 1024, "diskGb": 10}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "a form post with the cookie"
    );
    assert_eq!(
        server
            .call("GET", "/v1/me/vm", Some(&token), None)
            .await
            .status,
        StatusCode::NOT_FOUND,
        "the refused post made no VM"
    );

    let out = tokio::process::Command::new("node")
        .arg("test/trpc.mjs")
        .current_dir(ui)
        .env("HEARTH_URL", &server.base)
        .env("TOKEN", &token)
        .env("ADMIN_TOKEN", &server.admin_token)
        .output()
        .await
        .expect("node (make ui installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.contains("trpc: done"),
        "the tRPC client test failed:\n{said}\n{}",
        site.log()
    );
}
