//! The response body of an SSE connection: the bytes its delivery task wrote that the HTTP
//! writer has not taken yet.
//!
//! Everything queued when the writer polls goes out as one chunk (one chunk header, one copy
//! into actix's write buffer, usually one `send`), so a connection that fell a few frames
//! behind catches up in one write instead of one per frame. Empty, the queue holds no
//! allocation: an idle connection pays for the shared state only.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};

/// The connection is gone (the HTTP writer dropped the body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

#[derive(Default)]
struct State {
    chunks: Vec<Bytes>,
    /// Bytes of `chunks`.
    bytes: usize,
    writer_done: bool,
    reader_gone: bool,
    /// The HTTP writer waiting for bytes.
    reader: Option<Waker>,
    /// The delivery task waiting for room (woken when the reader takes).
    room: Option<Waker>,
    /// The delivery task watching for the reader to go (woken only then: a wake-up per
    /// take would poll the delivery task once more per write).
    gone: Option<Waker>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn park(slot: &mut Option<Waker>, cx: &Context<'_>) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        *slot = Some(cx.waker().clone());
    }
}

/// A body queue that holds up to `limit` bytes before its writer waits.
pub fn channel(limit: usize) -> (BodyWriter, BodyStream) {
    let shared = Arc::new(Shared::default());
    (
        BodyWriter {
            shared: shared.clone(),
            limit,
        },
        BodyStream { shared },
    )
}

/// The delivery task's end.
pub struct BodyWriter {
    shared: Arc<Shared>,
    limit: usize,
}

impl BodyWriter {
    /// Queues `bytes` whatever the queue holds (a writer bounds itself with [`Self::room`]).
    pub fn push(&self, bytes: Bytes) -> Result<(), Gone> {
        let mut state = self.shared.lock();
        if state.reader_gone {
            return Err(Gone);
        }
        if bytes.is_empty() {
            return Ok(());
        }
        state.bytes += bytes.len();
        state.chunks.push(bytes);
        if let Some(reader) = state.reader.take() {
            reader.wake();
        }
        Ok(())
    }

    /// Ready when the queue is under its limit (the client took enough), or the client is gone.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<Result<(), Gone>> {
        let mut state = self.shared.lock();
        if state.reader_gone {
            return Poll::Ready(Err(Gone));
        }
        if state.bytes < self.limit {
            return Poll::Ready(Ok(()));
        }
        park(&mut state.room, cx);
        Poll::Pending
    }

    pub async fn room(&self) -> Result<(), Gone> {
        std::future::poll_fn(|cx| self.poll_room(cx)).await
    }

    /// Resolves when the client is gone.
    pub async fn closed(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.shared.lock();
            if state.reader_gone {
                return Poll::Ready(());
            }
            park(&mut state.gone, cx);
            Poll::Pending
        })
        .await;
    }
}

impl Drop for BodyWriter {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.writer_done = true;
        if let Some(reader) = state.reader.take() {
            reader.wake();
        }
    }
}

/// The HTTP response's end: yields everything queued as one chunk, and ends after the writer
/// is dropped and the queue is empty.
pub struct BodyStream {
    shared: Arc<Shared>,
}

impl futures::Stream for BodyStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut state = self.shared.lock();
        if state.chunks.is_empty() {
            if state.writer_done {
                return Poll::Ready(None);
            }
            park(&mut state.reader, cx);
            return Poll::Pending;
        }
        let total = std::mem::take(&mut state.bytes);
        let chunks = std::mem::take(&mut state.chunks);
        if let Some(writer) = state.room.take() {
            writer.wake();
        }
        drop(state);
        let chunk = if let [only] = chunks.as_slice() {
            only.clone()
        } else {
            let mut joined = BytesMut::with_capacity(total);
            for chunk in &chunks {
                joined.extend_from_slice(chunk);
            }
            joined.freeze()
        };
        Poll::Ready(Some(Ok(chunk)))
    }
}

impl Drop for BodyStream {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.reader_gone = true;
        state.chunks = Vec::new();
        state.bytes = 0;
        for writer in [state.room.take(), state.gone.take()].into_iter().flatten() {
            writer.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use futures::task::noop_waker_ref;

    use super::*;

    fn poll(stream: &mut BodyStream) -> Poll<Option<Result<Bytes, Infallible>>> {
        stream.poll_next_unpin(&mut Context::from_waker(noop_waker_ref()))
    }

    #[test]
    fn frames_queued_while_the_connection_is_not_polled_go_out_as_one_chunk_in_order() {
        let (writer, mut stream) = channel(1024);
        assert!(poll(&mut stream).is_pending());
        for frame in ["id: 1-0\ndata: a\n\n", "id: 2-0\ndata: b\n\n", ": ping\n\n"] {
            assert_eq!(writer.push(Bytes::from_static(frame.as_bytes())), Ok(()));
        }
        assert!(matches!(
            poll(&mut stream),
            Poll::Ready(Some(Ok(chunk)))
                if &chunk[..] == b"id: 1-0\ndata: a\n\nid: 2-0\ndata: b\n\n: ping\n\n"
        ));
        assert!(poll(&mut stream).is_pending());
        // A lone frame goes out as it is.
        let frame = Bytes::from_static(b"id: 3-0\ndata: c\n\n");
        assert_eq!(writer.push(frame.clone()), Ok(()));
        assert!(matches!(poll(&mut stream), Poll::Ready(Some(Ok(c))) if c == frame));
        // The end comes after what is still queued.
        assert_eq!(writer.push(Bytes::from_static(b"last")), Ok(()));
        drop(writer);
        assert!(matches!(poll(&mut stream), Poll::Ready(Some(Ok(c))) if &c[..] == b"last"));
        assert!(matches!(poll(&mut stream), Poll::Ready(None)));
    }

    #[test]
    fn the_writer_waits_for_room_and_learns_when_the_client_is_gone() {
        let (writer, mut stream) = channel(8);
        let mut cx = Context::from_waker(noop_waker_ref());
        assert_eq!(writer.poll_room(&mut cx), Poll::Ready(Ok(())));
        assert_eq!(writer.push(Bytes::from_static(b"12345678")), Ok(()));
        assert!(writer.poll_room(&mut cx).is_pending());
        assert!(matches!(poll(&mut stream), Poll::Ready(Some(Ok(_)))));
        assert_eq!(writer.poll_room(&mut cx), Poll::Ready(Ok(())));
        drop(stream);
        assert_eq!(writer.poll_room(&mut cx), Poll::Ready(Err(Gone)));
        assert_eq!(writer.push(Bytes::from_static(b"x")), Err(Gone));
    }
}
