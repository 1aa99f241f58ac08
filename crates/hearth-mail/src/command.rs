//! Which command a message asks for.
//!
//! A body that is a JSON object with an `action` is a JSON command. Otherwise the command is
//! the first word of the subject (reply and forward prefixes such as `Re:`, `AW:`, `SV:`,
//! `Fwd:` aside), or, for a reply (such a prefix, or Hearth's own `[env_...]` tag in the
//! subject), the first word of the body's first line: replying to Hearth's answer must never
//! repeat the command of the thread's first message. Only the first word counts, so
//! "Happy new year" is not "new", "restart" is not "start", and nothing is ever created by
//! default: a message without a command word gets the help.
//!
//! Quoted lines (`>`), and everything after an "On ... wrote:" line or a `-- ` signature
//! line, are not read: they are someone's earlier words. Fenced code blocks are read as
//! they are: a `>` or `--` line inside one is code.

use crate::cap;
use serde::Deserialize;
use std::collections::BTreeMap;

/// What a message asks for. Sizes and targets are as written; the service validates them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Create(CreateRequest),
    Destroy {
        target: String,
    },
    Status {
        target: String,
    },
    Connect {
        target: String,
    },
    Execute {
        target: String,
        code: String,
        working_dir: Option<String>,
    },
    List,
    /// The help, with what was wrong when the message asked for something unreadable.
    Help {
        problem: Option<String>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateRequest {
    pub name: Option<String>,
    pub vcpus: Option<i64>,
    pub memory_mb: Option<i64>,
    pub disk_gb: Option<i64>,
    pub duration_hours: Option<i64>,
    pub repository: Option<String>,
    pub init_script: Option<String>,
    pub environment_vars: BTreeMap<String, String>,
}

impl Command {
    /// The command's name, as stored and audited.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Create(_) => "create",
            Command::Destroy { .. } => "destroy",
            Command::Status { .. } => "status",
            Command::Connect { .. } => "connect",
            Command::Execute { .. } => "execute",
            Command::List => "list",
            Command::Help { .. } => "help",
        }
    }

    /// The environment (slug or id) it acts on, if any.
    pub fn target(&self) -> Option<&str> {
        match self {
            Command::Destroy { target }
            | Command::Status { target }
            | Command::Connect { target }
            | Command::Execute { target, .. } => Some(target),
            _ => None,
        }
    }
}

fn help(problem: impl Into<String>) -> Command {
    Command::Help {
        problem: Some(problem.into()),
    }
}

/// The words that name a command, and the command each names.
const WORDS: &[(&str, &str)] = &[
    ("create", "create"),
    ("destroy", "destroy"),
    ("delete", "destroy"),
    ("status", "status"),
    ("info", "status"),
    ("connect", "connect"),
    ("ssh", "connect"),
    ("execute", "execute"),
    ("exec", "execute"),
    ("run", "execute"),
    ("list", "list"),
    ("help", "help"),
];

/// The command of a message with this subject and (text) body.
pub fn parse(subject: &str, body: &str) -> Command {
    let body = own_words(body);
    let trimmed = body.trim();
    if trimmed.starts_with('{') && trimmed.ends_with('}') {
        return json_command(trimmed);
    }
    let (is_reply, subject) = strip_prefixes(subject);
    let first_line = body
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    // The line the command word is read from, and the text its details come from.
    let (line, details) = if is_reply {
        (first_line, format!("{first_line}\n{subject}"))
    } else {
        (subject, format!("{subject}\n{}", outside_fences(&body)))
    };
    let Some(verb) = words(line).next().and_then(|w| {
        WORDS
            .iter()
            .find(|(word, _)| *word == w.as_str())
            .map(|(_, verb)| *verb)
    }) else {
        return Command::Help {
            problem: (!line.trim().is_empty()).then(|| {
                format!(
                    "no command in {:?}; the commands are create, destroy, status, connect, execute, list and help",
                    cap(line, 80)
                )
            }),
        };
    };
    let target = words(&details).find(|w| is_slug(w));
    let needs_target = |make: fn(String) -> Command| match &target {
        Some(t) => make(t.clone()),
        None => help(format!(
            "{verb} needs an environment: name its slug (env_...) in the subject or first line"
        )),
    };
    match verb {
        "create" => match sizes(&details) {
            Ok(request) => Command::Create(request),
            Err(problem) => help(problem),
        },
        "destroy" => needs_target(|target| Command::Destroy { target }),
        "status" => needs_target(|target| Command::Status { target }),
        "connect" => needs_target(|target| Command::Connect { target }),
        "execute" => {
            let Some(code) = first_fence(&body) else {
                return help(
                    "execute runs the first fenced code block (between ``` lines), and the message has none",
                );
            };
            match target {
                Some(target) => Command::Execute {
                    target,
                    code,
                    working_dir: None,
                },
                None => help(
                    "execute needs an environment: name its slug (env_...) in the subject or first line",
                ),
            }
        }
        "list" => Command::List,
        _ => Command::Help { problem: None },
    }
}

/// The body without quoted lines, and cut at an attribution or signature line; inside a
/// fenced block every line is kept as it is.
fn own_words(body: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in body.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            if line.trim_end() == "--"
                || t.starts_with("-----Original Message-----")
                || (t.starts_with("On ") && t.ends_with("wrote:"))
            {
                break;
            }
            if t.starts_with('>') {
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `Re:`, `Fwd:` and similar prefixes removed; whether one of them was a reply's.
fn strip_prefixes(subject: &str) -> (bool, &str) {
    const REPLY: [&str; 7] = ["re", "aw", "sv", "vs", "antw", "r", "rif"];
    const FORWARD: [&str; 6] = ["fw", "fwd", "wg", "tr", "rv", "enc"];
    let mut rest = subject.trim();
    // Hearth tags its answers' subjects with the environment: a subject with the tag is a
    // reply, whatever the mail program did to the prefixes.
    let mut reply = words(rest).any(|w| is_slug(&w)) && rest.contains("[env_");
    loop {
        let Some((head, tail)) = rest.split_once(':') else {
            return (reply, rest);
        };
        let head = head.trim().to_ascii_lowercase();
        // "Re[2]:" and "Re(2):" count as "Re:".
        let head = head.split(['[', '(']).next().unwrap_or("");
        if REPLY.contains(&head) {
            reply = true;
        } else if !FORWARD.contains(&head) {
            return (reply, rest);
        }
        rest = tail.trim_start();
    }
}

/// Lower-cased words: runs of letters, digits, `_`, `-`, `.` and `/` (so slugs, sizes such
/// as `4gb` and URLs stay whole).
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ':')))
        .map(|w| {
            w.trim_matches(|c: char| matches!(c, '.' | ':' | '-'))
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
}

/// Hearth's slugs: `env_` and eight lower-case letters or digits.
fn is_slug(word: &str) -> bool {
    word.strip_prefix("env_").is_some_and(|rest| {
        rest.len() == 8
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

/// The text outside fenced blocks (a block's contents are code, not details).
fn outside_fences(body: &str) -> String {
    let mut inside = false;
    let mut out = String::new();
    for line in body.lines() {
        if line.trim_start().starts_with("```") {
            inside = !inside;
            continue;
        }
        if !inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The first fenced code block's contents, when it is closed and not empty.
fn first_fence(body: &str) -> Option<String> {
    let mut lines = body.lines();
    lines.find(|l| l.trim_start().starts_with("```"))?;
    let mut code = String::new();
    for line in lines {
        if line.trim_start().starts_with("```") {
            return (!code.trim().is_empty()).then_some(code);
        }
        code.push_str(line);
        code.push('\n');
    }
    None
}

/// Sizes, duration and repository written as words: "2 vcpus", "4gb ram", "8192 mb memory",
/// "20 gb disk", "3 hours", "2d", "repo https://github.com/o/r". A memory or disk size needs
/// its qualifier ("ram"/"memory", "disk"): a bare "4gb" names neither, and is refused rather
/// than ignored. A URL counts only after "repo" or "repository" (a link in a signature is
/// not a repository).
fn sizes(text: &str) -> Result<CreateRequest, String> {
    // Each word split where digits meet letters: "4gb" → "4", "gb".
    let mut parts: Vec<String> = Vec::new();
    let mut repository = None;
    let mut previous = String::new();
    for w in words(text).take(2000) {
        if w.starts_with("https://") || w.starts_with("http://") {
            if matches!(previous.as_str(), "repo" | "repository") {
                repository.get_or_insert(w.clone());
            }
            previous = w;
            continue;
        }
        previous = w.clone();
        let mut current = String::new();
        for c in w.chars() {
            if !current.is_empty()
                && current.chars().last().is_some_and(|p| p.is_ascii_digit()) != c.is_ascii_digit()
            {
                parts.push(std::mem::take(&mut current));
            }
            current.push(c);
        }
        parts.push(current);
    }
    let mut req = CreateRequest {
        repository,
        ..Default::default()
    };
    for (i, part) in parts.iter().enumerate() {
        let Ok(n) = part.parse::<i64>() else { continue };
        let unit = parts.get(i + 1).map(String::as_str).unwrap_or("");
        let qualifier = parts.get(i + 2).map(String::as_str).unwrap_or("");
        let memory = matches!(qualifier, "ram" | "memory" | "mem");
        let disk = matches!(qualifier, "disk" | "storage");
        match unit {
            "cpu" | "cpus" | "vcpu" | "vcpus" | "core" | "cores" => {
                req.vcpus.get_or_insert(n);
            }
            "gb" | "gib" | "g" if memory => {
                req.memory_mb.get_or_insert(n.saturating_mul(1024));
            }
            "mb" | "mib" | "m" if memory => {
                req.memory_mb.get_or_insert(n);
            }
            "gb" | "gib" | "g" if disk => {
                req.disk_gb.get_or_insert(n);
            }
            "gb" | "gib" | "mb" | "mib" => {
                return Err(format!(
                    "\"{n} {unit}\" names neither memory nor disk: write \"{n} {unit} ram\" or \"{n} {unit} disk\""
                ));
            }
            "h" | "hr" | "hrs" | "hour" | "hours" => {
                req.duration_hours.get_or_insert(n);
            }
            "d" | "day" | "days" => {
                req.duration_hours.get_or_insert(n.saturating_mul(24));
            }
            _ => {}
        }
    }
    Ok(req)
}

/// The JSON form: `{"action": "create", "vcpus": 2, "memoryMb": 4096, "duration": "2h", ...}`.
/// The seed's field names are accepted too (`resources`, `envId`, `repositoryUrl`, `env`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JsonCommand {
    action: String,
    name: Option<String>,
    vcpus: Option<i64>,
    memory_mb: Option<i64>,
    disk_gb: Option<i64>,
    resources: Option<JsonResources>,
    duration: Option<String>,
    duration_hours: Option<i64>,
    #[serde(alias = "repositoryUrl")]
    repository: Option<String>,
    init_script: Option<String>,
    #[serde(alias = "environmentVars")]
    env: Option<BTreeMap<String, String>>,
    #[serde(alias = "envId", alias = "environmentId")]
    slug: Option<String>,
    code: Option<String>,
    working_dir: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JsonResources {
    vcpus: Option<i64>,
    memory_mb: Option<i64>,
    disk_gb: Option<i64>,
}

fn json_command(text: &str) -> Command {
    let c: JsonCommand = match serde_json::from_str(text) {
        Ok(c) => c,
        Err(e) => return help(format!("the body is not a command in JSON: {e}")),
    };
    let action = c.action.trim().to_lowercase();
    let Some(verb) = WORDS
        .iter()
        .find(|(word, _)| *word == action)
        .map(|(_, v)| *v)
    else {
        return help(format!("unknown action {:?}", cap(&c.action, 40)));
    };
    let target = c.slug.clone().filter(|s| !s.trim().is_empty());
    let needs = |make: fn(String) -> Command| match &target {
        Some(t) => make(t.clone()),
        None => help(format!(
            "{verb} needs \"slug\": the environment's slug or id"
        )),
    };
    match verb {
        "create" => {
            let resources = c.resources.unwrap_or(JsonResources {
                vcpus: None,
                memory_mb: None,
                disk_gb: None,
            });
            let duration_hours = match (c.duration_hours, c.duration.as_deref()) {
                (Some(h), _) => Some(h),
                (None, Some(d)) => match duration(d) {
                    Some(h) => Some(h),
                    None => {
                        return help(format!(
                            "duration {:?} is not a number of hours or days (\"2h\", \"7d\")",
                            cap(d, 40)
                        ));
                    }
                },
                (None, None) => None,
            };
            Command::Create(CreateRequest {
                name: c.name,
                vcpus: c.vcpus.or(resources.vcpus),
                memory_mb: c.memory_mb.or(resources.memory_mb),
                disk_gb: c.disk_gb.or(resources.disk_gb),
                duration_hours,
                repository: c.repository,
                init_script: c.init_script,
                environment_vars: c.env.unwrap_or_default(),
            })
        }
        "destroy" => needs(|target| Command::Destroy { target }),
        "status" => needs(|target| Command::Status { target }),
        "connect" => needs(|target| Command::Connect { target }),
        "execute" => match (target, c.code.filter(|s| !s.trim().is_empty())) {
            (Some(target), Some(code)) => Command::Execute {
                target,
                code,
                working_dir: c.working_dir,
            },
            (None, _) => help("execute needs \"slug\": the environment's slug or id"),
            (_, None) => help("execute needs \"code\": the command to run"),
        },
        "list" => Command::List,
        _ => Command::Help { problem: None },
    }
}

/// "2h", "3 hours", "7d", "1 day" as hours.
fn duration(text: &str) -> Option<i64> {
    let t = text.trim().to_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit())?;
    let n: i64 = t[..split].parse().ok()?;
    match t[split..].trim() {
        "h" | "hr" | "hrs" | "hour" | "hours" => Some(n),
        "d" | "day" | "days" => n.checked_mul(24),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(subject: &str, body: &str) -> CreateRequest {
        match parse(subject, body) {
            Command::Create(r) => r,
            other => panic!("{subject:?} gave {other:?}"),
        }
    }

    #[test]
    fn subject_words_name_commands() {
        assert_eq!(
            parse("create", ""),
            Command::Create(CreateRequest::default())
        );
        assert_eq!(parse("Fwd: FW: create", "").name(), "create");
        // "new" starts too many subjects to mean create.
        assert_eq!(parse("New environment please", "").name(), "help");
        assert_eq!(
            parse("Destroy env_ab12cd34", ""),
            Command::Destroy {
                target: "env_ab12cd34".into()
            }
        );
        assert_eq!(
            parse("status", "of env_ab12cd34 please"),
            Command::Status {
                target: "env_ab12cd34".into()
            }
        );
        assert_eq!(parse("SSH env_ab12cd34", "").name(), "connect");
        assert_eq!(parse("list", ""), Command::List);
        assert_eq!(parse("help", ""), Command::Help { problem: None });
    }

    #[test]
    fn the_originals_misfires_do_not_happen() {
        // "restart" is not "start" and not create; unknown subjects get the help.
        for subject in [
            "restart env_ab12cd34",
            "hello",
            "Restarted?",
            "Startup ideas",
            "",
            "kill it",
        ] {
            let c = parse(subject, "");
            assert_eq!(c.name(), "help", "{subject:?} gave {c:?}");
        }
        // "showcase" is not "show"/"list", "remover" not "remove".
        assert_eq!(parse("showcase", "").name(), "help");
        // Only the first word is the command.
        for subject in [
            "Happy new year",
            "Fwd: New pricing",
            "please don't delete env_ab12cd34",
            "What's new?",
        ] {
            assert_eq!(parse(subject, "").name(), "help", "{subject:?}");
        }
    }

    #[test]
    fn sizes_duration_and_repository_are_read() {
        let r = create(
            "create",
            "2 vcpus, 4gb ram and 20 GB disk for 3 hours\nhttps://github.com/o/r\n",
        );
        assert_eq!(r.vcpus, Some(2));
        assert_eq!(r.memory_mb, Some(4096));
        assert_eq!(r.disk_gb, Some(20));
        assert_eq!(r.duration_hours, Some(3));
        assert_eq!(r.repository, None, "a bare link is not a repository");
        let r = create(
            "create",
            "repo https://github.com/o/r\n-- \nhttps://example.com/me",
        );
        assert_eq!(r.repository.as_deref(), Some("https://github.com/o/r"));
        let r = create("create 1cpu 512 mb memory 2d", "");
        assert_eq!(
            (r.vcpus, r.memory_mb, r.duration_hours),
            (Some(1), Some(512), Some(48))
        );
        // A bare size names neither memory nor disk: refused, not ignored.
        let c = parse("create 4gb", "");
        assert!(
            matches!(&c, Command::Help { problem: Some(p) } if p.contains("neither memory nor disk")),
            "{c:?}"
        );
    }

    #[test]
    fn execute_runs_the_first_fence_only() {
        let body =
            "please run this\n```sh\necho one\necho two\n```\nand not\n```\necho three\n```\n";
        assert_eq!(
            parse("execute env_ab12cd34", body),
            Command::Execute {
                target: "env_ab12cd34".into(),
                code: "echo one\necho two\n".into(),
                working_dir: None
            }
        );
        assert_eq!(parse("execute env_ab12cd34", "echo hi").name(), "help");
        // Inside the block, quote and signature markers are code.
        let c = parse(
            "execute env_ab12cd34",
            "```\necho a > /tmp/x\n> /tmp/y\n--\nOn it wrote:\n```\n",
        );
        assert!(
            matches!(&c, Command::Execute { code, .. } if code == "echo a > /tmp/x\n> /tmp/y\n--\nOn it wrote:\n"),
            "{c:?}"
        );
        assert_eq!(
            parse("execute env_ab12cd34", "```\necho open").name(),
            "help"
        );
        assert_eq!(parse("execute", "```\necho hi\n```").name(), "help");
    }

    #[test]
    fn a_reply_takes_its_command_from_the_first_line() {
        // Replying to the answer of "create" with "destroy" destroys, never creates again.
        assert_eq!(
            parse(
                "Re: create [env_ab12cd34]",
                "destroy\n\nOn Monday, Hearth wrote:\n> create\n"
            ),
            Command::Destroy {
                target: "env_ab12cd34".into()
            }
        );
        assert_eq!(parse("RE: Re: create", "thanks!\n> create").name(), "help");
        assert_eq!(parse("Fwd: create", "").name(), "create");
        // A mail program that lost the prefix: Hearth's tag still makes it a reply.
        assert_eq!(
            parse("create [env_ab12cd34]", "status"),
            Command::Status {
                target: "env_ab12cd34".into()
            }
        );
        assert_eq!(parse("SV: Re[2]: create", "thanks").name(), "help");
    }

    #[test]
    fn quoted_and_signature_text_is_ignored() {
        assert_eq!(parse("status", "> env_ab12cd34\n").name(), "help");
        let r = create("create", "1 vcpu\n-- \n64 vcpus\n");
        assert_eq!(r.vcpus, Some(1));
    }

    #[test]
    fn json_commands() {
        let c = parse(
            "anything",
            r#"{"action":"create","resources":{"vcpus":2,"memoryMb":2048},"duration":"7d","env":{"A":"b"}}"#,
        );
        let Command::Create(r) = c else {
            panic!("{c:?}")
        };
        assert_eq!(
            (r.vcpus, r.memory_mb, r.duration_hours),
            (Some(2), Some(2048), Some(168))
        );
        assert_eq!(r.environment_vars.get("A").map(String::as_str), Some("b"));
        assert_eq!(
            parse(
                "",
                r#"{"action":"execute","envId":"env_ab12cd34","code":"uname -a","workingDir":"/tmp"}"#
            ),
            Command::Execute {
                target: "env_ab12cd34".into(),
                code: "uname -a".into(),
                working_dir: Some("/tmp".into())
            }
        );
        for bad in [
            r#"{"action":"reboot"}"#,
            r#"{"action":"create","duration":"forever"}"#,
            r#"{"action":"create","colour":"blue"}"#,
            r#"{"action":"destroy"}"#,
            r#"{"action":"execute","slug":"env_ab12cd34"}"#,
            r#"{"nope"}"#,
        ] {
            let c = parse("create", bad);
            assert!(
                matches!(&c, Command::Help { problem: Some(_) }),
                "{bad} gave {c:?}"
            );
        }
    }
}
