//! Every endpoint, called with someone else's ids (404, nothing changes) and every admin
//! path called by a normal user (403), on SQLite and PostgreSQL.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;

async fn ownership_matrix(db: Db) {
    // No workers: nothing needs to run for ownership to be checked, and nothing moves on its own.
    let site = Site::new(db).await.with_env("HEARTH_WORKERS", "0");
    let server = site.start().await;
    let alice = server.user("alice@example.com", "pro").await;
    let bob = server.user("bob@example.com", "pro").await;
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&alice),
            Some(json!({"name": "alice's"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let id = r.body["id"].as_str().unwrap().to_string();
    let slug = r.body["slug"].as_str().unwrap().to_string();
    let r = server
        .call(
            "POST",
            "/v1/me/vm",
            Some(&alice),
            Some(json!({"memoryMb": 512})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let before = site.counts().await;
    let env_before = site.store().await.environment(&id).await.unwrap();

    let unknown = "01900000-0000-7000-8000-000000000000";
    let r = server
        .call("PUT_IS_NOT_ALLOWED", "/v1/environments", Some(&bob), None)
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.body["error"]["code"], "method_not_allowed");
    for target in [id.as_str(), slug.as_str(), unknown] {
        let calls: Vec<(&str, String, Option<serde_json::Value>)> = vec![
            ("GET", format!("/v1/environments/{target}"), None),
            (
                "GET",
                format!("/v1/environments/{target}/wait?state=running&timeoutSeconds=1"),
                None,
            ),
            ("POST", format!("/v1/environments/{target}/start"), None),
            ("POST", format!("/v1/environments/{target}/stop"), None),
            (
                "POST",
                format!("/v1/environments/{target}/exec"),
                Some(json!({"code": "id"})),
            ),
            ("DELETE", format!("/v1/environments/{target}"), None),
            ("GET", format!("/v1/environments/{target}/executions"), None),
            ("GET", format!("/v1/environments/{target}/audit"), None),
            ("GET", format!("/v1/environments/{target}/logs"), None),
            ("GET", format!("/v1/environments/{target}/activity"), None),
            ("POST", format!("/v1/environments/{target}/keepalive"), None),
            ("GET", format!("/v1/environments/{target}/events"), None),
            (
                "POST",
                format!("/v1/environments/{target}/exec/stream"),
                Some(json!({"code": "id"})),
            ),
            (
                "POST",
                format!("/v1/environments/{target}/terminal/ticket"),
                None,
            ),
            ("GET", format!("/v1/environments/{target}/terminal"), None),
        ];
        for (method, path, body) in calls {
            let r = server.call(method, &path, Some(&bob), body).await;
            assert_eq!(
                r.status,
                StatusCode::NOT_FOUND,
                "bob {method} {path}: {:?}",
                r.body
            );
            assert_eq!(r.body["error"]["code"], "not_found");
            assert!(
                !r.body.to_string().contains("alice"),
                "leaked: {:?}",
                r.body
            );
        }
    }
    // Bob's own views show nothing of Alice's.
    let list = server
        .call("GET", "/v1/environments", Some(&bob), None)
        .await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 0);
    for (method, path) in [
        ("GET", "/v1/me/vm"),
        ("GET", "/v1/me/vm/events"),
        ("POST", "/v1/me/vm/exec/stream"),
    ] {
        let r = server
            .call(method, path, Some(&bob), Some(json!({"code": "id"})))
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "bob {method} {path}");
    }

    // Every admin operation the document lists, so a new one cannot be left out.
    let document = server.call("GET", "/openapi.json", None, None).await.body;
    let mut admin_calls: Vec<(String, String)> = Vec::new();
    for (path, operations) in document["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/admin/") {
            continue;
        }
        for method in operations.as_object().unwrap().keys() {
            let path = if path.starts_with("/v1/admin/environments/") {
                path.replace("{id}", &id)
            } else {
                path.replace("{id}", "x")
            };
            admin_calls.push((method.to_uppercase(), path));
        }
    }
    assert!(admin_calls.len() >= 20, "{admin_calls:?}");
    for (method, path) in &admin_calls {
        let (method, path) = (method.as_str(), path.as_str());
        let r = if method == "PATCH" {
            server.patch(path, &bob, json!({"tier": "unlimited"})).await
        } else {
            server
                .call(
                    method,
                    path,
                    Some(&bob),
                    Some(json!({"email": "evil@example.com", "role": "admin"})),
                )
                .await
        };
        assert_eq!(r.status, StatusCode::FORBIDDEN, "bob {method} {path}");
        assert_eq!(r.body["error"]["code"], "forbidden");
        let r = server.call(method, path, None, None).await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "anonymous {method} {path}"
        );
    }

    assert_eq!(
        site.counts().await,
        before,
        "a refused request wrote to the database"
    );
    let env_after = site.store().await.environment(&id).await.unwrap();
    assert_eq!(
        (env_after.state, env_after.generation),
        (env_before.state, env_before.generation)
    );

    // The admin, by contrast, sees and manages everything.
    let all = server
        .call(
            "GET",
            "/v1/admin/environments",
            Some(&server.admin_token),
            None,
        )
        .await;
    assert_eq!(all.body["items"].as_array().unwrap().len(), 2);
    let hosts = server
        .call("GET", "/v1/admin/hosts", Some(&server.admin_token), None)
        .await;
    let host = &hosts.body["items"][0];
    assert_eq!(host["kind"], "docker");
    assert_eq!(host["usedEnvironments"], 2, "{hosts:?}");
    let drained = server
        .call(
            "POST",
            &format!("/v1/admin/hosts/{}/drain", host["id"].as_str().unwrap()),
            Some(&server.admin_token),
            None,
        )
        .await;
    assert_eq!(drained.body["status"], "draining");
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&bob),
            Some(json!({"name": "no room"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.body["error"]["code"], "no_capacity");
    assert!(
        !r.body.to_string().contains(host["name"].as_str().unwrap()),
        "a user saw a host's name: {:?}",
        r.body
    );
    let r = server
        .call(
            "DELETE",
            &format!("/v1/admin/environments/{id}"),
            Some(&server.admin_token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let jobs = server
        .call(
            "GET",
            "/v1/admin/jobs?state=queued",
            Some(&server.admin_token),
            None,
        )
        .await;
    assert!(
        jobs.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["kind"] == "destroy" && j["environmentId"] == id.as_str())
    );
    let bob_id = server.user_id("bob@example.com").await;
    let r = server
        .patch(
            &format!("/v1/admin/users/{bob_id}"),
            &server.admin_token,
            json!({"tier": "unlimited", "quota": {"maxVcpus": 3}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        (
            r.body["user"]["tier"].as_str(),
            r.body["quota"]["maxVcpus"].as_i64()
        ),
        (Some("unlimited"), Some(3))
    );
    let r = server
        .patch(
            &format!("/v1/admin/users/{bob_id}"),
            &server.admin_token,
            json!({"quota": {"maxVcpus": -1}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Tokens: a user makes another, sees ids and names only, and revokes one; another
    // user's token id is unknown to them.
    let made = server
        .call(
            "POST",
            "/v1/me/tokens",
            Some(&alice),
            Some(json!({"name": "laptop"})),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    let laptop = made.body["token"].as_str().unwrap().to_string();
    let laptop_id = made.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        server
            .call("GET", "/v1/me", Some(&laptop), None)
            .await
            .status,
        StatusCode::OK
    );
    let listed = server
        .call("GET", "/v1/me/tokens", Some(&alice), None)
        .await
        .body;
    let names: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "laptop"]);
    assert!(
        !listed.to_string().contains(&laptop) && !listed.to_string().contains(&alice),
        "a listing showed a token"
    );
    let r = server
        .call(
            "DELETE",
            &format!("/v1/me/tokens/{laptop_id}"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        server
            .call(
                "POST",
                "/v1/me/tokens",
                Some(&alice),
                Some(json!({"name": ""}))
            )
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    let r = server
        .call(
            "DELETE",
            &format!("/v1/me/tokens/{laptop_id}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        server
            .call("GET", "/v1/me", Some(&laptop), None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        server
            .call("GET", "/v1/me", Some(&alice), None)
            .await
            .status,
        StatusCode::OK
    );

    // Removing users: not one who holds environments, not oneself; one who holds nothing
    // goes, and their token with them.
    let alice_id = server.user_id("alice@example.com").await;
    let r = server
        .call(
            "DELETE",
            &format!("/v1/admin/users/{alice_id}"),
            Some(&server.admin_token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    let admin_id = server
        .call("GET", "/v1/me", Some(&server.admin_token), None)
        .await
        .body["user"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = server
        .call(
            "DELETE",
            &format!("/v1/admin/users/{admin_id}"),
            Some(&server.admin_token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    let r = server
        .call(
            "DELETE",
            &format!("/v1/admin/users/{bob_id}"),
            Some(&server.admin_token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    assert_eq!(
        server.call("GET", "/v1/me", Some(&bob), None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let r = server
        .call(
            "DELETE",
            &format!("/v1/admin/users/{bob_id}"),
            Some(&server.admin_token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn ownership_matrix_sqlite() {
    ownership_matrix(Db::Sqlite).await;
}

#[tokio::test]
async fn ownership_matrix_postgres() {
    ownership_matrix(Db::Postgres).await;
}
