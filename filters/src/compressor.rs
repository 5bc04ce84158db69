//! `envoy.filters.http.compressor` with `envoy.compression.gzip.compressor`: compresses
//! response bodies the client accepts gzip for.
//!
//! As in Envoy: the request's `accept-encoding` is read (q-values; `gzip;q=0` refuses it, `*`
//! accepts it, `identity` or another coding with a higher weight wins over it) and removed
//! when `remove_accept_encoding_header`. A response is *compressible* when the direction is
//! enabled, its `content-length` (if any) is at least `min_content_length` (default 30), its
//! `content-type` (if any) is in the list (Envoy's default list when empty), it has no
//! `content-encoding`, no `cache-control: no-transform`, no `etag` under
//! `disable_on_etag_header`, and a status not in `uncompressible_response_codes`. A
//! compressible response gets `vary: accept-encoding`; it is compressed when it also has a body
//! and the client accepts gzip: `content-length` is dropped, `content-encoding: gzip` set, a
//! strong `etag` removed (or weakened with `weaken_etag_on_compress`), and each chunk is
//! compressed and flushed (the stream finishes at the end of the body or before trailers).

use std::io::Write;
use std::sync::Arc;

use flate2::write::GzEncoder;
use flate2::Compression;
use http::header::{
    HeaderValue, ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE,
    ETAG, VARY,
};
use legate_proto::pb::envoy::extensions::compression::gzip::compressor::v3 as gzippb;
use legate_proto::pb::envoy::extensions::filters::http::compressor::v3 as pb;
use legate_proto::DynamicMessage;

use crate::api::{
    Data, DataStatus, FilterStatus, HttpFilter, Phases, RequestContext, RouteConfig, Trailers,
};
use crate::common::{self, FieldTable};
use crate::registry::{FilterConfig, FilterError, FilterFactory};

/// Type URL of the filter's config.
pub const COMPRESSOR_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor";
const CONFIG_TYPE: &str = "envoy.extensions.filters.http.compressor.v3.Compressor";
const PER_ROUTE_TYPE: &str = "envoy.extensions.filters.http.compressor.v3.CompressorPerRoute";
/// Type URL of the gzip compressor library.
pub const GZIP_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip";
const GZIP_TYPE: &str = "envoy.extensions.compression.gzip.compressor.v3.Gzip";

/// The fields this filter implements.
pub const FIELDS: FieldTable = &[
    (
        CONFIG_TYPE,
        &["compressor_library", "response_direction_config"],
    ),
    (
        "envoy.extensions.filters.http.compressor.v3.Compressor.ResponseDirectionConfig",
        &[
            "common_config",
            "disable_on_etag_header",
            "remove_accept_encoding_header",
            "uncompressible_response_codes",
            "weaken_etag_on_compress",
        ],
    ),
    (
        "envoy.extensions.filters.http.compressor.v3.Compressor.CommonDirectionConfig",
        &["enabled", "min_content_length", "content_type"],
    ),
    (
        "envoy.config.core.v3.RuntimeFeatureFlag",
        &["default_value", "runtime_key"],
    ),
    (
        "envoy.config.core.v3.TypedExtensionConfig",
        &["name", "typed_config"],
    ),
    (PER_ROUTE_TYPE, &["disabled", "overrides"]),
    (
        "envoy.extensions.filters.http.compressor.v3.CompressorOverrides",
        &["response_direction_config", "compressor_library"],
    ),
    (
        "envoy.extensions.filters.http.compressor.v3.ResponseDirectionOverrides",
        &["remove_accept_encoding_header"],
    ),
];

/// The gzip library's fields.
pub const GZIP_FIELDS: FieldTable = &[(
    GZIP_TYPE,
    &[
        "compression_level",
        "memory_level",
        "window_bits",
        "compression_strategy",
        "chunk_size",
    ],
)];

/// Envoy's default compressible content types.
const DEFAULT_CONTENT_TYPES: &[&str] = &[
    "text/html",
    "text/plain",
    "text/css",
    "application/javascript",
    "application/x-javascript",
    "text/javascript",
    "text/x-javascript",
    "text/ecmascript",
    "text/js",
    "text/jscript",
    "text/x-js",
    "application/ecmascript",
    "application/x-json",
    "application/xml",
    "application/json",
    "image/svg+xml",
    "text/xml",
    "application/xhtml+xml",
];

const DEFAULT_MIN_CONTENT_LENGTH: u64 = 30;

/// The compiled response-direction settings.
#[derive(Debug, Clone)]
struct Settings {
    enabled: bool,
    min_content_length: u64,
    content_types: Vec<String>,
    disable_on_etag_header: bool,
    weaken_etag_on_compress: bool,
    remove_accept_encoding_header: bool,
    uncompressible_response_codes: Vec<u16>,
    level: Compression,
}

/// The gzip level from the library config.
fn gzip_level(
    lib: Option<&legate_proto::pb::envoy::config::core::v3::TypedExtensionConfig>,
    field: &str,
) -> Result<Compression, FilterError> {
    let Some(lib) = lib else {
        return Err(common::invalid(field, "is required"));
    };
    let Some(any) = &lib.typed_config else {
        return Err(common::invalid(
            format!("{field}.typed_config"),
            "is required",
        ));
    };
    if any.type_url != GZIP_TYPE_URL {
        return Err(common::invalid(
            format!("{field}.typed_config"),
            format!(
                "unsupported compressor library {} (Legate has gzip)",
                any.type_url
            ),
        ));
    }
    let msg = legate_proto::dynamic_from_bytes(GZIP_TYPE, &any.value)
        .map_err(|e| common::invalid(format!("{field}.typed_config"), e.to_string()))?;
    let g: gzippb::Gzip = common::decode(&msg, GZIP_FIELDS).map_err(|e| match e {
        FilterError::InvalidConfig { field: f, reason } => {
            common::invalid(format!("{field}.typed_config.{f}"), reason)
        }
        other => other,
    })?;
    if let Some(m) = g.memory_level {
        if !(1..=9).contains(&m.value) {
            return Err(common::invalid(
                format!("{field}.typed_config.memory_level"),
                "must be 1..=9",
            ));
        }
    }
    if let Some(w) = g.window_bits {
        if !(9..=15).contains(&w.value) {
            return Err(common::invalid(
                format!("{field}.typed_config.window_bits"),
                "must be 9..=15",
            ));
        }
    }
    if g.compression_strategy != 0 {
        return Err(common::invalid(
            format!("{field}.typed_config.compression_strategy"),
            "only DEFAULT_STRATEGY is supported",
        ));
    }
    Ok(match g.compression_level {
        0 => Compression::default(),
        n @ 1..=9 => Compression::new(n as u32),
        n => {
            return Err(common::invalid(
                format!("{field}.typed_config.compression_level"),
                format!("invalid level {n}"),
            ))
        }
    })
}

impl Settings {
    // `content_type` is deprecated in favour of `content_type_matcher` but still honoured.
    #[allow(deprecated)]
    fn new(c: &pb::Compressor) -> Result<Self, FilterError> {
        let level = gzip_level(c.compressor_library.as_ref(), "compressor_library")?;
        let r = c.response_direction_config.clone().unwrap_or_default();
        let common = r.common_config.clone().unwrap_or_default();
        let mut codes = Vec::new();
        for (i, code) in r.uncompressible_response_codes.iter().enumerate() {
            match u16::try_from(*code) {
                Ok(c) if (200..600).contains(&c) => codes.push(c),
                _ => {
                    return Err(common::invalid(
                        format!("response_direction_config.uncompressible_response_codes[{i}]"),
                        "must be an HTTP status (200..=599)",
                    ))
                }
            }
        }
        Ok(Settings {
            enabled: common
                .enabled
                .as_ref()
                .is_none_or(|f| f.default_value.is_none_or(|v| v.value)),
            min_content_length: common
                .min_content_length
                .map_or(DEFAULT_MIN_CONTENT_LENGTH, |v| u64::from(v.value)),
            content_types: if common.content_type.is_empty() {
                DEFAULT_CONTENT_TYPES
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            } else {
                common.content_type.clone()
            },
            disable_on_etag_header: r.disable_on_etag_header,
            weaken_etag_on_compress: r.weaken_etag_on_compress,
            remove_accept_encoding_header: r.remove_accept_encoding_header,
            uncompressible_response_codes: codes,
            level,
        })
    }

    /// Whether the response may be compressed, whatever the client accepts.
    fn compressible(&self, parts: &http::response::Parts) -> bool {
        let h = &parts.headers;
        if !self.enabled {
            return false;
        }
        let long_enough = match h.get(CONTENT_LENGTH) {
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .is_some_and(|len| len >= self.min_content_length),
            // Legate strips `transfer-encoding` before filters: a body without a length is
            // one Envoy would see as chunked.
            None => true,
        };
        if !long_enough {
            return false;
        }
        let type_ok = match h.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
            Some(ct) => {
                let media = ct.split(';').next().unwrap_or("").trim();
                self.content_types
                    .iter()
                    .any(|t| t.eq_ignore_ascii_case(media))
            }
            None => true,
        };
        let no_transform = h.get_all(CACHE_CONTROL).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("no-transform"))
            })
        });
        let etag_refused = self.disable_on_etag_header && h.contains_key(ETAG);
        let code_refused = self
            .uncompressible_response_codes
            .contains(&parts.status.as_u16());
        type_ok
            && !no_transform
            && !etag_refused
            && !h.contains_key(CONTENT_ENCODING)
            && !code_refused
    }
}

/// Envoy's choice of a coding for a client that sent `accept-encoding`, with gzip the only
/// compressor: true when it is gzip.
fn accepts_gzip(accept_encoding: &str) -> bool {
    let mut pairs: Vec<(&str, f32)> = Vec::new();
    let mut gzip_allowed = true;
    for token in accept_encoding.split(',') {
        let token = token.trim();
        if token.is_empty() {
            continue;
        }
        let (name, params) = match token.split_once(';') {
            Some((n, p)) => (n.trim(), Some(p)),
            None => (token, None),
        };
        let mut q = 1.0f32;
        if let Some(p) = params {
            if let Some((k, v)) = p.split_once('=') {
                if k.trim().eq_ignore_ascii_case("q") {
                    match v.trim().parse::<f32>() {
                        Ok(v) => q = v,
                        Err(_) => continue,
                    }
                }
            }
        }
        pairs.push((name, q));
        if q == 0.0 && name == "gzip" {
            gzip_allowed = false;
        }
    }
    if pairs.is_empty() || !gzip_allowed {
        return false;
    }
    let mut choice = ("identity", 0.0f32);
    for (name, q) in pairs {
        if q > choice.1 && (name == "gzip" || name == "identity" || name == "*") {
            choice = (name, q);
        }
    }
    choice.1 > 0.0 && (choice.0 == "gzip" || choice.0 == "*")
}

/// Per-route setting.
#[derive(Debug)]
enum PerRoute {
    Disabled,
    Overrides {
        remove_accept_encoding_header: Option<bool>,
        level: Option<Compression>,
    },
}

/// What the request phase leaves for the response: the client's `accept-encoding`.
struct Accept(Option<String>);

/// A response being compressed.
struct Compressing(GzEncoder<Vec<u8>>);

impl Compressing {
    fn take(&mut self) -> bytes::Bytes {
        bytes::Bytes::from(std::mem::take(self.0.get_mut()))
    }
}

/// The filter.
#[derive(Debug)]
pub struct CompressorFilter {
    name: String,
    settings: Settings,
}

impl HttpFilter for CompressorFilter {
    fn phases(&self) -> Phases {
        Phases::HEADERS | Phases::RESPONSE_BODY
    }

    fn on_request_headers(
        &self,
        ctx: &mut RequestContext,
        parts: &mut http::request::Parts,
    ) -> FilterStatus {
        let remove = match ctx.route_config::<PerRoute>() {
            Some(PerRoute::Disabled) => return FilterStatus::Continue,
            Some(PerRoute::Overrides {
                remove_accept_encoding_header: Some(r),
                ..
            }) => *r,
            _ => self.settings.remove_accept_encoding_header,
        };
        let accept = parts
            .headers
            .get_all(ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>();
        let accept = if accept.is_empty() {
            None
        } else {
            Some(accept.join(","))
        };
        ctx.filter_data.insert(&self.name, Accept(accept));
        if remove && self.settings.enabled {
            parts.headers.remove(ACCEPT_ENCODING);
        }
        FilterStatus::Continue
    }

    fn on_response_headers(
        &self,
        ctx: &mut RequestContext,
        parts: &mut http::response::Parts,
    ) -> FilterStatus {
        let level = match ctx.route_config::<PerRoute>() {
            Some(PerRoute::Disabled) => return FilterStatus::Continue,
            Some(PerRoute::Overrides { level: Some(l), .. }) => *l,
            _ => self.settings.level,
        };
        let Some(Accept(accept)) = ctx.filter_data.get::<Accept>(&self.name) else {
            return FilterStatus::Continue;
        };
        if !self.settings.compressible(parts) {
            return FilterStatus::Continue;
        }
        let compress = !ctx.end_stream && accept.as_deref().is_some_and(accepts_gzip);
        let h = &mut parts.headers;
        let has_vary = h.get_all(VARY).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("accept-encoding"))
            })
        });
        if !has_vary {
            let value = match h.get(VARY).and_then(|v| v.to_str().ok()) {
                Some(prev) => format!("{prev}, Accept-Encoding"),
                None => "Accept-Encoding".to_owned(),
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(VARY, v);
            }
        }
        if compress {
            if let Some(etag) = h.get(ETAG).map(|v| v.as_bytes().to_vec()) {
                let weak =
                    etag.len() >= 2 && (etag[0] == b'W' || etag[0] == b'w') && etag[1] == b'/';
                if !weak && etag.len() > 2 {
                    if self.settings.weaken_etag_on_compress {
                        let mut w = b"W/".to_vec();
                        w.extend_from_slice(&etag);
                        if let Ok(v) = HeaderValue::from_bytes(&w) {
                            h.insert(ETAG, v);
                        }
                    } else {
                        h.remove(ETAG);
                    }
                }
            }
            h.remove(CONTENT_LENGTH);
            h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            ctx.filter_data
                .insert(&self.name, Compressing(GzEncoder::new(Vec::new(), level)));
        }
        FilterStatus::Continue
    }

    fn on_response_data(&self, ctx: &mut RequestContext, data: &mut Data<'_>) -> DataStatus {
        let Some(c) = ctx.filter_data.get_mut::<Compressing>(&self.name) else {
            return DataStatus::Continue;
        };
        // Envoy flushes after every chunk, so a streamed response stays streamed.
        let written = c.0.write_all(&data.data).and_then(|()| {
            if data.end_stream {
                c.0.try_finish()
            } else {
                c.0.flush()
            }
        });
        if let Err(e) = written {
            return DataStatus::LocalReply(crate::api::LocalReply::new(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("compression failed: {e}"),
            ));
        }
        data.data = c.take();
        DataStatus::Continue
    }

    fn on_response_trailers(
        &self,
        ctx: &mut RequestContext,
        trailers: &mut Trailers<'_>,
    ) -> DataStatus {
        let Some(c) = ctx.filter_data.get_mut::<Compressing>(&self.name) else {
            return DataStatus::Continue;
        };
        if c.0
            .write_all(&trailers.data)
            .and_then(|()| c.0.try_finish())
            .is_ok()
        {
            trailers.data = c.take();
        }
        DataStatus::Continue
    }
}

/// Factory of [`CompressorFilter`].
#[derive(Debug)]
pub struct CompressorFactory;

impl FilterFactory for CompressorFactory {
    fn type_url(&self) -> &'static str {
        COMPRESSOR_TYPE_URL
    }

    fn fields(&self) -> FieldTable {
        FIELDS
    }

    fn create(&self, name: &str, config: &DynamicMessage) -> Result<FilterConfig, FilterError> {
        let c: pb::Compressor = common::decode(config, FIELDS)?;
        Ok(FilterConfig::Filter {
            name: name.to_owned(),
            filter: Arc::new(CompressorFilter {
                name: name.to_owned(),
                settings: Settings::new(&c)?,
            }),
        })
    }

    fn route_config_type(&self) -> Option<&'static str> {
        Some(PER_ROUTE_TYPE)
    }

    fn create_route_config(&self, config: &DynamicMessage) -> Result<RouteConfig, FilterError> {
        use pb::compressor_per_route::Override;
        let c: pb::CompressorPerRoute = common::decode(config, FIELDS)?;
        let setting = match &c.r#override {
            Some(Override::Disabled(true)) => PerRoute::Disabled,
            Some(Override::Disabled(false)) => {
                return Err(common::invalid("disabled", "must be true when set"))
            }
            Some(Override::Overrides(o)) => PerRoute::Overrides {
                remove_accept_encoding_header: o
                    .response_direction_config
                    .as_ref()
                    .and_then(|r| r.remove_accept_encoding_header)
                    .map(|v| v.value),
                level: match &o.compressor_library {
                    Some(lib) => Some(gzip_level(Some(lib), "overrides.compressor_library")?),
                    None => None,
                },
            },
            None => {
                return Err(common::invalid(
                    "override",
                    "disabled or overrides is required",
                ))
            }
        };
        Ok(Arc::new(setting))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_encoding_negotiation_follows_envoy() {
        assert!(accepts_gzip("gzip"));
        assert!(accepts_gzip("deflate, gzip;q=0.5"));
        assert!(accepts_gzip("*"));
        assert!(accepts_gzip("*;q=0, gzip;q=1"));
        assert!(!accepts_gzip("gzip;q=0, *;q=1"));
        assert!(!accepts_gzip("identity"));
        assert!(!accepts_gzip("br"));
        assert!(!accepts_gzip("identity;q=1, gzip;q=0.5"));
        assert!(accepts_gzip("gzip;q=0.5, identity;q=0.4"));
        assert!(!accepts_gzip(""));
    }

    #[test]
    fn a_stream_of_flushed_chunks_decompresses() {
        let mut c = Compressing(GzEncoder::new(Vec::new(), Compression::default()));
        let mut out = Vec::new();
        for chunk in [&b"hello "[..], b"world"] {
            assert!(c.0.write_all(chunk).and_then(|()| c.0.flush()).is_ok());
            out.extend_from_slice(&c.take());
        }
        assert!(c.0.try_finish().is_ok());
        out.extend_from_slice(&c.take());
        let mut d = flate2::read::GzDecoder::new(&out[..]);
        let mut s = String::new();
        assert!(std::io::Read::read_to_string(&mut d, &mut s).is_ok());
        assert_eq!(s, "hello world");
    }
}
