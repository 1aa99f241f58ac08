//! The Firecracker driver against a fake Firecracker that checks every request against
//! `spec/firecracker-api.yaml`: the path and method exist; the body's required fields are
//! there, with the declared types and enum values, and no undeclared field; and the order
//! holds: an operation the spec marks "Pre-boot only" never follows `InstanceStart` (and
//! one marked "Post-boot only" never precedes it), `InstanceStart` happens once,
//! `PATCH /vm` needs a started VM, and `PUT /snapshot/create` a paused one. A request that
//! breaks any of that is answered 400 with a `fault_message` and recorded as a violation.
//!
//! What the fake cannot prove: that a real Firecracker boots the guest, and everything
//! around the process (the jailer, tap devices). There is no Firecracker binary or working
//! KVM here.

use hearth_agent::firecracker::{self, BootSpec, FcClient};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};

/// The spec, as JSON.
fn spec() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/spec/firecracker-api.yaml"
    ))
    .unwrap();
    serde_yaml::from_str(&text).unwrap()
}

#[derive(Default)]
struct Fake {
    started: bool,
    paused: bool,
    /// Every request, as `METHOD path`.
    log: Vec<String>,
    violations: Vec<String>,
}

/// The spec path template matching `path` (`/drives/{drive_id}` for `/drives/rootfs`).
fn template<'a>(spec: &'a Value, path: &str) -> Option<(&'a str, &'a Value)> {
    spec["paths"].as_object()?.iter().find_map(|(t, ops)| {
        let (ts, ps): (Vec<&str>, Vec<&str>) = (t.split('/').collect(), path.split('/').collect());
        let same = ts.len() == ps.len()
            && ts
                .iter()
                .zip(&ps)
                .all(|(a, b)| (a.starts_with('{') && !b.is_empty()) || a == b);
        same.then_some((t.as_str(), ops))
    })
}

fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => &spec["definitions"][r.trim_start_matches("#/definitions/")],
        None => schema,
    }
}

/// Problems of `body` against `schema` (objects checked recursively).
fn check(spec: &Value, schema: &Value, body: &Value, at: &str, out: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    let kind = schema["type"]
        .as_str()
        .unwrap_or(if schema["properties"].is_object() {
            "object"
        } else {
            ""
        });
    match kind {
        "object" => {
            let Some(obj) = body.as_object() else {
                return out.push(format!("{at} must be an object"));
            };
            for req in schema["required"].as_array().into_iter().flatten() {
                if !obj.contains_key(req.as_str().unwrap()) {
                    out.push(format!("{at}.{} is required", req.as_str().unwrap()));
                }
            }
            for (k, v) in obj {
                match schema["properties"].get(k) {
                    Some(p) => check(spec, p, v, &format!("{at}.{k}"), out),
                    None if schema["properties"].is_object() => {
                        out.push(format!("{at}.{k} is not in the spec"))
                    }
                    None => {}
                }
            }
        }
        "string" if !body.is_string() => out.push(format!("{at} must be a string")),
        "integer" if !body.is_i64() => out.push(format!("{at} must be an integer")),
        "boolean" if !body.is_boolean() => out.push(format!("{at} must be a boolean")),
        "array" if !body.is_array() => out.push(format!("{at} must be an array")),
        _ => {}
    }
    if let (Some(choices), Some(s)) = (schema["enum"].as_array(), body.as_str()) {
        if !choices.iter().any(|c| c.as_str() == Some(s)) {
            out.push(format!("{at} must be one of {choices:?}, got {s:?}"));
        }
    }
}

fn judge(
    spec: &Value,
    fake: &mut Fake,
    method: &str,
    path: &str,
    body: &Value,
) -> Result<Value, String> {
    fake.log.push(format!("{method} {path}"));
    let found = template(spec, path)
        .ok_or_else(|| format!("no path {path} in the spec"))
        .and_then(|(t, ops)| {
            ops.get(method.to_ascii_lowercase())
                .map(|op| (t, op))
                .ok_or_else(|| format!("{method} is not allowed on {t}"))
        });
    let (t, op) =
        found.inspect_err(|fault| fake.violations.push(format!("{method} {path}: {fault}")))?;
    let mut problems = Vec::new();
    if let Some(param) = op["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["in"] == "body")
    {
        if body.is_null() && param["required"] == true {
            problems.push("the body is required".to_string());
        } else if !body.is_null() {
            check(spec, &param["schema"], body, "body", &mut problems);
        }
    }
    let text = format!(
        "{} {}",
        op["summary"].as_str().unwrap_or(""),
        op["description"].as_str().unwrap_or("")
    );
    if text.contains("Pre-boot only") && fake.started {
        problems.push(format!(
            "{method} {t} is pre-boot only and came after InstanceStart"
        ));
    }
    if text.contains("Post-boot only") && !fake.started {
        problems.push(format!(
            "{method} {t} is post-boot only and came before InstanceStart"
        ));
    }
    let action = body["action_type"].as_str();
    if t == "/actions" && action == Some("InstanceStart") && fake.started {
        problems.push("InstanceStart came twice".into());
    }
    if t == "/vm" && !fake.started {
        problems.push("PATCH /vm before the VM started".into());
    }
    if t == "/snapshot/create" && !fake.paused {
        problems.push("a snapshot of a VM that is not paused".into());
    }
    if !problems.is_empty() {
        let fault = problems.join("; ");
        fake.violations.push(format!("{method} {path}: {fault}"));
        return Err(fault);
    }
    match (t, action) {
        ("/actions", Some("InstanceStart")) => fake.started = true,
        ("/actions", Some("SendCtrlAltDel")) => fake.started = false,
        ("/vm", _) => fake.paused = body["state"] == "Paused",
        ("/snapshot/load", _) => {
            fake.started = true;
            fake.paused = body["resume_vm"] != true;
        }
        _ => {}
    }
    if method == "GET" && t == "/" {
        let state = if !fake.started {
            "Not started"
        } else if fake.paused {
            "Paused"
        } else {
            "Running"
        };
        return Ok(
            json!({"app_name": "Firecracker", "id": "fake", "state": state, "vmm_version": "1.17.0-dev"}),
        );
    }
    Ok(Value::Null)
}

/// Serves the fake on `socket`; returns its record.
fn serve(socket: &std::path::Path) -> Arc<Mutex<Fake>> {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let spec = Arc::new(spec());
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    let state = fake.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (spec, state) = (spec.clone(), state.clone());
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (spec, state) = (spec.clone(), state.clone());
                async move {
                    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
                    let bytes = req.into_body().collect().await.unwrap().to_bytes();
                    let body: Value = if bytes.is_empty() {
                        Value::Null
                    } else {
                        serde_json::from_slice(&bytes).unwrap_or(json!("not JSON"))
                    };
                    let verdict = judge(&spec, &mut state.lock().unwrap(), &method, &path, &body);
                    let (status, text) = match verdict {
                        Ok(Value::Null) => (204, String::new()),
                        Ok(v) => (200, v.to_string()),
                        Err(fault) => (400, json!({"fault_message": fault}).to_string()),
                    };
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(text)))
                            .unwrap(),
                    )
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    fake
}

fn boot_spec() -> BootSpec {
    BootSpec {
        kernel: "/vm/vmlinux".into(),
        initrd: Some("/vm/initrd.gz".into()),
        boot_args: "console=ttyS0 reboot=k panic=1".into(),
        vcpus: 2,
        memory_mb: 1024,
        root_disk: "/vm/disk.ext4".into(),
        config_drive: "/vm/config.ext4".into(),
        tap: "hzfc0".into(),
        guest_mac: firecracker::guest_mac("hearth-test"),
        log_path: "/vm/firecracker.log".into(),
    }
}

#[tokio::test]
async fn the_whole_life_of_a_vm_follows_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fc.sock");
    let fake = serve(&socket);
    let client = FcClient::new(&socket);
    assert_eq!(firecracker::state(&client).await.unwrap(), "not started");
    firecracker::boot(&client, &boot_spec()).await.unwrap();
    assert_eq!(firecracker::state(&client).await.unwrap(), "running");
    firecracker::pause(&client).await.unwrap();
    assert_eq!(firecracker::state(&client).await.unwrap(), "paused");
    firecracker::resume(&client).await.unwrap();
    firecracker::snapshot(&client, "/vm/snap", "/vm/mem")
        .await
        .unwrap();
    assert_eq!(firecracker::state(&client).await.unwrap(), "paused");
    firecracker::resume(&client).await.unwrap();
    firecracker::stop(&client).await.unwrap();
    {
        let f = fake.lock().unwrap();
        assert!(f.violations.is_empty(), "{:?}", f.violations);
        let start = f.log.iter().position(|l| l == "PUT /actions").unwrap();
        assert_eq!(
            f.log[..start]
                .iter()
                .filter(|l| !l.starts_with("GET"))
                .cloned()
                .collect::<Vec<_>>(),
            [
                "PUT /logger",
                "PUT /boot-source",
                "PUT /machine-config",
                "PUT /drives/rootfs",
                "PUT /drives/config",
                "PUT /network-interfaces/eth0"
            ]
        );
    }
    // A fresh process loads the snapshot and runs.
    let socket2 = dir.path().join("fc2.sock");
    let fresh = serve(&socket2);
    let client2 = FcClient::new(&socket2);
    firecracker::load(&client2, "/vm/snap", "/vm/mem")
        .await
        .unwrap();
    assert_eq!(firecracker::state(&client2).await.unwrap(), "running");
    assert!(fresh.lock().unwrap().violations.is_empty());
}

#[tokio::test]
async fn a_request_that_breaks_the_spec_fails() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fc.sock");
    let fake = serve(&socket);
    let client = FcClient::new(&socket);
    // A required field missing, a wrong enum, an unknown field, an unknown path.
    for (method, path, body) in [
        ("PUT", "/machine-config", json!({"vcpu_count": 1})),
        ("PATCH", "/vm", json!({"state": "Sleeping"})),
        (
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": "/k", "kernel_args": "x"}),
        ),
        ("PUT", "/no-such-thing", json!({})),
    ] {
        let err = client.call(method, path, Some(body)).await.unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
    }
    // Order: a snapshot of a running VM, a drive after the start, a second start.
    firecracker::boot(&client, &boot_spec()).await.unwrap();
    assert!(
        client
            .call(
                "PUT",
                "/snapshot/create",
                Some(json!({"snapshot_path": "/s", "mem_file_path": "/m"}))
            )
            .await
            .is_err()
    );
    assert!(
        client
            .call(
                "PUT",
                "/drives/extra",
                Some(json!({"drive_id": "extra", "is_root_device": false}))
            )
            .await
            .is_err()
    );
    assert!(
        client
            .call(
                "PUT",
                "/actions",
                Some(json!({"action_type": "InstanceStart"}))
            )
            .await
            .is_err()
    );
    let violations = fake.lock().unwrap().violations.clone();
    assert_eq!(violations.len(), 7, "{violations:#?}");
    // Booting again on a started process breaks the order too: the driver reports it.
    let again = firecracker::boot(&client, &boot_spec()).await.unwrap_err();
    assert!(again.to_string().contains("pre-boot only"), "{again}");
}
