//! The HTTP filter chain of one stream: the headers phases in `http_filters` order on the
//! request and in reverse on the response, and — only when a filter active on the route
//! declared one — the data and trailers phases around the bodies (see `docs/filters.md`).

use http::{Request, Response, StatusCode};
use http_body::Body;
use hyper::body::Incoming;
use legate_filters::{FilterStatus, LocalReply, Phases, Resumption, RouteConfig};

use super::{HcmFilter, Stream};
use crate::body::ProxyBody;
use crate::filter_body::{Direction, FilteredBody, Stage};
use crate::upstream::UpstreamBody;

/// How a run of headers phases ended.
enum Headers {
    Continue,
    LocalReply(LocalReply),
    /// Filter `i` holds the headers until its body phase continues.
    Held(usize),
}

/// The filters of `filters` that declare any of `phases`, as a bit mask (computed once per
/// connection manager).
pub fn phase_mask(filters: &[HcmFilter], phases: Phases) -> u64 {
    filters
        .iter()
        .enumerate()
        .filter(|(_, f)| f.phases.intersects(phases))
        .fold(0, |m, (i, _)| m | 1 << i)
}

impl Stream<'_> {
    /// Whether filter `i` runs on this route, and with which per-route configuration.
    pub(super) fn filter_setup(&self, i: usize) -> Option<Option<RouteConfig>> {
        let f = &self.conn.hcm.filters[i];
        match self.route_filters.as_ref().and_then(|m| m.get(&f.name)) {
            Some(crate::route::RouteFilter::Disabled) => None,
            Some(crate::route::RouteFilter::Enabled(c)) => Some(c.clone()),
            None if f.disabled_by_default => None,
            None => Some(None),
        }
    }

    /// The filters of `mask` that run on this route.
    fn active(&self, mask: u64) -> u64 {
        (0..self.conn.hcm.filters.len())
            .filter(|i| mask & (1 << i) != 0 && self.filter_setup(*i).is_some())
            .fold(0, |m, i| m | 1 << i)
    }

    /// Body stages for the filters of `mask`, in request or response order.
    fn stages(&self, mask: u64, direction: Direction) -> Vec<Stage> {
        let mut stages: Vec<Stage> = self
            .conn
            .hcm
            .filters
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(i, f)| Stage::new(i, f.filter.clone(), self.filter_setup(i).flatten()))
            .collect();
        if direction == Direction::Response {
            stages.reverse();
        }
        stages
    }

    /// The request side of the chain: the headers phases, then (for a route with a request
    /// body filter) the body wrapped in its data phases, with headers held as filters ask.
    pub(super) async fn request_path(
        &mut self,
        req: Request<Incoming>,
    ) -> Result<Request<UpstreamBody>, LocalReply> {
        let hcm = &self.conn.hcm;
        let (mut parts, body) = req.into_parts();
        let end = body.is_end_stream();
        let body_filters = if hcm.body_filters == 0 {
            0
        } else {
            self.active(hcm.body_filters)
        };
        if body_filters == 0 {
            // The router-only path, and every route whose filters touch headers only.
            return match self.request_headers(&mut parts, 0, true).await {
                Headers::LocalReply(r) => Err(r),
                Headers::Continue | Headers::Held(_) => {
                    Ok(Request::from_parts(parts, UpstreamBody::from(body)))
                }
            };
        }
        let shared = self.ctx.share();
        let request_filters = body_filters & phase_mask(&hcm.filters, Phases::REQUEST_BODY);
        if end || request_filters == 0 {
            return match self.request_headers(&mut parts, 0, true).await {
                Headers::LocalReply(r) => Err(r),
                Headers::Continue | Headers::Held(_) => {
                    Ok(Request::from_parts(parts, UpstreamBody::from(body)))
                }
            };
        }
        let mut fb = FilteredBody::new(
            crate::filter_body::Source::Incoming(body),
            self.stages(request_filters, Direction::Request),
            shared,
            Direction::Request,
        );
        let mut start = 0;
        loop {
            match self.request_headers(&mut parts, start, false).await {
                Headers::Continue => break,
                Headers::LocalReply(r) => return Err(r),
                Headers::Held(i) => {
                    if start == 0 {
                        fb.hold_at(i);
                    } else {
                        fb.release(Some(i), &mut parts.headers).map_err(|r| *r)?;
                    }
                    fb.pump(&mut parts.headers).await.map_err(|r| *r)?;
                    start = i + 1;
                }
            }
        }
        fb.release(None, &mut parts.headers).map_err(|r| *r)?;
        Ok(Request::from_parts(
            parts,
            UpstreamBody::Filtered { body: Box::new(fb) },
        ))
    }

    /// The request headers phases of the filters from `start`, in order. With `end_stream`
    /// (or no body phase to continue them) a hold is a continue.
    async fn request_headers(
        &mut self,
        parts: &mut http::request::Parts,
        start: usize,
        end_stream: bool,
    ) -> Headers {
        let conn = self.conn;
        for (i, f) in conn.hcm.filters.iter().enumerate().skip(start) {
            let Some(config) = self.filter_setup(i) else {
                continue;
            };
            self.ran_filters |= 1 << i;
            let status = {
                let mut ctx = self.ctx.get();
                ctx.route_config = config;
                ctx.end_stream = end_stream;
                let status = f.filter.on_request_headers(&mut ctx, parts);
                ctx.route_config = None;
                status
            };
            match status {
                FilterStatus::Continue => {}
                FilterStatus::StopIteration => {
                    if !end_stream && f.phases.intersects(Phases::REQUEST_BODY) {
                        return Headers::Held(i);
                    }
                }
                FilterStatus::LocalReply(r) => return Headers::LocalReply(r),
                FilterStatus::Wait(fut) => match fut.await {
                    Resumption::Continue { set_headers } => {
                        let mut last = None;
                        for (k, v) in set_headers {
                            if let Some(k) = k {
                                last = Some(k);
                            }
                            if let Some(k) = &last {
                                parts.headers.insert(k.clone(), v);
                            }
                        }
                    }
                    Resumption::Apply(edit) => edit(&mut self.ctx.get(), parts),
                    Resumption::LocalReply(r) => return Headers::LocalReply(r),
                },
            }
        }
        Headers::Continue
    }

    /// The response side of the chain: the headers phases of the filters whose request phase
    /// ran, in reverse order, then (for a route with a response body filter) the body wrapped
    /// in their data phases. Waiting is not offered here: a response phase decides
    /// synchronously. A local reply from a response phase replaces the response but does not
    /// restart the response path.
    pub(super) async fn response_path(&mut self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        if self.ran_filters == 0 {
            return resp;
        }
        let hcm = &self.conn.hcm;
        let (mut parts, mut body) = resp.into_parts();
        let end = body.is_end_stream();
        let response_filters = if hcm.body_filters == 0 || end {
            0
        } else {
            self.ran_filters & phase_mask(&hcm.filters, Phases::RESPONSE_BODY)
        };
        if response_filters != 0 && !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
            // A local reply's length, as Envoy's local replies carry it, for the filters that
            // look at it (the compressor's `min_content_length`).
            if let Some(len) = body.size_hint().exact() {
                parts
                    .headers
                    .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
            }
        }
        let mut before = hcm.filters.len();
        let mut held = false;
        loop {
            match self.response_filter_headers(&mut parts, before, end || response_filters == 0) {
                Headers::Continue => break,
                Headers::LocalReply(r) => return reply(r),
                Headers::Held(i) => {
                    if !held {
                        let stages = self.stages(response_filters, Direction::Response);
                        let shared = self.ctx.share();
                        body = body.filter(|source| {
                            FilteredBody::new(source, stages, shared, Direction::Response)
                        });
                    }
                    let Some(fb) = body.filtered_mut() else {
                        break;
                    };
                    let pumped = if held {
                        fb.release(Some(i), &mut parts.headers)
                    } else {
                        fb.hold_at(i);
                        Ok(())
                    };
                    held = true;
                    let pumped = match pumped {
                        Ok(()) => fb.pump(&mut parts.headers).await,
                        Err(r) => Err(r),
                    };
                    if let Err(r) = pumped {
                        return reply(*r);
                    }
                    before = i;
                }
            }
        }
        if held {
            if let Some(fb) = body.filtered_mut() {
                if let Err(r) = fb.release(None, &mut parts.headers) {
                    return reply(*r);
                }
            }
        } else if response_filters != 0 {
            let stages = self.stages(response_filters, Direction::Response);
            let shared = self.ctx.share();
            body = body
                .filter(|source| FilteredBody::new(source, stages, shared, Direction::Response));
        }
        Response::from_parts(parts, body)
    }

    /// The response headers phases of the filters (whose request phase ran) before `before`,
    /// in reverse order.
    fn response_filter_headers(
        &mut self,
        parts: &mut http::response::Parts,
        before: usize,
        end_stream: bool,
    ) -> Headers {
        let conn = self.conn;
        for (i, f) in conn.hcm.filters.iter().enumerate().take(before).rev() {
            if self.ran_filters & (1 << i) == 0 {
                continue;
            }
            let config = self.filter_setup(i).flatten();
            let status = {
                let mut ctx = self.ctx.get();
                ctx.route_config = config;
                ctx.end_stream = end_stream;
                let status = f.filter.on_response_headers(&mut ctx, parts);
                ctx.route_config = None;
                status
            };
            match status {
                FilterStatus::LocalReply(r) => return Headers::LocalReply(r),
                FilterStatus::StopIteration
                    if !end_stream && f.phases.intersects(Phases::RESPONSE_BODY) =>
                {
                    return Headers::Held(i)
                }
                FilterStatus::Continue | FilterStatus::Wait(_) | FilterStatus::StopIteration => {}
            }
        }
        Headers::Continue
    }
}

/// A response built from a local reply, outside the filter chain.
fn reply(r: LocalReply) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(r.body));
    *resp.status_mut() = r.status;
    *resp.headers_mut() = r.headers;
    resp
}

/// A response for when the chain could not finish synchronously (never expected for a local
/// reply, whose body is complete).
pub(super) fn internal_error() -> Response<ProxyBody> {
    reply(LocalReply::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        bytes::Bytes::new(),
    ))
}
