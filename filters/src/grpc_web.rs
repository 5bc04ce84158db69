//! `envoy.filters.http.grpc_web`: bridges gRPC-Web clients (HTTP/1.1 or HTTP/2, binary or
//! base64 text) to a gRPC upstream.
//!
//! As in Envoy: a request whose `content-type` is `application/grpc-web`,
//! `application/grpc-web+proto`, `application/grpc-web-text` or
//! `application/grpc-web-text+proto` goes upstream as `application/grpc` with `te: trailers`,
//! `grpc-accept-encoding: identity,deflate,gzip` (unless set) and no `content-length`; a text
//! body is base64-decoded on the way (a bad one is answered 400 `Bad gRPC-web request,
//! invalid base64 data.`). The response gets `content-type: application/grpc-web+proto` (or
//! `application/grpc-web-text+proto` when the request's `accept` asked for text, with each
//! frame base64-encoded), and its trailers become a trailer frame (flag `0x80`) at the end of
//! the body. A response that is neither gRPC nor proto-encoded gRPC-Web (an HTTP error, a
//! local reply) has its headers held until its body ends, then gets `grpc-status` mapped from
//! the HTTP status, `grpc-message` from the body (percent-encoded, at most 16 KiB) and an
//! empty body.

use std::sync::Arc;

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, TE};
use http::StatusCode;
use legate_proto::DynamicMessage;

use crate::api::{
    Data, DataStatus, FilterStatus, HttpFilter, LocalReply, Phases, RequestContext, Trailers,
};
use crate::common::{self, FieldTable};
use crate::registry::{FilterConfig, FilterError, FilterFactory};

/// Type URL of the filter's config.
pub const GRPC_WEB_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb";
const CONFIG_TYPE: &str = "envoy.extensions.filters.http.grpc_web.v3.GrpcWeb";

/// The fields this filter implements.
pub const FIELDS: FieldTable = &[(CONFIG_TYPE, &[])];

const GRPC_WEB: &str = "application/grpc-web";
const GRPC_WEB_PROTO: &str = "application/grpc-web+proto";
const GRPC_WEB_TEXT: &str = "application/grpc-web-text";
const GRPC_WEB_TEXT_PROTO: &str = "application/grpc-web-text+proto";
const GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// The most body kept for `grpc-message` when a response is transformed.
const MAX_MESSAGE: usize = 16384;
const TRAILER_FLAG: u8 = 0x80;

/// Per-request state of a gRPC-Web call.
#[derive(Default)]
struct Call {
    text_request: bool,
    text_response: bool,
    /// Base64 not yet decoded (fewer than 4 bytes).
    undecoded: Vec<u8>,
    /// Response bytes not yet a whole gRPC frame (text responses).
    partial: BytesMut,
    /// The response is not gRPC: its body becomes `grpc-message`.
    transform: bool,
    message: Vec<u8>,
    status: u16,
}

/// The filter.
#[derive(Debug)]
pub struct GrpcWebFilter {
    name: String,
}

fn bad_request() -> DataStatus {
    DataStatus::LocalReply(LocalReply::new(
        StatusCode::BAD_REQUEST,
        "Bad gRPC-web request, invalid base64 data.",
    ))
}

/// `application/grpc` and its `+` / `;` variants.
fn is_grpc_content_type(h: &HeaderMap) -> bool {
    h.get(CONTENT_TYPE)
        .and_then(|v| v.as_bytes().strip_prefix(b"application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest[0] == b'+' || rest[0] == b';')
}

/// A `200` response in proto-encoded gRPC-Web (parameters ignored, case-insensitive).
fn is_grpc_web_proto(parts: &http::response::Parts) -> bool {
    parts.status == StatusCode::OK
        && parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim_end())
            .is_some_and(|t| {
                t.eq_ignore_ascii_case(GRPC_WEB_PROTO) || t.eq_ignore_ascii_case(GRPC_WEB)
            })
}

/// Envoy's mapping of an HTTP status to a gRPC status.
fn grpc_status(http: u16) -> u32 {
    match http {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// Envoy's percent-encoding of `grpc-message`.
fn percent_encode(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for &c in b {
        if !(b' '..b'~').contains(&c) || c == b'%' {
            out.push_str(&format!("%{c:02X}"));
        } else {
            out.push(c as char);
        }
    }
    out
}

impl Call {
    /// Sets the transformed headers on the held response headers.
    fn finish_transform(&mut self, headers: Option<&mut HeaderMap>) {
        self.transform = false;
        let Some(h) = headers else { return };
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&self.message)) {
            h.insert(GRPC_MESSAGE, v);
        }
        h.insert(GRPC_STATUS, HeaderValue::from(grpc_status(self.status)));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    }

    /// Takes whole gRPC frames from `partial` and base64-encodes each.
    fn encode_frames(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        loop {
            if self.partial.len() < 5 {
                break;
            }
            let len = u32::from_be_bytes([
                self.partial[1],
                self.partial[2],
                self.partial[3],
                self.partial[4],
            ]) as usize;
            if self.partial.len() < 5 + len {
                break;
            }
            let frame = self.partial.split_to(5 + len);
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&frame)
                    .as_bytes(),
            );
        }
        out.freeze()
    }
}

impl HttpFilter for GrpcWebFilter {
    fn phases(&self) -> Phases {
        Phases::HEADERS | Phases::REQUEST_DATA | Phases::RESPONSE_BODY
    }

    fn on_request_headers(
        &self,
        ctx: &mut RequestContext,
        parts: &mut http::request::Parts,
    ) -> FilterStatus {
        let content_type = match parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        {
            Some(t @ (GRPC_WEB | GRPC_WEB_PROTO | GRPC_WEB_TEXT | GRPC_WEB_TEXT_PROTO)) => {
                t.to_owned()
            }
            _ => return FilterStatus::Continue,
        };
        let h = &mut parts.headers;
        h.remove(CONTENT_LENGTH);
        let text_response = h
            .get(ACCEPT)
            .is_some_and(|a| a == GRPC_WEB_TEXT || a == GRPC_WEB_TEXT_PROTO);
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        if !h.contains_key(GRPC_ACCEPT_ENCODING) {
            h.insert(
                GRPC_ACCEPT_ENCODING,
                HeaderValue::from_static("identity,deflate,gzip"),
            );
        }
        let text_request = content_type == GRPC_WEB_TEXT || content_type == GRPC_WEB_TEXT_PROTO;
        ctx.filter_data.insert(
            &self.name,
            Call {
                text_request,
                text_response,
                ..Default::default()
            },
        );
        if text_request {
            // Until the first base64 block decodes, so that a bad body is answered with 400
            // before the call reaches the upstream (Envoy streams the headers first and
            // resets the upstream call).
            return FilterStatus::StopIteration;
        }
        FilterStatus::Continue
    }

    fn on_request_data(&self, ctx: &mut RequestContext, data: &mut Data<'_>) -> DataStatus {
        let Some(call) = ctx.filter_data.get_mut::<Call>(&self.name) else {
            return DataStatus::Continue;
        };
        if !call.text_request {
            return DataStatus::Continue;
        }
        call.undecoded.extend_from_slice(&data.data);
        let available = call.undecoded.len();
        if data.end_stream {
            if available == 0 {
                return DataStatus::Continue;
            }
            if available % 4 != 0 {
                return bad_request();
            }
        } else if available < 4 {
            data.data = Bytes::new();
            return DataStatus::Continue;
        }
        let whole = available / 4 * 4;
        let rest = call.undecoded.split_off(whole);
        let decoded = base64::engine::general_purpose::STANDARD.decode(&call.undecoded);
        call.undecoded = rest;
        match decoded {
            Ok(d) if !d.is_empty() => {
                data.data = Bytes::from(d);
                DataStatus::Continue
            }
            _ => bad_request(),
        }
    }

    fn on_response_headers(
        &self,
        ctx: &mut RequestContext,
        parts: &mut http::response::Parts,
    ) -> FilterStatus {
        let end_stream = ctx.end_stream;
        let Some(call) = ctx.filter_data.get_mut::<Call>(&self.name) else {
            return FilterStatus::Continue;
        };
        let grpc = if end_stream {
            parts.headers.contains_key(GRPC_STATUS)
        } else {
            parts.status == StatusCode::OK && is_grpc_content_type(&parts.headers)
        };
        call.transform = !grpc && !is_grpc_web_proto(parts);
        call.status = parts.status.as_u16();
        let content_type = if call.text_response {
            GRPC_WEB_TEXT_PROTO
        } else {
            GRPC_WEB_PROTO
        };
        parts
            .headers
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        if end_stream || !call.transform {
            return FilterStatus::Continue;
        }
        FilterStatus::StopIteration
    }

    fn on_response_data(&self, ctx: &mut RequestContext, data: &mut Data<'_>) -> DataStatus {
        let Some(call) = ctx.filter_data.get_mut::<Call>(&self.name) else {
            return DataStatus::Continue;
        };
        if call.transform {
            if data.end_stream {
                if call.message.is_empty() {
                    call.message = data.data.to_vec();
                } else {
                    call.message.extend_from_slice(&data.data);
                    call.message.truncate(MAX_MESSAGE);
                }
                call.finish_transform(data.headers.as_deref_mut());
            } else if call.message.len() < MAX_MESSAGE {
                call.message.extend_from_slice(&data.data);
            }
            data.data = Bytes::new();
            return DataStatus::Continue;
        }
        if !call.text_response {
            return DataStatus::Continue;
        }
        call.partial.extend_from_slice(&data.data);
        data.data = call.encode_frames();
        DataStatus::Continue
    }

    fn on_response_trailers(
        &self,
        ctx: &mut RequestContext,
        trailers: &mut Trailers<'_>,
    ) -> DataStatus {
        let Some(call) = ctx.filter_data.get_mut::<Call>(&self.name) else {
            return DataStatus::Continue;
        };
        if call.transform {
            call.finish_transform(trailers.headers.as_deref_mut());
            return DataStatus::Continue;
        }
        let mut block = Vec::new();
        for (k, v) in trailers.trailers.iter() {
            block.extend_from_slice(k.as_str().as_bytes());
            block.push(b':');
            block.extend_from_slice(v.as_bytes());
            block.extend_from_slice(b"\r\n");
        }
        trailers.trailers = HeaderMap::new();
        let mut frame = BytesMut::with_capacity(5 + block.len());
        frame.put_u8(TRAILER_FLAG);
        frame.put_u32(block.len() as u32);
        frame.extend_from_slice(&block);
        let mut out = BytesMut::from(&trailers.data[..]);
        if call.text_response {
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&frame)
                    .as_bytes(),
            );
        } else {
            out.extend_from_slice(&frame);
        }
        trailers.data = out.freeze();
        DataStatus::Continue
    }
}

/// Factory of [`GrpcWebFilter`].
#[derive(Debug)]
pub struct GrpcWebFactory;

impl FilterFactory for GrpcWebFactory {
    fn type_url(&self) -> &'static str {
        GRPC_WEB_TYPE_URL
    }

    fn fields(&self) -> FieldTable {
        FIELDS
    }

    fn create(&self, name: &str, config: &DynamicMessage) -> Result<FilterConfig, FilterError> {
        let _: legate_proto::pb::envoy::extensions::filters::http::grpc_web::v3::GrpcWeb =
            common::decode(config, FIELDS)?;
        Ok(FilterConfig::Filter {
            name: name.to_owned(),
            filter: Arc::new(GrpcWebFilter {
                name: name.to_owned(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_frames_are_encoded_one_by_one() {
        let mut call = Call::default();
        call.partial
            .extend_from_slice(&[0, 0, 0, 0, 2, b'h', b'i', 0, 0]);
        assert_eq!(&call.encode_frames()[..], b"AAAAAAJoaQ==");
        assert_eq!(call.partial.len(), 2);
    }

    #[test]
    fn grpc_message_is_percent_encoded_like_envoy() {
        assert_eq!(
            percent_encode(b"no healthy upstream"),
            "no healthy upstream"
        );
        assert_eq!(percent_encode(b"50%\n"), "50%25%0A");
    }
}
