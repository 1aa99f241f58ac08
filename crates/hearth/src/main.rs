//! `hearth`: the server (`serve`), the image builder (`image build`) and a client for the
//! HTTP API (`vm ...`).
//!
//! Exit codes: 0 done; 1 the operation failed (the VM ended in `error`, a request was
//! refused); 2 bad usage; 3 Hearth could not be reached or the token was refused;
//! `vm exec` exits with the remote command's code.

mod client;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use client::{Client, Failure};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "hearth", version, about = "Development VMs and sandboxes, self-hosted")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: API, workers and reconciler.
    Serve,
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
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build the Docker base image from Debian packages (needs root, mmdebstrap, dockerd).
    Build {
        #[arg(long, default_value = hearth_provider::image::DEFAULT_IMAGE)]
        tag: String,
        /// Rebuild even if an image from the same recipe exists.
        #[arg(long)]
        force: bool,
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
        Command::Image { command: ImageCommand::Build { tag, force } } => build_image(&tag, force),
        Command::Vm { command } => vm(command).await,
    }
}

async fn serve() -> Result<ExitCode, Failure> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn,russh=warn".into()),
        )
        .init();
    let config = hearth_server::Config::from_env().map_err(|m| Failure::usage(m))?;
    hearth_server::serve::run(config).await.map_err(|e| Failure::failed(format!("{e:#}")))?;
    Ok(ExitCode::SUCCESS)
}

fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}").expect("template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(message.to_string());
    bar
}

fn build_image(tag: &str, force: bool) -> Result<ExitCode, Failure> {
    use hearth_provider::image;
    if !force && image::is_current(tag) {
        println!("{tag} is up to date (recipe {})", image::recipe_hash());
        return Ok(ExitCode::SUCCESS);
    }
    let work = tempfile_dir()?;
    let bar = spinner("starting");
    let started = Instant::now();
    let result = image::build(tag, &work, &mut |step| {
        bar.println(format!("[{:>5.1}s] {step}", started.elapsed().as_secs_f64()));
        bar.set_message(step.to_string());
    });
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&work);
    result.map_err(|e| Failure::failed(e.to_string()))?;
    println!("built {tag} in {:.1}s", started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

fn tempfile_dir() -> Result<std::path::PathBuf, Failure> {
    let dir = std::env::temp_dir().join(format!("hearth-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Failure::failed(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

fn print_vm(vm: &Value) {
    let s = |k: &str| vm.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    let n = |k: &str| vm.get(k).and_then(Value::as_i64).map(|v| v.to_string()).unwrap_or("-".into());
    println!("id:      {}", s("id"));
    println!("status:  {}{}", s("status"), vm.get("stateMessage").and_then(Value::as_str).map(|m| format!(" ({m})")).unwrap_or_default());
    println!("size:    {} vCPUs, {} MB memory, {} GB disk", n("vcpus"), n("memoryMb"), n("diskGb"));
    if let (Some(host), Some(port)) = (vm.get("sshHost").and_then(Value::as_str), vm.get("sshPort").and_then(Value::as_i64)) {
        println!("ssh:     {}@{host} -p {port}", s("sshUser"));
    }
    println!("runtime: {} min", n("totalRuntimeMinutes"));
}

/// Polls the VM until its status is one of `want`, printing new log lines as they come.
async fn wait_for(client: &Client, want: &[&str], timeout: u64, gone_ok: bool) -> Result<ExitCode, Failure> {
    let bar = spinner("waiting");
    let started = Instant::now();
    let mut seen = 0usize;
    loop {
        if let Ok(logs) = client.get("/v1/me/vm/logs").await {
            let items = logs["items"].as_array().cloned().unwrap_or_default();
            // The log keeps the last 100 lines; print only what is new.
            for line in items.iter().skip(seen.min(items.len())) {
                bar.println(format!("  {:<7} {}", line["level"].as_str().unwrap_or(""), line["message"].as_str().unwrap_or("")));
            }
            seen = items.len();
        }
        let vm = match client.get("/v1/me/vm").await {
            Ok(vm) => vm,
            Err(f) if gone_ok && f.status == Some(404) => {
                bar.finish_and_clear();
                println!("destroyed");
                return Ok(ExitCode::SUCCESS);
            }
            Err(f) => {
                bar.finish_and_clear();
                return Err(f);
            }
        };
        let status = vm["status"].as_str().unwrap_or("").to_string();
        bar.set_message(status.clone());
        if want.contains(&status.as_str()) {
            bar.finish_and_clear();
            print_vm(&vm);
            return Ok(ExitCode::SUCCESS);
        }
        if status == "error" {
            bar.finish_and_clear();
            print_vm(&vm);
            return Err(Failure::failed(format!(
                "the VM is in error: {}",
                vm["stateMessage"].as_str().unwrap_or("no reason given")
            )));
        }
        if started.elapsed() > Duration::from_secs(timeout) {
            bar.finish_and_clear();
            return Err(Failure::failed(format!("still {status} after {timeout}s; `hearth vm status` to check again")));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn vm(command: VmCommand) -> Result<ExitCode, Failure> {
    let client = Client::from_env()?;
    match command {
        VmCommand::Provision { vcpus, memory_mb, disk_gb, wait } => {
            let mut body = serde_json::Map::new();
            for (k, v) in [("vcpus", vcpus), ("memoryMb", memory_mb), ("diskGb", disk_gb)] {
                if let Some(v) = v {
                    body.insert(k.into(), json!(v));
                }
            }
            let vm = client.post("/v1/me/vm", Value::Object(body)).await?;
            if wait.no_wait {
                print_vm(&vm);
                return Ok(ExitCode::SUCCESS);
            }
            wait_for(&client, &["running"], wait.timeout, false).await
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
            client.post("/v1/me/vm/start", json!({})).await?;
            if wait.no_wait { Ok(ExitCode::SUCCESS) } else { wait_for(&client, &["running"], wait.timeout, false).await }
        }
        VmCommand::Stop { wait } => {
            client.post("/v1/me/vm/stop", json!({})).await?;
            if wait.no_wait { Ok(ExitCode::SUCCESS) } else { wait_for(&client, &["stopped"], wait.timeout, false).await }
        }
        VmCommand::Destroy { wait } => {
            client.delete("/v1/me/vm").await?;
            if wait.no_wait { Ok(ExitCode::SUCCESS) } else { wait_for(&client, &["destroyed"], wait.timeout, true).await }
        }
        VmCommand::Exec { timeout, workdir, command } => {
            let mut body = json!({ "code": command.join(" "), "timeoutSeconds": timeout });
            if let Some(dir) = workdir {
                body["workingDir"] = json!(dir);
            }
            let out = client.post("/v1/me/vm/exec", body).await?;
            use std::io::Write;
            let _ = std::io::stdout().write_all(out["stdout"].as_str().unwrap_or("").as_bytes());
            let _ = std::io::stderr().write_all(out["stderr"].as_str().unwrap_or("").as_bytes());
            if out["timedOut"].as_bool() == Some(true) {
                return Err(Failure::failed(format!("the command timed out after {timeout}s")));
            }
            let code = out["exitCode"].as_i64().unwrap_or(255);
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
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
