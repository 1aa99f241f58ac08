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

/// Clones a repository into `~/DIR`, once. Its inputs come on standard input, a line
/// each: the URL, the branch or tag (or an empty line), the directory, the credential's
/// kind (or an empty line), its user name, and the host a token may be sent to; then the
/// secret, to the end. The shell text is fixed; none of the inputs is ever part of it.
///
/// - One clone at a time per guest (`flock`): a clone left running by a node that died
///   holds the lock, and the retry says so (exit 75) rather than racing it. Temporary
///   directories are cleared only under the lock, so never a live clone's.
/// - The secret is written to a 0600 file in a private temporary directory and read by
///   `GIT_ASKPASS` (a token: answered only to prompts for the repository's own host, so a
///   redirect elsewhere gets nothing) or `GIT_SSH_COMMAND` (a key). It is in no command
///   line, URL, environment or history; no credential helper may keep it
///   (`credential.helper=` clears the image's); the directory goes when the script ends,
///   including on a hang-up or a timeout (git runs under `timeout`, inside the exec's).
/// - The clone lands in the temporary directory and is renamed into place. `~/DIR`
///   already holding a clone of the same URL means done; anything else there is refused.
const CLONE: &str = r#"set -u
IFS= read -r url; IFS= read -r ref; IFS= read -r dir; IFS= read -r kind; IFS= read -r user; IFS= read -r host
command -v git > /dev/null || { echo "git is not installed in this image" >&2; exit 127; }
mkdir -p "$HOME/.hearth"
exec 9> "$HOME/.hearth/clone.lock"
flock -n 9 || { echo "another clone is still running in this VM" >&2; exit 75; }
rm -rf "$HOME"/.hearth-clone.*
done_already() {
  [ -d "$HOME/$dir/.git" ] && [ "$(git -C "$HOME/$dir" remote get-url origin 2>/dev/null)" = "$url" ]
}
if [ -e "$HOME/$dir" ]; then
  if done_already; then echo already; exit 0; fi
  echo "~/$dir exists and is not a clone of this repository" >&2; exit 2
fi
umask 077
t=$(mktemp -d "$HOME/.hearth-clone.XXXXXX") || exit 125
trap 'rm -rf "$t"' EXIT
trap 'exit 129' HUP INT TERM
cat > "$t/secret"
printf '%s\n' "$user" > "$t/user"
printf '%s\n' "$host" > "$t/host"
export GIT_TERMINAL_PROMPT=0
case "$kind" in
  https-token)
    printf '%s\n' '#!/bin/sh' 'd=$(dirname "$0")' 'h=$(cat "$d/host")' \
      'case "$1" in *"//$h'"'"'"*|*"@$h'"'"'"*) ;; *) exit 1 ;; esac' \
      'case "$1" in [Uu]sername*) cat "$d/user" ;; *) cat "$d/secret" ;; esac' > "$t/askpass"
    chmod 700 "$t/askpass"
    export GIT_ASKPASS="$t/askpass" ;;
  ssh-key)
    export GIT_SSH_COMMAND="ssh -i '$t/secret' -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=accept-new" ;;
  *) export GIT_SSH_COMMAND="ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new" ;;
esac
if [ -n "$ref" ]; then
  timeout 570 git -c credential.helper= clone --quiet --branch "$ref" -- "$url" "$t/work" 2> "$t/err"
else
  timeout 570 git -c credential.helper= clone --quiet -- "$url" "$t/work" 2> "$t/err"
fi
code=$?
if [ $code -eq 124 ]; then echo "git did not finish within 570 s" >&2; exit 124; fi
if [ $code -ne 0 ]; then tail -c 2000 "$t/err" >&2; exit 1; fi
mv -T "$t/work" "$HOME/$dir" || { if done_already; then echo already; exit 0; fi; exit 1; }
echo cloned
"#;

/// What to clone and with what: the secret opened, for the clone's standard input only.
pub(crate) struct CloneRequest {
    pub url: String,
    /// The host (and port) of an HTTP URL: the only one its token is given to.
    pub host: String,
    pub git_ref: Option<String>,
    pub dir: String,
    /// `(kind, user name, secret)`.
    pub credential: Option<(String, String, String)>,
}

/// Why git could not clone, in words for the environment's state message: from git's
/// own last lines, which never hold the secret (it is never in the URL or a command).
pub(crate) fn clone_failure(stderr: &str, req: &CloneRequest) -> String {
    let text = stderr.to_ascii_lowercase();
    let reason = if text.contains("authentication failed")
        || text.contains("could not read username")
        || text.contains("could not read password")
        || text.contains("permission denied (publickey")
        || text.contains("invalid username or password")
        || text.contains("returned error: 401")
        || text.contains("returned error: 403")
    {
        if req.credential.is_some() {
            "the repository refused the credential (authentication failed)"
        } else {
            "the repository needs a credential: store one (POST /v1/me/git-credentials) and name it in gitCredential"
        }
    } else if text.contains("remote branch") && text.contains("not found") {
        "no such branch or tag"
    } else if text.contains("not found")
        || text.contains("does not appear to be a git repository")
        || text.contains("returned error: 404")
    {
        "the repository was not found"
    } else if text.contains("could not resolve host")
        || text.contains("connection refused")
        || text.contains("timed out")
        || text.contains("no route to host")
        || text.contains("network is unreachable")
        || text.contains("unable to access")
    {
        "the repository's server could not be reached from the environment"
    } else if text.contains("git is not installed") {
        "git is not installed in this image"
    } else if text.contains("is not a clone of this repository") {
        "its directory is taken"
    } else if text.contains("did not finish within") {
        "it took too long"
    } else {
        "git failed"
    };
    let last = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("");
    format!("cloning {} failed: {reason} ({last})", req.url)
}

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
        host: Box<HostRef>,
        vm: VmRef,
    },
}

/// How long a clone may take.
pub(crate) const CLONE_TIMEOUT: Duration = Duration::from_secs(600);

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

    /// Clones a repository into the guest unless it is there already. `Err` carries
    /// whether another try could help (git's refusal will not change; a lost connection
    /// may), and the reason.
    pub async fn clone_repository(&self, req: &CloneRequest) -> Result<(), (bool, String)> {
        match self {
            Guest::Ssh { pool, target } => {
                let (kind, user, secret) = req.credential.clone().unwrap_or_default();
                let mut stdin = format!(
                    "{}\n{}\n{}\n{}\n{}\n{}\n",
                    req.url,
                    req.git_ref.as_deref().unwrap_or(""),
                    req.dir,
                    kind,
                    user,
                    req.host
                )
                .into_bytes();
                stdin.extend_from_slice(secret.as_bytes());
                let mut exec = request(CLONE, &BTreeMap::new(), stdin);
                exec.timeout = CLONE_TIMEOUT;
                let out = pool
                    .exec(target, &exec)
                    .await
                    .map_err(|e| (true, e.to_string()))?;
                match out.exit_code {
                    Some(0) => Ok(()),
                    // A clone a dead node left running: it ends by itself (570 s at most).
                    Some(75) => Err((
                        true,
                        "another clone is still running in this VM; trying again".into(),
                    )),
                    // The connection went before the command ended: another try finds
                    // the clone done, or makes it.
                    None if !out.timed_out => Err((
                        true,
                        "the connection to the VM was lost during the clone".into(),
                    )),
                    None => Err((
                        false,
                        format!(
                            "cloning {} did not finish within {} minutes",
                            req.url,
                            CLONE_TIMEOUT.as_secs() / 60
                        ),
                    )),
                    _ => Err((
                        false,
                        clone_failure(&String::from_utf8_lossy(&out.stderr), req),
                    )),
                }
            }
            // A simulated VM has no disk: its clone succeeds while the VM lives, so the
            // step's place in the saga, its retries and crash recovery are what it tests.
            Guest::Sim { sim, host, vm } => {
                sim.probe(host, vm).await.map_err(|e| (true, e.to_string()))
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

    /// Runs CLONE with `sh` here, as sshd would in a guest.
    fn clone_with(home: &std::path::Path, lines: &str, secret: &str) -> std::process::Output {
        let mut child = Command::new("sh")
            .args(["-c", CLONE])
            .env("HOME", home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(lines.as_bytes()).unwrap();
        input.write_all(secret.as_bytes()).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    }

    #[test]
    fn a_clone_lands_once_and_leaves_no_secret_behind() {
        let home = tempfile::tempdir().unwrap();
        let origin = home.path().join("origin");
        let git = |args: &[&str]| {
            let out = Command::new("git")
                .args(args)
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@example.com")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@example.com")
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {out:?}");
        };
        let o = origin.to_str().unwrap();
        git(&["init", "-q", "-b", "main", o]);
        std::fs::write(origin.join("README"), "hello\n").unwrap();
        git(&["-C", o, "add", "README"]);
        git(&["-C", o, "commit", "-q", "-m", "first"]);
        git(&["-C", o, "branch", "other"]);
        // A token that must end up nowhere; a directory a dead clone left behind.
        let secret = "tok-3b7f1e-never-kept";
        std::fs::create_dir(home.path().join(".hearth-clone.dead")).unwrap();
        let lines = format!("{o}\nother\nproject\nhttps-token\nme\nexample.com\n");
        let out = clone_with(home.path(), &lines, secret);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "cloned\n", "{out:?}");
        assert_eq!(
            std::fs::read_to_string(home.path().join("project/README")).unwrap(),
            "hello\n"
        );
        let again = clone_with(home.path(), &lines, secret);
        assert_eq!(
            String::from_utf8_lossy(&again.stdout),
            "already\n",
            "{again:?}"
        );
        let left: Vec<_> = std::fs::read_dir(home.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".hearth-clone"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let grep = Command::new("grep")
            .args(["-r", "-l", secret])
            .arg(home.path())
            .output()
            .unwrap();
        assert!(grep.stdout.is_empty(), "the secret was kept: {grep:?}");
        // A branch that is not there: git's reason, and nothing in place.
        let bad = format!("{o}\nnone-such\nother-dir\n\n\n\n");
        let out = clone_with(home.path(), &bad, "");
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(!home.path().join("other-dir").exists());
        let req = CloneRequest {
            url: o.to_string(),
            host: String::new(),
            git_ref: Some("none-such".into()),
            dir: "other-dir".into(),
            credential: None,
        };
        let said = clone_failure(&String::from_utf8_lossy(&out.stderr), &req);
        assert!(said.contains("no such branch or tag"), "{said}");
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
