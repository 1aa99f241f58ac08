//! Mail as data: what a received message says (`Inbound`), which command it asks for
//! (`command::parse`), whether its recipient carries a user's secret (`recipient`), and what
//! SendGrid's `dkim` field claims (`sendgrid_dkim_passes`).
//!
//! Architecture invariant: no I/O, no clock, no database. Every function here is a pure
//! function of its input, bounded in what it reads, and never panics on any input: the fuzz
//! target in `fuzz/` runs all of it on arbitrary bytes.

pub mod command;

use mail_parser::MessageParser;
use sha2::{Digest, Sha256};

pub use command::{Command, CreateRequest};

/// The largest message accepted, by SMTP and by the webhook (the SMTP `SIZE` we announce).
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// The part of a body the command parser reads; the rest is ignored.
pub const MAX_BODY_CHARS: usize = 64 * 1024;
/// RFC 5322's line limit, and the longest subject kept.
pub const MAX_SUBJECT_CHARS: usize = 998;

/// What a received message says, as far as commands care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// Without angle brackets. A message without one gets `sha256-<hash>@hearth` of its
    /// bytes, so the same bytes delivered twice are still recognised.
    pub message_id: String,
    /// The `From` header's address, lower-cased; `None` when absent or unreadable.
    pub from: Option<String>,
    pub subject: String,
    /// The text part (or the HTML part as text), at most `MAX_BODY_CHARS`.
    pub text: String,
    pub in_reply_to: Option<String>,
    /// Sent by a machine (`Auto-Submitted` other than `no`, `Precedence: bulk|junk|list`, or
    /// a `List-Id`): never answered, so an out-of-office reply cannot start a mail loop.
    pub automatic: bool,
}

/// Reads a raw RFC 5322 message.
pub fn parse_message(raw: &[u8]) -> Result<Inbound, String> {
    if raw.len() > MAX_MESSAGE_BYTES {
        return Err(format!(
            "the message is {} bytes; the limit is {MAX_MESSAGE_BYTES}",
            raw.len()
        ));
    }
    let message = MessageParser::default()
        .parse(raw)
        .ok_or("the message has no headers")?;
    let message_id = match message.message_id() {
        Some(id) if !id.trim().is_empty() => clean_message_id(id),
        _ => derived_message_id(raw),
    };
    let from = message
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .and_then(address);
    let subject = message.subject().map(cap_subject).unwrap_or_default();
    let text = message
        .body_text(0)
        .map(|t| cap(&t, MAX_BODY_CHARS))
        .unwrap_or_default();
    let header = |name: &'static str| {
        message
            .header_raw(name)
            .map(|v| v.trim().to_ascii_lowercase())
    };
    let automatic = header("Auto-Submitted").is_some_and(|v| !v.starts_with("no"))
        || header("Precedence").is_some_and(|v| matches!(v.as_str(), "bulk" | "junk" | "list"))
        || header("List-Id").is_some();
    let in_reply_to = message
        .in_reply_to()
        .as_text()
        .map(clean_message_id)
        .filter(|s| !s.is_empty());
    Ok(Inbound {
        message_id,
        from,
        subject,
        text,
        in_reply_to,
        automatic,
    })
}

/// What SendGrid's Inbound Parse posts, read as a message: `headers` is the original header
/// block (Message-ID, From, In-Reply-To and the rest); the body is `text`, or `html` as text.
/// The `from` and `subject` fields stand in when the headers lack them.
pub fn parse_webhook(
    headers: &str,
    from: Option<&str>,
    subject: Option<&str>,
    text: Option<&str>,
    html: Option<&str>,
) -> Result<Inbound, String> {
    let size = headers.len() + text.map_or(0, str::len) + html.map_or(0, str::len);
    if size > MAX_MESSAGE_BYTES {
        return Err(format!(
            "the message is {size} bytes; the limit is {MAX_MESSAGE_BYTES}"
        ));
    }
    // The header block alone, so a multipart Content-Type in it cannot misread the body.
    let mut block = headers
        .trim_end()
        .replace("\r\n", "\n")
        .replace('\n', "\r\n");
    block.push_str("\r\n\r\n");
    let mut inbound = parse_message(block.as_bytes()).unwrap_or(Inbound {
        message_id: String::new(),
        from: None,
        subject: String::new(),
        text: String::new(),
        in_reply_to: None,
        automatic: false,
    });
    let has_id = headers.lines().any(|l| {
        l.get(..11)
            .is_some_and(|h| h.eq_ignore_ascii_case("message-id:"))
    });
    if !has_id {
        // No id of its own: one from everything posted, so two different messages differ.
        let all = [
            headers,
            from.unwrap_or(""),
            subject.unwrap_or(""),
            text.unwrap_or(""),
            html.unwrap_or(""),
        ];
        inbound.message_id = derived_message_id(all.join("\0").as_bytes());
    }
    if inbound.from.is_none() {
        inbound.from = from.and_then(address_in);
    }
    if inbound.subject.is_empty() {
        inbound.subject = subject.map(cap_subject).unwrap_or_default();
    }
    inbound.text = match (text, html) {
        (Some(t), _) if !t.trim().is_empty() => cap(t, MAX_BODY_CHARS),
        (_, Some(h)) => cap(
            &mail_parser::decoders::html::html_to_text(h),
            MAX_BODY_CHARS,
        ),
        _ => String::new(),
    };
    Ok(inbound)
}

/// A message id as stored: no angle brackets or surrounding space, at most 250 characters
/// (longer ones are replaced by their hash, still stable).
pub fn clean_message_id(id: &str) -> String {
    let id = id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    if id.len() > 250 || id.chars().any(|c| c.is_control()) {
        return derived_message_id(id.as_bytes());
    }
    id.to_string()
}

fn derived_message_id(bytes: &[u8]) -> String {
    format!("sha256-{}@hearth", hex::encode(Sha256::digest(bytes)))
}

/// An address as compared: trimmed, lower-cased, and only when it has one `@` with
/// something on both sides and no space or control character.
pub fn address(raw: &str) -> Option<String> {
    let a = raw
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_lowercase();
    let (local, domain) = a.split_once('@')?;
    let plain = |s: &str| {
        !s.is_empty() && !s.contains('@') && !s.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    (a.len() <= 254 && plain(local) && plain(domain)).then_some(a)
}

/// The address in a header-style field: `Name <a@b.c>` or `a@b.c`, cleaned by `address`.
pub fn address_in(field: &str) -> Option<String> {
    let start = field.rfind('<').map_or(0, |i| i + 1);
    address(field[start..].trim_end_matches('>'))
}

/// The domain of an address (already cleaned by `address`).
pub fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

/// The first `chars` characters of `text`.
pub(crate) fn cap(text: &str, chars: usize) -> String {
    text.chars().take(chars).collect()
}

fn cap_subject(subject: &str) -> String {
    cap(subject, MAX_SUBJECT_CHARS)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// How a recipient relates to the agent's address `agent` (`local@domain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    /// `local@domain` itself.
    Agent,
    /// `local+token@domain`: the token a user's secret sub-address carries.
    SubAddress(String),
    /// Any other address: not ours to accept.
    Other,
}

/// Classifies `recipient` against the agent address.
pub fn recipient(recipient: &str, agent: &str) -> Recipient {
    let (Some(r), Some(a)) = (address(recipient), address(agent)) else {
        return Recipient::Other;
    };
    let (Some((r_local, r_domain)), Some((a_local, a_domain))) =
        (r.rsplit_once('@'), a.rsplit_once('@'))
    else {
        return Recipient::Other;
    };
    if r_domain != a_domain {
        return Recipient::Other;
    }
    if r_local == a_local {
        return Recipient::Agent;
    }
    match r_local
        .strip_prefix(a_local)
        .and_then(|t| t.strip_prefix('+'))
    {
        Some(token) if !token.is_empty() => Recipient::SubAddress(token.to_string()),
        _ => Recipient::Other,
    }
}

/// Whether SendGrid's Inbound Parse `dkim` field (`{@example.com : pass, @other.net : fail}`)
/// reports a passing signature for `domain`. Only an exact domain match counts: a pass for a
/// parent or another domain proves nothing about this sender.
pub fn sendgrid_dkim_passes(field: &str, domain: &str) -> bool {
    let domain = domain.trim().to_lowercase();
    if domain.is_empty() {
        return false;
    }
    field
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .split(',')
        .filter_map(|entry| entry.split_once(':'))
        .any(|(d, verdict)| {
            d.trim().trim_start_matches('@').to_lowercase() == domain
                && verdict.trim().eq_ignore_ascii_case("pass")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_read() {
        let raw =
            b"From: Alice <Alice@Example.COM>\r\nTo: agent@hearth.test\r\nSubject: create\r\n\
Message-ID: <abc@example.com>\r\nIn-Reply-To: <prev@hearth.test>\r\n\r\nhello\r\n";
        let m = parse_message(raw).unwrap();
        assert_eq!(m.message_id, "abc@example.com");
        assert_eq!(m.from.as_deref(), Some("alice@example.com"));
        assert_eq!(m.subject, "create");
        assert_eq!(m.text.trim(), "hello");
        assert_eq!(m.in_reply_to.as_deref(), Some("prev@hearth.test"));
    }

    #[test]
    fn machines_are_recognised() {
        let base = "From: a@b.c\r\nSubject: Out of office\r\n";
        for extra in [
            "Auto-Submitted: auto-replied\r\n",
            "Precedence: bulk\r\n",
            "List-Id: <x.y>\r\n",
        ] {
            let raw = format!("{base}{extra}\r\nbody\r\n");
            assert!(parse_message(raw.as_bytes()).unwrap().automatic, "{extra}");
        }
        let raw = format!("{base}Auto-Submitted: no\r\n\r\nbody\r\n");
        assert!(!parse_message(raw.as_bytes()).unwrap().automatic);
    }

    #[test]
    fn a_webhook_post_is_read() {
        let headers = "Message-ID: <w1@example.com>\nFrom: Bob <bob@example.com>\nSubject: list\n\
Content-Type: multipart/alternative; boundary=\"x\"";
        let m =
            parse_webhook(headers, None, None, None, Some("<p>hello <b>there</b></p>")).unwrap();
        assert_eq!(m.message_id, "w1@example.com");
        assert_eq!(m.from.as_deref(), Some("bob@example.com"));
        assert_eq!(m.subject, "list");
        assert!(m.text.contains("hello there"), "{:?}", m.text);
        let m =
            parse_webhook("", Some("Eve <EVE@x.org>"), Some("status"), Some("t"), None).unwrap();
        assert_eq!(
            (m.from.as_deref(), m.subject.as_str(), m.text.as_str()),
            (Some("eve@x.org"), "status", "t")
        );
    }

    #[test]
    fn a_message_without_an_id_gets_a_stable_one() {
        let raw = b"From: a@b.c\r\nSubject: list\r\n\r\nx\r\n";
        let one = parse_message(raw).unwrap().message_id;
        assert!(one.starts_with("sha256-"), "{one}");
        assert_eq!(parse_message(raw).unwrap().message_id, one);
        let other = parse_message(b"From: a@b.c\r\nSubject: list\r\n\r\ny\r\n").unwrap();
        assert_ne!(other.message_id, one);
    }

    #[test]
    fn too_large_is_refused() {
        let raw = vec![b'a'; MAX_MESSAGE_BYTES + 1];
        assert!(parse_message(&raw).unwrap_err().contains("limit"));
    }

    #[test]
    fn recipients_are_classified() {
        let agent = "agent@hearth.test";
        assert_eq!(recipient("Agent@Hearth.test", agent), Recipient::Agent);
        assert_eq!(
            recipient("<agent+abc123@hearth.test>", agent),
            Recipient::SubAddress("abc123".into())
        );
        assert_eq!(recipient("agent+@hearth.test", agent), Recipient::Other);
        assert_eq!(recipient("agentx@hearth.test", agent), Recipient::Other);
        assert_eq!(recipient("agent@evil.test", agent), Recipient::Other);
        assert_eq!(recipient("nonsense", agent), Recipient::Other);
    }

    #[test]
    fn the_sendgrid_dkim_field_must_name_the_domain() {
        assert!(sendgrid_dkim_passes("{@example.com : pass}", "example.com"));
        assert!(sendgrid_dkim_passes(
            "{@other.net : fail, @Example.com : pass}",
            "example.com"
        ));
        assert!(!sendgrid_dkim_passes(
            "{@example.com : fail}",
            "example.com"
        ));
        assert!(!sendgrid_dkim_passes("{@evil.com : pass}", "example.com"));
        assert!(!sendgrid_dkim_passes(
            "{@mail.example.com : pass}",
            "example.com"
        ));
        assert!(!sendgrid_dkim_passes("none", "example.com"));
        assert!(!sendgrid_dkim_passes("{@ : pass}", ""));
    }

    #[test]
    fn addresses_are_found_in_fields() {
        assert_eq!(
            address_in("Alice <Alice@Example.com>").as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(address_in(" bob@x.org ").as_deref(), Some("bob@x.org"));
        assert_eq!(address_in("Nobody <>"), None);
    }

    #[test]
    fn addresses_are_cleaned_or_refused() {
        assert_eq!(address(" <A@B.c> ").as_deref(), Some("a@b.c"));
        assert_eq!(address("a@@b"), None);
        assert_eq!(address("a b@c"), None);
        assert_eq!(address("@c"), None);
    }
}
