//! What carries a connection's MQTT bytes: TCP, TLS, WebSocket or WebSocket over TLS.
//!
//! The connection task sees one [`Stream`] whatever the listener; the handshakes that make one
//! ([`Endpoint::handshake`]) run inside that task, within its CONNECT deadline, so a client
//! that stalls a TLS or HTTP handshake costs one task and one connection slot, nothing more.

pub mod out;
pub mod tls;
pub mod ws;

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::config::{ListenerSpec, TransportKind};
pub use out::OutBuf;

/// One accepted connection after its transport handshake. Boxed variants keep the common
/// plain-TCP case small (TLS state is tens of kilobytes).
pub enum Stream {
    /// MQTT on TCP.
    Tcp(TcpStream),
    /// MQTT on TLS.
    Tls(Box<TlsStream<TcpStream>>),
    /// MQTT in WebSocket binary frames.
    Ws(Box<ws::WsStream<TcpStream>>),
    /// MQTT in WebSocket binary frames over TLS.
    Wss(Box<ws::WsStream<TlsStream<TcpStream>>>),
}

/// What one turn of [`Stream::poll_io`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// Wrote this many bytes of the output (possibly only into the transport's buffer).
    Wrote(usize),
    /// Read this many bytes into the input buffer; 0 = the peer closed.
    Read(usize),
    /// The transport's own buffer reached the socket.
    Flushed,
}

macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Stream::Tcp($s) => $e,
            Stream::Tls($s) => $e,
            Stream::Ws($s) => $e,
            Stream::Wss($s) => $e,
        }
    };
}

impl Stream {
    /// Whether written bytes can wait in a buffer of the transport's own (TLS records,
    /// WebSocket frames) until flushed; plain TCP writes go straight to the socket.
    pub fn buffers_writes(&self) -> bool {
        !matches!(self, Stream::Tcp(_))
    }

    /// The subject CN of the client's verified certificate, if it sent one.
    pub fn peer_common_name(&self) -> Option<String> {
        let conn = match self {
            Stream::Tls(s) => s.get_ref().1,
            Stream::Wss(s) => s.get_ref().get_ref().1,
            _ => return None,
        };
        tls::common_name(conn.peer_certificates()?.first()?)
    }

    /// Read what has arrived into `buf`. Plain TCP waits for readiness before it reserves
    /// `chunk` bytes, so an idle connection holds no read buffer; the others read through
    /// their own buffers anyway.
    pub fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        chunk: usize,
    ) -> Poll<io::Result<usize>> {
        if let Stream::Tcp(tcp) = self {
            loop {
                ready!(tcp.poll_read_ready(cx))?;
                buf.reserve(chunk);
                match tcp.try_read_buf(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Stale readiness: nothing came. Give the buffer back before waiting,
                        // or every idle connection would sit on a reserved, empty chunk.
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                        continue;
                    }
                    r => return Poll::Ready(r),
                }
            }
        }
        buf.reserve(chunk);
        // `read_buf` is cancel-safe: a future made and dropped per poll loses nothing.
        let read = std::pin::pin!(self.read_buf(&mut *buf));
        let r = std::future::Future::poll(read, cx);
        if r.is_pending() && buf.is_empty() {
            // Waiting: an idle connection holds no read buffer of ours (the transport keeps
            // its own).
            *buf = BytesMut::new();
        }
        r
    }

    /// One step of the connection's I/O: write the first `limit` bytes of `out` if there are
    /// any, else flush if `flush`; and read into `input` if given. Ready with whichever
    /// finished first.
    pub fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        out: &OutBuf,
        limit: usize,
        flush: bool,
        input: Option<(&mut BytesMut, usize)>,
    ) -> Poll<io::Result<Io>> {
        let limit = limit.min(out.len());
        if limit > 0 {
            let written = match out.contiguous(limit) {
                Some(bytes) => Pin::new(&mut *self).poll_write(cx, bytes),
                None => {
                    let mut slices = [IoSlice::new(&[]); out::MAX_SLICES];
                    let n = out.io_slices(limit, &mut slices);
                    Pin::new(&mut *self).poll_write_vectored(cx, &slices[..n])
                }
            };
            if let Poll::Ready(r) = written {
                return Poll::Ready(r.map(Io::Wrote));
            }
        } else if flush {
            if let Poll::Ready(r) = Pin::new(&mut *self).poll_flush(cx) {
                return Poll::Ready(r.map(|()| Io::Flushed));
            }
        }
        if let Some((buf, chunk)) = input {
            if let Poll::Ready(r) = self.poll_read_into(cx, buf, chunk) {
                return Poll::Ready(r.map(Io::Read));
            }
        }
        Poll::Pending
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        each!(self, s => s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

/// Why a transport handshake failed (each closes only its own connection).
#[derive(Debug)]
pub enum HandshakeError {
    /// The TLS handshake failed: not TLS, an old version, a bad or missing client certificate.
    Tls(io::Error),
    /// The HTTP upgrade failed: not an upgrade, wrong path or subprotocol, bad frames.
    Ws(ws::WsError),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            HandshakeError::Ws(e) => write!(f, "WebSocket upgrade failed: {e}"),
        }
    }
}

/// A listener's transport: its settings and, with TLS, its (reloadable) certificate.
#[derive(Debug)]
pub struct Endpoint {
    /// The listener's resolved settings.
    pub spec: ListenerSpec,
    /// The TLS acceptor, re-read on SIGHUP; `None` for a plain listener.
    pub tls: Option<Arc<tls::Certs>>,
}

impl Endpoint {
    /// Set up a listener's transport; fails when its certificate or key cannot be loaded.
    pub fn new(spec: ListenerSpec) -> Result<Endpoint, tls::TlsError> {
        let tls = match &spec.tls {
            Some(t) => Some(Arc::new(tls::Certs::load(t.clone())?)),
            None => None,
        };
        Ok(Endpoint { spec, tls })
    }

    /// Plain TCP: no handshake before CONNECT.
    pub fn is_plain(&self) -> bool {
        self.tls.is_none() && self.spec.transport == TransportKind::Tcp
    }

    /// Turn an accepted socket into the listener's stream: TLS handshake and/or WebSocket
    /// upgrade. `max_frame` bounds a WebSocket message (the packet size limit).
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        max_frame: usize,
    ) -> Result<Stream, HandshakeError> {
        let ws = self.spec.transport == TransportKind::Ws;
        let path = self.spec.ws_path.as_str();
        match &self.tls {
            None if !ws => Ok(Stream::Tcp(tcp)),
            None => ws::accept(tcp, path, max_frame)
                .await
                .map(|s| Stream::Ws(Box::new(s)))
                .map_err(HandshakeError::Ws),
            Some(certs) => {
                let tls = certs
                    .acceptor()
                    .accept(tcp)
                    .await
                    .map_err(HandshakeError::Tls)?;
                if !ws {
                    return Ok(Stream::Tls(Box::new(tls)));
                }
                ws::accept(tls, path, max_frame)
                    .await
                    .map(|s| Stream::Wss(Box::new(s)))
                    .map_err(HandshakeError::Ws)
            }
        }
    }
}
