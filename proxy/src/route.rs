//! Compiled route tables: virtual-host selection, route matching and header mutations.
//!
//! Built once from a `RouteConfiguration` (see `config::route`), read by every request. All
//! regexes are compiled and all strings are lowercased at build time.

use std::collections::HashMap;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use regex::Regex;

/// A route table: the `RouteConfiguration` Envoy would serve.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    exact: HashMap<String, usize>,
    /// `*.suffix` / `*suffix` wildcards, longest suffix first.
    suffixes: Vec<(String, usize)>,
    /// `prefix*` wildcards, longest prefix first.
    prefixes: Vec<(String, usize)>,
    any: Option<usize>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// `most_specific_header_mutations_wins`: apply outer levels first, so inner ones win.
    pub most_specific_wins: bool,
}

/// A virtual host.
#[derive(Debug, Default)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

/// How a route treats one HTTP filter (`typed_per_filter_config`, virtual host then route).
#[derive(Clone)]
pub enum RouteFilter {
    /// `FilterConfig { disabled: true }`.
    Disabled,
    /// Enabled, with the filter's per-route configuration if one was given.
    Enabled(Option<legate_filters::RouteConfig>),
}

impl std::fmt::Debug for RouteFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteFilter::Disabled => f.write_str("Disabled"),
            RouteFilter::Enabled(c) => write!(f, "Enabled(config: {})", c.is_some()),
        }
    }
}

/// Per-filter settings of a route, by filter name, resolved when the config is compiled.
pub type RouteFilters = HashMap<String, RouteFilter>;

/// One route: a match and what to do with the request.
#[derive(Debug)]
pub struct Route {
    /// `None` when neither the route nor its virtual host configures any filter.
    pub filters: Option<std::sync::Arc<RouteFilters>>,
    pub name: String,
    pub matcher: RouteMatch,
    pub action: RouteAction,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

/// The path part of a route match.
#[derive(Debug)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    SeparatedPrefix(String),
    Regex(Regex),
}

/// A route's match criteria.
#[derive(Debug)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatcher>,
    pub query: Vec<QueryMatcher>,
}

/// How a string is compared.
#[derive(Debug)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
}

/// A string matcher with Envoy's `ignore_case`.
#[derive(Debug)]
pub struct StringMatcher {
    pub kind: StringMatch,
    pub ignore_case: bool,
}

impl StringMatcher {
    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        if self.ignore_case {
            let v = value.to_ascii_lowercase();
            // Patterns were lowercased when compiled.
            self.matches_raw(&v)
        } else {
            self.matches_raw(value)
        }
    }

    fn matches_raw(&self, v: &str) -> bool {
        match &self.kind {
            StringMatch::Exact(s) => v == s,
            StringMatch::Prefix(s) => v.starts_with(s.as_str()),
            StringMatch::Suffix(s) => v.ends_with(s.as_str()),
            StringMatch::Contains(s) => v.contains(s.as_str()),
            StringMatch::Regex(r) => r.is_match(v),
        }
    }
}

/// How a header is matched.
#[derive(Debug)]
pub enum HeaderMatchKind {
    String(StringMatcher),
    Present(bool),
    Range { start: i64, end: i64 },
}

/// Where a header matcher reads its value: a header or one of HTTP/2's pseudo-headers (which
/// Envoy also exposes for HTTP/1.1 requests).
#[derive(Debug)]
pub enum HeaderSource {
    Header(HeaderName),
    Method,
    Authority,
    Path,
    Scheme,
}

/// The parts of a request that route matching reads.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a str,
    pub authority: &'a str,
    pub path_and_query: &'a str,
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
}

/// A `HeaderMatcher`.
#[derive(Debug)]
pub struct HeaderMatcher {
    pub name: HeaderSource,
    pub kind: HeaderMatchKind,
    pub invert: bool,
    pub treat_missing_as_empty: bool,
}

impl HeaderMatcher {
    /// Whether the request satisfies this matcher.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let name = match &self.name {
            HeaderSource::Header(n) => n,
            other => {
                let v = match other {
                    HeaderSource::Method => req.method,
                    HeaderSource::Authority => req.authority,
                    HeaderSource::Path => req.path_and_query,
                    _ => req.scheme,
                };
                return self.matches_value(Some(v.into()));
            }
        };
        let mut values = req.headers.get_all(name).iter().peekable();
        let joined: Option<std::borrow::Cow<'_, str>> = match values.next() {
            None => None,
            Some(first) => {
                let first = String::from_utf8_lossy(first.as_bytes());
                if values.peek().is_none() {
                    Some(first)
                } else {
                    let mut s = first.into_owned();
                    for v in values {
                        s.push(',');
                        s.push_str(&String::from_utf8_lossy(v.as_bytes()));
                    }
                    Some(s.into())
                }
            }
        };
        self.matches_value(joined)
    }

    fn matches_value(&self, joined: Option<std::borrow::Cow<'_, str>>) -> bool {
        let joined = match (joined, self.treat_missing_as_empty) {
            (None, true) => Some("".into()),
            (j, _) => j,
        };
        let result = match (&self.kind, joined.as_deref()) {
            (HeaderMatchKind::Present(want), v) => v.is_some() == *want,
            (_, None) => {
                // Envoy: a missing header never matches a value matcher, inverted or not.
                return false;
            }
            (HeaderMatchKind::String(m), Some(v)) => m.matches(v),
            (HeaderMatchKind::Range { start, end }, Some(v)) => v
                .trim()
                .parse::<i64>()
                .is_ok_and(|n| n >= *start && n < *end),
        };
        result != self.invert
    }
}

/// A `QueryParameterMatcher`.
#[derive(Debug)]
pub struct QueryMatcher {
    pub name: String,
    /// `None` means "present".
    pub value: Option<StringMatcher>,
}

/// What a matched route does.
#[derive(Debug)]
pub enum RouteAction {
    Forward(ForwardAction),
    Redirect(RedirectAction),
    Direct {
        status: StatusCode,
        body: Option<bytes::Bytes>,
    },
}

/// Which cluster a forwarding route picks.
#[derive(Debug)]
pub enum ClusterTarget {
    Named(String),
    Header(HeaderName),
    Weighted {
        clusters: Vec<WeightedCluster>,
        total: u64,
    },
}

/// One entry of `weighted_clusters`.
#[derive(Debug)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u64,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

/// A route hash policy entry.
#[derive(Debug)]
pub enum HashPolicy {
    Header { name: HeaderName, terminal: bool },
    Cookie { name: String, terminal: bool },
    SourceIp { terminal: bool },
}

/// `route` action.
#[derive(Debug)]
pub struct ForwardAction {
    pub target: ClusterTarget,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(Regex, String)>,
    pub host_rewrite: Option<HeaderValue>,
    pub auto_host_rewrite: bool,
    /// `None` disables the timeout (`timeout: 0s`).
    pub timeout: Option<Duration>,
    pub hash_policy: Vec<HashPolicy>,
    pub cluster_not_found_status: StatusCode,
    pub websocket: Option<bool>,
}

/// `redirect` action.
#[derive(Debug)]
pub struct RedirectAction {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u32>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(Regex, String)>,
    pub status: StatusCode,
    pub strip_query: bool,
}

/// How a header is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    AppendOrAdd,
    AddIfAbsent,
    OverwriteOrAdd,
    OverwriteIfExists,
}

/// Headers to add and remove at one level of the route configuration.
#[derive(Debug, Default)]
pub struct HeaderOps {
    pub add: Vec<(HeaderName, HeaderValue, AppendAction)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    /// Whether this level changes nothing.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies removals, then additions, as Envoy's header parser does.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value, action) in &self.add {
            match action {
                AppendAction::AppendOrAdd => {
                    headers.append(name.clone(), value.clone());
                }
                AppendAction::AddIfAbsent => {
                    if !headers.contains_key(name) {
                        headers.insert(name.clone(), value.clone());
                    }
                }
                AppendAction::OverwriteOrAdd => {
                    headers.insert(name.clone(), value.clone());
                }
                AppendAction::OverwriteIfExists => {
                    if headers.contains_key(name) {
                        headers.insert(name.clone(), value.clone());
                    }
                }
            }
        }
    }
}

impl RouteTable {
    /// Applies the header mutations of every level in Envoy's order: the most specific level
    /// first unless `most_specific_header_mutations_wins`, in which case it goes last.
    pub fn apply_levels(&self, levels: [Option<&HeaderOps>; 4], headers: &mut HeaderMap) {
        if self.most_specific_wins {
            for ops in levels.iter().rev().flatten() {
                ops.apply(headers);
            }
        } else {
            for ops in levels.iter().flatten() {
                ops.apply(headers);
            }
        }
    }

    /// Builds the domain index. Domains must already be lowercased and validated.
    pub fn new(
        name: String,
        virtual_hosts: Vec<VirtualHost>,
        request_headers: HeaderOps,
        response_headers: HeaderOps,
    ) -> Result<Self, String> {
        let mut table = RouteTable {
            name,
            request_headers,
            response_headers,
            ..Default::default()
        };
        for (i, vh) in virtual_hosts.iter().enumerate() {
            for d in &vh.domains {
                let dup = if d == "*" {
                    table.any.replace(i).is_some()
                } else if let Some(suffix) = d.strip_prefix('*') {
                    let dup = table.suffixes.iter().any(|(s, _)| s == suffix);
                    table.suffixes.push((suffix.to_owned(), i));
                    dup
                } else if let Some(prefix) = d.strip_suffix('*') {
                    let dup = table.prefixes.iter().any(|(s, _)| s == prefix);
                    table.prefixes.push((prefix.to_owned(), i));
                    dup
                } else {
                    table.exact.insert(d.clone(), i).is_some()
                };
                if dup {
                    return Err(format!(
                        "only unique values for domains are permitted; duplicate entry of domain {d}"
                    ));
                }
            }
        }
        // Longest wildcard first, as Envoy searches.
        table.suffixes.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        table.prefixes.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        table.virtual_hosts = virtual_hosts;
        Ok(table)
    }

    /// Selects the virtual host for a `Host`/`:authority` value.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        let idx = self
            .exact
            .get(host)
            .copied()
            // A wildcard never matches the empty string.
            .or_else(|| {
                self.suffixes
                    .iter()
                    .find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str()))
                    .map(|(_, i)| *i)
            })
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(p, _)| host.len() > p.len() && host.starts_with(p.as_str()))
                    .map(|(_, i)| *i)
            })
            .or(self.any)?;
        self.virtual_hosts.get(idx)
    }
}

impl VirtualHost {
    /// The first route whose match accepts the request.
    pub fn route(&self, req: &RequestView<'_>) -> Option<&Route> {
        let path_and_query = req.path_and_query;
        let (path, query) = match path_and_query.find('?') {
            Some(i) => (&path_and_query[..i], Some(&path_and_query[i + 1..])),
            None => (path_and_query, None),
        };
        // The fragment is never part of matching.
        let path = path.split('#').next().unwrap_or(path);
        self.routes
            .iter()
            .find(|r| r.matcher.matches(path, query, req))
    }
}

impl RouteMatch {
    fn matches(&self, path: &str, query: Option<&str>, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => starts_with(path, p, self.case_sensitive),
            PathMatch::Exact(p) => eq(path, p, self.case_sensitive),
            PathMatch::SeparatedPrefix(p) => {
                starts_with(path, p, self.case_sensitive)
                    && (path.len() == p.len() || path.as_bytes().get(p.len()) == Some(&b'/'))
            }
            PathMatch::Regex(r) => r.is_match(path),
        };
        path_ok
            && self.headers.iter().all(|h| h.matches(req))
            && self.query.iter().all(|q| q.matches(query))
    }
}

impl QueryMatcher {
    fn matches(&self, query: Option<&str>) -> bool {
        let Some(query) = query else { return false };
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == self.name {
                return match &self.value {
                    None => true,
                    Some(m) => m.matches(&percent_decode(v)),
                };
            }
        }
        false
    }
}

fn starts_with(path: &str, prefix: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        path.starts_with(prefix)
    } else {
        path.len() >= prefix.len()
            && path.is_char_boundary(prefix.len())
            && path[..prefix.len()].eq_ignore_ascii_case(prefix)
    }
}

fn eq(a: &str, b: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        a == b
    } else {
        a.eq_ignore_ascii_case(b)
    }
}

/// Decodes `%XX` escapes and `+` in a query value.
pub fn percent_decode(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains('%') && !s.contains('+') {
        return s.into();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vh(name: &str, domains: &[&str]) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn domain_precedence_follows_envoy() -> Result<(), String> {
        let t = RouteTable::new(
            "t".into(),
            vec![
                vh("any", &["*"]),
                vh("suffix", &["*.example.com"]),
                vh("longer", &["*.api.example.com"]),
                vh("prefix", &["api.*"]),
                vh("exact", &["www.example.com", "www.example.com:8080"]),
            ],
            HeaderOps::default(),
            HeaderOps::default(),
        )?;
        let pick = |h: &str| t.virtual_host(h).map(|v| v.name.clone());
        assert_eq!(pick("www.example.com").as_deref(), Some("exact"));
        assert_eq!(pick("WWW.Example.com").as_deref(), Some("exact"));
        assert_eq!(pick("www.example.com:8080").as_deref(), Some("exact"));
        assert_eq!(pick("a.api.example.com").as_deref(), Some("longer"));
        assert_eq!(pick("b.example.com").as_deref(), Some("suffix"));
        assert_eq!(pick("api.other").as_deref(), Some("prefix"));
        assert_eq!(pick(".example.com").as_deref(), Some("any"));
        assert_eq!(pick("other").as_deref(), Some("any"));
        Ok(())
    }

    #[test]
    fn header_matchers() {
        let mut h = HeaderMap::new();
        h.insert("x-num", HeaderValue::from_static("42"));
        let view = RequestView {
            method: "GET",
            authority: "h",
            path_and_query: "/",
            scheme: "http",
            headers: &h,
        };
        let range = HeaderMatcher {
            name: HeaderSource::Header(HeaderName::from_static("x-num")),
            kind: HeaderMatchKind::Range { start: 40, end: 43 },
            invert: false,
            treat_missing_as_empty: false,
        };
        assert!(range.matches(&view));
        let absent = HeaderMatcher {
            name: HeaderSource::Header(HeaderName::from_static("x-missing")),
            kind: HeaderMatchKind::Present(true),
            invert: true,
            treat_missing_as_empty: false,
        };
        assert!(absent.matches(&view));
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
