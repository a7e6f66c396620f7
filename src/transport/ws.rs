//! WebSocket listeners: the HTTP upgrade (path and the `mqtt` subprotocol checked), then an
//! adapter that turns binary messages into the plain byte stream the MQTT codec reads. MQTT
//! packets and WebSocket frames are independent [MQTT-6.0.0-2]: a packet may span frames and a
//! frame may carry several packets; the codec sees only bytes.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_core::Stream as _;
use futures_sink::Sink;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::WebSocketStream;

/// The error type of the upgrade and of frames.
pub type WsError = Error;

/// Subprotocols accepted, in order of preference: `mqtt` [MQTT-6.0.0-4], and the name
/// MQTT 3.1 clients (and old Paho JavaScript) offer.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];
/// Largest binary message sent in one go; larger output becomes several messages.
const MAX_OUT_MESSAGE: usize = 64 * 1024;
/// The read buffer tungstenite allocates per connection (its default is 128 KiB).
const READ_BUFFER: usize = 8 * 1024;

/// A WebSocket connection read and written as a byte stream of binary messages.
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// The rest of the binary message being read.
    pending: Bytes,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// The stream underneath (the TLS session of a `wss` connection).
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }
}

fn refuse(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(why.to_string()));
    *r.status_mut() = status;
    r
}

/// Answer the HTTP upgrade on `path`, choosing the `mqtt` subprotocol; anything else (another
/// path, no upgrade, no MQTT subprotocol) is refused with an HTTP error and the connection
/// closed. `max_message` bounds one incoming frame and message.
// The callback's error type is tungstenite's own HTTP response, large or not.
#[allow(clippy::result_large_err)]
pub async fn accept<S>(stream: S, path: &str, max_message: usize) -> Result<WsStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let check = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != path {
            return Err(refuse(StatusCode::NOT_FOUND, "no MQTT endpoint here"));
        }
        let offered: Vec<&str> = req
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let Some(chosen) = SUBPROTOCOLS
            .iter()
            .find(|p| offered.iter().any(|o| o.eq_ignore_ascii_case(p)))
        else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "the mqtt WebSocket subprotocol is required",
            ));
        };
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(chosen),
        );
        Ok(resp)
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        // Our own output buffer already batches packets: write each message at once.
        .write_buffer_size(0)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let inner =
        tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config)).await?;
    Ok(WsStream {
        inner,
        pending: Bytes::new(),
    })
}

fn to_io(e: Error) -> io::Error {
    match e {
        Error::Io(e) => e,
        Error::ConnectionClosed | Error::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                // End of stream or a Close frame (tungstenite answers it): EOF.
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(b))) => this.pending = b,
                // [MQTT-6.0.0-1]: MQTT travels in binary frames; a text frame closes the
                // connection.
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "WebSocket text frame",
                    )))
                }
                // Pings are answered by tungstenite itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(Error::ConnectionClosed | Error::AlreadyClosed)) => {
                    return Poll::Ready(Ok(()))
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let inner = &mut self.get_mut().inner;
        ready!(Pin::new(&mut *inner).poll_ready(cx)).map_err(to_io)?;
        let n = buf.len().min(MAX_OUT_MESSAGE);
        Pin::new(inner)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    /// The slices go out in one binary message (copied, as `poll_write` copies), not one
    /// message per slice: a header and the payload it is followed by are one frame.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total = bufs
            .iter()
            .map(|b| b.len())
            .sum::<usize>()
            .min(MAX_OUT_MESSAGE);
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let inner = &mut self.get_mut().inner;
        ready!(Pin::new(&mut *inner).poll_ready(cx)).map_err(to_io)?;
        let mut message = Vec::with_capacity(total);
        for b in bufs {
            let n = b.len().min(total - message.len());
            message.extend_from_slice(&b[..n]);
        }
        Pin::new(inner)
            .start_send(Message::Binary(Bytes::from(message)))
            .map_err(to_io)?;
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_flush(cx)
            .map_err(to_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_close(cx)
            .map_err(to_io)
    }
}
