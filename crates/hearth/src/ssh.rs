//! `hearth ssh`: an interactive shell in an environment, through the terminal WebSocket,
//! so no SSH key leaves the server. The local terminal is put in raw mode while it runs
//! and window size changes are forwarded.

use crate::client::{Client, Failure};
use futures::{SinkExt, StreamExt};
use std::io::Write;
use std::process::ExitCode;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

/// Restores the terminal's settings when dropped.
struct RawMode(Option<libc::termios>);

impl RawMode {
    fn enable() -> RawMode {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a zeroed termios they fill in.
        unsafe {
            if libc::isatty(0) != 1 {
                return RawMode(None);
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return RawMode(None);
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw);
            RawMode(Some(saved))
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = self.0 {
            // SAFETY: restores what tcgetattr returned.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &saved);
            }
        }
    }
}

fn terminal_size() -> (u16, u16) {
    // SAFETY: TIOCGWINSZ fills a winsize struct.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0 {
            return (ws.ws_col, ws.ws_row);
        }
    }
    (80, 24)
}

pub async fn run(client: &Client, id: Option<String>) -> Result<ExitCode, Failure> {
    let id = match id {
        Some(id) => id,
        None => client.get("/v1/me/vm").await?["environmentId"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    };
    let (cols, rows) = terminal_size();
    let ws = client
        .websocket(&format!(
            "/v1/environments/{id}/terminal?cols={cols}&rows={rows}"
        ))
        .await?;
    let (mut sink, mut stream) = ws.split();
    let raw = RawMode::enable();
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 4096];
    let mut winch =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => match n {
                Ok(0) | Err(_) => {
                    // End of input (a pipe): let the shell finish what it was given.
                    stdin_open = false;
                }
                Ok(n) => {
                    if sink.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() { break; }
                }
            },
            _ = async { match winch.as_mut() { Some(w) => { w.recv().await; } None => std::future::pending().await } } => {
                let (cols, rows) = terminal_size();
                let resize = serde_json::json!({"type": "resize", "cols": cols, "rows": rows}).to_string();
                let _ = sink.send(Message::Text(resize.into())).await;
            }
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    let mut out = std::io::stdout();
                    let _ = out.write_all(&b);
                    let _ = out.flush();
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    drop(raw);
    Ok(ExitCode::SUCCESS)
}
