//! Framed I/O over any `AsyncRead + AsyncWrite` stream (TCP or TLS), shared
//! by the server and the client.
//!
//! Reading is cancellation-safe: bytes stay in the buffer until a whole frame
//! is there. Writing drains a small queue of frames with `poll_write_vectored`
//! over a fixed `[IoSlice; MAX_IOVECS]` on the stack, tracking partial writes
//! by offset into the front frame; streams without vectored writes get one
//! frame per call. The queue holds refcounted buffers (`T: AsRef<[u8]>`), so a
//! frame shared by 100k connections is never copied.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::error::FrameError;
use crate::frame::{self, Frame};

/// Most frames gathered into one `writev` (IOV_MAX is 1024; past ~64 small
/// iovecs the kernel's per-iovec work starts to show).
pub const MAX_IOVECS: usize = 64;
/// Bytes read per `read` call when the buffer has no room. Client frames
/// are tiny (a HEARTBEAT is 22 bytes), so this is plenty.
const READ_CHUNK: usize = 256;

/// A read that did not produce a frame.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("peer closed the connection in the middle of a frame")]
    Truncated,
}

/// A stream with a read buffer and a write queue.
pub struct Connection<S, T = Bytes> {
    stream: S,
    read_buf: BytesMut,
    max_payload: u32,
    queue: VecDeque<T>,
    /// Bytes of `queue[0]` already written.
    front_offset: usize,
    /// A TLS stream buffers plaintext: it needs a flush after writes.
    needs_flush: bool,
}

impl<S, T> Connection<S, T>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsRef<[u8]>,
{
    /// Wraps `stream`; frames read must have payloads of at most `max_payload`.
    pub fn new(stream: S, max_payload: u32) -> Self {
        Connection {
            stream,
            read_buf: BytesMut::new(),
            max_payload,
            queue: VecDeque::new(),
            front_offset: 0,
            needs_flush: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Changes the payload limit for frames read from now on (the server
    /// allows larger frames once a peer has authenticated).
    pub fn set_max_payload(&mut self, max_payload: u32) {
        self.max_payload = max_payload;
    }

    /// Polls for the next frame. `Ready(Ok(None))` is a clean end of stream.
    ///
    /// An idle connection holds no read buffer: while nothing is buffered,
    /// bytes are read into a stack array and copied out only when they arrive.
    pub fn poll_read_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Frame>, ReadError>> {
        loop {
            if let Some(frame) = frame::decode(&mut self.read_buf, self.max_payload)? {
                if self.read_buf.is_empty() {
                    self.read_buf = BytesMut::new();
                }
                return Poll::Ready(Ok(Some(frame)));
            }
            // Without spare room, read onto the stack and keep only what
            // arrived: a peer that sends a few bytes of a frame and stops
            // holds a buffer the size of those bytes, not a read chunk.
            let n = if self.read_buf.capacity() == self.read_buf.len() {
                let mut stack = [0u8; READ_CHUNK];
                let mut buf = ReadBuf::new(&mut stack);
                match Pin::new(&mut self.stream).poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) => {
                        self.read_buf.extend_from_slice(buf.filled());
                        buf.filled().len()
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => return Poll::Pending,
                }
            } else {
                match tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read_buf) {
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => return Poll::Pending,
                }
            };
            if n == 0 {
                return Poll::Ready(if self.read_buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated)
                });
            }
        }
    }

    /// Reads the next frame; `Ok(None)` at a clean end of stream.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        poll_fn(|cx| self.poll_read_frame(cx)).await
    }

    /// Queues `item` behind what is already queued.
    pub fn enqueue(&mut self, item: T) {
        self.queue.push_back(item);
    }

    /// Queues `item` whose first `written` bytes another writer of this
    /// stream has already sent, so it is the frame in progress: the rest
    /// goes out first, and [`Connection::discard_unstarted`] keeps it. The
    /// queue must be empty (a frame cannot follow one in progress).
    pub fn enqueue_started(&mut self, item: T, written: usize) {
        debug_assert!(self.queue.is_empty(), "a started frame goes first");
        debug_assert!(written < item.as_ref().len(), "a started frame has a rest");
        self.queue.push_front(item);
        self.front_offset = written;
    }

    /// Frames queued and not completely written.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Drops every queued frame not yet started, keeping a partly written
    /// front frame so the stream stays at a frame boundary. Used before a
    /// closing ERROR to a peer that is not reading.
    pub fn discard_unstarted(&mut self) {
        let keep = usize::from(self.front_offset > 0);
        self.queue.truncate(keep);
    }

    /// Writes queued frames until the queue is empty (`Ready(Ok)`) or the
    /// stream is full (`Pending`). Calls `sent` for each frame completely
    /// handed to the stream, and `wrote` once per write call with the number
    /// of frames it gathered.
    pub fn poll_drain(
        &mut self,
        cx: &mut Context<'_>,
        mut sent: impl FnMut(&T),
        mut wrote: impl FnMut(usize),
    ) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            let vectored = self.stream.is_write_vectored();
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            for (i, item) in self
                .queue
                .iter()
                .enumerate()
                .take(if vectored { MAX_IOVECS } else { 1 })
            {
                let bytes = item.as_ref();
                slices[i] = IoSlice::new(if i == 0 {
                    &bytes[self.front_offset..]
                } else {
                    bytes
                });
                count += 1;
            }
            // One frame: plain write(2), which skips the kernel's copy and
            // check of an iovec array (the common case at clock rates).
            let result = if count == 1 {
                Pin::new(&mut self.stream).poll_write(cx, &slices[0])
            } else {
                Pin::new(&mut self.stream).poll_write_vectored(cx, &slices[..count])
            };
            let mut written = match result {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            self.needs_flush = true;
            wrote(count);
            while written > 0 {
                let front_left = self.queue[0].as_ref().len() - self.front_offset;
                if written < front_left {
                    self.front_offset += written;
                    break;
                }
                written -= front_left;
                self.front_offset = 0;
                if let Some(item) = self.queue.pop_front() {
                    sent(&item);
                }
            }
        }
        // A drained queue is released: an idle connection holds no queue
        // memory, and one allocation per write burst is noise next to the
        // send syscall it accompanies.
        self.queue = VecDeque::new();
        if self.needs_flush {
            match Pin::new(&mut self.stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.needs_flush = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_drain(cx, |_| {}, |_| {})).await
    }

    /// Sends our FIN after flushing.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.stream.shutdown().await
    }

    /// Reads and discards, without waiting, whatever input the kernel
    /// already holds (at most `limit` bytes). Called before dropping a
    /// connection whose close grace ran out: unread input at `close(2)`
    /// makes the kernel answer with a RST instead of a FIN.
    pub fn discard_ready_input(&mut self, limit: usize) {
        // `Waker::noop` needs Rust 1.85 (MSRV 1.80); this runs once per close.
        let waker = std::task::Waker::from(std::sync::Arc::new(NoopWake));
        let mut cx = Context::from_waker(&waker);
        let mut seen = 0;
        while seen < limit {
            let mut chunk = [0u8; READ_CHUNK];
            let mut buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.stream).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => seen += buf.filled().len(),
                _ => return,
            }
        }
    }

    /// Reads and discards input until EOF, an error, or `limit` bytes: used
    /// after a closing ERROR so that the peer's unread bytes do not turn our
    /// close into a reset that destroys the ERROR before the peer reads it.
    pub async fn drain_input(&mut self, limit: usize) {
        let mut seen = 0;
        while seen < limit {
            self.read_buf.clear();
            self.read_buf.reserve(READ_CHUNK);
            match poll_fn(|cx| {
                tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read_buf)
            })
            .await
            {
                Ok(0) | Err(_) => return,
                Ok(n) => seen += n,
            }
        }
    }
}

/// A waker that does nothing: for polls that must not wait.
struct NoopWake;

impl std::task::Wake for NoopWake {
    fn wake(self: std::sync::Arc<Self>) {}
}

#[cfg(test)]
mod tests {
    use tokio_test::io::Builder;

    use super::*;
    use crate::frame::{HEADER_LEN, MAX_CLIENT_PAYLOAD};
    use crate::proto::{Auth, Heartbeat};

    fn auth() -> Frame {
        Frame::Auth(Auth {
            username: "u".into(),
            password: "p".into(),
        })
    }

    #[tokio::test]
    async fn frames_split_at_awkward_boundaries_are_reassembled() {
        let a = auth().encode();
        let h = Frame::Heartbeat(Heartbeat {
            client_time_ms: 5,
            server_time_ms: 0,
            ..Heartbeat::default()
        })
        .encode();
        let mut wire = a.to_vec();
        wire.extend_from_slice(&h);
        let stream = Builder::new()
            .read(&wire[..1])
            .read(&wire[1..HEADER_LEN + 1])
            .read(&wire[HEADER_LEN + 1..a.len() + 3])
            .read(&wire[a.len() + 3..])
            .build();
        let mut conn: Connection<_> = Connection::new(stream, MAX_CLIENT_PAYLOAD);
        assert_eq!(conn.read_frame().await.unwrap(), Some(auth()));
        assert!(matches!(
            conn.read_frame().await.unwrap(),
            Some(Frame::Heartbeat(_))
        ));
        assert!(conn.read_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_truncated() {
        let a = auth().encode();
        let stream = Builder::new().read(&a[..5]).build();
        let mut conn: Connection<_> = Connection::new(stream, MAX_CLIENT_PAYLOAD);
        assert!(matches!(conn.read_frame().await, Err(ReadError::Truncated)));
    }

    #[tokio::test]
    async fn a_frame_started_elsewhere_is_finished_first_and_kept_by_a_discard() {
        let frame = Bytes::from_static(b"0123456789");
        let (client, mut server) = tokio::io::duplex(64);
        let mut conn: Connection<_> = Connection::new(client, MAX_CLIENT_PAYLOAD);
        conn.enqueue_started(frame, 4);
        conn.enqueue(Bytes::from_static(b"next"));
        conn.discard_unstarted();
        assert_eq!(conn.queued(), 1, "the started frame stays, the rest goes");
        conn.enqueue(Bytes::from_static(b"!"));
        conn.flush().await.unwrap();
        drop(conn);
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut server, &mut got)
            .await
            .unwrap();
        assert_eq!(got, b"456789!");
    }

    #[tokio::test]
    async fn partial_writes_resume_at_the_right_offset() {
        let a = auth().encode();
        let b = Bytes::from_static(b"0123456789");
        let mut expected = a.to_vec();
        expected.extend_from_slice(&b);
        // The mock accepts writes in whatever pieces we give; checking the
        // concatenation proves offsets were tracked across partial writes.
        let (client, mut server) = tokio::io::duplex(7);
        let mut conn: Connection<_> = Connection::new(client, MAX_CLIENT_PAYLOAD);
        conn.enqueue(a.clone());
        conn.enqueue(b.clone());
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut server, &mut got)
                .await
                .unwrap();
            got
        });
        let mut sent = 0;
        poll_fn(|cx| conn.poll_drain(cx, |_| sent += 1, |_| {}))
            .await
            .unwrap();
        assert_eq!(sent, 2);
        assert_eq!(conn.queued(), 0);
        drop(conn);
        assert_eq!(reader.await.unwrap(), expected);
    }
}
