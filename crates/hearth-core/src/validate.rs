//! Input rules shared by the API and the CLI. Values are checked, never rewritten:
//! what passes is stored and handed to the VM verbatim.

use std::collections::BTreeMap;

pub const MAX_VCPUS: i64 = 64;
pub const MIN_MEMORY_MB: i64 = 256;
pub const MAX_MEMORY_MB: i64 = 262_144;
pub const MAX_DISK_GB: i64 = 2048;
/// Limits are in characters, as the API document states them (so at most 4 bytes each).
pub const MAX_COMMAND_CHARS: usize = 65_536;
pub const MAX_TIMEOUT_SECONDS: i64 = 3600;
pub const MAX_ENV_VARS: usize = 64;
pub const MAX_ENV_VALUE_CHARS: usize = 8_192;
pub const MAX_NAME_CHARS: usize = 100;
pub const MAX_WORKING_DIR_CHARS: usize = 4096;
/// Names the guest's own start-up uses; users may not override them.
pub const RESERVED_ENV_PREFIX: &str = "HEARTH_";

pub fn vcpus(v: i64) -> Result<i64, String> {
    in_range("vcpus", v, 1, MAX_VCPUS)
}

pub fn memory_mb(v: i64) -> Result<i64, String> {
    in_range("memoryMb", v, MIN_MEMORY_MB, MAX_MEMORY_MB)
}

pub fn disk_gb(v: i64) -> Result<i64, String> {
    in_range("diskGb", v, 1, MAX_DISK_GB)
}

pub fn timeout_seconds(v: i64) -> Result<i64, String> {
    in_range("timeoutSeconds", v, 1, MAX_TIMEOUT_SECONDS)
}

fn in_range(field: &str, v: i64, min: i64, max: i64) -> Result<i64, String> {
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{field} must be between {min} and {max}, got {v}"))
    }
}

pub fn command(code: &str) -> Result<(), String> {
    if code.trim().is_empty() {
        return Err("code must not be empty".into());
    }
    let chars = code.chars().count();
    if chars > MAX_COMMAND_CHARS {
        return Err(format!(
            "code is {chars} characters; the limit is {MAX_COMMAND_CHARS}"
        ));
    }
    if code.contains('\0') {
        return Err("code must not contain NUL characters".into());
    }
    Ok(())
}

pub fn working_dir(dir: &str) -> Result<(), String> {
    if !dir.starts_with('/') || dir.chars().count() > MAX_WORKING_DIR_CHARS || dir.contains('\0') {
        return Err(format!(
            "workingDir must be an absolute path without NUL characters, at most {MAX_WORKING_DIR_CHARS} characters"
        ));
    }
    Ok(())
}

/// A display name: 1 to 100 characters, not only spaces, no control characters.
pub fn name(name: &str) -> Result<(), String> {
    if name.trim().is_empty()
        || name.chars().count() > MAX_NAME_CHARS
        || name.chars().any(char::is_control)
    {
        return Err(format!(
            "name must be 1 to {MAX_NAME_CHARS} characters without control characters"
        ));
    }
    Ok(())
}

pub fn env_vars(vars: &BTreeMap<String, String>) -> Result<(), String> {
    if vars.len() > MAX_ENV_VARS {
        return Err(format!(
            "at most {MAX_ENV_VARS} environment variables, got {}",
            vars.len()
        ));
    }
    for (name, value) in vars {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c == '_' || c.is_ascii_alphabetic());
        if !first_ok || !chars.all(|c| c == '_' || c.is_ascii_alphanumeric()) || name.len() > 128 {
            return Err(format!(
                "environment variable name {name:?} must match [A-Za-z_][A-Za-z0-9_]* (at most 128 characters)"
            ));
        }
        if name.starts_with(RESERVED_ENV_PREFIX) {
            return Err(format!(
                "environment variable names starting with {RESERVED_ENV_PREFIX} are reserved"
            ));
        }
        if value.chars().count() > MAX_ENV_VALUE_CHARS || value.contains('\0') {
            return Err(format!(
                "environment variable {name} must be at most {MAX_ENV_VALUE_CHARS} characters without NUL characters"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert!(vcpus(0).is_err());
        assert!(vcpus(1000).is_err());
        assert_eq!(vcpus(2), Ok(2));
        assert!(memory_mb(-1).is_err());
        assert!(disk_gb(0).is_err());
        assert!(vcpus(0).unwrap_err().contains("vcpus"));
    }

    #[test]
    fn hostile_values_pass_verbatim_but_bad_names_do_not() {
        let mut v = BTreeMap::new();
        v.insert(
            "X".to_string(),
            "$(rm -rf /); `id` 'quoted' \"dq\"\nline".to_string(),
        );
        assert!(env_vars(&v).is_ok());
        for bad in [
            "1X",
            "A-B",
            "A B",
            "",
            "A=B",
            "HEARTH_AUTHORIZED_KEYS",
            "$(id)",
        ] {
            let mut v = BTreeMap::new();
            v.insert(bad.to_string(), "x".to_string());
            assert!(env_vars(&v).is_err(), "{bad:?}");
        }
        let mut v = BTreeMap::new();
        v.insert("X".to_string(), "a\0b".to_string());
        assert!(env_vars(&v).is_err());
    }

    #[test]
    fn commands() {
        assert!(command("").is_err());
        assert!(command("   ").is_err());
        assert!(command("a\0b").is_err());
        assert!(command(&"x".repeat(MAX_COMMAND_CHARS + 1)).is_err());
        assert!(command(&"é".repeat(MAX_COMMAND_CHARS)).is_ok());
        assert!(name("  ").is_err() && name("ok").is_ok() && name("a\u{7}").is_err());
        assert!(command("echo hi; exit 3").is_ok());
        assert!(working_dir("relative").is_err());
        assert!(working_dir("/tmp").is_ok());
    }
}

pub const MAX_REPOSITORY_URL_CHARS: usize = 2048;

/// How a repository is reached, which says what credential fits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GitTransport {
    /// `https://` or `http://`: an HTTPS token fits.
    Http,
    /// `ssh://` or scp-like `user@host:path`: an SSH deploy key fits.
    Ssh,
    /// `git://`: no credential.
    Git,
}

/// A `repositoryUrl`: `https://`, `http://`, `git://`, `ssh://` or scp-like
/// `user@host:path`, with no user or password in an HTTP URL (credentials are stored
/// apart and never written into a URL, which git would keep in the clone). Other forms
/// (`file://`, `ext::`, anything git would read as an option) are refused. Returns how it
/// is reached and the directory it is cloned into, under the home directory: its last
/// path segment, less `.git`.
pub fn repository_url(url: &str) -> Result<(GitTransport, String), String> {
    let chars = url.chars().count();
    if chars == 0 || chars > MAX_REPOSITORY_URL_CHARS {
        return Err(format!(
            "repositoryUrl must be 1 to {MAX_REPOSITORY_URL_CHARS} characters"
        ));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) || url.starts_with('-') {
        return Err(
            "repositoryUrl must not contain spaces or control characters, or start with '-'".into(),
        );
    }
    let forms = "give https://host/path, http://, git://, ssh://user@host/path or user@host:path";
    let (transport, authority, path) = if let Some((scheme, rest)) = url.split_once("://") {
        let transport = match scheme {
            "https" | "http" => GitTransport::Http,
            "ssh" => GitTransport::Ssh,
            "git" => GitTransport::Git,
            _ => {
                return Err(format!(
                    "repositoryUrl scheme {scheme:?} is not accepted: {forms}"
                ));
            }
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let userinfo = authority.rsplit_once('@').map(|(u, _)| u);
        if transport != GitTransport::Ssh && userinfo.is_some() {
            return Err("put no user or password in repositoryUrl: store a git credential (POST /v1/me/git-credentials) and name it in gitCredential".into());
        }
        if userinfo.is_some_and(|u| u.contains(':')) {
            return Err("put no password in repositoryUrl: store an ssh-key git credential and name it in gitCredential".into());
        }
        (transport, authority, path)
    } else {
        match url.split_once(':') {
            Some((authority, path)) if authority.contains('@') && !authority.contains('/') => {
                (GitTransport::Ssh, authority, path)
            }
            _ => {
                return Err(format!(
                    "repositoryUrl is not a URL git is given here: {forms}"
                ));
            }
        }
    };
    let (user, host) = match authority.rsplit_once('@') {
        Some((user, host)) => (user, host),
        None => ("", authority),
    };
    // git and ssh would read a leading '-' as an option.
    if host.is_empty() || host.trim_start_matches('[').starts_with('-') || user.starts_with('-') {
        return Err("repositoryUrl has no host, or a user or host starting with '-'".into());
    }
    let last = path
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or("");
    let dir = last.strip_suffix(".git").unwrap_or(last);
    let plain = dir
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if dir.is_empty() || !plain || dir.len() > 100 || dir.starts_with(['-', '.']) {
        return Err(format!(
            "repositoryUrl must end in a plain name to clone into (letters, digits, '.', '_', '-'; not starting with '.' or '-'), not {last:?}"
        ));
    }
    Ok((transport, dir.to_string()))
}

/// The host (with its port) a checked `repository_url` is fetched from: the only one its
/// token may be given to.
pub fn repository_host(url: &str) -> String {
    let authority = match url.split_once("://") {
        Some((_, rest)) => rest.split('/').next().unwrap_or(""),
        None => url.split(':').next().unwrap_or(""),
    };
    authority.rsplit('@').next().unwrap_or("").to_string()
}

/// A `repositoryRef`: the branch or tag to clone, as git names them.
pub fn git_ref(r: &str) -> Result<(), String> {
    let plain = r
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if r.is_empty()
        || r.len() > 255
        || !plain
        || r.starts_with(['-', '/', '.'])
        || r.ends_with(['/', '.'])
        || r.contains("..")
        || r.contains("//")
        || r.ends_with(".lock")
    {
        return Err(format!(
            "repositoryRef must be a branch or tag name (letters, digits, '.', '_', '-', '/'; not starting with '-'), got {r:?}"
        ));
    }
    Ok(())
}

/// The name a user gives a stored git credential.
pub fn credential_name(name: &str) -> Result<(), String> {
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty()
        || name.len() > 64
        || !plain
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(format!(
            "a credential's name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit; got {name:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod repository_tests {
    use super::*;

    #[test]
    fn repository_urls_name_their_directory_and_refuse_what_git_would_misread() {
        for (url, transport, dir) in [
            (
                "https://github.com/owner/repo.git",
                GitTransport::Http,
                "repo",
            ),
            (
                "http://10.0.0.2:8080/public.git/",
                GitTransport::Http,
                "public",
            ),
            ("git://host/x", GitTransport::Git, "x"),
            (
                "ssh://git@host:2222/team/tool.git",
                GitTransport::Ssh,
                "tool",
            ),
            (
                "git@github.com:owner/my.repo.git",
                GitTransport::Ssh,
                "my.repo",
            ),
            ("git@host:solo", GitTransport::Ssh, "solo"),
        ] {
            assert_eq!(
                repository_url(url),
                Ok((transport, dir.to_string())),
                "{url}"
            );
        }
        for bad in [
            "",
            "https://user:token@github.com/o/r.git",
            "https://token@github.com/o/r.git",
            "file:///etc/passwd",
            "ext::sh -c touch% /tmp/x",
            "--upload-pack=touch /tmp/x",
            "/local/path",
            "https:///nohost.git",
            "https://host/",
            "https://host/..",
            "https://host/a b",
            "https://host/r\n.git",
            "host:path",
            "https://host/$(reboot)",
            "https://host/.hearth",
            "ssh://[-oProxyCommand=x]/r",
            "ssh://-oX@host/r",
            "ssh://u:password@host/r",
            "-oX@host:r",
        ] {
            assert!(repository_url(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_token_goes_to_the_urls_own_host() {
        assert_eq!(repository_host("https://github.com/o/r.git"), "github.com");
        assert_eq!(
            repository_host("http://10.0.0.2:8080/p.git"),
            "10.0.0.2:8080"
        );
        assert_eq!(repository_host("git@github.com:o/r.git"), "github.com");
        assert_eq!(repository_host("ssh://git@host:2222/r"), "host:2222");
    }

    #[test]
    fn refs_are_names_not_options() {
        for ok in ["main", "v1.2.3", "release/2026-12", "feature_x"] {
            assert_eq!(git_ref(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "--orphan",
            "-b",
            "/abs",
            "a..b",
            "a//b",
            "x.lock",
            "a b",
            "a;b",
            "trailing/",
            ".hidden",
        ] {
            assert!(git_ref(bad).is_err(), "{bad:?}");
        }
        assert!(credential_name("ci-token").is_ok());
        for bad in ["", "-x", "a b", "x/y", &"a".repeat(65)] {
            assert!(credential_name(bad).is_err(), "{bad:?}");
        }
    }
}
