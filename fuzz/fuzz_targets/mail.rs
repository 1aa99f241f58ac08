//! Everything `hearth-mail` reads from the outside, on arbitrary bytes: a raw message, the
//! webhook's fields, the command in a subject and body, recipients, SendGrid's DKIM field.
//! No input may panic (or hang: libFuzzer reports slow units).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(inbound) = hearth_mail::parse_message(data) {
        let _ = hearth_mail::command::parse(&inbound.subject, &inbound.text);
    }
    let text = String::from_utf8_lossy(data);
    // The same text as every field, split at the first two NULs.
    let mut parts = text.splitn(3, '\0');
    let (a, b, c) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let _ = hearth_mail::command::parse(a, b);
    let _ = hearth_mail::command::parse(b, c);
    let _ = hearth_mail::parse_webhook(a, Some(b), Some(c), Some(b), Some(c));
    let _ = hearth_mail::recipient(a, "agent@hearth.test");
    let _ = hearth_mail::recipient(a, b);
    let _ = hearth_mail::sendgrid_dkim_passes(a, b);
    let _ = hearth_mail::address(a);
    let _ = hearth_mail::clean_message_id(a);
});
