//! The response body Legate sends downstream: a local reply or a streamed upstream body. It
//! counts the bytes it yields, hands the upstream connection back to its pool when the body
//! ends, and writes the access log once, when the stream is finished or dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::accesslog::{AccessLog, Record};
use crate::filter_body::{BodyError, FilteredBody, Source};
use crate::upstream::PoolReturn;

/// What to do when the response is complete.
#[derive(Debug)]
pub struct Completion {
    pub logs: Arc<[AccessLog]>,
    pub record: Record,
    pub started: Instant,
}

/// The downstream response body.
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    sent: u64,
    pool: Option<PoolReturn>,
    completion: Option<Box<Completion>>,
    /// Keeps the upstream host's active-request count up while the body streams.
    _active: Option<crate::cluster::ActiveGuard>,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Upstream(Incoming),
    /// Through the response data phases of the route's filters.
    Filtered(Box<FilteredBody>),
}

impl ProxyBody {
    /// A complete body.
    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        Self::new(Kind::Full(if b.is_empty() { None } else { Some(b) }))
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::new(Kind::Full(None))
    }

    /// A streamed upstream body.
    pub fn upstream(
        body: Incoming,
        pool: Option<PoolReturn>,
        active: Option<crate::cluster::ActiveGuard>,
    ) -> Self {
        let mut b = Self::new(Kind::Upstream(body));
        b.pool = pool;
        b._active = active;
        b
    }

    fn new(kind: Kind) -> Self {
        Self {
            kind,
            sent: 0,
            pool: None,
            completion: None,
            _active: None,
        }
    }

    /// Runs the body through the response data phases `make` sets up.
    pub fn filter(mut self, make: impl FnOnce(Source) -> FilteredBody) -> Self {
        let kind = std::mem::replace(&mut self.kind, Kind::Full(None));
        let source = match kind {
            Kind::Full(b) => Source::Full(b),
            Kind::Upstream(b) => Source::Incoming(b),
            Kind::Filtered(f) => {
                self.kind = Kind::Filtered(f);
                return self;
            }
        };
        self.kind = Kind::Filtered(Box::new(make(source)));
        self
    }

    /// The filtered body inside, if [`ProxyBody::filter`] made one.
    pub fn filtered_mut(&mut self) -> Option<&mut FilteredBody> {
        match &mut self.kind {
            Kind::Filtered(f) => Some(f),
            _ => None,
        }
    }

    /// Attaches the access-log completion.
    pub fn on_complete(&mut self, c: Option<Box<Completion>>) {
        self.completion = c;
    }

    fn finish(&mut self, clean: bool) {
        if let Some(p) = self.pool.take() {
            if clean {
                p.release();
            }
        }
        if let Some(mut c) = self.completion.take() {
            c.record.bytes_sent = self.sent;
            c.record.duration = c.started.elapsed();
            if !clean && c.record.response_flags.is_empty() {
                // The downstream went away (or the upstream reset) mid-body.
                c.record.response_flags = "DC";
            }
            for log in c.logs.iter() {
                log.log(&c.record);
            }
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        let done = match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(b) => b.is_end_stream(),
            Kind::Filtered(b) => b.is_end_stream(),
        };
        self.finish(done);
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let res = match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(|e| e.into()),
            Kind::Filtered(b) => Pin::new(b.as_mut()).poll_frame(cx),
        };
        match &res {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.sent += d.len() as u64;
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(b) => b.is_end_stream(),
            Kind::Filtered(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(b) => b.size_hint(),
            Kind::Filtered(b) => b.size_hint(),
        }
    }
}
