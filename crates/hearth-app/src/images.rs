//! Custom images: admins (for everyone or themselves) and users (for themselves, within
//! their tier's count) register an image built from a Dockerfile on a Docker host; it is
//! offered only once it honours the guest contract, which `check_image` tests the way a
//! VM is used: booted like an environment's, it must let user `dev` in over SSH with the
//! key Hearth hands it, and run a command. Environments of an image go on the host that
//! built it.
//!
//! An image may also come as a tarball (`docker save`), uploaded to this node's disk
//! (`<data dir>/imports`, at most `HEARTH_IMAGE_UPLOAD_MAX_BYTES`), loaded by the engine
//! under a name Hearth gives (never the names the tarball carries), then checked the same way.
//!
//! An image for VMs on agent hosts (`provider: agent`) is built the same way on a Docker
//! host, under `<reference>-vm`; its file system is exported to this node's disk
//! (`<data dir>/imports`) and sent to an agent host, which makes a VM's root file system of
//! it (the agent's `images.rs`); the Docker image and the file go once it has. Environments
//! of it go on that agent host.
//!
//! The build or import runs while the caller waits (bounded by `BUILD_LIMIT`); a node that
//! dies mid-way leaves a `building` row, which the reaper removes with whatever the engine
//! finished, and an upload file, which that node's reaper removes (`settle_images`).

use crate::App;
use crate::error::{AppError, AppResult};
use hearth_core::{HostHealth, HostKind, HostStatus, Role};
use hearth_guest::keys::KeyPair;
use hearth_guest::{SshPool, Target};
use hearth_provider::{HostRef, ImageMade, Provider, ProviderError, VmRef, VmSpec, VmState};
use hearth_store::{Image, StoreError, User};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What a VM image's build on a Docker host is tagged as, after its reference.
pub(crate) const VM_BUILD_SUFFIX: &str = "-vm";
/// How long a build may run.
const BUILD_LIMIT: Duration = Duration::from_secs(900);
/// Where uploaded tarballs wait, under the data directory.
const IMPORTS: &str = "imports";
/// How long an upload may send nothing before it is given up.
const UPLOAD_STALL: Duration = Duration::from_secs(60);
/// How long an upload may take in all.
const UPLOAD_LIMIT: Duration = Duration::from_secs(30 * 60);
/// Imports one node receives at once, and images for VMs it makes (each keeps up to two
/// copies of its tarball, or one of the image's file system, on this node's disk).
const IMPORTS_AT_ONCE: usize = 2;
static IMPORTS_UNDER_WAY: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(IMPORTS_AT_ONCE);
/// How long a checked image's VM may take to run and let `dev` in.
const CHECK_LIMIT: Duration = Duration::from_secs(60);
/// A Dockerfile's size.
pub const MAX_DOCKERFILE_BYTES: usize = 65_536;
/// The largest image a build may make (it is removed, and refused, past this).
pub const MAX_IMAGE_BYTES: i64 = 20_000_000_000;
/// How long a check's VM is the check's own: the reconciler leaves it alone this long.
pub const CHECK_VM_GRACE_MS: i64 = 5 * 60_000;

/// Whether `environment_id` is a check's VM made less than `CHECK_VM_GRACE_MS` ago
/// (`check-<epoch ms>-<random>`): older ones were left by a node that died mid-check.
pub fn is_fresh_check(environment_id: &str, now_ms: i64) -> bool {
    environment_id
        .strip_prefix("check-")
        .and_then(|rest| rest.split_once('-'))
        .and_then(|(ms, _)| ms.parse::<i64>().ok())
        .is_some_and(|made| now_ms - made < CHECK_VM_GRACE_MS)
}

/// Checks that `reference` on `host` honours the guest contract: a VM of it (made as an
/// environment's is, with a fresh key) runs, lets `dev` in over SSH with that key, and runs
/// `id -un`, which must say `dev`. The VM is removed whatever happened. The error says
/// what broke and what the image must do.
pub async fn check_image(
    provider: &dyn Provider,
    host: &HostRef,
    ssh: &SshPool,
    reference: &str,
    disk_gb: i64,
) -> Result<(), String> {
    let keys = KeyPair::generate();
    let made_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let check_id = format!(
        "check-{made_ms}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let spec = VmSpec {
        environment_id: check_id.clone(),
        name: hearth_provider::vm_name(&check_id),
        hostname: "image-check".into(),
        image: reference.to_string(),
        vcpus: 1,
        memory_mb: 512,
        disk_gb,
        gpus: 0,
        env: BTreeMap::new(),
        authorized_key: keys.public_openssh.clone(),
        labels: BTreeMap::new(),
    };
    let outcome = boot_and_log_in(provider, host, ssh, &spec, &keys).await;
    ssh.forget(&check_id).await;
    let vm = VmRef {
        name: spec.name.clone(),
        id: None,
    };
    if let Err(e) = provider.destroy(host, &vm).await {
        tracing::warn!(vm = %spec.name, error = %e, "could not remove an image check's VM (the reconciler will)");
    }
    outcome
}

async fn boot_and_log_in(
    provider: &dyn Provider,
    host: &HostRef,
    ssh: &SshPool,
    spec: &VmSpec,
    keys: &KeyPair,
) -> Result<(), String> {
    let vm = provider
        .ensure_created(host, spec)
        .await
        .map_err(|e| format!("a VM of it could not start: {e}"))?;
    let started = Instant::now();
    // The engine started it before `ensure_created` returned: anything but running (or
    // on its way) now means its start-up already ended.
    const ENDED: &str = "its VM stopped as soon as it started: its start-up failed (the base image's, \
                         /usr/local/sbin/hearth-init, needs user dev with a home and sshd, and keeps sshd running)";
    let (ssh_host, ssh_port) = loop {
        match provider
            .inspect(host, &vm)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(info) if info.state == VmState::Running => {
                if let (Some(h), Some(p)) = (info.ssh_host, info.ssh_port) {
                    break (h, p);
                }
            }
            Some(info) if info.state == VmState::Stopped => return Err(ENDED.into()),
            Some(_) => {}
            // Gone at once: its engine removed it when its start-up ended.
            None => return Err(ENDED.into()),
        }
        if started.elapsed() > CHECK_LIMIT {
            return Err(format!(
                "its VM did not run within {} s",
                CHECK_LIMIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let target = Target {
        environment_id: spec.environment_id.clone(),
        host: ssh_host,
        port: u16::try_from(ssh_port).map_err(|e| e.to_string())?,
        user: "dev".into(),
        private_key_openssh: keys.private_openssh.clone(),
        host_key: None,
    };
    let mut last = String::new();
    while started.elapsed() < CHECK_LIMIT {
        match ssh.probe(&target, Duration::from_millis(750)).await {
            Ok(_) => {
                let out = ssh
                    .exec(
                        &target,
                        &hearth_guest::ExecRequest {
                            code: "id -un".into(),
                            code_on_stdin: false,
                            working_dir: None,
                            env: BTreeMap::new(),
                            stdin: Vec::new(),
                            timeout: Duration::from_secs(10),
                            max_output: 1024,
                        },
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let who = String::from_utf8_lossy(&out.stdout).trim().to_string();
                return if who == "dev" {
                    Ok(())
                } else {
                    Err(format!("a login as dev runs commands as {who:?}"))
                };
            }
            Err(hearth_guest::GuestError::Auth(_)) => {
                return Err("sshd refused the key Hearth handed it for user dev: the image must have a user dev \
                            and its start-up must write HEARTH_AUTHORIZED_KEYS into /home/dev/.ssh/authorized_keys"
                    .into());
            }
            Err(e) => last = e.to_string(),
        }
        match provider
            .inspect(host, &vm)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(info) if info.state == VmState::Running => {}
            _ => return Err(ENDED.into()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "sshd did not let dev in within {} s ({last}): the image must run sshd on port 22",
        CHECK_LIMIT.as_secs()
    ))
}

/// How a VM image is made on a Docker host before its file system goes to an agent.
enum Stage<'a> {
    /// From this Dockerfile.
    Build(&'a str),
    /// From the `docker save` tarball at this path.
    Load(&'a std::path::Path),
}

/// The kind of host an image is made for: `docker` unless `provider` says `agent`.
fn image_kind(provider: Option<&str>) -> AppResult<HostKind> {
    match provider.map(|p| (p, HostKind::parse(p))) {
        None => Ok(HostKind::Docker),
        Some((_, Some(kind @ (HostKind::Docker | HostKind::Agent)))) => Ok(kind),
        Some((p, _)) => Err(AppError::Invalid(format!(
            "images are made for provider docker or agent, not {p:?}"
        ))),
    }
}

/// `import_image` of the tarball at `path`, given up after `BUILD_LIMIT`.
async fn load_within_limit(
    provider: &dyn Provider,
    host: &HostRef,
    reference: &str,
    path: &std::path::Path,
) -> Result<ImageMade, ProviderError> {
    tokio::time::timeout(BUILD_LIMIT, provider.import_image(host, reference, path))
        .await
        .unwrap_or_else(|_| {
            Err(ProviderError::Failed(format!(
                "the load took longer than {} s",
                BUILD_LIMIT.as_secs()
            )))
        })
}

fn take_import_permit() -> AppResult<tokio::sync::SemaphorePermit<'static>> {
    IMPORTS_UNDER_WAY.try_acquire().map_err(|_| {
        AppError::NoCapacity(format!(
            "{IMPORTS_AT_ONCE} image imports or images for VMs are being made on this server; try again in a few minutes"
        ))
    })
}

fn too_big(size: i64) -> AppError {
    AppError::Invalid(format!(
        "the image is {} GB, past the {} GB an image may have",
        size / 1_000_000_000,
        MAX_IMAGE_BYTES / 1_000_000_000
    ))
}

/// `build_image`, given up after `BUILD_LIMIT`.
async fn build_within_limit(
    provider: &dyn Provider,
    host: &HostRef,
    reference: &str,
    dockerfile: &str,
) -> Result<i64, ProviderError> {
    tokio::time::timeout(
        BUILD_LIMIT,
        provider.build_image(host, reference, dockerfile),
    )
    .await
    .unwrap_or_else(|_| {
        Err(ProviderError::Failed(format!(
            "the build took longer than {} s",
            BUILD_LIMIT.as_secs()
        )))
    })
}

/// A Dockerfile's logical lines: a trailing backslash joins the next line, comments and
/// blank lines are dropped (as the classic builder reads them).
fn logical_lines(dockerfile: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for raw in dockerfile.lines() {
        let trimmed = raw.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match raw.trim_end().strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(raw);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.trim().is_empty() {
        lines.push(current);
    }
    lines
}

/// The Dockerfile with every stage's base checked and named as the engine knows it: the
/// server's image, or an image the caller may use (by its name). Anything else is refused,
/// whatever the engine holds (other users' snapshots and private images are local images
/// too), as is a `COPY --from` that names anything but an earlier stage.
async fn confine_bases(app: &App, user: &User, dockerfile: &str) -> AppResult<String> {
    let mut stages: Vec<String> = Vec::new();
    let mut stage_count = 0usize;
    let mut out = Vec::new();
    for line in logical_lines(dockerfile) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let instruction = words
            .first()
            .map(|w| w.to_ascii_uppercase())
            .unwrap_or_default();
        if instruction == "FROM" {
            let (base, rest) = match words.get(1) {
                Some(b) if !b.starts_with("--") && !b.contains('$') => (*b, &words[2..]),
                _ => {
                    return Err(AppError::Invalid(format!(
                        "FROM names an image plainly (no flags, no variables): {}",
                        line.trim()
                    )));
                }
            };
            stage_count += 1;
            let engine_name = if base == app.config.image {
                base.to_string()
            } else {
                app.usable_image(user, base).await?.reference
            };
            match rest {
                [] => {}
                [as_word, name] if as_word.eq_ignore_ascii_case("as") => {
                    stages.push(name.to_ascii_lowercase())
                }
                _ => {
                    return Err(AppError::Invalid(format!(
                        "FROM takes an image and AS <name>: {}",
                        line.trim()
                    )));
                }
            }
            let mut rewritten = format!("FROM {engine_name}");
            if let [_, name] = rest {
                rewritten.push_str(&format!(" AS {name}"));
            }
            out.push(rewritten);
            continue;
        }
        for word in &words[1.min(words.len())..] {
            if let Some(from) = word.strip_prefix("--from=") {
                let earlier = stages.contains(&from.to_ascii_lowercase())
                    || from.parse::<usize>().is_ok_and(|i| i < stage_count);
                if !earlier {
                    return Err(AppError::Invalid(format!(
                        "--from names an earlier stage of this Dockerfile only: {}",
                        line.trim()
                    )));
                }
            }
            if word.starts_with("--mount") {
                return Err(AppError::Invalid(format!(
                    "RUN --mount is not offered: {}",
                    line.trim()
                )));
            }
        }
        out.push(line);
    }
    if !out.iter().any(|l| l.starts_with("FROM ")) {
        return Err(AppError::Invalid("the Dockerfile has no FROM".into()));
    }
    Ok(out.join("\n") + "\n")
}

fn too_large(max: u64) -> AppError {
    AppError::TooLarge(format!(
        "an image tarball may have at most {max} bytes (HEARTH_IMAGE_UPLOAD_MAX_BYTES)"
    ))
}

/// An image name: what creates name in `baseImage`; never a Docker reference, so it can
/// never name an engine's own image.
fn valid_name(name: &str) -> Result<(), String> {
    if uuid::Uuid::parse_str(name).is_ok() {
        return Err("an image name must not look like an image's id".into());
    }
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == b'_'
        });
    if ok {
        Ok(())
    } else {
        Err(
            "an image name is 1 to 63 of a-z, 0-9, '-', '.', '_', starting with a letter or digit"
                .into(),
        )
    }
}

impl App {
    /// Builds and checks an image from `dockerfile` on a Docker host, then offers it under
    /// `name`, for VMs on hosts of kind `provider` (`docker` or `agent`; `docker` when
    /// `None`). `everyone` needs the admin role.
    pub async fn register_image(
        &self,
        user: &User,
        name: &str,
        dockerfile: &str,
        everyone: bool,
        provider: Option<&str>,
    ) -> AppResult<Image> {
        let kind = image_kind(provider)?;
        valid_name(name).map_err(AppError::Invalid)?;
        if dockerfile.trim().is_empty()
            || dockerfile.len() > MAX_DOCKERFILE_BYTES
            || dockerfile.contains('\0')
        {
            return Err(AppError::Invalid(format!(
                "dockerfile must be 1 to {MAX_DOCKERFILE_BYTES} bytes of text"
            )));
        }
        let dockerfile = &confine_bases(self, user, dockerfile).await?;
        let _permit = if kind == HostKind::Docker {
            None
        } else {
            Some(take_import_permit()?)
        };
        let (image, host_ref, provider) = self.begin_image(user, name, everyone, kind).await?;
        let built = if kind == HostKind::Docker {
            build_within_limit(provider.as_ref(), &host_ref, &image.reference, dockerfile)
                .await
                .map(|size_bytes| ImageMade {
                    size_bytes,
                    min_disk_gb: None,
                })
        } else {
            let stage = Stage::Build(dockerfile);
            self.for_vms(&image, &host_ref, provider.as_ref(), stage)
                .await
        };
        self.offer_image(
            user,
            image,
            &host_ref,
            provider.as_ref(),
            built,
            "the Dockerfile did not build",
        )
        .await
    }

    /// Loads the image in an uploaded `docker save` tarball (`upload`, streamed to this
    /// node's disk, at most `image_upload_max_bytes`; `declared` is the size the request
    /// announced) on a Docker host, checks it as a built one is, and offers it under `name`,
    /// for VMs on hosts of kind `provider` as `register_image` does. The names the tarball
    /// carries are ignored. Run it in a task of its own: a caller that gives up mid-way
    /// would skip the clean-up.
    pub async fn import_image<E: std::fmt::Display>(
        &self,
        user: &User,
        name: &str,
        everyone: bool,
        provider: Option<&str>,
        declared: Option<u64>,
        upload: impl futures::Stream<Item = Result<bytes::Bytes, E>>,
    ) -> AppResult<Image> {
        let kind = image_kind(provider)?;
        valid_name(name).map_err(AppError::Invalid)?;
        let max = self.config.image_upload_max_bytes;
        if declared.is_some_and(|n| n > max) {
            return Err(too_large(max));
        }
        let _permit = take_import_permit()?;
        let (image, host_ref, provider) = self.begin_image(user, name, everyone, kind).await?;
        let dir = self.config.data_dir.join(IMPORTS);
        let path = dir.join(format!("{}.tar", image.id));
        let received = tokio::time::timeout(UPLOAD_LIMIT, self.receive_upload(&dir, &path, upload))
            .await
            .unwrap_or_else(|_| {
                Err(AppError::Timeout(format!(
                    "the upload took longer than {} minutes",
                    UPLOAD_LIMIT.as_secs() / 60
                )))
            });
        let loaded = match received {
            Ok(()) if kind == HostKind::Docker => {
                load_within_limit(provider.as_ref(), &host_ref, &image.reference, &path).await
            }
            Ok(()) => {
                self.for_vms(&image, &host_ref, provider.as_ref(), Stage::Load(&path))
                    .await
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                self.store.forget_image(&image.id).await?;
                return Err(e);
            }
        };
        let _ = tokio::fs::remove_file(&path).await;
        self.offer_image(
            user,
            image,
            &host_ref,
            provider.as_ref(),
            loaded,
            "the tarball did not load",
        )
        .await
    }

    /// Writes `upload` to `path`, refusing it past `image_upload_max_bytes`.
    async fn receive_upload<E: std::fmt::Display>(
        &self,
        dir: &std::path::Path,
        path: &std::path::Path,
        upload: impl futures::Stream<Item = Result<bytes::Bytes, E>>,
    ) -> AppResult<()> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let failed =
            |e: std::io::Error| AppError::Internal(format!("keeping the upload failed: {e}"));
        tokio::fs::create_dir_all(dir).await.map_err(failed)?;
        let mut file = tokio::fs::File::create(path).await.map_err(failed)?;
        let max = self.config.image_upload_max_bytes;
        let mut written = 0u64;
        let mut upload = std::pin::pin!(upload);
        loop {
            let Ok(next) = tokio::time::timeout(UPLOAD_STALL, upload.next()).await else {
                return Err(AppError::Timeout(format!(
                    "the upload stalled: nothing arrived for {} s",
                    UPLOAD_STALL.as_secs()
                )));
            };
            let Some(chunk) = next else {
                break;
            };
            let chunk =
                chunk.map_err(|e| AppError::Invalid(format!("the upload broke off: {e}")))?;
            written += chunk.len() as u64;
            if written > max {
                return Err(too_large(max));
            }
            file.write_all(&chunk).await.map_err(failed)?;
        }
        file.flush().await.map_err(failed)?;
        if written == 0 {
            return Err(AppError::Invalid(
                "the body is empty: send the tarball `docker save IMAGE` writes".into(),
            ));
        }
        Ok(())
    }

    /// Makes the image on a Docker host as `<reference>-vm` (`stage`: a build or a load),
    /// exports its file system and has the agent host `host` make `image` of it. The Docker
    /// image and the exported file are removed whatever happened (and, after a node died, by
    /// `remove_image_everywhere` and the reaper's sweep of images no record names).
    async fn for_vms(
        &self,
        image: &Image,
        host: &HostRef,
        agent: &dyn Provider,
        stage: Stage<'_>,
    ) -> Result<ImageMade, ProviderError> {
        let (builder, docker) = self
            .builder()
            .await
            .map_err(|e| ProviderError::Unavailable(e.to_string()))?;
        let staged = format!("{}{VM_BUILD_SUFFIX}", image.reference);
        let dir = self.config.data_dir.join(IMPORTS);
        let tarball = dir.join(format!("{}.rootfs.tar", image.id));
        let made = async {
            let size = match stage {
                Stage::Build(dockerfile) => {
                    build_within_limit(docker.as_ref(), &builder, &staged, dockerfile).await?
                }
                Stage::Load(path) => {
                    load_within_limit(docker.as_ref(), &builder, &staged, path)
                        .await?
                        .size_bytes
                }
            };
            // Before its file system is written to this node's disk.
            if size > MAX_IMAGE_BYTES {
                return Err(ProviderError::Failed(too_big(size).to_string()));
            }
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(|e| ProviderError::Failed(format!("keeping the file system: {e}")))?;
            let export = docker.export_image(&builder, &staged, &tarball, MAX_IMAGE_BYTES as u64);
            let bytes = tokio::time::timeout(BUILD_LIMIT, export)
                .await
                .unwrap_or_else(|_| {
                    Err(ProviderError::Failed(format!(
                        "the export took longer than {} s",
                        BUILD_LIMIT.as_secs()
                    )))
                })?;
            tracing::info!(image = %image.name, bytes, host = %host.name, "sending an image's file system to its agent host");
            agent.import_image(host, &image.reference, &tarball).await
        }
        .await;
        let _ = tokio::fs::remove_file(&tarball).await;
        if let Err(e) = docker.remove_image(&builder, &staged).await {
            tracing::warn!(image = %staged, error = %e, "could not remove a VM image's build (the reaper will)");
        }
        made
    }

    /// Removes what making `image` for VMs may have left on the Docker hosts (a node died
    /// mid-way): its build and its export's container.
    async fn remove_vm_builds(&self, image: &Image) -> AppResult<()> {
        let docker = self
            .providers
            .get(HostKind::Docker)
            .map_err(|e| AppError::Invalid(e.to_string()))?;
        let staged = format!("{}{VM_BUILD_SUFFIX}", image.reference);
        for host in self.store.hosts().await? {
            if host.kind == HostKind::Docker && host.health == HostHealth::Healthy {
                let _ = docker.remove_image(&self.host_ref(&host)?, &staged).await;
            }
        }
        Ok(())
    }

    /// A Docker host that answers, to build on.
    async fn builder(&self) -> AppResult<(HostRef, std::sync::Arc<dyn Provider>)> {
        let host = self.image_host(HostKind::Docker).await?;
        let provider = self
            .providers
            .get(HostKind::Docker)
            .map_err(|e| AppError::Invalid(e.to_string()))?;
        Ok((self.host_ref(&host)?, provider))
    }

    /// A host of `kind` that answers now.
    async fn image_host(&self, kind: HostKind) -> AppResult<hearth_store::Host> {
        let hosts: Vec<_> = self
            .store
            .hosts()
            .await?
            .into_iter()
            .filter(|h| h.kind == kind)
            .collect();
        if hosts.is_empty() {
            return Err(AppError::Invalid(format!(
                "images are built on a Docker host and kept on a host of kind {kind}, and this installation has no {kind} host"
            )));
        }
        hosts
            .into_iter()
            .find(|h| h.status == HostStatus::Ready && h.health == HostHealth::Healthy)
            .ok_or_else(|| {
                AppError::NoCapacity(format!(
                    "no {kind} host answers now to make the image; try again later"
                ))
            })
    }

    /// The record of a new image (`building`, under the caller's count) and the host of
    /// `kind` that will keep it.
    async fn begin_image(
        &self,
        user: &User,
        name: &str,
        everyone: bool,
        kind: HostKind,
    ) -> AppResult<(
        Image,
        hearth_provider::HostRef,
        std::sync::Arc<dyn Provider>,
    )> {
        if everyone && user.role != Role::Admin {
            return Err(AppError::Forbidden(
                "only admins offer images to everyone; leave visibility private".into(),
            ));
        }
        if kind != HostKind::Docker {
            // The builder must answer too, before anything is recorded.
            self.image_host(HostKind::Docker).await?;
        }
        let host = self.image_host(kind).await?;
        let host_ref = self.host_ref(&host)?;
        let provider = self
            .providers
            .get(kind)
            .map_err(|e| AppError::Invalid(e.to_string()))?;
        let max = if user.role == Role::Admin {
            1000
        } else {
            user.tier.max_images()
        };
        let visibility = if everyone { "everyone" } else { "private" };
        let image = self
            .store
            .begin_image(user, name, visibility, &host.id, max)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => AppError::Conflict(m),
                e => e.into(),
            })?;
        Ok((image, host_ref, provider))
    }

    /// Ends what `begin_image` started: an image that was made, within the size allowed and
    /// honouring the guest contract, is offered; otherwise it is removed with its record
    /// and the error says why (`failed` introduces the engine's reason).
    async fn offer_image(
        &self,
        user: &User,
        image: Image,
        host_ref: &hearth_provider::HostRef,
        provider: &dyn Provider,
        made: Result<ImageMade, ProviderError>,
        failed: &str,
    ) -> AppResult<Image> {
        let name = image.name.clone();
        let refuse = async |error: AppError| -> AppResult<Image> {
            let _ = provider.remove_image(host_ref, &image.reference).await;
            self.store.forget_image(&image.id).await?;
            Err(error)
        };
        let (size, min_disk_gb) = match made {
            Ok(made) if made.size_bytes > MAX_IMAGE_BYTES => {
                return refuse(too_big(made.size_bytes)).await;
            }
            Ok(made) => (made.size_bytes, made.min_disk_gb),
            // Down, busy or out of room: another time may do.
            Err(ProviderError::Unavailable(m)) => {
                return refuse(AppError::NoCapacity(format!(
                    "a host cannot make the image now; try again later: {m}"
                )))
                .await;
            }
            Err(e) => return refuse(AppError::Invalid(format!("{failed}:\n{e}"))).await,
        };
        let disk_gb = min_disk_gb.unwrap_or(2).max(2);
        if let Err(reason) =
            check_image(provider, host_ref, &self.ssh, &image.reference, disk_gb).await
        {
            return refuse(AppError::Invalid(format!(
                "image {name} breaks the guest contract: {reason}"
            )))
            .await;
        }
        let image = self.store.image_ready(&image.id, size, min_disk_gb).await?;
        let _ = self
            .store
            .audit(
                &user.id,
                "image_register",
                None,
                "success",
                Some(&name),
                None,
            )
            .await;
        Ok(image)
    }

    /// The images the caller may use.
    pub async fn images(&self, user: &User) -> AppResult<Vec<Image>> {
        Ok(self.store.images_for(&user.id).await?)
    }

    /// The image a create names, if the caller may use it; someone else's private image is
    /// as unknown as one that does not exist.
    pub(crate) async fn usable_image(&self, user: &User, name: &str) -> AppResult<Image> {
        let unknown = || {
            AppError::Invalid(format!(
                "there is no image {name:?}: baseImage is {:?} or an image of GET /v1/images",
                self.config.image
            ))
        };
        let image = match self.store.image_named(name).await {
            Ok(image) => image,
            Err(StoreError::NotFound) => return Err(unknown()),
            Err(e) => return Err(e.into()),
        };
        if image.owner_id != user.id && image.visibility != "everyone" {
            return Err(unknown());
        }
        if image.state != "ready" {
            return Err(AppError::InvalidState(format!(
                "image {name} is still being built"
            )));
        }
        Ok(image)
    }

    /// Removes an image (its owner's, or any for an admin). Environments made from it keep
    /// running.
    pub async fn delete_image(&self, user: &User, id_or_name: &str) -> AppResult<Image> {
        let image = match self.store.image_named(id_or_name).await {
            Ok(i) if i.owner_id == user.id || user.role == Role::Admin => i,
            Ok(_) | Err(StoreError::NotFound) => return Err(AppError::NotFound("image")),
            Err(e) => return Err(e.into()),
        };
        if image.state == "building" {
            return Err(AppError::InvalidState(
                "the image is still being built".into(),
            ));
        }
        self.remove_image_everywhere(&image).await?;
        let _ = self
            .store
            .audit(
                &user.id,
                "image_delete",
                None,
                "success",
                Some(&image.name),
                None,
            )
            .await;
        Ok(image)
    }

    async fn remove_image_everywhere(&self, image: &Image) -> AppResult<()> {
        match self.store.host(&image.host_id).await {
            Ok(host) => {
                if host.kind != HostKind::Docker {
                    self.remove_vm_builds(image).await?;
                }
                let host_ref = self.host_ref(&host)?;
                self.providers
                    .get(host.kind)
                    .map_err(|e| AppError::Invalid(e.to_string()))?
                    .remove_image(&host_ref, &image.reference)
                    .await
                    .map_err(|e| {
                        AppError::Unavailable(format!("removing the image failed: {e}"))
                    })?;
            }
            Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        self.store.forget_image(&image.id).await?;
        Ok(())
    }

    /// The reaper's part: a build whose builder died is removed, with what it made, and
    /// images no record names (untagged at a delete while a VM used them) once unused.
    pub async fn settle_images(&self, sweep: bool) -> anyhow::Result<()> {
        if sweep {
            self.remove_unrecorded_images(hearth_provider::docker::LABEL_IMAGE)
                .await?;
        }
        for image in self
            .store
            .stale_images(self.config.image_builder_lost.as_millis() as i64)
            .await?
        {
            tracing::info!(image = %image.name, "removing an image whose build never finished");
            if let Err(e) = self.remove_image_everywhere(&image).await {
                tracing::warn!(image = %image.name, error = %e, "could not remove an unfinished image");
            }
        }
        self.remove_lost_uploads();
        Ok(())
    }

    /// Removes this node's uploaded tarballs older than a build may last: their import
    /// ended with a node that died.
    fn remove_lost_uploads(&self) {
        let Ok(entries) = std::fs::read_dir(self.config.data_dir.join(IMPORTS)) else {
            return;
        };
        let lost = self.config.image_builder_lost;
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > lost));
            if old {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {
                        tracing::info!(file = %entry.path().display(), "removed an upload whose import never finished")
                    }
                    Err(e) => {
                        tracing::warn!(file = %entry.path().display(), error = %e, "could not remove a lost upload")
                    }
                }
            }
        }
    }
}
