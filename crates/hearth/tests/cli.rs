//! The `hearth` CLI against a real server: commands work and exit codes mean what they say.

mod common;

use common::*;
use std::process::Command;

fn hearth(server: &Server, token: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(args)
        .env("HEARTH_URL", &server.base)
        .env("HEARTH_TOKEN", token)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn cli_drives_vms_and_environments() {
    let site = Site::new(Db::Sqlite).await;
    let server = site.start().await;
    let token = server.user("cli@example.com", "pro").await;

    let (code, out, err) = hearth(&server, &token, &["vm", "provision", "--memory-mb", "512"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("status:  running"), "{out}");
    let (code, out, err) = hearth(
        &server,
        &token,
        &[
            "vm", "exec", "echo", "hi;", "echo", "err", ">&2;", "exit", "3",
        ],
    );
    assert_eq!((code, out.as_str(), err.as_str()), (3, "hi\n", "err\n"));
    let (code, _, _) = hearth(&server, &token, &["vm", "destroy"]);
    assert_eq!(code, 0);

    let (code, out, err) = hearth(
        &server,
        &token,
        &[
            "env",
            "create",
            "cli env",
            "--memory-mb",
            "256",
            "--env",
            "GREETING=hello world",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let slug = out
        .split_whitespace()
        .find(|w| w.starts_with("(env_"))
        .unwrap()
        .trim_matches(|c| c == '(' || c == ')' || c == ';')
        .to_string();
    let (code, out, _) = hearth(
        &server,
        &token,
        &["env", "exec", &slug, "printenv GREETING"],
    );
    assert_eq!((code, out.as_str()), (0, "hello world\n"));
    let (code, out, _) = hearth(&server, &token, &["env", "list"]);
    assert!(
        code == 0 && out.contains(&slug) && out.contains("running"),
        "{out}"
    );
    let (code, out, _) = hearth(&server, &token, &["env", "history", &slug]);
    assert!(code == 0 && out.contains("printenv GREETING"), "{out}");
    let (code, out, _) = hearth(&server, &token, &["env", "audit", &slug]);
    assert!(
        code == 0 && out.contains("provisioning -> running"),
        "{out}"
    );
    // `hearth ssh`: a shell on a PTY; here fed from a pipe.
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["ssh", &slug])
        .env("HEARTH_URL", &server.base)
        .env("HEARTH_TOKEN", &token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"echo $((6*7)) $GREETING\nexit\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("42 hello world"),
        "{text}"
    );

    let (code, _, _) = hearth(&server, &token, &["env", "destroy", &slug]);
    assert_eq!(code, 0);

    // Destroying an environment in `error` succeeds: the error it had is not the outcome.
    let script = site.dir.path().join("fail.sh");
    std::fs::write(&script, "exit 7\n").unwrap();
    let (code, out, err) = hearth(
        &server,
        &token,
        &[
            "env",
            "create",
            "broken",
            "--memory-mb",
            "256",
            "--init-script",
            script.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{out}{err}");
    let slug = out
        .split_whitespace()
        .find(|w| w.starts_with("(env_"))
        .unwrap()
        .trim_matches(|c| c == '(' || c == ')' || c == ';')
        .to_string();
    let (code, out, err) = hearth(&server, &token, &["env", "wait", &slug, "--state", "error"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = hearth(&server, &token, &["env", "destroy", &slug]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("destroyed"), "{out}");

    // Failures: unknown id is 1, a refused token is 3, admin commands need the role.
    let (code, _, err) = hearth(&server, &token, &["env", "show", "env_nothere"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not_found"));
    let (code, _, err) = hearth(&server, "hearth_wrong", &["vm", "status"]);
    assert_eq!(code, 3, "{err}");
    let (code, _, _) = hearth(&server, &token, &["admin", "hosts", "list"]);
    assert_eq!(code, 1);
    let (code, out, _) = hearth(&server, &server.admin_token, &["admin", "hosts", "list"]);
    assert!(
        code == 0 && out.contains("docker@") && out.contains("healthy"),
        "{out}"
    );
    let (code, out, _) = hearth(
        &server,
        &server.admin_token,
        &[
            "admin",
            "users",
            "--create",
            "new@example.com",
            "--tier",
            "pro",
        ],
    );
    assert!(code == 0 && out.contains("token: hearth_"), "{out}");
}
