//! `hearth`: the server (`serve`), the image builder (`image build`) and a client for the
//! HTTP API (`vm ...`).
//!
//! Exit codes: 0 done; 1 the operation failed (the VM ended in `error`, a request was
//! refused); 2 bad usage; 3 Hearth could not be reached or the token was refused;
//! `vm exec` exits with the remote command's code.

mod client;
mod ssh;
mod tunnel;

/// jemalloc, not glibc's malloc: after 50 clients read pages of 100 environments for 20 s
/// the server held 104 MiB with glibc's (its per-thread arenas keep what the load freed)
/// and 47-49 MiB with jemalloc, at the same throughput (BENCHMARKS.md, issue 16). It is
/// the process's `malloc` too (`unprefixed_malloc_on_supported_platforms`), so SQLite's
/// allocations, a page's JSON among them, come from it rather than from glibc's, where
/// they cost page faults (BENCHMARKS.md, issue 16).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings (its `malloc_conf`, read at start; unprefixed, as its `malloc` is). A background thread returns
/// freed pages to the system once their decay time (10 s) has passed, even when nothing
/// allocates: without it an idle server keeps what its start-up freed until the next
/// allocation, which may never come (idle RSS 34-35 MiB without, 28 MiB with; BENCHMARKS.md).
/// One such thread is enough here; jemalloc would start one per core.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "malloc_conf")]
pub static malloc_conf: &[u8; 48] = b"background_thread:true,max_background_threads:1\0";

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use client::{Client, Failure};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "Development VMs and sandboxes, self-hosted"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: API, workers and reconciler.
    Serve,
    /// Print the API's OpenAPI document (the web UI's types are generated from it).
    Openapi,
    /// Run the agent of a VM host (QEMU): joins an installation once, then serves it.
    Agent(AgentArgs),
    /// Guest images.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Your personal VM.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Your environments (several, under quota).
    Env {
        #[command(subcommand)]
        command: EnvCommand,
    },
    /// An interactive shell in an environment (your personal VM if no id is given).
    Ssh {
        id: Option<String>,
        /// Carry the environment's SSH server on standard input and output instead (for an
        /// SSH client's `ProxyCommand`; see `ssh-config`).
        #[arg(long)]
        stdio: bool,
    },
    /// Print an OpenSSH config entry per environment (`Host hearth-<slug>`, through
    /// `hearth ssh --stdio`), so ssh, scp, rsync and editors' remote SSH reach them
    /// through the API with your own key (given as `sshPublicKey` at creation).
    SshConfig {
        /// Where to write the environments' pinned host keys (default:
        /// ~/.config/hearth/known_hosts).
        #[arg(long)]
        known_hosts: Option<std::path::PathBuf>,
    },
    /// Copy a file into or out of an environment, through the API: `hearth cp ./local
    /// ENV:path` or `hearth cp ENV:path ./local` (paths in the environment are relative
    /// to its home directory, or absolute).
    Cp { from: String, to: String },
    /// Forward a local port to a port in an environment, through the API:
    /// `hearth port-forward ENV 8080:3000` (LOCAL:REMOTE, or one port for both; local 0
    /// picks a free one). Listens on 127.0.0.1 until interrupted.
    PortForward { id: String, ports: String },
    /// Git credentials for cloning private repositories (`env create --repo URL
    /// --git-credential NAME`).
    GitCredentials {
        #[command(subcommand)]
        command: GitCredentialsCommand,
    },
    /// Keep a server address and a token (read from standard input) for this user, so
    /// commands, and SSH's `ProxyCommand`, work without HEARTH_URL and HEARTH_TOKEN.
    Login {
        /// The server, e.g. https://hearth.example.com
        #[arg(long)]
        url: String,
    },
    /// Administration (admin role).
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum GitCredentialsCommand {
    List,
    /// Keep a credential; its secret (the token, or the key file's contents) is read from
    /// standard input and never shown again.
    Add {
        name: String,
        /// `https-token` or `ssh-key`.
        #[arg(long)]
        kind: String,
        /// Sent with an HTTPS token (`x-access-token` when left out).
        #[arg(long)]
        username: Option<String>,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum EnvCommand {
    /// Create an environment and wait until it runs.
    Create {
        name: String,
        #[arg(long)]
        vcpus: Option<i64>,
        #[arg(long)]
        memory_mb: Option<i64>,
        #[arg(long)]
        disk_gb: Option<i64>,
        #[arg(long)]
        duration_hours: Option<i64>,
        /// NAME=VALUE, repeatable; values are passed as data, never through a shell.
        #[arg(long = "env", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        /// A file whose contents run once in the guest after it boots.
        #[arg(long)]
        init_script: Option<std::path::PathBuf>,
        /// Your OpenSSH public key file, to SSH in yourself.
        #[arg(long)]
        ssh_key: Option<std::path::PathBuf>,
        /// A git repository cloned into the home directory before the init script runs.
        #[arg(long, value_name = "URL")]
        repo: Option<String>,
        /// The branch or tag of --repo to clone.
        #[arg(long = "ref", value_name = "BRANCH", requires = "repo")]
        git_ref: Option<String>,
        /// The stored git credential to clone --repo with (`hearth git-credentials`).
        #[arg(long, value_name = "NAME", requires = "repo")]
        git_credential: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    List {
        #[arg(long)]
        all: bool,
    },
    Show {
        id: String,
    },
    Start {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    Stop {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    Destroy {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Run a command; exits with its exit code.
    Exec {
        id: String,
        #[arg(long, default_value_t = 60)]
        timeout: i64,
        #[arg(long)]
        workdir: Option<String>,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Wait until the environment reaches a state.
    Wait {
        id: String,
        #[arg(long, default_value = "running")]
        state: String,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Its audit log.
    Audit {
        id: String,
    },
    /// Its command history.
    History {
        id: String,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// List users, or create one (prints its token).
    Users {
        #[arg(long, value_name = "EMAIL")]
        create: Option<String>,
        #[arg(long, default_value = "free")]
        tier: String,
        #[arg(long, default_value = "user")]
        role: String,
    },
    /// A one-time link with which a user sets their web UI password (an invitation, valid
    /// 7 days, or with --reset a reset, valid 1 hour). Prints the link.
    PasswordLink {
        /// The user's id (`hearth admin users` lists them).
        user: String,
        #[arg(long)]
        reset: bool,
    },
    /// Every personal VM with stats.
    Vms,
    /// Jobs, optionally by state (queued, running, succeeded, dead); --retry ID requeues a dead one.
    Jobs {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        retry: Option<i64>,
    },
    /// Hosts: the machines (or projects) VMs run on.
    Hosts {
        #[command(subcommand)]
        command: Box<HostsCommand>,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// Where the agent keeps its identity and VM records (0700).
    #[arg(
        long,
        env = "HEARTH_AGENT_STATE_DIR",
        default_value = "/var/lib/hearth/agent"
    )]
    state_dir: std::path::PathBuf,
    /// The VM image (`hearth image build --vm`).
    #[arg(long, env = "HEARTH_VM_IMAGE_DIR", default_value = hearth_agent::DEFAULT_VM_IMAGE_DIR)]
    image_dir: std::path::PathBuf,
    /// Where the agent's HTTPS API listens.
    #[arg(long, env = "HEARTH_AGENT_LISTEN", default_value = "127.0.0.1:9443")]
    listen: String,
    /// host:port the control plane reaches the API at (default: --listen). `auto`: the
    /// address this machine sends from towards the control plane, with --listen's port (a
    /// cloud instance that does not know its address beforehand).
    #[arg(long, env = "HEARTH_AGENT_ADVERTISE")]
    advertise: Option<String>,
    /// Where guests' SSH ports are forwarded from (an address the nodes and users reach);
    /// `auto` as for --advertise.
    #[arg(long, env = "HEARTH_AGENT_GUEST_ADDRESS", default_value = "127.0.0.1")]
    guest_address: String,
    /// First start only: the control plane's URL.
    #[arg(long, env = "HEARTH_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// First start only: from `hearth admin hosts join-token NAME`.
    #[arg(long, env = "HEARTH_JOIN_TOKEN")]
    join_token: Option<String>,
    /// auto (boot a probe under KVM and use it only if it works), kvm or tcg (qemu only).
    #[arg(long, env = "HEARTH_AGENT_ACCEL", default_value = "auto")]
    accel: String,
    /// The VMM: qemu, or firecracker (needs working KVM, root for tap devices, and the
    /// firecracker binary).
    #[arg(long, env = "HEARTH_AGENT_VMM", default_value = "qemu")]
    vmm: String,
    /// qemu: new VMs restore a snapshot of a booted VM of their size (made on the first
    /// create of that size; at most 8 sizes, one build at a time) instead of booting: about
    /// a second to SSH instead of eight under software emulation. firecracker: the first VM
    /// of a size is saved once booted, and later ones load it. `off` always boots.
    #[arg(long, env = "HEARTH_AGENT_BASE_SNAPSHOTS", default_value = "on", value_parser = ["on", "off"])]
    base_snapshots: String,
    #[arg(
        long,
        env = "HEARTH_FIRECRACKER",
        default_value = "/usr/local/bin/firecracker"
    )]
    firecracker: std::path::PathBuf,
    /// Run each Firecracker VM under this jailer, chrooted and as the VM user.
    #[arg(long, env = "HEARTH_JAILER")]
    jailer: Option<std::path::PathBuf>,
    /// The jailer's chroot base (on the same file system as the state directory).
    #[arg(long, env = "HEARTH_JAILER_CHROOT", default_value = "/srv/jailer")]
    jailer_chroot: std::path::PathBuf,
    #[arg(long, env = "HEARTH_AGENT_MAX_VMS", default_value_t = 50)]
    max_vms: i64,
    #[arg(long, env = "HEARTH_AGENT_MAX_VCPUS", default_value_t = 16)]
    max_vcpus: i64,
    #[arg(long, env = "HEARTH_AGENT_MAX_MEMORY_MB", default_value_t = 60000)]
    max_memory_mb: i64,
    #[arg(long, env = "HEARTH_AGENT_MAX_DISK_GB", default_value_t = 500)]
    max_disk_gb: i64,
}

#[derive(Subcommand)]
enum HostsCommand {
    /// Every host with its health and use.
    List,
    /// A one-time token with which `hearth agent` joins as host NAME.
    JoinToken {
        name: String,
        #[arg(long)]
        region: Option<String>,
        /// How long it may be used.
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: i64,
    },
    /// Add a host; it must answer first (nothing is added when it does not).
    Add {
        name: String,
        /// docker, ovh or sim (agents join by themselves: see join-token).
        #[arg(long, default_value = "docker")]
        kind: String,
        /// unix:///path/docker.sock, tcp://host:2376 (with --tls-*), ssh://user@host; sim://... for sim;
        /// ovh-eu, ovh-ca, ovh-us or a base URL for ovh (the credentials come from
        /// OVH_APPLICATION_KEY, OVH_APPLICATION_SECRET and OVH_CONSUMER_KEY).
        #[arg(long)]
        endpoint: Option<String>,
        /// The OVH project (an ovh host is one project and --region).
        #[arg(long)]
        ovh_project: Option<String>,
        /// Where the nodes reach the host's guests (Docker publishes SSH ports on it).
        #[arg(long)]
        guest_address: Option<String>,
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        gpu_model: Option<String>,
        #[arg(long)]
        gpu_count: Option<i64>,
        /// Required but for ovh hosts (whose capacity is their project's quota).
        #[arg(long)]
        max_vcpus: Option<i64>,
        #[arg(long)]
        max_memory_mb: Option<i64>,
        #[arg(long)]
        max_environments: Option<i64>,
        /// PEM files for a tcp:// Docker endpoint; the key is sealed in the database.
        #[arg(long)]
        tls_ca: Option<std::path::PathBuf>,
        #[arg(long)]
        tls_cert: Option<std::path::PathBuf>,
        #[arg(long)]
        tls_key: Option<std::path::PathBuf>,
        /// Kind-specific options as JSON (a sim host's latency and faults).
        #[arg(long)]
        options: Option<String>,
    },
    /// Change a host's capacity or options.
    Update {
        id: String,
        #[arg(long)]
        max_vcpus: Option<i64>,
        #[arg(long)]
        max_memory_mb: Option<i64>,
        #[arg(long)]
        max_environments: Option<i64>,
        #[arg(long)]
        options: Option<String>,
    },
    /// Take no new environments on it (what it runs stays).
    Drain { id: String },
    /// Take new environments again.
    Ready { id: String },
    /// Remove a host that holds no environment.
    Remove { id: String },
    /// Buy an agent host on OVH: an instance that installs `hearth agent` and joins as NAME.
    Provision {
        name: String,
        /// Where to buy it (only `ovh`).
        #[arg(long, default_value = "ovh")]
        provider: String,
        /// An OVH flavor of the region (b2-15, ...).
        #[arg(long)]
        flavor: String,
        /// The region (picks the ovh host there).
        #[arg(long)]
        region: Option<String>,
        /// The ovh host (project and region) to buy through, when several match.
        #[arg(long)]
        via: Option<String>,
        /// The URL the new host reaches this control plane at (default: HEARTH_URL).
        #[arg(long)]
        control_plane: Option<String>,
    },
    /// Sell a bought agent host: drain it, wait until its environments are gone, then
    /// delete its instance.
    Destroy {
        name: String,
        /// How long to wait for its environments to go.
        #[arg(long, default_value_t = 60)]
        wait_minutes: u64,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build the guest image from Debian packages (needs root and mmdebstrap): the Docker
    /// base image, or with `--vm` a VM host's kernel, initramfs and root disk.
    Build {
        #[arg(long, default_value = hearth_provider::image::DEFAULT_IMAGE)]
        tag: String,
        /// Rebuild even if an image from the same recipe exists.
        #[arg(long)]
        force: bool,
        /// Build the VM image (for `hearth agent` with QEMU or Firecracker) instead.
        #[arg(long)]
        vm: bool,
        /// Where the VM image goes.
        #[arg(long, env = "HEARTH_VM_IMAGE_DIR", default_value = hearth_agent::DEFAULT_VM_IMAGE_DIR)]
        dir: std::path::PathBuf,
    },
    /// Say whether a Docker image of the local engine honours the guest contract: a VM of
    /// it must let user `dev` in over SSH with the key Hearth hands it (what `POST
    /// /v1/images` checks before it offers an image). Exits 1 with the reason when not.
    Check {
        /// The image, as the engine names it (`hearth/base:latest`).
        name: String,
        /// The engine.
        #[arg(long, default_value = "unix:///var/run/docker.sock")]
        endpoint: String,
    },
    /// Upload an image as `docker save IMAGE > FILE` wrote it; the server loads it under
    /// NAME (never the names the file carries), checks the guest contract and offers it
    /// (`POST /v1/images/import`).
    Import {
        /// What creates will name in `baseImage`.
        name: String,
        /// The tarball.
        file: std::path::PathBuf,
        /// Offer it to everyone (admins only).
        #[arg(long)]
        everyone: bool,
        /// The kind of host its environments run on: docker, or agent (VMs).
        #[arg(long, default_value = "docker")]
        provider: String,
    },
}

#[derive(Args)]
struct Wait {
    /// Return once the request is accepted instead of waiting for the result.
    #[arg(long)]
    no_wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

#[derive(Subcommand)]
enum VmCommand {
    /// Create your VM (tier sizes unless given) and wait until it runs.
    Provision {
        #[arg(long)]
        vcpus: Option<i64>,
        #[arg(long)]
        memory_mb: Option<i64>,
        #[arg(long)]
        disk_gb: Option<i64>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Show your VM.
    Status {
        #[arg(long)]
        json: bool,
    },
    Start {
        #[command(flatten)]
        wait: Wait,
    },
    Stop {
        #[command(flatten)]
        wait: Wait,
    },
    /// Run a command in the VM; exits with its exit code.
    Exec {
        #[arg(long, default_value_t = 60)]
        timeout: i64,
        #[arg(long)]
        workdir: Option<String>,
        /// The command, run by the guest's shell (words are joined with spaces, as ssh does).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    Destroy {
        #[command(flatten)]
        wait: Wait,
    },
    /// The provisioning log.
    Logs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.exit_code)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Failure> {
    match cli.command {
        Command::Serve => serve().await,
        Command::Openapi => {
            println!("{}", hearth_server::api::openapi_json());
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => agent(args).await,
        Command::Image {
            command:
                ImageCommand::Build {
                    vm: true,
                    force,
                    dir,
                    ..
                },
        } => build_vm_image(&dir, force),
        Command::Image {
            command: ImageCommand::Build { tag, force, .. },
        } => build_image(&tag, force),
        Command::Image {
            command: ImageCommand::Check { name, endpoint },
        } => check_image(&name, &endpoint).await,
        Command::Image {
            command:
                ImageCommand::Import {
                    name,
                    file,
                    everyone,
                    provider,
                },
        } => import_image(&name, &file, everyone, &provider).await,
        Command::Vm { command } => vm(command).await,
        Command::Env { command } => env(command).await,
        Command::Admin { command } => admin(command).await,
        Command::Ssh { id, stdio: false } => ssh::run(&Client::from_env()?, id).await,
        Command::Ssh { id, stdio: true } => {
            let client = Client::from_env()?;
            let id = match id {
                Some(id) => id,
                None => s(&client.get("/v1/me/vm").await?, "environmentId"),
            };
            tunnel::stdio(&client, &id).await
        }
        Command::SshConfig { known_hosts } => {
            tunnel::ssh_config(&Client::from_env()?, known_hosts).await
        }
        Command::PortForward { id, ports } => {
            tunnel::port_forward(Client::from_env()?, &id, &ports).await
        }
        Command::Login { url } => login(url).await,
        Command::Cp { from, to } => copy(&from, &to).await,
        Command::GitCredentials { command } => git_credentials(command).await,
    }
}

/// `ENV:path`, when `spec` names a file in an environment (a local path holds no `:`
/// before its first `/`, or starts with `.` or `/`).
fn remote_path(spec: &str) -> Option<(&str, &str)> {
    if spec.starts_with(['.', '/']) {
        return None;
    }
    spec.split_once(':')
        .filter(|(env, path)| !env.is_empty() && !env.contains('/') && !path.is_empty())
}

/// `hearth cp`, with a progress bar.
async fn copy(from: &str, to: &str) -> Result<ExitCode, Failure> {
    let client = Client::from_env()?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
        )
        .expect("template"),
    );
    match (remote_path(from), remote_path(to)) {
        (None, Some((env, path))) => {
            let local = std::path::Path::new(from);
            let size = std::fs::metadata(local)
                .map_err(|e| Failure::usage(format!("cannot read {from}: {e}")))?
                .len();
            bar.set_length(size);
            bar.set_message("uploading");
            let written = client
                .upload(
                    reqwest::Method::PUT,
                    &format!("/v1/environments/{env}/files/content"),
                    &[("path", path)],
                    local,
                    &bar,
                    "sent; the environment is writing it",
                )
                .await;
            bar.finish_and_clear();
            let written = written?;
            eprintln!("{from} -> {env}:{path} ({} bytes)", written["size"]);
        }
        (Some((env, path)), None) => {
            // Into a directory: under the file's own name, as cp does.
            let mut local = std::path::PathBuf::from(to);
            if local.is_dir() {
                local.push(path.rsplit('/').next().unwrap_or(path));
            }
            bar.set_message("downloading");
            let got = client
                .download(
                    &format!("/v1/environments/{env}/files/content"),
                    &[("path", path)],
                    &local,
                    &bar,
                )
                .await;
            bar.finish_and_clear();
            eprintln!("{env}:{path} -> {} ({} bytes)", local.display(), got?);
        }
        _ => {
            return Err(Failure::usage(
                "give one local path and one ENV:path, e.g. `hearth cp ./notes.txt env_x:notes.txt`",
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `hearth git-credentials`.
async fn git_credentials(command: GitCredentialsCommand) -> Result<ExitCode, Failure> {
    let client = Client::from_env()?;
    match command {
        GitCredentialsCommand::List => {
            let list = client.get("/v1/me/git-credentials").await?;
            println!("{:<24} {:<12} USERNAME", "NAME", "KIND");
            for c in list["items"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<24} {:<12} {}",
                    s(&c, "name"),
                    s(&c, "kind"),
                    s(&c, "username")
                );
            }
        }
        GitCredentialsCommand::Add {
            name,
            kind,
            username,
        } => {
            let mut secret = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut secret).map_err(|e| {
                Failure::usage(format!("cannot read the secret from standard input: {e}"))
            })?;
            let secret = if kind == "ssh-key" {
                secret
            } else {
                secret.trim().to_string()
            };
            let mut body = json!({"name": name, "kind": kind, "secret": secret});
            if let Some(u) = username {
                body["username"] = json!(u);
            }
            let made = client.post("/v1/me/git-credentials", body).await?;
            println!("kept {} ({})", s(&made, "name"), s(&made, "kind"));
        }
        GitCredentialsCommand::Delete { name } => {
            hearth_core::validate::credential_name(&name).map_err(Failure::usage)?;
            client
                .delete(&format!("/v1/me/git-credentials/{name}"))
                .await?;
            println!("deleted {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `hearth login`: checks the token (read from standard input) against the server, then
/// keeps both.
async fn login(url: String) -> Result<ExitCode, Failure> {
    let mut token = String::new();
    std::io::stdin()
        .read_line(&mut token)
        .map_err(|e| Failure::usage(format!("cannot read the token from standard input: {e}")))?;
    let url = url.trim_end_matches('/').to_string();
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(Failure::usage(
            "give the token on standard input, e.g. `hearth login --url URL < token-file`",
        ));
    }
    let me = Client::new(url.clone(), token.clone())?
        .get("/v1/me")
        .await?;
    let path = client::save_login(&client::SavedLogin { url, token })?;
    eprintln!(
        "logged in as {}; kept in {}",
        s(&me, "email"),
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `hearth image import`: the upload with a progress bar, then a spinner while the server
/// loads and checks the image.
async fn import_image(
    name: &str,
    file: &std::path::Path,
    everyone: bool,
    provider: &str,
) -> Result<ExitCode, Failure> {
    let client = Client::from_env()?;
    let size = std::fs::metadata(file)
        .map_err(|e| Failure::usage(format!("cannot read {}: {e}", file.display())))?
        .len();
    let bar = ProgressBar::new(size);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
        )
        .expect("template"),
    );
    bar.set_message("uploading");
    let visibility = if everyone { "everyone" } else { "private" };
    let image = client
        .upload(
            reqwest::Method::POST,
            "/v1/images/import",
            &[
                ("name", name),
                ("visibility", visibility),
                ("provider", provider),
            ],
            file,
            &bar,
            "sent; the server is loading and checking it",
        )
        .await;
    bar.finish_and_clear();
    let image = image?;
    println!(
        "image {} is ready ({} MB); create environments of it with baseImage {:?}",
        image["name"].as_str().unwrap_or(name),
        image["sizeBytes"].as_i64().unwrap_or(0) / 1_000_000,
        image["name"].as_str().unwrap_or(name)
    );
    Ok(ExitCode::SUCCESS)
}

/// `hearth image check`: the guest contract, tested on the local engine with a VM of the
/// image that is removed afterwards.
async fn check_image(name: &str, endpoint: &str) -> Result<ExitCode, Failure> {
    let scratch = tempfile::tempdir().map_err(|e| Failure::failed(e.to_string()))?;
    let provider = hearth_provider::docker::DockerProvider::new(scratch.path().to_path_buf());
    let host = hearth_provider::HostRef {
        id: "image-check".into(),
        name: "the local engine".into(),
        kind: hearth_core::HostKind::Docker,
        endpoint: endpoint.to_string(),
        guest_address: "127.0.0.1".into(),
        tls: None,
        agent: None,
        ovh: None,
        region: None,
        options: serde_json::json!({}),
        installation_id: format!("image-check-{}", std::process::id()),
    };
    eprintln!("checking {name}: starting a VM of it and logging in as dev (up to 60 s)");
    match hearth_app::images::check_image(&provider, &host, &hearth_guest::SshPool::new(), name, 2)
        .await
    {
        Ok(()) => {
            println!(
                "{name} honours the guest contract: user dev logs in over SSH with the key Hearth hands it"
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(reason) => {
            println!("{name} breaks the guest contract: {reason}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn serve() -> Result<ExitCode, Failure> {
    // Everything the server writes (the database, its journal, keys, tokens) is for its
    // own user only.
    // SAFETY: umask has no preconditions; it only sets this process's file mode mask.
    unsafe {
        libc::umask(0o077);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,russh=warn".into()),
        )
        .init();
    let config = hearth_server::Config::from_env().map_err(Failure::usage)?;
    hearth_server::serve::run(config)
        .await
        .map_err(|e| Failure::failed(format!("{e:#}")))?;
    Ok(ExitCode::SUCCESS)
}

async fn agent(args: AgentArgs) -> Result<ExitCode, Failure> {
    use hearth_agent::vmm::Accel;
    // The agent's identity and the VMs' disks are for its own user only.
    // SAFETY: umask has no preconditions; it only sets this process's file mode mask.
    unsafe {
        libc::umask(0o077);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let accel = match args.accel.as_str() {
        "auto" => None,
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        other => {
            return Err(Failure::usage(format!(
                "--accel must be auto, kvm or tcg, got {other:?}"
            )));
        }
    };
    let backend = match args.vmm.as_str() {
        "qemu" => hearth_agent::run::Backend::Qemu,
        "firecracker" => hearth_agent::run::Backend::Firecracker(
            hearth_agent::firecracker_host::FirecrackerConfig {
                firecracker: args.firecracker,
                jailer: args.jailer,
                chroot_base: args.jailer_chroot,
            },
        ),
        other => {
            return Err(Failure::usage(format!(
                "--vmm must be qemu or firecracker, got {other:?}"
            )));
        }
    };
    let own_address = || {
        let url = args.control_plane.clone().ok_or_else(|| {
            Failure::usage(
                "`auto` addresses need --control-plane (the address is the one used to reach it)",
            )
        })?;
        address_towards(&url).map_err(Failure::usage)
    };
    let advertise = match args.advertise.as_deref() {
        Some("auto") => {
            let port = args
                .listen
                .rsplit_once(':')
                .map(|(_, p)| p)
                .unwrap_or("9443");
            format!("{}:{port}", own_address()?)
        }
        Some(a) => a.to_string(),
        None => args.listen.clone(),
    };
    let guest_address = match args.guest_address.as_str() {
        "auto" => own_address()?,
        a => a.to_string(),
    };
    let config = hearth_agent::run::AgentConfig {
        backend,
        state_dir: args.state_dir,
        image_dir: args.image_dir,
        advertise,
        listen: args.listen,
        guest_address,
        capacity: hearth_provider::agent::wire::Capacity {
            max_vms: args.max_vms,
            max_vcpus: args.max_vcpus,
            max_memory_mb: args.max_memory_mb,
            max_disk_gb: args.max_disk_gb,
        },
        accel,
        base_snapshots: args.base_snapshots == "on",
        control_plane: args.control_plane,
        join_token: args.join_token,
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    hearth_agent::run::run(config, shutdown)
        .await
        .map_err(|e| Failure::failed(format!("{e:#}")))?;
    Ok(ExitCode::SUCCESS)
}

fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}").expect("template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(message.to_string());
    bar
}

/// A fresh directory only this user can enter (mode 0700, a random name), never one that
/// already exists: the root filesystem of every guest is built in it.
fn image_work_dir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix("hearth-image-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
}

fn build_vm_image(dir: &std::path::Path, force: bool) -> Result<ExitCode, Failure> {
    use hearth_agent::image::{VmImage, build, recipe_hash};
    if !force && VmImage::is_current(dir) {
        println!(
            "the VM image in {} is up to date (recipe {})",
            dir.display(),
            recipe_hash()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let work = image_work_dir().map_err(|e| {
        Failure::failed(format!("cannot create a private temporary directory: {e}"))
    })?;
    let bar = spinner("starting");
    let started = Instant::now();
    let result = build(dir, work.path(), &mut |step| {
        bar.println(format!(
            "[{:>5.1}s] {step}",
            started.elapsed().as_secs_f64()
        ));
        bar.set_message(step.to_string());
    });
    bar.finish_and_clear();
    drop(work);
    let image = result.map_err(|e| Failure::failed(e.to_string()))?;
    println!(
        "built the VM image (kernel {}) into {} in {:.1}s",
        image.kernel_version,
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn build_image(tag: &str, force: bool) -> Result<ExitCode, Failure> {
    use hearth_provider::image;
    if !force && image::is_current(tag) {
        println!("{tag} is up to date (recipe {})", image::recipe_hash());
        return Ok(ExitCode::SUCCESS);
    }
    let work = image_work_dir().map_err(|e| {
        Failure::failed(format!("cannot create a private temporary directory: {e}"))
    })?;
    let bar = spinner("starting");
    let started = Instant::now();
    let result = image::build(tag, work.path(), &mut |step| {
        bar.println(format!(
            "[{:>5.1}s] {step}",
            started.elapsed().as_secs_f64()
        ));
        bar.set_message(step.to_string());
    });
    bar.finish_and_clear();
    drop(work);
    result.map_err(|e| Failure::failed(e.to_string()))?;
    println!("built {tag} in {:.1}s", started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

fn print_vm(vm: &Value) {
    let s = |k: &str| vm.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    let n = |k: &str| {
        vm.get(k)
            .and_then(Value::as_i64)
            .map(|v| v.to_string())
            .unwrap_or("-".into())
    };
    println!("id:      {}", s("id"));
    println!(
        "status:  {}{}",
        s("status"),
        vm.get("stateMessage")
            .and_then(Value::as_str)
            .map(|m| format!(" ({m})"))
            .unwrap_or_default()
    );
    println!(
        "size:    {} vCPUs, {} MB memory, {} GB disk",
        n("vcpus"),
        n("memoryMb"),
        n("diskGb")
    );
    if let (Some(host), Some(port)) = (
        vm.get("sshHost").and_then(Value::as_str),
        vm.get("sshPort").and_then(Value::as_i64),
    ) {
        println!("ssh:     {}@{host} -p {port}", s("sshUser"));
    }
    println!("runtime: {} min", n("totalRuntimeMinutes"));
}

/// What `wait_until` polls: the VM or an environment, its log, and how to show it.
struct Watch {
    path: String,
    logs: String,
    /// `status` for the personal VM, `state` for an environment.
    field: &'static str,
    noun: &'static str,
    /// The command that shows it again, for the timeout message.
    check: String,
    print: fn(&Value),
    /// The personal VM answers 404 once destroyed: that counts as reaching `destroyed`.
    gone_is_destroyed: bool,
}

impl Watch {
    fn vm() -> Watch {
        Watch {
            path: "/v1/me/vm".into(),
            logs: "/v1/me/vm/logs".into(),
            field: "status",
            noun: "VM",
            check: "hearth vm status".into(),
            print: print_vm,
            gone_is_destroyed: true,
        }
    }

    fn env(id: &str) -> Watch {
        Watch {
            path: format!("/v1/environments/{id}"),
            logs: format!("/v1/environments/{id}/logs"),
            field: "state",
            noun: "environment",
            check: format!("hearth env show {id}"),
            print: print_env,
            gone_is_destroyed: false,
        }
    }
}

/// Polls until the state is `want`, printing new log lines as they come; `error` (or an
/// unexpected `destroyed`) ends it with exit code 1. `requested` is the answer to the
/// request being waited for: a state it already had (say, the `error` a destroy was asked
/// to clear) is not the outcome, only a later generation is.
async fn wait_until(
    client: &Client,
    w: Watch,
    want: &str,
    timeout: u64,
    requested: &Value,
) -> Result<ExitCode, Failure> {
    let since = requested["generation"].as_i64().unwrap_or(i64::MIN);
    let bar = spinner("waiting");
    let started = Instant::now();
    let mut seen = 0usize;
    loop {
        if let Ok(logs) = client.get(&w.logs).await {
            let items = logs["items"].as_array().cloned().unwrap_or_default();
            // The log keeps the last 100 lines; print only what is new.
            for line in items.iter().skip(seen.min(items.len())) {
                bar.println(format!(
                    "  {:<7} {}",
                    line["level"].as_str().unwrap_or(""),
                    line["message"].as_str().unwrap_or("")
                ));
            }
            seen = items.len();
        }
        let current = match client.get(&w.path).await {
            Ok(v) => v,
            Err(f) if w.gone_is_destroyed && want == "destroyed" && f.status == Some(404) => {
                bar.finish_and_clear();
                println!("destroyed");
                return Ok(ExitCode::SUCCESS);
            }
            Err(f) => {
                bar.finish_and_clear();
                return Err(f);
            }
        };
        let state = s(&current, w.field);
        bar.set_message(state.clone());
        if state == want {
            bar.finish_and_clear();
            (w.print)(&current);
            return Ok(ExitCode::SUCCESS);
        }
        let newer = current["generation"].as_i64().is_none_or(|g| g > since);
        if (state == "error" || state == "destroyed") && newer {
            bar.finish_and_clear();
            (w.print)(&current);
            let reason = current["stateMessage"]
                .as_str()
                .unwrap_or("no reason given");
            return Err(Failure::failed(format!(
                "the {} is {state}: {reason}",
                w.noun
            )));
        }
        if started.elapsed() > Duration::from_secs(timeout) {
            bar.finish_and_clear();
            return Err(Failure::failed(format!(
                "still {state} after {timeout}s; `{}` to check again",
                w.check
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn vm(command: VmCommand) -> Result<ExitCode, Failure> {
    let client = Client::from_env()?;
    match command {
        VmCommand::Provision {
            vcpus,
            memory_mb,
            disk_gb,
            wait,
        } => {
            let mut body = serde_json::Map::new();
            for (k, v) in [
                ("vcpus", vcpus),
                ("memoryMb", memory_mb),
                ("diskGb", disk_gb),
            ] {
                if let Some(v) = v {
                    body.insert(k.into(), json!(v));
                }
            }
            let vm = client.post("/v1/me/vm", Value::Object(body)).await?;
            if wait.no_wait {
                print_vm(&vm);
                return Ok(ExitCode::SUCCESS);
            }
            wait_until(&client, Watch::vm(), "running", wait.timeout, &Value::Null).await
        }
        VmCommand::Status { json } => {
            let vm = client.get("/v1/me/vm").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vm).unwrap_or_default());
            } else {
                print_vm(&vm);
            }
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Start { wait } => {
            let requested = client.post("/v1/me/vm/start", json!({})).await?;
            if wait.no_wait {
                Ok(ExitCode::SUCCESS)
            } else {
                wait_until(&client, Watch::vm(), "running", wait.timeout, &requested).await
            }
        }
        VmCommand::Stop { wait } => {
            let requested = client.post("/v1/me/vm/stop", json!({})).await?;
            if wait.no_wait {
                Ok(ExitCode::SUCCESS)
            } else {
                wait_until(&client, Watch::vm(), "stopped", wait.timeout, &requested).await
            }
        }
        VmCommand::Destroy { wait } => {
            let requested = client.delete("/v1/me/vm").await?;
            if wait.no_wait {
                Ok(ExitCode::SUCCESS)
            } else {
                wait_until(&client, Watch::vm(), "destroyed", wait.timeout, &requested).await
            }
        }
        VmCommand::Exec {
            timeout,
            workdir,
            command,
        } => {
            let mut body = json!({ "code": command.join(" "), "timeoutSeconds": timeout });
            if let Some(dir) = workdir {
                body["workingDir"] = json!(dir);
            }
            let out = client.post("/v1/me/vm/exec", body).await?;
            print_exec(&out, timeout)
        }
        VmCommand::Logs => {
            let logs = client.get("/v1/me/vm/logs").await?;
            for line in logs["items"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{} {:<7} {}",
                    line["timestamp"].as_str().unwrap_or(""),
                    line["level"].as_str().unwrap_or(""),
                    line["message"].as_str().unwrap_or("")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn s(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(x) => x.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_env(e: &Value) {
    println!("id:      {}  ({})", s(e, "id"), s(e, "slug"));
    println!("name:    {}", s(e, "name"));
    println!(
        "state:   {}{}",
        s(e, "state"),
        e["stateMessage"]
            .as_str()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default()
    );
    println!(
        "size:    {} vCPUs, {} MB memory, {} GB disk",
        s(e, "vcpus"),
        s(e, "memoryMb"),
        s(e, "diskGb")
    );
    if let (Some(host), Some(port)) = (e["sshHost"].as_str(), e["sshPort"].as_i64()) {
        println!("ssh:     {}@{host} -p {port}", s(e, "sshUser"));
    }
    println!("expires: {}", s(e, "expiresAt"));
}

fn read_file(path: &std::path::Path, what: &str) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("cannot read {what} {}: {e}", path.display())))
}

async fn env(command: EnvCommand) -> Result<ExitCode, Failure> {
    let client = Client::from_env()?;
    match command {
        EnvCommand::Create {
            name,
            vcpus,
            memory_mb,
            disk_gb,
            duration_hours,
            vars,
            init_script,
            ssh_key,
            repo,
            git_ref,
            git_credential,
            wait,
        } => {
            let mut body = json!({ "name": name });
            for (k, v) in [
                ("repositoryUrl", repo),
                ("repositoryRef", git_ref),
                ("gitCredential", git_credential),
            ] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            for (k, v) in [
                ("vcpus", vcpus),
                ("memoryMb", memory_mb),
                ("diskGb", disk_gb),
                ("durationHours", duration_hours),
            ] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            let mut env_vars = serde_json::Map::new();
            for pair in vars {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    Failure::usage(format!("--env takes NAME=VALUE, got {pair:?}"))
                })?;
                env_vars.insert(k.to_string(), json!(v));
            }
            body["environmentVars"] = Value::Object(env_vars);
            if let Some(p) = init_script {
                body["initScript"] = json!(read_file(&p, "the init script")?);
            }
            if let Some(p) = ssh_key {
                body["sshPublicKey"] = json!(read_file(&p, "the public key")?.trim());
            }
            let e = client.post("/v1/environments", body).await?;
            println!("created {} ({})", s(&e, "id"), s(&e, "slug"));
            if wait.no_wait {
                return Ok(ExitCode::SUCCESS);
            }
            wait_until(
                &client,
                Watch::env(&s(&e, "id")),
                "running",
                wait.timeout,
                &Value::Null,
            )
            .await
        }
        EnvCommand::List { all } => {
            let list = client
                .get(&format!("/v1/environments?includeDestroyed={all}"))
                .await?;
            println!(
                "{:<12} {:<12} {:>5} {:>7}  {:<25} NAME",
                "SLUG", "STATE", "VCPUS", "MEM MB", "EXPIRES"
            );
            for e in list["items"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<12} {:<12} {:>5} {:>7}  {:<25} {}",
                    s(&e, "slug"),
                    s(&e, "state"),
                    s(&e, "vcpus"),
                    s(&e, "memoryMb"),
                    s(&e, "expiresAt"),
                    s(&e, "name")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        EnvCommand::Show { id } => {
            print_env(&client.get(&format!("/v1/environments/{id}")).await?);
            let a = client
                .get(&format!("/v1/environments/{id}/activity"))
                .await?;
            println!("activity: {}", s(&a, "reason"));
            Ok(ExitCode::SUCCESS)
        }
        EnvCommand::Start { id, wait } => {
            let requested = client
                .post(&format!("/v1/environments/{id}/start"), json!({}))
                .await?;
            if wait.no_wait {
                Ok(ExitCode::SUCCESS)
            } else {
                wait_until(
                    &client,
                    Watch::env(&id),
                    "running",
                    wait.timeout,
                    &requested,
                )
                .await
            }
        }
        EnvCommand::Stop { id, wait } => {
            let requested = client
                .post(&format!("/v1/environments/{id}/stop"), json!({}))
                .await?;
            if wait.no_wait {
                Ok(ExitCode::SUCCESS)
            } else {
                wait_until(
                    &client,
                    Watch::env(&id),
                    "stopped",
                    wait.timeout,
                    &requested,
                )
                .await
            }
        }
        EnvCommand::Destroy { id, wait } => {
            let requested = client.delete(&format!("/v1/environments/{id}")).await?;
            if wait.no_wait {
                Ok(ExitCode::SUCCESS)
            } else {
                wait_until(
                    &client,
                    Watch::env(&id),
                    "destroyed",
                    wait.timeout,
                    &requested,
                )
                .await
            }
        }
        EnvCommand::Exec {
            id,
            timeout,
            workdir,
            command,
        } => {
            let mut body = json!({ "code": command.join(" "), "timeoutSeconds": timeout });
            if let Some(dir) = workdir {
                body["workingDir"] = json!(dir);
            }
            let out = client
                .post(&format!("/v1/environments/{id}/exec"), body)
                .await?;
            print_exec(&out, timeout)
        }
        EnvCommand::Wait { id, state, timeout } => {
            wait_until(&client, Watch::env(&id), &state, timeout, &Value::Null).await
        }
        EnvCommand::Audit { id } => {
            let list = client
                .get(&format!("/v1/environments/{id}/audit?limit=1000"))
                .await?;
            for a in list["items"].as_array().cloned().unwrap_or_default() {
                let change = if a["newState"].is_string() {
                    format!("{} -> {}", s(&a, "previousState"), s(&a, "newState"))
                } else {
                    String::new()
                };
                println!(
                    "{} {:<18} {:<22} {:<8} {} {}",
                    s(&a, "at"),
                    s(&a, "actor"),
                    s(&a, "action"),
                    s(&a, "outcome"),
                    change,
                    a["error"].as_str().unwrap_or("")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        EnvCommand::History { id } => {
            let list = client
                .get(&format!("/v1/environments/{id}/executions?limit=1000"))
                .await?;
            for e in list["items"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{} exit={:<4} {:>6}ms {:<9} {}",
                    s(&e, "startedAt"),
                    s(&e, "exitCode"),
                    s(&e, "durationMs"),
                    s(&e, "status"),
                    s(&e, "command").replace('\n', "; ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_exec(out: &Value, timeout: i64) -> Result<ExitCode, Failure> {
    use std::io::Write;
    let _ = std::io::stdout().write_all(out["stdout"].as_str().unwrap_or("").as_bytes());
    let _ = std::io::stderr().write_all(out["stderr"].as_str().unwrap_or("").as_bytes());
    if out["timedOut"].as_bool() == Some(true) {
        return Err(Failure::failed(format!(
            "the command timed out after {timeout}s"
        )));
    }
    let code = out["exitCode"].as_i64().unwrap_or(255);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
}

async fn admin(command: AdminCommand) -> Result<ExitCode, Failure> {
    let client = Client::from_env()?;
    match command {
        AdminCommand::Users {
            create: Some(email),
            tier,
            role,
        } => {
            let r = client
                .post(
                    "/v1/admin/users",
                    json!({ "email": email, "tier": tier, "role": role }),
                )
                .await?;
            println!(
                "created {} ({}); token: {}",
                s(&r["user"], "email"),
                s(&r["user"], "id"),
                s(&r, "token")
            );
        }
        AdminCommand::Users { create: None, .. } => {
            let list = client.get("/v1/admin/users").await?;
            println!("{:<38} {:<6} {:<10} EMAIL", "ID", "ROLE", "TIER");
            for u in list["items"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<38} {:<6} {:<10} {}",
                    s(&u, "id"),
                    s(&u, "role"),
                    s(&u, "tier"),
                    s(&u, "email")
                );
            }
        }
        AdminCommand::PasswordLink { user, reset } => {
            let purpose = if reset { "reset" } else { "invite" };
            let r = client
                .post(
                    &format!("/v1/admin/users/{user}/password-link"),
                    json!({ "purpose": purpose }),
                )
                .await?;
            println!(
                "{}/ui/password?token={}",
                client.base().trim_end_matches('/'),
                s(&r, "token")
            );
            println!("valid until {}, once", s(&r, "expiresAt"));
        }
        AdminCommand::Vms => {
            let r = client.get("/v1/admin/vms").await?;
            let st = &r["stats"];
            println!(
                "total {}  running {}  stopped {}  provisioning {}  error {}  vCPUs {}/{}  memory {}/{} MB",
                s(st, "total"),
                s(st, "running"),
                s(st, "stopped"),
                s(st, "provisioning"),
                s(st, "error"),
                s(st, "vcpusRunning"),
                s(st, "vcpusTotal"),
                s(st, "memoryMbRunning"),
                s(st, "memoryMbTotal")
            );
            for v in r["vms"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<38} {:<12} {:>3} vCPU {:>6} MB  user {}",
                    s(&v, "id"),
                    s(&v, "status"),
                    s(&v, "vcpus"),
                    s(&v, "memoryMb"),
                    s(&v, "userId")
                );
            }
        }
        AdminCommand::Jobs {
            retry: Some(id), ..
        } => {
            let j = client
                .post(&format!("/v1/admin/jobs/{id}/retry"), json!({}))
                .await?;
            println!("job {} is {} again", s(&j, "id"), s(&j, "state"));
        }
        AdminCommand::Jobs { state, retry: None } => {
            let path = match state {
                Some(st) => format!("/v1/admin/jobs?state={st}"),
                None => "/v1/admin/jobs".into(),
            };
            for j in client.get(&path).await?["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                println!(
                    "{:>6} {:<9} {:<9} {:<9} {}/{} {} {}",
                    s(&j, "id"),
                    s(&j, "queue"),
                    s(&j, "kind"),
                    s(&j, "state"),
                    s(&j, "attempts"),
                    s(&j, "maxAttempts"),
                    s(&j, "environmentId"),
                    j["lastError"].as_str().unwrap_or("")
                );
            }
        }
        AdminCommand::Hosts { command } => return hosts(&client, *command).await,
    }
    Ok(ExitCode::SUCCESS)
}

fn print_host(h: &Value) {
    println!(
        "{} {:<24} {:<6} {:<9} {:<9} vCPUs {}/{}  memory {}/{} MB  environments {}/{}  {}{}{}",
        s(h, "id"),
        s(h, "name"),
        s(h, "kind"),
        s(h, "status"),
        s(h, "health"),
        s(h, "usedVcpus"),
        s(h, "maxVcpus"),
        s(h, "usedMemoryMb"),
        s(h, "maxMemoryMb"),
        s(h, "usedEnvironments"),
        s(h, "maxEnvironments"),
        s(h, "endpoint"),
        reported(&h["report"]),
        h["healthMessage"]
            .as_str()
            .map(|m| format!("  ({m})"))
            .unwrap_or_default()
    );
}

/// What a host said of itself, as `  [version 0.1.0, accel tcg, vms 2 (running 1)]`.
fn reported(report: &Value) -> String {
    let Some(fields) = report.as_object() else {
        return String::new();
    };
    let mut parts: Vec<String> = Vec::new();
    for key in ["version", "backend", "accel", "vms", "containers"] {
        if let Some(v) = fields.get(key).filter(|v| !v.is_null()) {
            let v = v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            let running = fields
                .get("running")
                .filter(|_| key == "vms" || key == "containers");
            parts.push(match running {
                Some(r) => format!("{key} {v} (running {r})"),
                None => format!("{key} {v}"),
            });
        }
    }
    format!("  [{}]", parts.join(", "))
}

fn json_arg(text: Option<String>, what: &str) -> Result<Option<Value>, Failure> {
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| Failure::usage(format!("{what} must be JSON: {e}")))
    })
    .transpose()
}

async fn hosts(client: &Client, command: HostsCommand) -> Result<ExitCode, Failure> {
    match command {
        HostsCommand::List => {
            for h in client.get("/v1/admin/hosts").await?["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                print_host(&h);
            }
        }
        HostsCommand::Add {
            name,
            kind,
            endpoint,
            ovh_project,
            guest_address,
            region,
            gpu_model,
            gpu_count,
            max_vcpus,
            max_memory_mb,
            max_environments,
            tls_ca,
            tls_cert,
            tls_key,
            options,
        } => {
            let mut body = json!({ "name": name, "kind": kind });
            if kind == "ovh" {
                let var = |name: &str| {
                    std::env::var(name).map_err(|_| {
                        Failure::usage(format!("an ovh host needs {name} in the environment (its credentials are never taken on the command line)"))
                    })
                };
                body["ovhCredentials"] = json!({
                    "applicationKey": var("OVH_APPLICATION_KEY")?,
                    "applicationSecret": var("OVH_APPLICATION_SECRET")?,
                    "consumerKey": var("OVH_CONSUMER_KEY")?,
                });
                let project =
                    ovh_project.ok_or_else(|| Failure::usage("an ovh host needs --ovh-project"))?;
                let mut o = json_arg(options.clone(), "--options")?.unwrap_or_else(|| json!({}));
                o["projectId"] = json!(project);
                body["options"] = o;
            }
            for (k, v) in [
                ("endpoint", endpoint),
                ("guestAddress", guest_address),
                ("region", region),
                ("gpuModel", gpu_model),
            ] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            for (k, v) in [
                ("gpuCount", gpu_count),
                ("maxVcpus", max_vcpus),
                ("maxMemoryMb", max_memory_mb),
                ("maxEnvironments", max_environments),
            ] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            for (k, path) in [
                ("tlsCa", tls_ca),
                ("tlsCert", tls_cert),
                ("tlsKey", tls_key),
            ] {
                if let Some(p) = path {
                    body[k] = json!(read_file(&p, k)?);
                }
            }
            if body.get("options").is_none()
                && let Some(o) = json_arg(options, "--options")?
            {
                body["options"] = o;
            }
            let h = client.post("/v1/admin/hosts", body).await?;
            print_host(&h);
        }
        HostsCommand::Update {
            id,
            max_vcpus,
            max_memory_mb,
            max_environments,
            options,
        } => {
            let mut body = json!({});
            for (k, v) in [
                ("maxVcpus", max_vcpus),
                ("maxMemoryMb", max_memory_mb),
                ("maxEnvironments", max_environments),
            ] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            if let Some(o) = json_arg(options, "--options")? {
                body["options"] = o;
            }
            print_host(&client.patch(&format!("/v1/admin/hosts/{id}"), body).await?);
        }
        HostsCommand::JoinToken {
            name,
            region,
            ttl_seconds,
        } => {
            let t = client
                .post(
                    "/v1/admin/hosts/join-tokens",
                    json!({"name": name, "region": region, "ttlSeconds": ttl_seconds}),
                )
                .await?;
            println!(
                "join token for host {} (good for one join, until {}):",
                s(&t, "hostName"),
                s(&t, "expiresAt")
            );
            println!("{}", s(&t, "token"));
            println!(
                "on the VM host: hearth agent --control-plane URL --join-token TOKEN --advertise HOST:PORT --guest-address HOST"
            );
        }
        HostsCommand::Drain { id } => print_host(
            &client
                .post(&format!("/v1/admin/hosts/{id}/drain"), json!({}))
                .await?,
        ),
        HostsCommand::Ready { id } => print_host(
            &client
                .post(&format!("/v1/admin/hosts/{id}/ready"), json!({}))
                .await?,
        ),
        HostsCommand::Remove { id } => {
            let h = client.delete(&format!("/v1/admin/hosts/{id}")).await?;
            println!("removed {} ({})", s(&h, "name"), s(&h, "id"));
        }
        HostsCommand::Provision {
            name,
            provider,
            flavor,
            region,
            via,
            control_plane,
        } => {
            if provider != "ovh" {
                return Err(Failure::usage(format!(
                    "--provider must be ovh (the only place hosts can be bought), got {provider:?}"
                )));
            }
            let mut body = json!({
                "name": name,
                "flavor": flavor,
                "controlPlane": control_plane.unwrap_or_else(|| client.base().to_string()),
            });
            if let Some(r) = region {
                body["region"] = json!(r);
            }
            if let Some(v) = via {
                body["via"] = json!(v);
            }
            let b = client.post("/v1/admin/hosts/bought", body).await?;
            println!(
                "bought {} as OVH instance {} ({}); it appears in `hearth admin hosts list` when its agent joins",
                s(&b, "name"),
                s(&b, "instanceId"),
                s(&b, "flavor")
            );
        }
        HostsCommand::Destroy { name, wait_minutes } => {
            let bar = spinner(&format!("selling {name}"));
            let until = std::time::Instant::now() + Duration::from_secs(wait_minutes * 60);
            loop {
                match client
                    .delete(&format!("/v1/admin/hosts/bought/{name}"))
                    .await
                {
                    Ok(_) => break,
                    Err(f) if f.status == Some(409) && std::time::Instant::now() < until => {
                        bar.set_message(f.message.clone());
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    Err(f) => {
                        bar.finish_and_clear();
                        return Err(f);
                    }
                }
            }
            bar.finish_and_clear();
            println!("sold {name}: its instance is deleted and the host removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The local address this machine sends from towards `url`'s host (no packet is sent: a
/// connected UDP socket only asks the kernel for the route).
fn address_towards(url: &str) -> Result<String, String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    let target = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:443")
    };
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket
        .connect(&target)
        .map_err(|e| format!("cannot find a route to the control plane {target}: {e}"))?;
    Ok(socket
        .local_addr()
        .map_err(|e| e.to_string())?
        .ip()
        .to_string())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn images_are_built_in_a_fresh_private_directory() {
        // Someone else's directory where a predictable name would be: never used.
        let planted = std::env::temp_dir().join(format!("hearth-image-{}", std::process::id()));
        std::fs::create_dir_all(&planted).unwrap();
        let (a, b) = (
            super::image_work_dir().unwrap(),
            super::image_work_dir().unwrap(),
        );
        for dir in [&a, &b] {
            assert_ne!(dir.path(), planted);
            assert_eq!(
                std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777,
                0o700
            );
        }
        assert_ne!(a.path(), b.path());
        std::fs::remove_dir(&planted).unwrap();
    }
}
