//! A client of QEMU's machine protocol (QMP) on a Unix socket: JSON objects, one per line.
//! On connect QEMU greets; `qmp_capabilities` leaves negotiation mode; then each
//! `{"execute": ...}` is answered by `{"return": ...}` or `{"error": ...}`, with
//! asynchronous `{"event": ...}` lines in between (skipped here). No maintained crate
//! exists for this; it is small.

use serde_json::{Value, json};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long one command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot reach QEMU's QMP socket {0}: {1}")]
    Connect(String, String),
    #[error("QEMU's QMP connection failed: {0}")]
    Io(String),
    #[error("QEMU refused {command}: {message}")]
    Refused { command: String, message: String },
}

pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

/// Connects, waiting while QEMU's listen queue is full.
///
/// QEMU serves one QMP client at a time and listens with a queue of one, so while one
/// task of the agent holds a connection (a snapshot's pause, a status query) and another
/// waits in the queue, a third connect is refused at once with `EAGAIN` rather than queued.
/// That is "busy, try again", not "gone": retried here every few milliseconds, within the
/// caller's timeout. Any other error (no socket, refused: QEMU has exited) returns at once.
async fn connect_when_accepted(socket: &Path) -> std::io::Result<UnixStream> {
    let mut pause = Duration::from_millis(5);
    loop {
        match UnixStream::connect(socket).await {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

impl Qmp {
    /// Connects and leaves negotiation mode.
    pub async fn connect(socket: &Path) -> Result<Qmp, QmpError> {
        let stream = tokio::time::timeout(COMMAND_TIMEOUT, connect_when_accepted(socket))
            .await
            .map_err(|_| QmpError::Connect(socket.display().to_string(), "timed out".into()))?
            .map_err(|e| QmpError::Connect(socket.display().to_string(), e.to_string()))?;
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(read),
            writer,
        };
        let greeting = qmp.line().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Io(format!(
                "expected QEMU's greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn line(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = tokio::time::timeout(COMMAND_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Io("no answer within 10 s".into()))?
            .map_err(|e| QmpError::Io(e.to_string()))?;
        if n == 0 {
            return Err(QmpError::Io("QEMU closed the connection".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| QmpError::Io(format!("unreadable line {line:?}: {e}")))
    }

    /// Runs one command; returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut text = request.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|e| QmpError::Io(e.to_string()))?;
        self.answer(command).await
    }

    /// The answer to the command just sent, skipping events.
    async fn answer(&mut self, command: &str) -> Result<Value, QmpError> {
        loop {
            let answer = self.line().await?;
            if answer.get("event").is_some() {
                continue;
            }
            if let Some(error) = answer.get("error") {
                let message = error["desc"]
                    .as_str()
                    .unwrap_or("no description")
                    .to_string();
                return Err(QmpError::Refused {
                    command: command.to_string(),
                    message,
                });
            }
            return Ok(answer.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Hands QEMU an open file under `name` (`getfd`), for a later `fd:<name>` migration:
    /// the file is opened here, so QEMU needs no access to its path (it runs as a user of
    /// its own, see `guard.rs`). The descriptor travels as `SCM_RIGHTS` with the command.
    pub async fn send_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let mut text = json!({ "execute": "getfd", "arguments": { "fdname": name } }).to_string();
        text.push('\n');
        let socket = self.writer.as_ref();
        let fds = [fd.as_raw_fd()];
        loop {
            socket
                .writable()
                .await
                .map_err(|e| QmpError::Io(e.to_string()))?;
            let sent = socket.try_io(tokio::io::Interest::WRITABLE, || {
                sendmsg::<()>(
                    socket.as_raw_fd(),
                    &[std::io::IoSlice::new(text.as_bytes())],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                // A command this short goes whole; anything less would split the command
                // from its descriptor.
                Ok(n) if n == text.len() => break,
                Ok(n) => {
                    return Err(QmpError::Io(format!(
                        "getfd: sent {n} of {} bytes",
                        text.len()
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(QmpError::Io(e.to_string())),
            }
        }
        self.answer("getfd").await.map(|_| ())
    }

    /// `running`, `paused`, `shutdown`, ... as QEMU says.
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let status = self.execute("query-status", None).await?;
        Ok(status["status"].as_str().unwrap_or("unknown").to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A QEMU stand-in that greets, answers by the script, and records what it was sent.
    #[tokio::test]
    async fn commands_get_answers_events_are_skipped_and_errors_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            write
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut seen = Vec::new();
            while let Some(line) = lines.next_line().await.unwrap() {
                let v: Value = serde_json::from_str(&line).unwrap();
                let cmd = v["execute"].as_str().unwrap().to_string();
                let answer = match cmd.as_str() {
                    "qmp_capabilities" => "{\"return\": {}}\n".to_string(),
                    "query-status" => "{\"event\": \"RESUME\"}\n{\"return\": {\"status\": \"running\", \"running\": true}}\n".into(),
                    _ => "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no such command\"}}\n".into(),
                };
                write.write_all(answer.as_bytes()).await.unwrap();
                seen.push(cmd);
            }
            seen
        });
        let mut qmp = Qmp::connect(&path).await.unwrap();
        assert_eq!(qmp.status().await.unwrap(), "running");
        let err = qmp.execute("bogus", None).await.unwrap_err();
        assert!(err.to_string().contains("no such command"), "{err}");
        drop(qmp);
        assert_eq!(
            server.await.unwrap(),
            ["qmp_capabilities", "query-status", "bogus"]
        );
    }

    /// A listener with a queue as short as QEMU's: one connection queued, the next refused
    /// with `EAGAIN`. The client waits until the listener accepts, instead of failing.
    #[tokio::test]
    async fn a_full_listen_queue_is_waited_out() {
        use nix::sys::socket::{
            AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        bind(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        listen(&fd, Backlog::new(0).unwrap()).unwrap();
        // Fills the queue: nobody accepts yet.
        let queued = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let refused = UnixStream::connect(&path).await.unwrap_err();
        assert_eq!(
            refused.kind(),
            std::io::ErrorKind::WouldBlock,
            "the queue is full: {refused}"
        );

        let listener = std::os::unix::net::UnixListener::from(fd);
        let server = std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            std::thread::sleep(Duration::from_millis(300));
            let (first, _) = listener.accept().unwrap();
            drop(first);
            let (mut second, _) = listener.accept().unwrap();
            second
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut line = String::new();
            std::io::BufReader::new(second.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            second.write_all(b"{\"return\": {}}\n").unwrap();
            line
        });
        Qmp::connect(&path)
            .await
            .expect("connects once the listener accepts");
        drop(queued);
        assert!(server.join().unwrap().contains("qmp_capabilities"));
    }
}
