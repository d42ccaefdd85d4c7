//! Request bodies that can be sent again.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::error::BoxError;

pin_project! {
    /// The request body the inner service receives from [`Retry`](super::Retry): the
    /// caller's body, recorded as it is read (up to the layer's body limit) so that a retry
    /// can send the same bytes again.
    ///
    /// In-memory bodies (`Full`, `String`, `Bytes`, ...) are taken whole when the request
    /// arrives and replayed by reference count, with no copy. Streaming bodies are recorded
    /// lazily while the first attempt reads them; once more than the limit has been read the
    /// recording stops and the request is no longer retried.
    pub struct ReplayBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Empty,
        Bytes { data: Option<Bytes> },
        Once { #[pin] body: B },
        Shared { reader: Reader<B> },
        Failed { error: Option<BoxError> },
    }
}

impl<B> std::fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Empty => "empty",
            Kind::Bytes { .. } => "bytes",
            Kind::Once { .. } => "once",
            Kind::Shared { .. } => "recorded",
            Kind::Failed { .. } => "failed",
        };
        f.debug_struct("ReplayBody").field("kind", &kind).finish()
    }
}

impl<B> ReplayBody<B> {
    /// A body that is sent once and never replayed.
    pub fn once(body: B) -> Self {
        Self {
            kind: Kind::Once { body },
        }
    }

    /// An in-memory body.
    pub fn from_bytes(data: Bytes) -> Self {
        Self {
            kind: Kind::Bytes {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self { kind: Kind::Empty }
    }
}

pub(crate) struct Recording<B> {
    body: Option<Pin<Box<B>>>,
    /// Every data chunk read so far, while they fit in the limit.
    chunks: Vec<Bytes>,
    /// Chunks read from the body in all (buffered or not).
    total: usize,
    len: usize,
    limit: usize,
    /// More than `limit` bytes were read, or the body failed: no replay.
    spoiled: bool,
    trailers: Option<HeaderMap>,
    waiters: Vec<Waker>,
    hint: SizeHint,
}

impl<B> Recording<B> {
    fn wake_all(&mut self) {
        for w in self.waiters.drain(..) {
            w.wake();
        }
    }
}

type SharedRecording<B> = Arc<Mutex<Recording<B>>>;

fn lock<B>(shared: &SharedRecording<B>) -> MutexGuard<'_, Recording<B>> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One attempt's view of a recorded body: its position in the recording.
struct Reader<B> {
    shared: SharedRecording<B>,
    /// Data chunks delivered; `total + 1` once the trailers (or the end) were delivered.
    pos: usize,
    done: bool,
}

impl<B> Drop for Reader<B> {
    fn drop(&mut self) {
        // Another attempt may be waiting on a body this attempt was the last to poll.
        lock(&self.shared).wake_all();
    }
}

impl<B> Reader<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut rec = lock(&self.shared);
        if let Some(chunk) = rec.chunks.get(self.pos) {
            let chunk = chunk.clone();
            self.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if self.pos < rec.total {
            // The recording was dropped (over the limit) before this reader caught up.
            self.done = true;
            return Poll::Ready(Some(Err(
                "the request body was not recorded in full and cannot be sent again".into(),
            )));
        }
        let Some(body) = rec.body.as_mut() else {
            self.done = true;
            return Poll::Ready(rec.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        };
        match body.as_mut().poll_frame(cx) {
            Poll::Pending => {
                if !rec.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    rec.waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
            Poll::Ready(None) => {
                rec.body = None;
                rec.wake_all();
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                rec.body = None;
                rec.spoiled = true;
                rec.chunks = Vec::new();
                rec.wake_all();
                self.done = true;
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(mut data) => {
                        let bytes = data.copy_to_bytes(data.remaining());
                        rec.total += 1;
                        self.pos += 1;
                        if !rec.spoiled {
                            if rec.len + bytes.len() <= rec.limit {
                                rec.len += bytes.len();
                                rec.chunks.push(bytes.clone());
                            } else {
                                tracing::debug!(
                                    limit = rec.limit,
                                    "request body is larger than the retry body limit; it will not be retried"
                                );
                                rec.spoiled = true;
                                rec.chunks = Vec::new();
                            }
                        }
                        Frame::data(bytes)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            rec.trailers = Some(trailers.clone());
                            rec.body = None;
                            self.done = true;
                            Frame::trailers(trailers)
                        }
                        // An unknown frame kind: pass nothing on, read on.
                        Err(_) => {
                            drop(rec);
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                    },
                };
                rec.wake_all();
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }
}

/// Where the bodies of successive attempts come from.
pub(crate) enum BodySource<B> {
    Empty,
    Bytes(Bytes),
    Once(Option<B>),
    /// The recording, and whether a reader (the first attempt) was handed out yet.
    Shared(SharedRecording<B>, bool),
    Failed(Option<BoxError>),
}

impl<B> BodySource<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    /// Prepares `body` for replay. An in-memory body is taken at once: it is polled a
    /// single time with a no-op waker, which a body that is ready returns whole and a
    /// streaming body answers with `Pending` (its real reader registers itself later).
    #[inline]
    pub(crate) fn new(body: B, limit: usize) -> Self {
        if body.is_end_stream() {
            return BodySource::Empty;
        }
        let hint = body.size_hint();
        if hint.lower() > limit as u64 {
            return BodySource::Once(Some(body));
        }
        let mut body = Box::pin(body);
        let mut cx = Context::from_waker(Waker::noop());
        let mut rec = Recording {
            body: None,
            chunks: Vec::new(),
            total: 0,
            len: 0,
            limit,
            spoiled: false,
            trailers: None,
            waiters: Vec::new(),
            hint,
        };
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(None) => return BodySource::Empty,
            Poll::Ready(Some(Err(err))) => return BodySource::Failed(Some(err.into())),
            Poll::Pending => rec.body = Some(body),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(mut data) => {
                    let bytes = data.copy_to_bytes(data.remaining());
                    if body.is_end_stream() && bytes.len() <= limit {
                        return BodySource::Bytes(bytes);
                    }
                    rec.total = 1;
                    rec.len = bytes.len();
                    // Over the limit already: the first attempt still gets this chunk,
                    // but no attempt comes after it.
                    rec.spoiled = bytes.len() > limit;
                    rec.chunks.push(bytes);
                    rec.body = Some(body);
                }
                Err(frame) => {
                    rec.trailers = frame.into_trailers().ok();
                }
            },
        }
        BodySource::Shared(Arc::new(Mutex::new(rec)), false)
    }

    /// Whether another attempt can be made after the next one.
    #[inline]
    pub(crate) fn replayable(&self) -> bool {
        match self {
            BodySource::Empty | BodySource::Bytes(_) => true,
            BodySource::Once(_) | BodySource::Failed(_) => false,
            BodySource::Shared(shared, _) => !lock(shared).spoiled,
        }
    }

    /// The body of the next attempt, or `None` if the body cannot be sent again.
    #[inline]
    pub(crate) fn next(&mut self) -> Option<ReplayBody<B>> {
        let kind = match self {
            BodySource::Empty => Kind::Empty,
            BodySource::Bytes(data) => Kind::Bytes {
                data: Some(data.clone()),
            },
            BodySource::Once(body) => Kind::Once { body: body.take()? },
            BodySource::Failed(error) => Kind::Failed {
                error: Some(error.take()?),
            },
            BodySource::Shared(shared, started) => {
                // The first attempt always gets the body, recorded or not.
                if std::mem::replace(started, true) && lock(shared).spoiled {
                    return None;
                }
                Kind::Shared {
                    reader: Reader {
                        shared: Arc::clone(shared),
                        pos: 0,
                        done: false,
                    },
                }
            }
        };
        Some(ReplayBody { kind })
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Empty => Poll::Ready(None),
            KindProj::Bytes { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Once { body } => match body.poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(
                    frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))
                ))),
                Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            KindProj::Shared { reader } => reader.poll(cx),
            KindProj::Failed { error } => Poll::Ready(error.take().map(Err)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Bytes { data } => data.is_none(),
            Kind::Once { body } => body.is_end_stream(),
            Kind::Shared { reader } => reader.done,
            Kind::Failed { error } => error.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Bytes { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Once { body } => body.size_hint(),
            Kind::Shared { reader } => lock(&reader.shared).hint,
            Kind::Failed { .. } => SizeHint::default(),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    pub(crate) type Chunk = Result<Frame<Bytes>, std::io::Error>;

    /// A body fed chunk by chunk through a channel.
    pub(crate) fn streaming() -> (
        tokio::sync::mpsc::Sender<Chunk>,
        impl Body<Data = Bytes, Error = std::io::Error> + Send + 'static,
    ) {
        struct S(tokio::sync::mpsc::Receiver<Chunk>);
        impl futures_core::Stream for S {
            type Item = Chunk;
            fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
                self.0.poll_recv(cx)
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(16);
        (tx, StreamBody::new(S(rx)))
    }

    async fn read<B>(body: ReplayBody<B>) -> Result<Bytes, BoxError>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        Ok(body.collect().await?.to_bytes())
    }

    #[tokio::test]
    async fn full_body_is_taken_whole_and_replayed() {
        let mut source = BodySource::new(Full::new(Bytes::from_static(b"hello")), 1024);
        assert!(matches!(source, BodySource::Bytes(_)));
        assert!(source.replayable());
        for _ in 0..3 {
            let body = source.next().unwrap();
            assert_eq!(body.size_hint().exact(), Some(5));
            assert_eq!(read(body).await.unwrap(), "hello");
        }
    }

    #[tokio::test]
    async fn empty_body_is_empty() {
        let mut source = BodySource::new(http_body_util::Empty::<Bytes>::new(), 1024);
        assert!(matches!(source, BodySource::Empty));
        let body = source.next().unwrap();
        assert!(body.is_end_stream());
        assert_eq!(read(body).await.unwrap(), "");
    }

    #[tokio::test]
    async fn body_over_limit_by_hint_is_sent_once() {
        let mut source = BodySource::new(Full::new(Bytes::from(vec![7u8; 100])), 10);
        assert!(!source.replayable());
        assert_eq!(read(source.next().unwrap()).await.unwrap().len(), 100);
        assert!(source.next().is_none());
    }

    #[tokio::test]
    async fn streaming_body_is_recorded_then_replayed() {
        let (tx, body) = streaming();
        let mut source = BodySource::new(body, 1024);
        assert!(matches!(source, BodySource::Shared(..)));
        let first = source.next().unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"ab"))))
            .await
            .unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"cd"))))
            .await
            .unwrap();
        drop(tx);
        assert_eq!(read(first).await.unwrap(), "abcd");
        assert!(source.replayable());
        assert_eq!(read(source.next().unwrap()).await.unwrap(), "abcd");
        assert_eq!(read(source.next().unwrap()).await.unwrap(), "abcd");
    }

    #[tokio::test]
    async fn unread_streaming_body_survives_a_dropped_attempt() {
        let (tx, body) = streaming();
        let mut source = BodySource::new(body, 1024);
        // the first attempt fails before sending any byte
        drop(source.next().unwrap());
        tx.send(Ok(Frame::data(Bytes::from_static(b"late"))))
            .await
            .unwrap();
        drop(tx);
        assert_eq!(read(source.next().unwrap()).await.unwrap(), "late");
    }

    #[tokio::test]
    async fn streaming_body_over_limit_is_not_replayed() {
        let (tx, body) = streaming();
        let mut source = BodySource::new(body, 4);
        let first = source.next().unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
            .await
            .unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"def"))))
            .await
            .unwrap();
        drop(tx);
        // the first attempt still gets every byte
        assert_eq!(read(first).await.unwrap(), "abcdef");
        assert!(!source.replayable());
        assert!(source.next().is_none());
    }

    #[tokio::test]
    async fn trailers_are_replayed() {
        let (tx, body) = streaming();
        let mut source = BodySource::new(body, 1024);
        let first = source.next().unwrap();
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "42".parse().unwrap());
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .unwrap();
        tx.send(Ok(Frame::trailers(trailers.clone())))
            .await
            .unwrap();
        drop(tx);
        let collected = first.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        let again = source.next().unwrap().collect().await.unwrap();
        assert_eq!(again.trailers(), Some(&trailers));
        assert_eq!(again.to_bytes(), "x");
    }

    #[tokio::test]
    async fn a_ready_first_chunk_over_the_limit_is_sent_once() {
        let (tx, body) = streaming();
        tx.send(Ok(Frame::data(Bytes::from(vec![1u8; 64]))))
            .await
            .unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"tail"))))
            .await
            .unwrap();
        drop(tx);
        let mut source = BodySource::new(body, 16);
        assert!(!source.replayable());
        let first = read(source.next().unwrap()).await.unwrap();
        assert_eq!(first.len(), 68);
        assert!(source.next().is_none());
    }

    #[tokio::test]
    async fn a_body_that_fails_at_once_is_sent_once_with_its_error() {
        let (tx, body) = streaming();
        tx.send(Err(std::io::Error::other("disk gone")))
            .await
            .unwrap();
        let mut source = BodySource::new(body, 16);
        assert!(!source.replayable());
        let err = read(source.next().unwrap()).await.unwrap_err();
        assert_eq!(err.to_string(), "disk gone");
        assert!(source.next().is_none());
    }

    #[tokio::test]
    async fn a_reader_that_fell_behind_the_dropped_recording_gets_an_error() {
        let (tx, body) = streaming();
        let mut source = BodySource::new(body, 4);
        let mut early = source.next().unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"ab"))))
            .await
            .unwrap();
        let frame = early.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        // a second reader starts while the recording is still complete
        let late = source.next().unwrap();
        // the first reader goes past the limit: the recording is dropped
        tx.send(Ok(Frame::data(Bytes::from_static(b"cdef"))))
            .await
            .unwrap();
        drop(tx);
        assert_eq!(read(early).await.unwrap(), "cdef");
        // the second reader still gets what was recorded, then an honest error
        assert!(read(late).await.is_err());
    }
}
