//! Reaching into a guest during a job: over SSH for real VMs, through the simulated
//! provider for simulated ones.
//!
//! The init script runs detached in the guest, started once behind a `mkdir` guard and
//! recorded in files there (`~/.hearth/init/{script,pid,output,exit}`). So it never runs
//! twice, whatever happens to the node that started it, and a job can look in on it
//! later instead of holding a worker while it runs. The script itself travels as data on
//! standard input; the shell text below is fixed.

use hearth_guest::{ExecRequest, SshPool, Target};
use hearth_provider::sim::SimProvider;
use hearth_provider::{HostRef, VmRef};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Starts `~/.hearth/init/script` (read from stdin) once, detached from this connection.
/// The script is written into a fresh directory that is then renamed into place: the
/// rename is the once-only guard. A half-written script never runs: when the node dies
/// mid-send, `cat` sees an ordinary end of input, so the copy must match the SHA-256 that
/// `@SHA256@` is replaced with (hex digits of our own making, never user text) first.
const START_INIT: &str = r#"set -u
d="$HOME/.hearth/init"
mkdir -p "$HOME/.hearth"
t=$(mktemp -d "$HOME/.hearth/init.XXXXXX")
cat > "$t/script"
if ! printf '%s  %s\n' @SHA256@ "$t/script" | sha256sum -c --status; then
  rm -rf "$t"
  echo "the init script arrived incomplete" >&2
  exit 3
fi
if [ ! -e "$d" ] && mv -T "$t" "$d" 2>/dev/null; then
  setsid sh -c 'echo $$ > "$1/pid.tmp"; mv "$1/pid.tmp" "$1/pid"; bash "$1/script" > "$1/output" 2>&1; echo $? > "$1/exit.tmp"; mv "$1/exit.tmp" "$1/exit"' hearth-init "$d" < /dev/null > /dev/null 2>&1 &
  echo started
else
  rm -rf "$t"
  echo already
fi
"#;

/// Prints `exit <code>` and the output's tail, `running`, or `lost` (started, but neither
/// running nor finished: the VM restarted under it, or it never got going). Files are
/// written whole and renamed into place, and `lost` is only said when a second look a
/// moment later agrees, so a busy guest is never mistaken for a dead script.
const INIT_STATUS: &str = r#"d="$HOME/.hearth/init"
look() {
  if [ -f "$d/exit" ]; then echo "exit $(cat "$d/exit")"; tail -c 2048 "$d/output" 2>/dev/null
  elif [ -f "$d/pid" ] && kill -0 "$(cat "$d/pid")" 2>/dev/null; then echo running
  elif [ -d "$d" ] && [ ! -f "$d/pid" ] && [ -n "$(find "$d" -maxdepth 0 -mmin -1)" ]; then echo running
  else echo lost; fi
}
seen=$(look)
if [ "$seen" = lost ]; then sleep 1; seen=$(look); fi
printf '%s\n' "$seen"
"#;

pub(crate) enum InitStatus {
    Running,
    Exited {
        code: i64,
        output_tail: String,
    },
    /// Started, but its process is gone without an exit code.
    Lost,
}

pub(crate) enum Guest {
    Ssh {
        pool: SshPool,
        target: Target,
    },
    Sim {
        sim: Arc<SimProvider>,
        host: HostRef,
        vm: VmRef,
    },
}

fn request(code: &str, env: &BTreeMap<String, String>, stdin: Vec<u8>) -> ExecRequest {
    ExecRequest {
        code: code.to_string(),
        code_on_stdin: false,
        working_dir: None,
        env: env.clone(),
        stdin,
        timeout: Duration::from_secs(30),
        max_output: 16 * 1024,
    }
}

impl Guest {
    /// One try: does the guest accept Hearth's key and run a command? A try whose SSH
    /// banner has not come within `banner_wait` ends then. Returns the guest's SSH host key
    /// (`None` for a simulated guest); a host key other than the recorded one is `Err`
    /// with `true`: it will not get better by trying again.
    pub async fn probe(&self, banner_wait: Duration) -> Result<Option<String>, (bool, String)> {
        match self {
            Guest::Ssh { pool, target } => match pool.probe(target, banner_wait).await {
                Ok(key) => Ok(Some(key)),
                Err(e @ hearth_guest::GuestError::HostKey(..)) => Err((true, e.to_string())),
                Err(e) => Err((false, e.to_string())),
            },
            Guest::Sim { sim, host, vm } => sim
                .probe(host, vm)
                .await
                .map(|()| None)
                .map_err(|e| (false, e.to_string())),
        }
    }

    /// Starts the init script unless it ever started in this VM.
    pub async fn start_init(
        &self,
        script: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        match self {
            Guest::Ssh { pool, target } => {
                let digest = hex::encode(Sha256::digest(script.as_bytes()));
                let code = START_INIT.replace("@SHA256@", &digest);
                let out = pool
                    .exec(target, &request(&code, env, script.as_bytes().to_vec()))
                    .await
                    .map_err(|e| e.to_string())?;
                if out.exit_code != Some(0) {
                    return Err(format!(
                        "could not start the init script (exit {:?}): {}",
                        out.exit_code,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
                Ok(())
            }
            Guest::Sim { sim, host, vm } => {
                sim.start_init(host, vm).await.map_err(|e| e.to_string())
            }
        }
    }

    pub async fn init_status(&self) -> Result<InitStatus, String> {
        match self {
            Guest::Ssh { pool, target } => {
                let out = pool
                    .exec(target, &request(INIT_STATUS, &BTreeMap::new(), Vec::new()))
                    .await
                    .map_err(|e| e.to_string())?;
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                let (first, rest) = text.split_once('\n').unwrap_or((text.as_str(), ""));
                if let Some(code) = first.strip_prefix("exit ") {
                    let code = code
                        .trim()
                        .parse()
                        .map_err(|_| format!("unreadable init exit code {code:?}"))?;
                    return Ok(InitStatus::Exited {
                        code,
                        output_tail: rest.to_string(),
                    });
                }
                match first.trim() {
                    "running" => Ok(InitStatus::Running),
                    "lost" => Ok(InitStatus::Lost),
                    other => Err(format!(
                        "unexpected answer from the guest about its init script: {other:?}"
                    )),
                }
            }
            Guest::Sim { sim, host, vm } => match sim
                .init_outcome(host, vm)
                .await
                .map_err(|e| e.to_string())?
            {
                Some(code) => Ok(InitStatus::Exited {
                    code,
                    output_tail: String::new(),
                }),
                None => Ok(InitStatus::Lost),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    /// Runs START_INIT with `sh` here, as sshd would in a guest, on `sent` as its input.
    fn start_with(home: &std::path::Path, script: &str, sent: &[u8]) -> std::process::Output {
        let code = START_INIT.replace("@SHA256@", &hex::encode(Sha256::digest(script.as_bytes())));
        let mut child = Command::new("sh")
            .args(["-c", &code])
            .env("HOME", home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(sent).unwrap();
        child.wait_with_output().unwrap()
    }

    #[test]
    fn a_script_cut_short_by_a_dying_node_never_runs() {
        let home = tempfile::tempdir().unwrap();
        let script = "echo ran >> \"$HOME/runs\"\n";
        // The node died before sending anything, then halfway: both look like an end of input.
        for sent in [&b""[..], &script.as_bytes()[..8]] {
            let out = start_with(home.path(), script, sent);
            assert_eq!(out.status.code(), Some(3), "{out:?}");
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("incomplete"),
                "{out:?}"
            );
            assert!(
                !home.path().join(".hearth/init").exists(),
                "the guard was taken by a partial script"
            );
        }
        // The whole script runs, once.
        let out = start_with(home.path(), script, script.as_bytes());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "started\n", "{out:?}");
        let out = start_with(home.path(), script, script.as_bytes());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "already\n", "{out:?}");
        let exit = home.path().join(".hearth/init/exit");
        let waited = std::time::Instant::now();
        while !exit.exists() {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "the script never finished"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            std::fs::read_to_string(home.path().join("runs")).unwrap(),
            "ran\n"
        );
    }
}
