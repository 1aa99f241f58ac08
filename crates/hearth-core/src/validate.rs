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
