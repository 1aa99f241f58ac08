//! The SMTP listener for commands by mail (`HEARTH_SMTP_LISTEN`): the part of RFC 5321 a
//! sending server uses (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT; VRFY answers 252).
//!
//! It takes mail for the agent's address only (never a relay: any other recipient gets
//! 550), and answers 250 to DATA only once the message is stored, so a message it accepted
//! is never lost. What a message proves about its sender is decided after that (in
//! `hearth_app::mail`); a rejected message still gets 250, so a forger learns nothing and no
//! bounce goes to the forged address.
//!
//! What one client can hold is bounded: `HEARTH_SMTP_MAX_CONNECTIONS` sessions (64), 8 of
//! them from one address (one more is told 421 and closed), a command line of 512 bytes
//! and a text line of 1000 with their CRLF (RFC 5321's limits; longer gets 500 and the
//! session ends), a message of `MAX_MESSAGE_BYTES` (announced as SIZE; larger gets 552 and
//! is not kept), 16 recipients, 60 s to send each line, and 10 minutes per session.
//!
//! The message ends only at CRLF "." CRLF: a bare LF "." is text, so a message cannot
//! smuggle a second one past a server in front that reads line ends differently.
//!
//! STARTTLS is not offered: put the listener on loopback or a private network behind the
//! domain's MX (Postfix, a cloud relay), which speaks TLS to the world.

use hearth_app::App;
use hearth_app::mail::{Arrival, Receipt};
use hearth_mail::{MAX_MESSAGE_BYTES, Recipient};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

const COMMAND_LINE: usize = 510;
const TEXT_LINE: usize = 998;
/// Sessions one client address may hold at once.
const PER_PEER: usize = 8;
const MAX_RECIPIENTS: usize = 16;
const LINE_TIMEOUT: Duration = Duration::from_secs(60);
const SESSION_LIMIT: Duration = Duration::from_secs(600);

/// Serves SMTP on `listener` until `shutdown` turns true.
pub async fn serve(app: App, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let Some(mail) = app.mail.clone() else { return };
    let slots = Arc::new(Semaphore::new(mail.config.max_connections));
    let peers: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>> = Default::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let Ok((mut tcp, peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let ip = peer.ip();
        // Counted for as long as the session lives, whatever way it ends.
        let counted = PeerCount::new(peers.clone(), ip);
        let slot = slots.clone().try_acquire_owned();
        let Ok(slot) = slot.map_err(|_| ()).and_then(|s| {
            if counted.sessions > PER_PEER {
                Err(())
            } else {
                Ok(s)
            }
        }) else {
            drop(counted);
            let _ = tcp
                .write_all(b"421 4.7.0 too many connections, try again later\r\n")
                .await;
            continue;
        };
        // Answers are small and each waits for the next command: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let (read, write) = tcp.into_split();
            let session = Session::new(app, BufReader::new(read), write);
            match tokio::time::timeout(SESSION_LIMIT, session.run()).await {
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "SMTP session ended"),
                Err(_) => {
                    tracing::info!(%peer, "SMTP session cut after {} s", SESSION_LIMIT.as_secs())
                }
                Ok(Ok(())) => {}
            }
            drop(counted);
            drop(slot);
        });
    }
}

/// One session counted against its client's address; uncounted when dropped.
struct PeerCount {
    peers: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
    /// Sessions of this address, this one included, when it was counted.
    sessions: usize,
}

impl PeerCount {
    fn new(peers: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> PeerCount {
        let sessions = {
            let mut map = peers.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(ip).or_default();
            *n += 1;
            *n
        };
        PeerCount {
            peers,
            ip,
            sessions,
        }
    }
}

impl Drop for PeerCount {
    fn drop(&mut self) {
        let mut map = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// What reading a line gave.
enum Read {
    /// The line without its ending, and whether that ending was CRLF.
    Line(Vec<u8>, bool),
    TooLong,
    Closed,
}

struct Session<R, W> {
    app: App,
    reader: R,
    writer: W,
    greeted: bool,
    sender: Option<String>,
    recipients: Vec<String>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Session<BufReader<R>, W> {
    fn new(app: App, reader: BufReader<R>, writer: W) -> Self {
        Session {
            app,
            reader,
            writer,
            greeted: false,
            sender: None,
            recipients: Vec::new(),
        }
    }

    /// One answer, in one write (two small writes would wait on the peer's delayed ACK).
    async fn reply(&mut self, text: &str) -> std::io::Result<()> {
        self.writer
            .write_all(format!("{text}\r\n").as_bytes())
            .await?;
        self.writer.flush().await
    }

    /// One line of at most `limit` bytes before its line ending.
    async fn line(&mut self, limit: usize) -> std::io::Result<Read> {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(
            LINE_TIMEOUT,
            (&mut self.reader)
                .take(limit as u64 + 2)
                .read_until(b'\n', &mut buf),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no line within 60 s"))??;
        if read == 0 {
            return Ok(Read::Closed);
        }
        if buf.last() != Some(&b'\n') {
            return Ok(if buf.len() > limit {
                Read::TooLong
            } else {
                Read::Closed
            });
        }
        buf.pop();
        let crlf = buf.last() == Some(&b'\r');
        if crlf {
            buf.pop();
        }
        Ok(if buf.len() > limit {
            Read::TooLong
        } else {
            Read::Line(buf, crlf)
        })
    }

    fn agent(&self) -> &str {
        self.app
            .mail
            .as_ref()
            .map_or("", |m| m.config.address.as_str())
    }

    async fn run(mut self) -> std::io::Result<()> {
        self.reply("220 hearth ESMTP ready").await?;
        loop {
            let line = match self.line(COMMAND_LINE).await? {
                Read::Line(l, _) => l,
                Read::TooLong => return self.reply("500 5.5.2 line too long").await,
                Read::Closed => return Ok(()),
            };
            let line = String::from_utf8_lossy(&line).to_string();
            let (verb, rest) = line.split_once(' ').unwrap_or((&line, ""));
            match verb.to_ascii_uppercase().as_str() {
                "EHLO" => {
                    self.greeted = true;
                    self.reset();
                    self.reply(&format!(
                        "250-hearth\r\n250-SIZE {MAX_MESSAGE_BYTES}\r\n250 8BITMIME"
                    ))
                    .await?;
                }
                "HELO" => {
                    self.greeted = true;
                    self.reset();
                    self.reply("250 hearth").await?;
                }
                "MAIL" => self.mail_from(rest).await?,
                "RCPT" => self.rcpt_to(rest).await?,
                "DATA" => {
                    if self.sender.is_none() || self.recipients.is_empty() {
                        self.reply("503 5.5.1 MAIL and RCPT first").await?;
                        continue;
                    }
                    self.data().await?;
                }
                "RSET" => {
                    self.reset();
                    self.reply("250 2.0.0 ok").await?;
                }
                "NOOP" => self.reply("250 2.0.0 ok").await?,
                "VRFY" => self.reply("252 2.1.5 cannot verify, send and see").await?,
                "QUIT" => return self.reply("221 2.0.0 bye").await,
                _ => self.reply("502 5.5.1 not a command here").await?,
            }
        }
    }

    fn reset(&mut self) {
        self.sender = None;
        self.recipients.clear();
    }

    async fn mail_from(&mut self, rest: &str) -> std::io::Result<()> {
        if !self.greeted {
            return self.reply("503 5.5.1 EHLO first").await;
        }
        let Some((address, params)) = path(rest, "FROM:") else {
            return self.reply("501 5.5.4 MAIL FROM:<address> expected").await;
        };
        let size = params.split_whitespace().find_map(|p| {
            p.to_ascii_uppercase()
                .strip_prefix("SIZE=")
                .and_then(|n| n.parse::<usize>().ok())
        });
        if size.is_some_and(|s| s > MAX_MESSAGE_BYTES) {
            return self
                .reply(&format!("552 5.3.4 larger than {MAX_MESSAGE_BYTES} bytes"))
                .await;
        }
        self.sender = Some(address);
        self.recipients.clear();
        self.reply("250 2.1.0 ok").await
    }

    async fn rcpt_to(&mut self, rest: &str) -> std::io::Result<()> {
        if self.sender.is_none() {
            return self.reply("503 5.5.1 MAIL first").await;
        }
        let Some((address, _)) = path(rest, "TO:") else {
            return self.reply("501 5.5.4 RCPT TO:<address> expected").await;
        };
        if self.recipients.len() >= MAX_RECIPIENTS {
            return self.reply("452 4.5.3 too many recipients").await;
        }
        if hearth_mail::recipient(&address, self.agent()) == Recipient::Other {
            return self
                .reply("550 5.1.1 no such mailbox here (this is not a relay)")
                .await;
        }
        self.recipients.push(address);
        self.reply("250 2.1.5 ok").await
    }

    async fn data(&mut self) -> std::io::Result<()> {
        self.reply("354 end with <CRLF>.<CRLF>").await?;
        let mut message = Vec::new();
        let mut too_big = false;
        // The end is "." on a line of its own, with CRLF before and after it.
        let mut after_crlf = true;
        loop {
            let (line, crlf) = match self.line(TEXT_LINE).await? {
                Read::Line(l, crlf) => (l, crlf),
                // The rest of the message would be read as commands: end the session.
                Read::TooLong => {
                    self.reply("500 5.5.2 line too long; closing").await?;
                    return Err(std::io::Error::other("a text line over 998 bytes"));
                }
                Read::Closed => return Ok(()),
            };
            if line == b"." && crlf && after_crlf {
                break;
            }
            after_crlf = crlf;
            // Dot-stuffing: a line that starts with '.' was sent with one more.
            let line = line.strip_prefix(b".").unwrap_or(&line);
            if too_big || message.len() + line.len() + 2 > MAX_MESSAGE_BYTES {
                too_big = true;
                message = Vec::new();
                continue;
            }
            message.extend_from_slice(line);
            message.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
        }
        let recipients = std::mem::take(&mut self.recipients);
        let sender = self.sender.take().unwrap_or_default();
        if too_big {
            return self
                .reply(&format!(
                    "552 5.3.4 larger than {MAX_MESSAGE_BYTES} bytes; not kept"
                ))
                .await;
        }
        match self
            .app
            .receive(Arrival::Smtp {
                raw: &message,
                envelope_sender: &sender,
                recipients: &recipients,
            })
            .await
        {
            Ok(Receipt::Queued(id)) => self.reply(&format!("250 2.0.0 accepted as {id}")).await,
            Ok(_) => self.reply("250 2.0.0 accepted").await,
            Err(e) => {
                tracing::warn!(error = %e, "could not store a received message; the sender will retry");
                self.reply("451 4.3.0 cannot store the message now, try again later")
                    .await
            }
        }
    }
}

/// `FROM:<a@b> SIZE=10` → (`a@b`, `SIZE=10`); the empty path `<>` is allowed.
fn path(rest: &str, keyword: &str) -> Option<(String, String)> {
    let rest = rest.trim_start();
    if !rest.get(..keyword.len())?.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = rest[keyword.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    let address = rest[..end].trim().to_string();
    if address.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    Some((address, rest[end + 1..].trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::path;

    #[test]
    fn paths_are_read() {
        assert_eq!(
            path("FROM:<a@b.c> SIZE=10", "FROM:"),
            Some(("a@b.c".into(), "SIZE=10".into()))
        );
        assert_eq!(
            path("from: <>", "FROM:"),
            Some((String::new(), String::new()))
        );
        assert_eq!(path("TO:a@b.c", "TO:"), None);
        assert_eq!(path("TO:<a b@c>", "TO:"), None);
        assert_eq!(path("", "TO:"), None);
    }
}
