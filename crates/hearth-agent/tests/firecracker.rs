//! The `firecracker` backend against a fake Firecracker that checks every request against
//! `spec/firecracker-api.yaml`: the path and method exist; the body's required fields are
//! there, with the declared types and enum values, and no undeclared field; and the order
//! holds: an operation the spec marks "Pre-boot only" never follows `InstanceStart` (and
//! one marked "Post-boot only" never precedes it), `InstanceStart` happens once,
//! `PATCH /vm` needs a started VM, and `PUT /snapshot/create` a paused one. A request that
//! breaks any of that is answered 400 with a `fault_message` and recorded as a violation.
//!
//! This binary is its own fake Firecracker process: run with `--api-sock PATH` (as the
//! backend runs `firecracker`), it serves the fake API on PATH, appends every request and
//! every violation to `PATH.log` and `PATH.violations`, and exits on `SendCtrlAltDel` as
//! Firecracker does when its guest reboots. Hence `harness = false` (libtest-mimic).
//!
//! Snapshots: `PUT /snapshot/create` writes the two files it names; `PUT /snapshot/load`
//! must come to a fresh process (nothing configured but the logger) and name files that
//! exist, and must give the new VM's vsock socket; a state file other than the one it
//! writes fails the load (400, not a violation), as a real Firecracker fails on a state it
//! cannot read. The vsock device is served as
//! Firecracker serves it (`CONNECT <port>` answered `OK <port>`), with a fake guest behind
//! it: it answers `ping` with `pong`, and an identity (`identify` … `end`) with
//! `identified`, writing what it was told to `PATH.identity`; a guest booted with a base
//! VM's config drive (`config-base.ext4`) first says `ready`, as the real one does once
//! sshd runs.
//!
//! What the fake cannot prove: that a real Firecracker boots the guest, that the guest's
//! network comes up on its tap, the jailer, that a real snapshot restores, and the guest's
//! side of vsock (`image::AWAIT_RESTORE`). There is no Firecracker binary, working KVM or
//! `vhost-vsock` here.

use hearth_agent::firecracker::{self, BootSpec, FcClient};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
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
    /// Something besides the logger and metrics was configured (a load must come first).
    configured: bool,
    /// Where the fake guest writes the identities it is told.
    identity_log: PathBuf,
    /// Booted with a base VM's config drive: its guest says `ready` first.
    base: bool,
    /// Every request, as `METHOD path`.
    log: Vec<String>,
    /// `SendCtrlAltDel` came: a real Firecracker exits when its guest reboots.
    ended: bool,
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
    if let (Some(choices), Some(s)) = (schema["enum"].as_array(), body.as_str())
        && !choices.iter().any(|c| c.as_str() == Some(s))
    {
        out.push(format!("{at} must be one of {choices:?}, got {s:?}"));
    }
}

/// The state file the fake writes on `PUT /snapshot/create` and can load.
const FAKE_VMSTATE: &[u8] = b"{\"fake\": \"vmstate\"}";

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
    if t == "/snapshot/load" {
        if fake.configured {
            problems.push("a snapshot load into a process already configured".into());
        }
        for file in [&body["snapshot_path"], &body["mem_backend"]["backend_path"]] {
            if !file.as_str().is_some_and(|f| Path::new(f).is_file()) {
                problems.push(format!("a snapshot load of {file}, which is no file"));
            }
        }
        if body["vsock_override"]["uds_path"].as_str().is_none() {
            problems.push("a snapshot load that would bind the saved VM's vsock socket".into());
        }
    }
    if !problems.is_empty() {
        let fault = problems.join("; ");
        fake.violations.push(format!("{method} {path}: {fault}"));
        return Err(fault);
    }
    // Not a fault of the client's: a state file Firecracker cannot read fails the load, as
    // a real one's does (the tests write such a file to make a restore fail).
    if t == "/snapshot/load"
        && body["snapshot_path"]
            .as_str()
            .and_then(|f| std::fs::read(f).ok())
            .is_none_or(|state| state != FAKE_VMSTATE)
    {
        return Err("Load snapshot error: cannot restore the microVM state".into());
    }
    if method == "PUT" && !matches!(t, "/logger" | "/metrics" | "/snapshot/load" | "/actions") {
        fake.configured = true;
    }
    if t == "/drives/{drive_id}"
        && method == "PUT"
        && body["path_on_host"]
            .as_str()
            .is_some_and(|p| p.ends_with("config-base.ext4"))
    {
        fake.base = true;
    }
    match t {
        "/snapshot/create" => {
            let snapshot = body["snapshot_path"].as_str().unwrap_or_default();
            let memory = body["mem_file_path"].as_str().unwrap_or_default();
            let written = std::fs::write(snapshot, FAKE_VMSTATE)
                .and_then(|()| std::fs::write(memory, vec![0x5a; 2 << 20]));
            if let Err(e) = written {
                return Err(format!("cannot write the snapshot: {e}"));
            }
        }
        "/vsock" => fake_guest(body["uds_path"].as_str().unwrap_or_default(), fake),
        "/snapshot/load" => fake_guest(
            body["vsock_override"]["uds_path"]
                .as_str()
                .unwrap_or_default(),
            fake,
        ),
        _ => {}
    }
    match (t, action) {
        ("/actions", Some("InstanceStart")) => fake.started = true,
        ("/actions", Some("SendCtrlAltDel")) => {
            fake.started = false;
            fake.ended = true;
        }
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

/// Serves a vsock device's socket at `uds` as Firecracker does for host-initiated
/// connections, with a fake guest behind it (see the module's comment).
fn fake_guest(uds: &str, fake: &Fake) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let _ = std::fs::remove_file(uds);
    let Ok(listener) = tokio::net::UnixListener::bind(uds) else {
        return;
    };
    let log = fake.identity_log.clone();
    let mut ready = fake.base;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            let says_ready = std::mem::take(&mut ready);
            tokio::spawn(async move {
                let mut port = tokio::io::BufReader::new(stream);
                let mut line = String::new();
                if port.read_line(&mut line).await.is_err() || line != "CONNECT 52\n" {
                    return;
                }
                let _ = port.get_mut().write_all(b"OK 1073741824\n").await;
                if says_ready {
                    let _ = port.get_mut().write_all(b"ready\n").await;
                }
                let mut told = Vec::new();
                loop {
                    let mut line = String::new();
                    if port.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let line = line.trim_end().to_string();
                    match line.as_str() {
                        "ping" => {
                            let _ = port.get_mut().write_all(b"pong\n").await;
                        }
                        "identify" => told.clear(),
                        "end" => {
                            let mut text = std::fs::read_to_string(&log).unwrap_or_default();
                            for entry in told.drain(..) {
                                text.push_str(&format!("{entry}\n"));
                            }
                            text.push_str("end\n");
                            let _ = std::fs::write(&log, text);
                            let _ = port.get_mut().write_all(b"identified\n").await;
                        }
                        _ => {
                            // `name hex-value`: written down decoded, one line each.
                            let (name, value) = line.split_once(' ').unwrap_or((&line, ""));
                            let value = hex::decode(value).unwrap_or_default();
                            let value = String::from_utf8_lossy(&value);
                            told.push(format!("{name}={}", value.trim_end().replace('\n', "\\n")));
                        }
                    }
                }
            });
        }
    });
}

/// Serves the fake on `socket`; returns its record.
fn serve(socket: &Path) -> Arc<Mutex<Fake>> {
    let fake = Arc::new(Mutex::new(Fake {
        identity_log: socket.with_extension("identity"),
        ..Fake::default()
    }));
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
        vsock_uds: "/vm/vsock.sock".into(),
    }
}

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
    let (snap, mem) = (dir.path().join("snap"), dir.path().join("mem"));
    let (snap, mem) = (snap.to_str().unwrap(), mem.to_str().unwrap());
    firecracker::snapshot(&client, snap, mem).await.unwrap();
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
                "PUT /network-interfaces/eth0",
                "PUT /vsock"
            ]
        );
    }
    // A fresh process loads the snapshot and runs.
    let socket2 = dir.path().join("fc2.sock");
    let fresh = serve(&socket2);
    let client2 = FcClient::new(&socket2);
    let uds = dir.path().join("v2.sock");
    firecracker::load(
        &client2,
        "/vm/firecracker.log",
        snap,
        mem,
        "hzfc1",
        uds.to_str().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(firecracker::state(&client2).await.unwrap(), "running");
    assert!(fresh.lock().unwrap().violations.is_empty());
}

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

/// The fake as a process: serves `socket` and writes down what it was asked.
fn fake_process(socket: PathBuf) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let fake = serve(&socket);
        let (log, violations) = (
            socket.with_extension("log"),
            socket.with_extension("violations"),
        );
        let (mut logged, mut reported) = (0, 0);
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let (lines, faults, ended) = {
                let f = fake.lock().unwrap();
                (
                    f.log[logged..].to_vec(),
                    f.violations[reported..].to_vec(),
                    f.ended,
                )
            };
            (logged, reported) = (logged + lines.len(), reported + faults.len());
            for (file, new) in [(&log, lines), (&violations, faults)] {
                let mut text: String = new.iter().map(|l| format!("{l}\n")).collect();
                if !text.is_empty() {
                    text.insert_str(0, &std::fs::read_to_string(file).unwrap_or_default());
                    std::fs::write(file, text).unwrap();
                }
            }
            if ended {
                std::process::exit(0);
            }
        }
    });
}

fn image() -> hearth_agent::image::VmImage {
    let dir = std::env::var("HEARTH_VM_IMAGE_DIR")
        .unwrap_or_else(|_| hearth_agent::DEFAULT_VM_IMAGE_DIR.into());
    hearth_agent::image::VmImage::open(Path::new(&dir))
        .expect("the VM image: run `hearth image build --vm` (make test does)")
}

fn tap_exists(slot: u16) -> bool {
    std::process::Command::new("ip")
        .args(["link", "show", &format!("hzfc{slot}")])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{}", pid.trim())).exists()
        && !std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
            .unwrap_or_default()
            .contains(") Z ")
}

/// The backend runs each VM as a Firecracker process of its own (this binary, as the fake),
/// on a tap device, with its SSH forwarded; a new agent adopts it; stop, start, a VM killed
/// behind its back, destroy; and every request every process got followed the spec.
async fn the_backend_runs_vm_processes_through_their_life() {
    use hearth_agent::vmm::{VmSpec, VmStatus, Vmm};
    // The firewall the agent sets up for tap devices applies (iptables-restore accepts it).
    hearth_agent::guard::confine_taps().unwrap();
    for (table, chain, target) in [
        ("filter", "INPUT", "HEARTH-TAPS-IN"),
        ("filter", "FORWARD", "HEARTH-TAPS-FWD"),
        ("nat", "POSTROUTING", "HEARTH-TAPS-NAT"),
    ] {
        let jumps = std::process::Command::new("iptables")
            .args(["-w", "-t", table, "-C", chain, "-j", target])
            .status()
            .unwrap();
        assert!(jumps.success(), "no jump from {chain} to {target}");
    }
    let state = tempfile::tempdir().unwrap();
    let config = fake_firecracker(state.path());
    let make = || backend(state.path(), &config);
    let host = make();
    let name = format!("hearth-fc-{}", std::process::id());
    let spec = VmSpec {
        name: name.clone(),
        environment_id: "fc".into(),
        hostname: "fc-one".into(),
        vcpus: 1,
        memory_mb: 256,
        disk_gb: 2,
        authorized_keys:
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeyKeyKeyKeyKeyKeyKeyKeyKeyKeyKeyKeyKeyKeyK test"
                .into(),
        labels: Default::default(),
        snapshot: None,
        image: None,
    };
    let record = host.create(&spec).await.unwrap();
    let slot = record.net_slot.expect("a tap slot");
    let dir = state.path().join("vms").join(&name);
    let pid = std::fs::read_to_string(dir.join("fc.pid")).unwrap();
    assert!(alive(&pid) && tap_exists(slot));
    let kernel = std::fs::read(
        state
            .path()
            .join(format!("vmlinux-{}", image().kernel_version)),
    )
    .unwrap();
    assert_eq!(&kernel[..4], b"\x7fELF", "Firecracker boots an ELF kernel");
    assert_eq!(
        std::fs::metadata(dir.join("disk.ext4")).unwrap().len(),
        2 << 30,
        "the raw disk has the VM's size"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", record.ssh_port)).is_ok(),
        "nothing forwards the VM's SSH"
    );
    assert_eq!(host.status(&name).await.unwrap(), Some(VmStatus::Running));
    host.pause(&name).await.unwrap();
    assert_eq!(host.status(&name).await.unwrap(), Some(VmStatus::Paused));
    host.resume(&name).await.unwrap();

    // A user's snapshot of the running VM: paused for the copy, running after; a VM made
    // from it starts with what the disk held, and may not have a smaller disk.
    let mark = b"hearth snapshot mark";
    {
        use std::os::unix::fs::FileExt;
        let disk = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("disk.ext4"))
            .unwrap();
        disk.write_all_at(mark, (2 << 30) - 4096).unwrap();
    }
    let snapshot = host.snapshot(&name, "snap-fc").await.unwrap();
    assert_eq!(snapshot.disk_gb, 2);
    assert!(snapshot.size_bytes > 0, "{snapshot:?}");
    assert_eq!(host.status(&name).await.unwrap(), Some(VmStatus::Running));
    assert!(!dir.join("paused-for-snapshot").exists());
    let made = VmSpec {
        name: format!("{name}-s"),
        environment_id: "fc-s".into(),
        snapshot: Some("snap-fc".into()),
        image: None,
        ..spec.clone()
    };
    let smaller = host
        .create(&VmSpec {
            disk_gb: 1,
            ..made.clone()
        })
        .await
        .unwrap_err();
    assert!(smaller.to_string().contains("at least"), "{smaller}");
    host.create(&made).await.unwrap();
    {
        use std::os::unix::fs::FileExt;
        let copied =
            std::fs::File::open(state.path().join("vms").join(&made.name).join("disk.ext4"))
                .unwrap();
        let mut read = vec![0u8; mark.len()];
        copied.read_exact_at(&mut read, (2 << 30) - 4096).unwrap();
        assert_eq!(read, mark);
    }
    host.destroy(&made.name).await.unwrap();
    assert!(host.remove_snapshot("snap-fc").await.unwrap());
    assert_eq!(host.snapshots().unwrap().find("snap-fc").unwrap(), None);

    // A new agent adopts the running VM: the same process, its SSH forwarded again.
    drop(host);
    let host = make();
    let listed = host.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].1, VmStatus::Running);
    assert_eq!(
        host.create(&spec).await.unwrap(),
        record,
        "a second create finds the first VM"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("fc.pid")).unwrap(),
        pid,
        "a second process was started"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", record.ssh_port)).is_ok());

    host.stop(&name).await.unwrap();
    assert!(
        !alive(&pid) && !tap_exists(slot),
        "stop left the process or the tap"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", record.ssh_port)).is_err());
    assert_eq!(host.status(&name).await.unwrap(), Some(VmStatus::Stopped));
    host.start(&name).await.unwrap();
    let second = std::fs::read_to_string(dir.join("fc.pid")).unwrap();
    assert!(second != pid && alive(&second) && tap_exists(slot));

    // The fake writes down its requests every 20 ms: wait for the second boot's.
    let waited = std::time::Instant::now();
    while std::fs::read_to_string(dir.join("fc.log"))
        .unwrap_or_default()
        .matches("PUT /actions")
        .count()
        < 3
    {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(10),
            "the second process never recorded its boot"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Killed behind the agent's back: reported stopped.
    std::process::Command::new("kill")
        .args(["-9", second.trim()])
        .status()
        .unwrap();
    let waited = std::time::Instant::now();
    while host.status(&name).await.unwrap() != Some(VmStatus::Stopped) {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(10),
            "a killed VM is still reported"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Both processes were driven as the spec says: two boots, pause and resume (twice: the
    // second for the snapshot), one stop.
    let violations = std::fs::read_to_string(dir.join("fc.violations")).unwrap_or_default();
    assert!(violations.is_empty(), "{violations}");
    let log = std::fs::read_to_string(dir.join("fc.log")).unwrap();
    assert_eq!(log.matches("PUT /logger").count(), 2, "{log}");
    assert_eq!(log.matches("PUT /actions").count(), 3, "{log}");
    assert_eq!(log.matches("PATCH /vm").count(), 4, "{log}");

    host.destroy(&name).await.unwrap();
    assert!(!dir.exists() && !tap_exists(slot));
    assert_eq!(host.list().await.unwrap().len(), 0);
}

/// A VM's disk is a copy of its image's: one that would leave the host's disk without the
/// room the VMs' disks grow into is refused with the reason, and nothing is made. The state
/// directory is a 64 MiB tmpfs (the agent keeps 2 GiB free).
async fn a_disk_copy_that_would_fill_the_host_is_refused() {
    use hearth_agent::firecracker_host::{FirecrackerConfig, FirecrackerHost};
    use hearth_agent::vmm::{VmSpec, Vmm};
    let state = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(state.path())
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a tmpfs (the tests run as root)");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(state.path().to_path_buf());
    let host = FirecrackerHost::new(
        state.path().to_path_buf(),
        image(),
        FirecrackerConfig {
            firecracker: std::env::current_exe().unwrap(),
            jailer: None,
            chroot_base: state.path().join("jail"),
        },
        "127.0.0.1",
    )
    .unwrap();
    let spec = VmSpec {
        name: format!("hearth-fc-full-{}", std::process::id()),
        environment_id: "fc-full".into(),
        hostname: "fc-full".into(),
        vcpus: 1,
        memory_mb: 256,
        disk_gb: 2,
        authorized_keys: String::new(),
        labels: Default::default(),
        snapshot: None,
        image: None,
    };
    let refused = host.create(&spec).await.unwrap_err().to_string();
    assert!(
        refused.contains("not enough disk space on the host for this VM's disk"),
        "{refused}"
    );
    assert!(host.record(&spec.name).unwrap().is_none());
    assert!(host.list().await.unwrap().is_empty());
}

/// Firecracker for a backend keeping its state in `state`: this binary, as the fake.
fn fake_firecracker(state: &Path) -> hearth_agent::firecracker_host::FirecrackerConfig {
    hearth_agent::firecracker_host::FirecrackerConfig {
        firecracker: std::env::current_exe().unwrap(),
        jailer: None,
        chroot_base: state.join("jail"),
    }
}

/// The `firecracker` backend on `state`, running `config`.
fn backend(
    state: &Path,
    config: &hearth_agent::firecracker_host::FirecrackerConfig,
) -> hearth_agent::firecracker_host::FirecrackerHost {
    hearth_agent::firecracker_host::FirecrackerHost::new(
        state.to_path_buf(),
        image(),
        config.clone(),
        "127.0.0.1",
    )
    .unwrap()
}

/// A VM of 1 vCPU, `memory_mb` and a 1 GB disk, its hostname and key made from its name.
fn small_vm(name: &str, memory_mb: i64, snapshot: Option<&str>) -> hearth_agent::vmm::VmSpec {
    hearth_agent::vmm::VmSpec {
        name: name.into(),
        environment_id: name.into(),
        hostname: format!("{name}-host"),
        vcpus: 1,
        memory_mb,
        disk_gb: 1,
        authorized_keys: format!("ssh-ed25519 AAAA {name}"),
        labels: Default::default(),
        snapshot: snapshot.map(str::to_string),
        image: None,
    }
}

/// Waits until the fake process of the VM in `dir` has written down `wanted` (it writes its
/// requests every 20 ms), and returns its log.
async fn fake_log_with(dir: &Path, wanted: &str) -> String {
    let waited = std::time::Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.join("fc.log")).unwrap_or_default();
        if log.contains(wanted) {
            return log;
        }
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(10),
            "no {wanted:?} in the log of {}:\n{log}",
            dir.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A user's snapshot of a running VM whose guest answers on vsock keeps its memory
/// (`PUT /snapshot/create`, `vmstate` and `memory` kept with the disk). A VM of the same
/// size made from it is a fresh process that loads them, never booted, on its own tap
/// device and vsock socket (the drives by their names in its own directory), and its guest
/// is told the new VM's identity and address. One of another size boots from the disk. A
/// VM an agent left half-restored is stopped by the next agent. Every request of every
/// process followed the spec.
async fn a_snapshot_keeps_a_vms_memory_and_a_vm_of_its_size_loads_it() {
    use hearth_agent::vmm::{VmStatus, Vmm};
    hearth_agent::guard::confine_taps().unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = fake_firecracker(state.path());
    let make = || backend(state.path(), &config);
    let host = make();
    let pid = std::process::id();
    let spec = small_vm;
    let vm_dir = |name: &str| state.path().join("vms").join(name);

    let source = format!("hearth-fcm-source-{pid}");
    host.create(&spec(&source, 256, None)).await.unwrap();
    let made = host.snapshot(&source, "with-memory").await.unwrap();
    assert_eq!(made.memory_bytes, 2 << 20, "{made:?}");
    assert!(made.size_bytes >= made.memory_bytes, "{made:?}");
    assert_eq!(host.status(&source).await.unwrap(), Some(VmStatus::Running));
    let kept = state.path().join("snapshots/with-memory");
    for file in ["disk.ext4", "memory", "vmstate", "memory.json"] {
        assert!(kept.join(file).is_file(), "no {file} in the snapshot");
    }
    assert!(
        !vm_dir(&source).join("memory").exists(),
        "left in the VM's directory"
    );

    let restored = format!("hearth-fcm-restored-{pid}");
    let record = host
        .create(&spec(&restored, 256, Some("with-memory")))
        .await
        .unwrap();
    assert_eq!(
        host.status(&restored).await.unwrap(),
        Some(VmStatus::Running)
    );
    let log = fake_log_with(&vm_dir(&restored), "PUT /snapshot/load").await;
    assert_eq!(
        log.lines()
            .filter(|l| !l.starts_with("GET"))
            .collect::<Vec<_>>(),
        ["PUT /logger", "PUT /snapshot/load"],
        "loaded, not booted"
    );
    let told = std::fs::read_to_string(vm_dir(&restored).join("fc.identity")).unwrap();
    let slot = record.net_slot.unwrap();
    let guest = std::net::Ipv4Addr::from(
        u32::from(std::net::Ipv4Addr::new(10, 234, 0, 0)) + u32::from(slot) * 4 + 2,
    );
    for line in [
        format!("hostname={restored}-host"),
        format!("authorized_keys=ssh-ed25519 AAAA {restored}"),
        format!("address={guest}/30"),
        format!("mac={}", hearth_agent::firecracker::guest_mac(&restored)),
    ] {
        assert!(
            told.lines().any(|l| l == line),
            "{line:?} not told:\n{told}"
        );
    }
    for name in ["machine-id", "seed", "ssh_host_ed25519_key", "clock"] {
        assert!(
            told.lines().any(|l| l.starts_with(&format!("{name}="))),
            "no {name} told:\n{told}"
        );
    }
    assert!(!vm_dir(&restored).join("restoring").exists());
    assert!(std::net::TcpStream::connect(("127.0.0.1", record.ssh_port)).is_ok());

    let booted = format!("hearth-fcm-booted-{pid}");
    host.create(&spec(&booted, 512, Some("with-memory")))
        .await
        .unwrap();
    let log = fake_log_with(&vm_dir(&booted), "PUT /actions").await;
    assert!(!log.contains("/snapshot/load"), "{log}");

    // A restore that fails (here Firecracker cannot read the saved state): that process
    // is killed, and the VM boots from the snapshot's disk in a new one.
    let state_file = kept.join("vmstate");
    let saved_state = std::fs::read(&state_file).unwrap();
    std::fs::write(&state_file, b"not a microVM state").unwrap();
    let fell_back = format!("hearth-fcm-fellback-{pid}");
    host.create(&spec(&fell_back, 256, Some("with-memory")))
        .await
        .unwrap();
    assert_eq!(
        host.status(&fell_back).await.unwrap(),
        Some(VmStatus::Running)
    );
    let log = fake_log_with(&vm_dir(&fell_back), "PUT /actions").await;
    let calls: Vec<&str> = log.lines().filter(|l| !l.starts_with("GET")).collect();
    let (load, boot) = (
        calls.iter().position(|c| *c == "PUT /snapshot/load"),
        calls.iter().position(|c| c.starts_with("PUT /actions")),
    );
    assert!(
        load.is_some() && load < boot,
        "tried the load, then booted: {log}"
    );
    assert!(!vm_dir(&fell_back).join("restoring").exists());
    std::fs::write(&state_file, saved_state).unwrap();

    // An agent that died before the restored guest took its identity: the next one stops
    // the VM, which then boots from its disk when started.
    std::fs::write(vm_dir(&restored).join("restoring"), b"").unwrap();
    drop(host);
    let host = make();
    host.recover().await;
    assert_eq!(
        host.status(&restored).await.unwrap(),
        Some(VmStatus::Stopped)
    );
    assert!(!vm_dir(&restored).join("restoring").exists());
    host.start(&restored).await.unwrap();
    fake_log_with(&vm_dir(&restored), "PUT /actions").await;

    for name in [&source, &restored, &booted, &fell_back] {
        let violations =
            std::fs::read_to_string(vm_dir(name).join("fc.violations")).unwrap_or_default();
        assert!(violations.is_empty(), "{name}: {violations}");
        host.destroy(name).await.unwrap();
    }
    assert!(host.remove_snapshot("with-memory").await.unwrap());
}

/// Base snapshots on a Firecracker host: the first VM of a size boots with the neutral
/// config drive, is saved once its guest says `ready`, and then takes its own identity
/// (its config drive switched to its own); the next VM of that size loads the saved memory,
/// never booted, and is told its own; one of another size makes another base snapshot. An
/// agent with another Firecracker removes them. Every request followed the spec.
async fn base_snapshots_make_later_vms_of_a_size_load_the_first_ones_memory() {
    use hearth_agent::firecracker_host::FirecrackerConfig;
    use hearth_agent::vmm::{VmStatus, Vmm};
    hearth_agent::guard::confine_taps().unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = fake_firecracker(state.path());
    let make =
        |config: &FirecrackerConfig| backend(state.path(), config).with_base_snapshots().unwrap();
    let host = make(&config);
    let pid = std::process::id();
    let spec = |name: &str, memory_mb: i64| small_vm(name, memory_mb, None);
    let vm_dir = |name: &str| state.path().join("vms").join(name);
    let told =
        |name: &str| std::fs::read_to_string(vm_dir(name).join("fc.identity")).unwrap_or_default();
    let kept = || {
        let mut ids: Vec<String> = std::fs::read_dir(state.path().join("fc-base-snapshots"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        ids.sort();
        ids
    };

    let first = format!("hearth-fcb-first-{pid}");
    host.create(&spec(&first, 256)).await.unwrap();
    let log = fake_log_with(&vm_dir(&first), "PATCH /drives/config").await;
    let calls: Vec<&str> = log.lines().filter(|l| !l.starts_with("GET")).collect();
    let at = |call: &str| calls.iter().position(|l| *l == call).unwrap();
    assert!(
        at("PUT /actions") < at("PUT /snapshot/create")
            && at("PUT /snapshot/create") < at("PATCH /drives/config"),
        "booted, saved, then given its own drive: {calls:?}"
    );
    assert!(
        told(&first).contains(&format!("hostname={first}-host")),
        "{}",
        told(&first)
    );
    assert!(!vm_dir(&first).join("config-base.ext4").exists());
    assert!(!vm_dir(&first).join("restoring").exists());
    assert_eq!(host.status(&first).await.unwrap(), Some(VmStatus::Running));
    let ids = kept();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(ids[0].starts_with("1c256m1g-"), "{ids:?}");
    for file in ["memory", "vmstate", "disk.ext4"] {
        assert!(
            state
                .path()
                .join("fc-base-snapshots")
                .join(&ids[0])
                .join(file)
                .is_file()
        );
    }

    let second = format!("hearth-fcb-second-{pid}");
    host.create(&spec(&second, 256)).await.unwrap();
    let log = fake_log_with(&vm_dir(&second), "PUT /snapshot/load").await;
    assert_eq!(
        log.lines()
            .filter(|l| !l.starts_with("GET"))
            .collect::<Vec<_>>(),
        ["PUT /logger", "PUT /snapshot/load"],
        "loaded, not booted"
    );
    assert!(told(&second).contains(&format!("hostname={second}-host")));
    assert!(!told(&second).contains(&first));

    let other = format!("hearth-fcb-other-{pid}");
    host.create(&spec(&other, 512)).await.unwrap();
    fake_log_with(&vm_dir(&other), "PATCH /drives/config").await;
    assert_eq!(kept().len(), 2, "{:?}", kept());

    for name in [&first, &second, &other] {
        let violations =
            std::fs::read_to_string(vm_dir(name).join("fc.violations")).unwrap_or_default();
        assert!(violations.is_empty(), "{name}: {violations}");
        host.destroy(name).await.unwrap();
    }
    // Another Firecracker binary (here: another path to it): the saved memory is not its.
    drop(host);
    let elsewhere = state.path().join("firecracker-elsewhere");
    std::os::unix::fs::symlink(&config.firecracker, &elsewhere).unwrap();
    let _host = make(&FirecrackerConfig {
        firecracker: elsewhere,
        ..config.clone()
    });
    assert!(kept().is_empty(), "{:?}", kept());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--api-sock") {
        return fake_process(PathBuf::from(&args[at + 1]));
    }
    let run = |test: fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>| {
        move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(test());
            Ok(())
        }
    };
    let tests = vec![
        libtest_mimic::Trial::test(
            "the_whole_life_of_a_vm_follows_the_spec",
            run(|| Box::pin(the_whole_life_of_a_vm_follows_the_spec())),
        ),
        libtest_mimic::Trial::test(
            "a_request_that_breaks_the_spec_fails",
            run(|| Box::pin(a_request_that_breaks_the_spec_fails())),
        ),
        libtest_mimic::Trial::test(
            "a_disk_copy_that_would_fill_the_host_is_refused",
            run(|| Box::pin(a_disk_copy_that_would_fill_the_host_is_refused())),
        ),
        libtest_mimic::Trial::test(
            "the_backend_runs_vm_processes_through_their_life",
            run(|| Box::pin(the_backend_runs_vm_processes_through_their_life())),
        ),
        libtest_mimic::Trial::test(
            "base_snapshots_make_later_vms_of_a_size_load_the_first_ones_memory",
            run(|| Box::pin(base_snapshots_make_later_vms_of_a_size_load_the_first_ones_memory())),
        ),
        libtest_mimic::Trial::test(
            "a_snapshot_keeps_a_vms_memory_and_a_vm_of_its_size_loads_it",
            run(|| Box::pin(a_snapshot_keeps_a_vms_memory_and_a_vm_of_its_size_loads_it())),
        ),
    ];
    // One at a time: the backend's tests each number their tap devices from 0 (under
    // nextest, whose processes run one test each, the `firecracker-taps` group does this).
    let mut arguments = libtest_mimic::Arguments::from_args();
    arguments.test_threads = Some(1);
    libtest_mimic::run(&arguments, tests).exit();
}
