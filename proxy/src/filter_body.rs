//! The body and trailers phases of the filter chain: a body that runs each chunk through the
//! data phases of the filters that declared one ([`legate_filters::Phases`]), buffering what a
//! filter stops on, and the state a stream's filters share once a body is filtered.
//!
//! A route whose filters implement no body phase never builds one of these: the request body
//! goes upstream as hyper's `Incoming` and the response body comes back the same way.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use legate_filters::{
    Data, DataStatus, HttpFilter, LocalReply, Phases, RequestContext, RouteConfig, Trailers,
};

/// The error of a body Legate produces: hyper's, or the chain's own.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Envoy's default buffer limit (`per_connection_buffer_limit_bytes`, 1 MiB).
pub const DEFAULT_BUFFER_LIMIT: usize = 1024 * 1024;

/// Why the chain ended a body early.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("a filter answered locally after the stream started")]
    LocalReply,
}

/// What the filters of one stream share once a body phase runs outside the stream's task
/// (the request body is polled by the upstream connection, the response body by the
/// downstream one).
#[derive(Debug, Default)]
pub struct Shared {
    pub ctx: RequestContext,
    /// A local reply a request data phase asked for after the request went upstream.
    pub local_reply: Option<LocalReply>,
}

/// The stream's filter context: owned until a body phase needs to share it.
// Owned is the common case: boxing it would cost every filtered request an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum StreamCtx {
    Owned(RequestContext),
    Shared(Arc<Mutex<Shared>>),
}

impl StreamCtx {
    /// The context, for one call.
    pub fn get(&mut self) -> CtxRef<'_> {
        match self {
            StreamCtx::Owned(c) => CtxRef::Owned(c),
            StreamCtx::Shared(s) => CtxRef::Shared(lock(s)),
        }
    }

    /// Moves the context behind a lock (once) and returns the shared handle.
    pub fn share(&mut self) -> Arc<Mutex<Shared>> {
        if let StreamCtx::Owned(c) = self {
            let ctx = std::mem::take(c);
            *self = StreamCtx::Shared(Arc::new(Mutex::new(Shared {
                ctx,
                local_reply: None,
            })));
        }
        match self {
            StreamCtx::Shared(s) => s.clone(),
            StreamCtx::Owned(_) => unreachable!("shared above"),
        }
    }

    /// A local reply left by a request data phase, if any.
    pub fn take_local_reply(&mut self) -> Option<LocalReply> {
        match self {
            StreamCtx::Owned(_) => None,
            StreamCtx::Shared(s) => lock(s).local_reply.take(),
        }
    }
}

fn lock(s: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A filter that panicked mid-call poisons the lock; its state is still usable.
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// A borrowed context.
pub enum CtxRef<'a> {
    Owned(&'a mut RequestContext),
    Shared(MutexGuard<'a, Shared>),
}

impl std::ops::Deref for CtxRef<'_> {
    type Target = RequestContext;
    fn deref(&self) -> &RequestContext {
        match self {
            CtxRef::Owned(c) => c,
            CtxRef::Shared(g) => &g.ctx,
        }
    }
}

impl std::ops::DerefMut for CtxRef<'_> {
    fn deref_mut(&mut self) -> &mut RequestContext {
        match self {
            CtxRef::Owned(c) => c,
            CtxRef::Shared(g) => &mut g.ctx,
        }
    }
}

/// Which way a body flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// One filter's place in a filtered body.
#[derive(Debug)]
pub struct Stage {
    /// Its index in `http_filters` (for holding headers up to a filter).
    pub index: usize,
    pub filter: Arc<dyn HttpFilter>,
    pub config: Option<RouteConfig>,
    buffered: BytesMut,
}

impl Stage {
    pub fn new(index: usize, filter: Arc<dyn HttpFilter>, config: Option<RouteConfig>) -> Self {
        Stage {
            index,
            filter,
            config,
            buffered: BytesMut::new(),
        }
    }
}

/// Where the body comes from.
#[derive(Debug)]
pub enum Source {
    Incoming(Incoming),
    Full(Option<Bytes>),
}

impl Source {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self {
            Source::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(|e| e.into()),
            Source::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }
}

enum Item {
    Data(Bytes, bool),
    Trailers(HeaderMap),
}

/// A body run through the data and trailers phases of `stages` (request order for a request,
/// reverse order for a response).
pub struct FilteredBody {
    source: Source,
    /// The source has ended (its end went into the chain).
    source_done: bool,
    stages: Vec<Stage>,
    /// Stages `..gate` run; what leaves stage `gate - 1` waits in `held` while the headers are
    /// held at a later filter's stage.
    gate: usize,
    held: VecDeque<Item>,
    ready: VecDeque<Item>,
    /// The end of the stream was handed out.
    finished: bool,
    shared: Arc<Mutex<Shared>>,
    direction: Direction,
}

impl std::fmt::Debug for FilteredBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilteredBody")
            .field("direction", &self.direction)
            .field("stages", &self.stages.len())
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}

impl FilteredBody {
    pub fn new(
        source: Source,
        stages: Vec<Stage>,
        shared: Arc<Mutex<Shared>>,
        direction: Direction,
    ) -> Self {
        let gate = stages.len();
        FilteredBody {
            source,
            source_done: false,
            stages,
            gate,
            held: VecDeque::new(),
            ready: VecDeque::new(),
            finished: false,
            shared,
            direction,
        }
    }

    /// Holds everything that leaves the stages of filters up to `index` (inclusive): the
    /// headers are held at that filter.
    pub fn hold_at(&mut self, index: usize) {
        let direction = self.direction;
        self.gate = self
            .stages
            .iter()
            .take_while(|s| match direction {
                Direction::Request => s.index <= index,
                Direction::Response => s.index >= index,
            })
            .count();
    }

    /// Reads the source through the open stages until something leaves the last open one (the
    /// holding filter continued) or the stream ends. `headers` are the held headers.
    pub async fn pump(&mut self, headers: &mut HeaderMap) -> Result<(), Box<LocalReply>> {
        while self.held.is_empty() && !self.source_done {
            let next = poll_fn(|cx| self.source.poll_frame(cx)).await;
            let item = match next {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => Item::Data(d, false),
                    Err(frame) => match frame.into_trailers() {
                        Ok(t) => {
                            self.source_done = true;
                            Item::Trailers(t)
                        }
                        Err(_) => continue,
                    },
                },
                Some(Err(e)) => {
                    tracing::debug!("body error while headers are held: {e}");
                    return Err(Box::new(aborted(self.direction)));
                }
                None => {
                    self.source_done = true;
                    Item::Data(Bytes::new(), true)
                }
            };
            self.feed(0, item, Some(headers))?;
        }
        Ok(())
    }

    /// Opens the stages up to filter `index` (all of them with `None`), running what was held
    /// through the newly opened ones.
    pub fn release(
        &mut self,
        index: Option<usize>,
        headers: &mut HeaderMap,
    ) -> Result<(), Box<LocalReply>> {
        let from = self.gate;
        match index {
            Some(i) => self.hold_at(i),
            None => self.gate = self.stages.len(),
        }
        let held = std::mem::take(&mut self.held);
        for item in held {
            self.feed(from, item, Some(&mut *headers))?;
        }
        Ok(())
    }

    /// Runs `item` through stages `from..gate`.
    fn feed(
        &mut self,
        from: usize,
        item: Item,
        mut headers: Option<&mut HeaderMap>,
    ) -> Result<(), Box<LocalReply>> {
        let mut items = vec![item];
        for s in from..self.gate {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                self.run_stage(s, item, headers.as_deref_mut(), &mut out)?;
            }
            items = out;
            if items.is_empty() {
                return Ok(());
            }
        }
        let queue = if self.gate == self.stages.len() {
            &mut self.ready
        } else {
            &mut self.held
        };
        queue.extend(items);
        Ok(())
    }

    fn run_stage(
        &mut self,
        s: usize,
        item: Item,
        headers: Option<&mut HeaderMap>,
        out: &mut Vec<Item>,
    ) -> Result<(), Box<LocalReply>> {
        let direction = self.direction;
        let mut shared = lock(&self.shared);
        let stage = &mut self.stages[s];
        let (data_phase, trailers_phase) = match direction {
            Direction::Request => (Phases::REQUEST_DATA, Phases::REQUEST_TRAILERS),
            Direction::Response => (Phases::RESPONSE_DATA, Phases::RESPONSE_TRAILERS),
        };
        let phases = stage.filter.phases();
        match item {
            Item::Data(chunk, end) => {
                if !phases.intersects(data_phase) {
                    out.push(Item::Data(chunk, end));
                    return Ok(());
                }
                let data = if stage.buffered.is_empty() {
                    chunk
                } else {
                    stage.buffered.extend_from_slice(&chunk);
                    stage.buffered.split().freeze()
                };
                let mut d = Data {
                    data,
                    end_stream: end,
                    headers,
                    add_trailers: None,
                };
                shared.ctx.route_config = stage.config.clone();
                let status = match direction {
                    Direction::Request => stage.filter.on_request_data(&mut shared.ctx, &mut d),
                    Direction::Response => stage.filter.on_response_data(&mut shared.ctx, &mut d),
                };
                shared.ctx.route_config = None;
                match status {
                    DataStatus::StopAndBuffer if !end => {
                        let limit = match direction {
                            Direction::Request => shared.ctx.request_buffer_limit,
                            Direction::Response => shared.ctx.response_buffer_limit,
                        }
                        .unwrap_or(DEFAULT_BUFFER_LIMIT);
                        if d.data.len() > limit {
                            return Err(Box::new(overflow(direction)));
                        }
                        stage.buffered = BytesMut::from(d.data);
                    }
                    DataStatus::Continue | DataStatus::StopAndBuffer => {
                        let trailers = if end { d.add_trailers } else { None };
                        if !d.data.is_empty() || (end && trailers.is_none()) {
                            out.push(Item::Data(d.data, end && trailers.is_none()));
                        }
                        if let Some(t) = trailers {
                            out.push(Item::Trailers(t));
                        }
                    }
                    DataStatus::LocalReply(r) => return Err(Box::new(r)),
                }
            }
            Item::Trailers(trailers) => {
                if !phases.intersects(trailers_phase) && stage.buffered.is_empty() {
                    out.push(Item::Trailers(trailers));
                    return Ok(());
                }
                let mut t = Trailers {
                    trailers,
                    data: stage.buffered.split().freeze(),
                    headers,
                };
                if phases.intersects(trailers_phase) {
                    shared.ctx.route_config = stage.config.clone();
                    let status = match direction {
                        Direction::Request => {
                            stage.filter.on_request_trailers(&mut shared.ctx, &mut t)
                        }
                        Direction::Response => {
                            stage.filter.on_response_trailers(&mut shared.ctx, &mut t)
                        }
                    };
                    shared.ctx.route_config = None;
                    if let DataStatus::LocalReply(r) = status {
                        return Err(Box::new(r));
                    }
                }
                let no_trailers = t.trailers.is_empty();
                if !t.data.is_empty() || no_trailers {
                    out.push(Item::Data(t.data, no_trailers));
                }
                if !no_trailers {
                    out.push(Item::Trailers(t.trailers));
                }
            }
        }
        Ok(())
    }
}

/// The local reply for a buffer over its limit, as Envoy sends it.
fn overflow(direction: Direction) -> LocalReply {
    match direction {
        Direction::Request => LocalReply::new(StatusCode::PAYLOAD_TOO_LARGE, "Payload Too Large"),
        Direction::Response => {
            LocalReply::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
        }
    }
}

/// The body broke while the headers were held.
fn aborted(direction: Direction) -> LocalReply {
    match direction {
        Direction::Request => LocalReply::new(StatusCode::BAD_REQUEST, ""),
        Direction::Response => LocalReply::new(StatusCode::BAD_GATEWAY, ""),
    }
}

impl Body for FilteredBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            if let Some(item) = this.ready.pop_front() {
                match item {
                    Item::Data(d, end) => {
                        if end {
                            this.finished = true;
                        }
                        if d.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(d))));
                    }
                    Item::Trailers(t) => {
                        this.finished = true;
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                }
            }
            if this.finished || this.source_done {
                this.finished = true;
                return Poll::Ready(None);
            }
            let item = match this.source.poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) => Item::Data(d, false),
                    Err(frame) => match frame.into_trailers() {
                        Ok(t) => {
                            this.source_done = true;
                            Item::Trailers(t)
                        }
                        Err(_) => continue,
                    },
                },
                Poll::Ready(None) => {
                    this.source_done = true;
                    Item::Data(Bytes::new(), true)
                }
            };
            if let Err(reply) = this.feed(0, item, None) {
                if this.direction == Direction::Request {
                    lock(&this.shared).local_reply = Some(*reply);
                }
                this.finished = true;
                return Poll::Ready(Some(Err(Box::new(ChainError::LocalReply))));
            }
            if this.source_done && this.ready.is_empty() {
                this.finished = true;
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.ready.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        // Known once the whole (buffered) body is queued, e.g. behind the buffer filter.
        if self.source_done {
            let mut len = 0u64;
            for item in &self.ready {
                match item {
                    Item::Data(d, _) => len += d.len() as u64,
                    Item::Trailers(_) => return SizeHint::default(),
                }
            }
            return SizeHint::with_exact(len);
        }
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::BodyExt;
    use legate_filters::FilterStatus;

    /// Upper-cases request data; buffers it all when `buffer`; adds a trailer at the end.
    #[derive(Debug)]
    struct Upper {
        buffer: bool,
    }

    impl HttpFilter for Upper {
        fn phases(&self) -> Phases {
            Phases::HEADERS | Phases::REQUEST_BODY | Phases::RESPONSE_BODY
        }

        fn on_request_headers(
            &self,
            _ctx: &mut RequestContext,
            _parts: &mut http::request::Parts,
        ) -> FilterStatus {
            FilterStatus::Continue
        }

        fn on_request_data(&self, _ctx: &mut RequestContext, data: &mut Data<'_>) -> DataStatus {
            if self.buffer && !data.end_stream {
                return DataStatus::StopAndBuffer;
            }
            data.data = Bytes::from(data.data.to_ascii_uppercase());
            if data.end_stream {
                if let Some(h) = data.headers.as_deref_mut() {
                    h.insert("x-len", HeaderValue::from(data.data.len()));
                }
                let mut t = HeaderMap::new();
                t.insert("x-done", HeaderValue::from_static("1"));
                data.add_trailers = Some(t);
            }
            DataStatus::Continue
        }

        fn on_response_trailers(
            &self,
            _ctx: &mut RequestContext,
            trailers: &mut Trailers<'_>,
        ) -> DataStatus {
            let mut d = trailers.data.to_vec();
            d.extend_from_slice(b"|end");
            trailers.data = Bytes::from(d);
            trailers.trailers.clear();
            DataStatus::Continue
        }
    }

    fn body(chunks: &[&'static str], filter: Upper, direction: Direction) -> FilteredBody {
        let data: Bytes = chunks.concat().into();
        FilteredBody::new(
            Source::Full(Some(data)),
            vec![Stage::new(0, Arc::new(filter), None)],
            Arc::new(Mutex::new(Shared::default())),
            direction,
        )
    }

    async fn collect(b: FilteredBody) -> (Bytes, Option<HeaderMap>) {
        match b.collect().await {
            Ok(c) => {
                let trailers = c.trailers().cloned();
                (c.to_bytes(), trailers)
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn data_is_transformed_and_trailers_added_at_the_end() {
        let (data, trailers) = collect(body(
            &["ab", "cd"],
            Upper { buffer: false },
            Direction::Request,
        ))
        .await;
        assert_eq!(&data[..], b"ABCD");
        assert_eq!(
            trailers.and_then(|t| t.get("x-done").cloned()),
            Some(HeaderValue::from_static("1"))
        );
    }

    #[tokio::test]
    async fn held_headers_see_the_whole_buffered_body() {
        let mut b = body(&["hello"], Upper { buffer: true }, Direction::Request);
        b.hold_at(0);
        let mut headers = HeaderMap::new();
        assert!(b.pump(&mut headers).await.is_ok());
        assert_eq!(headers.get("x-len"), Some(&HeaderValue::from(5)));
        assert!(b.release(None, &mut headers).is_ok());
        // Trailers follow the data, so the length is not announced.
        assert_eq!(b.size_hint().exact(), None);
        assert_eq!(&collect(b).await.0[..], b"HELLO");
    }

    #[tokio::test]
    async fn buffering_over_the_limit_is_a_413() {
        let mut b = body(&["x"], Upper { buffer: true }, Direction::Request);
        if let Ok(mut s) = b.shared.lock() {
            s.ctx.request_buffer_limit = Some(3);
        }
        b.source = Source::Full(Some(Bytes::from_static(b"toolong")));
        b.hold_at(0);
        let mut headers = HeaderMap::new();
        match b.pump(&mut headers).await {
            Err(r) => assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE),
            Ok(()) => panic!("expected a 413"),
        }
    }

    #[tokio::test]
    async fn a_trailers_phase_can_turn_trailers_into_data() {
        let mut b = body(&[], Upper { buffer: false }, Direction::Response);
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        let mut headers = HeaderMap::new();
        assert!(b.feed(0, Item::Trailers(t), Some(&mut headers)).is_ok());
        b.source_done = true;
        let (data, trailers) = collect(b).await;
        assert_eq!(&data[..], b"|end");
        assert!(trailers.is_none());
    }
}
