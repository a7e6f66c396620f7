//! The client side of the admin API for `tether sessions ...`: one blocking HTTP/1.1 request
//! per call over std's `TcpStream` (no runtime needed for a one-shot command), with timeouts.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::ops::http::percent_encode;
use crate::session::inspect::SessionInfo;

/// Connect and read timeouts of one request.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response read.
const MAX_RESPONSE: u64 = 64 * 1024 * 1024;

/// Where the admin API is and how to authenticate.
#[derive(Debug, Clone)]
pub struct AdminClient {
    /// `host:port`.
    authority: String,
    /// Bearer token, if the broker requires one.
    token: Option<String>,
}

impl AdminClient {
    /// A client for `url` (`http://HOST:PORT`, the scheme optional).
    pub fn new(url: &str, token: Option<String>) -> Result<AdminClient, String> {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        if rest.contains("://") {
            return Err(format!("{url}: only http:// URLs are supported"));
        }
        let authority = rest.split('/').next().unwrap_or(rest).to_string();
        if authority.is_empty() || !authority.contains(':') {
            return Err(format!("{url}: expected http://HOST:PORT"));
        }
        Ok(AdminClient {
            authority,
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// Send one request; returns the status and the body.
    pub fn request(&self, method: &str, path: &str) -> Result<(u16, String), String> {
        let addr = self
            .authority
            .to_socket_addrs()
            .map_err(|e| format!("{}: {e}", self.authority))?
            .next()
            .ok_or_else(|| format!("{}: no address", self.authority))?;
        let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
            .map_err(|e| format!("cannot reach the admin API at {addr}: {e}"))?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
            .map_err(|e| e.to_string())?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: 0\r\n",
            self.authority
        );
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .map_err(|e| format!("sending to {addr}: {e}"))?;
        let mut raw = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .map_err(|e| format!("reading from {addr}: {e}"))?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("{addr}: not an HTTP response"))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("{addr}: not an HTTP response"))?;
        Ok((status, body.to_string()))
    }

    /// `GET /api/sessions`.
    pub fn list(&self) -> Result<Vec<SessionInfo>, String> {
        let body = ok(self.request("GET", "/api/sessions")?)?;
        serde_json::from_str(&body).map_err(|e| format!("unexpected answer: {e}"))
    }

    /// `GET /api/sessions/ID`: the pretty JSON.
    pub fn show(&self, client_id: &str) -> Result<String, String> {
        ok(self.request("GET", &session_path(client_id))?)
    }

    /// `POST /api/sessions/ID/kick`.
    pub fn kick(&self, client_id: &str) -> Result<(), String> {
        ok(self.request("POST", &format!("{}/kick", session_path(client_id)))?).map(drop)
    }

    /// `DELETE /api/sessions/ID`.
    pub fn delete(&self, client_id: &str) -> Result<(), String> {
        ok(self.request("DELETE", &session_path(client_id))?).map(drop)
    }
}

fn session_path(client_id: &str) -> String {
    format!("/api/sessions/{}", percent_encode(client_id))
}

/// The body of a 200, or the API's error message.
fn ok((status, body): (u16, String)) -> Result<String, String> {
    if status == 200 {
        return Ok(body);
    }
    let msg = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string());
    Err(format!(
        "{status} {}: {msg}",
        crate::ops::http::reason(status)
    ))
}

/// The table `tether sessions list` prints.
pub fn table(sessions: &[SessionInfo]) -> String {
    let mut rows = vec![[
        "CLIENT ID".to_string(),
        "STATE".into(),
        "PROTO".into(),
        "SUBS".into(),
        "QUEUED".into(),
        "INFLIGHT".into(),
        "EXPIRY".into(),
        "WILL".into(),
    ]];
    for s in sessions {
        let expiry = match (s.expiry_interval_secs, s.expires_in_secs) {
            (None, _) => "never".to_string(),
            (Some(_), Some(left)) => format!("in {left}s"),
            (Some(i), None) => format!("{i}s"),
        };
        rows.push([
            s.client_id.clone(),
            if s.online { "online" } else { "offline" }.into(),
            s.protocol.clone(),
            s.subscriptions.len().to_string(),
            s.queued_messages.to_string(),
            s.inflight.to_string(),
            expiry,
            if s.will { "yes" } else { "no" }.into(),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
