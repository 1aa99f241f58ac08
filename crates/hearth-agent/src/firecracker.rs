//! The `firecracker` backend's driver: Firecracker's REST API over its Unix socket, as
//! `spec/firecracker-api.yaml` (Firecracker 1.17.0-dev, beside this crate) specifies.
//!
//! A VM is one Firecracker process (`firecracker --api-sock <dir>/fc.sock`, or the jailer
//! when configured). Booting is a fixed sequence of pre-boot calls, then `InstanceStart`:
//! `PUT /logger`, `PUT /boot-source`, `PUT /machine-config`, `PUT /drives/rootfs`,
//! `PUT /drives/config` (the config drive, read-only), `PUT /network-interfaces/eth0`
//! (a tap device), `PUT /vsock` (the guest's identity channel, `image::AWAIT_RESTORE`),
//! `PUT /actions {InstanceStart}`. Pause and resume are `PATCH /vm`; a
//! snapshot pauses first and then `PUT /snapshot/create`; a snapshot is loaded into a fresh
//! process with `PUT /snapshot/load`, its tap device and vsock socket the new VM's. Stop is `SendCtrlAltDel`: the guest reboots and
//! Firecracker exits on the CPU reset (it has no power management).
//!
//! What is not proven here: there is no Firecracker binary and no working KVM on these
//! machines, so this driver is tested against a fake API server (`tests/firecracker.rs`) that
//! checks every request against the spec file: the path and method exist, the body has the
//! required fields with the right types and enum values and no unknown ones, and the order
//! holds (what the spec calls pre-boot never follows `InstanceStart`, `InstanceStart`
//! happens once, a snapshot needs a paused VM). That Firecracker boots this image, that the
//! tap device and NAT are right, and that the jailer's chroot paths work are not tested.
//!
//! Not built yet around this driver: spawning the process (or the jailer), the tap device
//! and NAT per VM, and an uncompressed `vmlinux` (Firecracker on x86_64 boots an ELF kernel;
//! the VM image holds Debian's compressed `vmlinuz`). The agent runs QEMU until those land.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum FcError {
    #[error("cannot reach Firecracker's API socket {0}: {1}")]
    Connect(String, String),
    #[error("Firecracker refused {method} {path} ({status}): {fault}")]
    Refused {
        method: String,
        path: String,
        status: u16,
        fault: String,
    },
    #[error("Firecracker's API failed: {0}")]
    Io(String),
}

/// A client of one Firecracker process's API socket.
pub struct FcClient {
    socket: PathBuf,
}

impl FcClient {
    pub fn new(socket: &Path) -> FcClient {
        FcClient {
            socket: socket.to_path_buf(),
        }
    }

    /// One request on a fresh connection (the API is local and cheap); `Null` for a 204.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, FcError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| FcError::Connect(self.socket.display().to_string(), e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| FcError::Io(e.to_string()))?;
        tokio::spawn(connection);
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| FcError::Io(e.to_string()))?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(request))
            .await
            .map_err(|_| FcError::Io(format!("{method} {path}: no answer within 10 s")))?
            .map_err(|e| FcError::Io(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| FcError::Io(e.to_string()))?
            .to_bytes();
        if status == 204 {
            return Ok(Value::Null);
        }
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            let fault = value["fault_message"]
                .as_str()
                .unwrap_or("no fault_message")
                .to_string();
            return Err(FcError::Refused {
                method: method.into(),
                path: path.into(),
                status,
                fault,
            });
        }
        Ok(value)
    }

    async fn put(&self, path: &str, body: impl Serialize) -> Result<(), FcError> {
        self.call(
            "PUT",
            path,
            Some(serde_json::to_value(body).expect("serializable")),
        )
        .await
        .map(|_| ())
    }
}

/// What one boot needs: paths as the Firecracker process sees them (inside the chroot when
/// the jailer is used).
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub kernel: String,
    pub initrd: Option<String>,
    pub boot_args: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub root_disk: String,
    pub config_drive: String,
    pub tap: String,
    pub guest_mac: String,
    pub log_path: String,
    /// The vsock device's socket, as Firecracker sees it.
    pub vsock_uds: String,
}

/// The guest's vsock context id: each VM has its own device, so every VM may have the same.
const GUEST_CID: u32 = 3;

/// `running`, `paused` or `not started`, from `GET /`.
pub async fn state(client: &FcClient) -> Result<String, FcError> {
    let info = client.call("GET", "/", None).await?;
    Ok(info["state"]
        .as_str()
        .unwrap_or("unknown")
        .to_ascii_lowercase())
}

/// Configures a fresh process and starts the guest.
pub async fn boot(client: &FcClient, spec: &BootSpec) -> Result<(), FcError> {
    client.put("/logger", json!({"log_path": spec.log_path, "level": "Warning", "show_level": true, "show_log_origin": false})).await?;
    let mut source = json!({"kernel_image_path": spec.kernel, "boot_args": spec.boot_args});
    if let Some(initrd) = &spec.initrd {
        source["initrd_path"] = json!(initrd);
    }
    client.put("/boot-source", source).await?;
    client
        .put(
            "/machine-config",
            json!({"vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mb, "smt": false}),
        )
        .await?;
    client
        .put("/drives/rootfs", json!({"drive_id": "rootfs", "path_on_host": spec.root_disk, "is_root_device": true, "is_read_only": false}))
        .await?;
    client
        .put("/drives/config", json!({"drive_id": "config", "path_on_host": spec.config_drive, "is_root_device": false, "is_read_only": true}))
        .await?;
    client
        .put(
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": spec.tap, "guest_mac": spec.guest_mac}),
        )
        .await?;
    client
        .put(
            "/vsock",
            json!({"guest_cid": GUEST_CID, "uds_path": spec.vsock_uds}),
        )
        .await?;
    client
        .put("/actions", json!({"action_type": "InstanceStart"}))
        .await
}

pub async fn pause(client: &FcClient) -> Result<(), FcError> {
    client
        .call("PATCH", "/vm", Some(json!({"state": "Paused"})))
        .await
        .map(|_| ())
}

pub async fn resume(client: &FcClient) -> Result<(), FcError> {
    client
        .call("PATCH", "/vm", Some(json!({"state": "Resumed"})))
        .await
        .map(|_| ())
}

/// A full snapshot of a running VM: it is paused first (Firecracker requires it) and left
/// paused; resume it to go on, or stop it.
pub async fn snapshot(
    client: &FcClient,
    snapshot_path: &str,
    mem_file_path: &str,
) -> Result<(), FcError> {
    if state(client).await? != "paused" {
        pause(client).await?;
    }
    client.put("/snapshot/create", json!({"snapshot_path": snapshot_path, "mem_file_path": mem_file_path, "snapshot_type": "Full"})).await
}

/// Loads a snapshot into a fresh process (its logger set first, the only call the spec
/// allows before a load) and resumes it, on the new VM's tap device and vsock socket. The
/// drives are opened by the paths they had when saved, which are relative to the VM's
/// directory (or its chroot), so they are the new VM's own.
pub async fn load(
    client: &FcClient,
    log_path: &str,
    snapshot_path: &str,
    mem_file_path: &str,
    tap: &str,
    vsock_uds: &str,
) -> Result<(), FcError> {
    client.put("/logger", json!({"log_path": log_path, "level": "Warning", "show_level": true, "show_log_origin": false})).await?;
    client
        .put(
            "/snapshot/load",
            json!({
                "snapshot_path": snapshot_path,
                "mem_backend": {"backend_type": "File", "backend_path": mem_file_path},
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": tap}],
                "vsock_override": {"uds_path": vsock_uds},
                "resume_vm": true
            }),
        )
        .await
}

/// Points a running VM's drive `drive_id` at another file (`PATCH /drives/{id}`).
pub async fn set_drive(client: &FcClient, drive_id: &str, path: &str) -> Result<(), FcError> {
    client
        .call(
            "PATCH",
            &format!("/drives/{drive_id}"),
            Some(json!({"drive_id": drive_id, "path_on_host": path})),
        )
        .await
        .map(|_| ())
}

/// Asks the guest to reboot, which ends the Firecracker process.
pub async fn stop(client: &FcClient) -> Result<(), FcError> {
    client
        .put("/actions", json!({"action_type": "SendCtrlAltDel"}))
        .await
}

/// A locally administered MAC for a VM, derived from its name (stable across restarts).
pub fn guest_mac(name: &str) -> String {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let b = h.to_be_bytes();
    format!(
        "06:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4]
    )
}
