//! Custom images through the real `hearth serve` and the real Docker engine: built from a
//! Dockerfile (one installs a Debian package) or loaded from a `docker save` tarball,
//! checked against the guest contract (one that breaks it is refused with the reason),
//! private or for everyone, counted, removed; and `hearth image check` and `hearth image
//! import` from the command line.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

const UP: Duration = Duration::from_secs(120);

async fn register(server: &Server, token: &str, body: Value) -> (StatusCode, Value) {
    let r = server
        .call("POST", "/v1/images", Some(token), Some(body))
        .await;
    (r.status, r.body)
}

/// Every custom image in the engine, tagged or not, by the record id on its label.
fn images_in_engine() -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args([
            "images",
            "-a",
            "--filter",
            "label=hearth.image",
            "--format",
            "{{.Label \"hearth.image\"}}",
        ])
        .output()
        .unwrap();
    let mut ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

async fn names(server: &Server, token: &str) -> Vec<String> {
    let listed = server
        .call("GET", "/v1/images", Some(token), None)
        .await
        .body;
    listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn custom_images_on_docker() {
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_REAPER_INTERVAL_MS", "500");
    let server = site.start().await;
    let admin = server.admin_token.clone();
    let before = images_in_engine();

    // For everyone: a package from Debian on top of the base image.
    let (status, jq) = register(&server, &admin, json!({
        "name": "with-jq", "visibility": "everyone",
        "dockerfile": "FROM hearth/base:latest\nRUN apt-get update && apt-get install -y --no-install-recommends jq && rm -rf /var/lib/apt/lists/*\n",
    }))
    .await;
    assert_eq!(status, StatusCode::CREATED, "{jq}");
    assert_eq!(
        (jq["state"].as_str(), jq["visibility"].as_str()),
        (Some("ready"), Some("everyone"))
    );
    assert!(jq["sizeBytes"].as_i64().unwrap() > 0);

    let user = server.user("images@example.com", "free").await;
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&user),
            Some(json!({"name": "jq", "baseImage": "with-jq", "vcpus": 1, "memoryMb": 512})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let env = r.body["id"].as_str().unwrap().to_string();
    server.wait_env(&user, &env, "running", UP).await;
    let out = server
        .call(
            "POST",
            &format!("/v1/environments/{env}/exec"),
            Some(&user),
            Some(json!({"code": "jq --version; whoami"})),
        )
        .await;
    assert_eq!(out.status, StatusCode::OK, "{:?}", out.body);
    let said = out.body["stdout"].as_str().unwrap();
    assert!(said.starts_with("jq-") && said.ends_with("dev\n"), "{said}");

    // One that breaks the guest contract is refused with the reason, and leaves nothing.
    let (status, body) = register(
        &server,
        &user,
        json!({
            "name": "no-dev", "dockerfile": "FROM hearth/base:latest\nRUN userdel -r dev\n",
        }),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("breaks the guest contract") && message.contains("user dev"),
        "{message}"
    );
    // A Dockerfile that does not build says why.
    let (status, body) = register(
        &server,
        &user,
        json!({
            "name": "broken", "dockerfile": "FROM hearth/base:latest\nRUN exit 7\n",
        }),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("did not build"), "{body}");
    assert_eq!(names(&server, &user).await, vec!["with-jq".to_string()]);

    // Private: its owner's only; someone else's is as unknown as none.
    let (status, mine) = register(
        &server,
        &user,
        json!({
            "name": "mine", "dockerfile": "FROM hearth/base:latest\nRUN touch /etc/mine\n",
        }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{mine}");
    assert_eq!(mine["visibility"], "private");
    assert_eq!(
        names(&server, &user).await,
        vec!["mine".to_string(), "with-jq".to_string()]
    );
    let other = server.user("other@example.com", "free").await;
    assert_eq!(names(&server, &other).await, vec!["with-jq".to_string()]);
    for image in ["mine", "nope"] {
        let r = server
            .call(
                "POST",
                "/v1/environments",
                Some(&other),
                Some(json!({"name": "x", "baseImage": image})),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
        assert!(
            r.body.to_string().contains("there is no image"),
            "{:?}",
            r.body
        );
    }
    // The free tier registers one; only admins offer images to everyone.
    let (status, body) = register(
        &server,
        &user,
        json!({
            "name": "second", "dockerfile": "FROM hearth/base:latest\n",
        }),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let (status, body) = register(
        &server,
        &other,
        json!({
            "name": "for-all", "visibility": "everyone", "dockerfile": "FROM hearth/base:latest\n",
        }),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let r = server
        .call("DELETE", "/v1/images/mine", Some(&other), None)
        .await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "someone else's image is not theirs to delete"
    );
    // A Dockerfile builds on the server's image or on images its author may use, by name:
    // never on what else the engine holds (another user's image, a snapshot), by any name.
    for base in [
        "mine".to_string(),
        format!("hearth-image:{}", mine["id"].as_str().unwrap()),
        "hearth-snapshot:anything".to_string(),
    ] {
        let (status, body) = register(
            &server,
            &other,
            json!({
                "name": "stolen", "dockerfile": format!("FROM {base}\n"),
            }),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{base}: {body}");
        assert!(body.to_string().contains("there is no image"), "{body}");
    }
    let (status, body) = register(&server, &other, json!({
        "name": "x", "dockerfile": "FROM hearth/base:latest AS one\nFROM hearth/base:latest\nCOPY --from=hearth-image:x /etc /x\n",
    }))
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, on_jq) = register(
        &server,
        &other,
        json!({
            "name": "on-jq", "dockerfile": "FROM with-jq\nRUN jq --version\n",
        }),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "an image for everyone is a base by its name: {on_jq}"
    );

    // `hearth image check` says the same from the command line.
    let binary = env!("CARGO_BIN_EXE_hearth");
    let out = tokio::process::Command::new(binary)
        .args(["image", "check", "hearth/base:latest"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("honours the guest contract"));

    // Removing: the environment of it runs on; the engine's images go.
    let r = server
        .call("DELETE", "/v1/images/mine", Some(&user), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = server
        .call("DELETE", "/v1/images/on-jq", Some(&other), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = server
        .call("DELETE", "/v1/images/with-jq", Some(&admin), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let out = server
        .call(
            "POST",
            &format!("/v1/environments/{env}/exec"),
            Some(&user),
            Some(json!({"code": "jq --version"})),
        )
        .await;
    assert_eq!(out.body["exitCode"], 0, "{:?}", out.body);
    let r = server
        .call(
            "DELETE",
            &format!("/v1/environments/{env}"),
            Some(&user),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    server.wait_env(&user, &env, "destroyed", UP).await;
    // Deleting an image a VM used only untagged it; once the VM is gone the reaper removes it.
    let started = std::time::Instant::now();
    while images_in_engine() != before {
        assert!(
            started.elapsed() < UP,
            "images left: {:?} (before: {before:?})",
            images_in_engine()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `docker build` of `dockerfile` (no context) as `tags[0]` with the other tags too, then
/// `docker save` of all of them into one tarball, then the tags removed from the engine:
/// what a user brings from another machine.
fn saved_tarball(dir: &std::path::Path, tags: &[&str], dockerfile: &str) -> std::path::PathBuf {
    use std::io::Write;
    // Layers of its own, never ones the build cache shares with another test's: the other
    // test builds the same `userdel` Dockerfile, and removing the tags below failed in CI
    // while a container ran from that shared layer.
    let (from, rest) = dockerfile.split_once('\n').unwrap();
    let dockerfile = format!("{from}\nLABEL hearth-test-tarball={}\n{rest}", tags[0]);
    let mut build = std::process::Command::new("docker")
        .args(["build", "-q", "-t", tags[0], "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    build
        .stdin
        .take()
        .unwrap()
        .write_all(dockerfile.as_bytes())
        .unwrap();
    assert!(build.wait().unwrap().success(), "docker build");
    for tag in &tags[1..] {
        let tagged = std::process::Command::new("docker")
            .args(["tag", tags[0], tag])
            .status()
            .unwrap();
        assert!(tagged.success());
    }
    let path = dir.join(format!("{}.tar", tags[0].replace([':', '/'], "-")));
    let saved = std::process::Command::new("docker")
        .args(["save", "-o"])
        .arg(&path)
        .args(tags)
        .status()
        .unwrap();
    assert!(saved.success(), "docker save");
    let removed = std::process::Command::new("docker")
        .arg("rmi")
        .args(tags)
        .output()
        .unwrap();
    assert!(removed.status.success(), "{removed:?}");
    path
}

fn engine_has(reference: &str) -> bool {
    std::process::Command::new("docker")
        .args(["image", "inspect", reference])
        .output()
        .unwrap()
        .status
        .success()
}

/// Images from tarballs (`POST /v1/images/import`, `hearth image import`): one saved
/// elsewhere loads under the name Hearth gives it (never the names it carries), is checked
/// and offered, and an environment of it has what it was built with; one that breaks the
/// guest contract, one that is not a tarball and one over the size allowed are refused with
/// the reason and leave nothing: no record, no image, no upload on the server's disk.
#[tokio::test]
async fn images_from_tarballs_on_docker() {
    let work = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let (own_tag, other_tag) = (
        format!("hearth-test-upload:{pid}"),
        format!("hearth-test-victim:{pid}"),
    );
    let good = saved_tarball(
        work.path(),
        &[&own_tag, &other_tag],
        "FROM hearth/base:latest\nRUN echo imported > /etc/imported-marker\n",
    );
    let bad = saved_tarball(
        work.path(),
        &[&format!("hearth-test-no-dev:{pid}")],
        "FROM hearth/base:latest\nRUN userdel -r dev\n",
    );
    let good_bytes = std::fs::read(&good).unwrap();
    let limit = good_bytes.len() + 1_000_000;
    let site = Site::new(Db::Sqlite)
        .await
        .with_env("HEARTH_IMAGE_UPLOAD_MAX_BYTES", &limit.to_string())
        .with_env("HEARTH_REAPER_INTERVAL_MS", "500");
    let server = site.start().await;
    let user = server.user("tarball@example.com", "pro").await;
    let before = images_in_engine();
    let http = reqwest::Client::new();
    let upload = |name: &str, body: Vec<u8>| {
        http.post(format!("{}/v1/images/import?name={name}", server.base))
            .bearer_auth(&user)
            .header("content-type", "application/x-tar")
            .body(body)
            .send()
    };
    let nothing_left = |what: &str| {
        let uploads: Vec<_> = std::fs::read_dir(site.data_dir().join("imports"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(uploads.is_empty(), "{what}: uploads left {uploads:?}");
    };

    // Through the command line, as a user would.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["image", "import", "imported"])
        .arg(&good)
        .env("HEARTH_URL", &server.base)
        .env("HEARTH_TOKEN", &user)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("image imported is ready"),
        "{out:?}"
    );
    let listed = server
        .call("GET", "/v1/images", Some(&user), None)
        .await
        .body;
    assert_eq!(listed["items"][0]["state"], "ready", "{listed}");
    assert!(
        listed["items"][0]["sizeBytes"].as_i64().unwrap() > 0,
        "{listed}"
    );
    nothing_left("after the import");
    assert!(
        !engine_has(&own_tag) && !engine_has(&other_tag),
        "the tarball's own names were given to the engine"
    );
    let imports = std::process::Command::new("docker")
        .args(["images", "-q", "hearth-import"])
        .output()
        .unwrap();
    assert!(imports.stdout.is_empty(), "an import's tag is left");
    let r = server
        .call(
            "POST",
            "/v1/environments",
            Some(&user),
            Some(json!({"name": "from-tarball", "baseImage": "imported"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let env = r.body["id"].as_str().unwrap().to_string();
    server.wait_env(&user, &env, "running", UP).await;
    let out = server
        .call(
            "POST",
            &format!("/v1/environments/{env}/exec"),
            Some(&user),
            Some(json!({"code": "cat /etc/imported-marker; id -un"})),
        )
        .await;
    assert_eq!(out.body["stdout"], "imported\ndev\n", "{:?}", out.body);

    // Refused with the reason, leaving nothing.
    let r = upload("no-dev", std::fs::read(&bad).unwrap())
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("guest contract"), "{body}");
    let r = upload("garbage", b"this is not a tarball\n".repeat(200))
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains("not a tar archive") || body.contains("no manifest.json"),
        "{body}"
    );
    // Over the limit: refused on its announced size, before the upload. curl sends
    // `Expect: 100-continue` for a large body, so it hears the refusal instead of a closed
    // connection.
    let mut padded = good_bytes;
    padded.resize(limit + 1, 0);
    let too_big = work.path().join("too-big.tar");
    std::fs::write(&too_big, padded).unwrap();
    let mut data = std::ffi::OsString::from("@");
    data.push(&too_big);
    let curl = tokio::process::Command::new("curl")
        .args(["-sS", "-X", "POST", "-w", "\n%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {user}"))
        .args(["-H", "Content-Type: application/x-tar", "--data-binary"])
        .arg(data)
        .arg(format!("{}/v1/images/import?name=too-big", server.base))
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&curl.stdout).to_string();
    assert!(said.ends_with("\n413"), "{said} {curl:?}");
    assert!(said.contains("HEARTH_IMAGE_UPLOAD_MAX_BYTES"), "{said}");
    // A body that announces no size is counted as it comes, and cut at the limit.
    let mut chunked = std::fs::read(&too_big).unwrap();
    chunked.truncate(limit + 1);
    let stream = futures::stream::iter(
        chunked
            .chunks(1 << 20)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = http
        .post(format!("{}/v1/images/import?name=too-big", server.base))
        .bearer_auth(&user)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let r = upload("Bad Name", b"x".to_vec()).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    nothing_left("after the refusals");
    assert_eq!(names(&server, &user).await, vec!["imported".to_string()]);

    // Removed with its environment gone: the engine is as it was.
    let r = server
        .call(
            "DELETE",
            &format!("/v1/environments/{env}"),
            Some(&user),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    server.wait_env(&user, &env, "destroyed", UP).await;
    let r = server
        .call("DELETE", "/v1/images/imported", Some(&user), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let started = std::time::Instant::now();
    while images_in_engine() != before {
        assert!(
            started.elapsed() < UP,
            "images left: {:?} (before: {before:?})",
            images_in_engine()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
