//! Pieces shared by the built-in filters: strict decoding of their protos, Envoy's fractional
//! percents, header value options and string matchers.

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use legate_proto::pb::envoy::config::core::v3 as corepb;
use legate_proto::pb::envoy::r#type::matcher::v3 as matcherpb;
use legate_proto::pb::envoy::r#type::v3 as typepb;
use legate_proto::{DynamicMessage, ReflectMessage, Value};

use crate::registry::FilterError;

pub(crate) use crate::registry::FieldTable;

/// An error naming a configuration field.
pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> FilterError {
    FilterError::InvalidConfig {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Rejects every set field that `table` does not list, naming its path; then converts the
/// message into its generated type.
pub(crate) fn decode<T: prost::Message + Default>(
    msg: &DynamicMessage,
    table: FieldTable,
) -> Result<T, FilterError> {
    check_fields(msg, "", table)?;
    legate_proto::to_typed(msg).map_err(|e| invalid(msg.descriptor().full_name(), e.to_string()))
}

fn check_fields(msg: &DynamicMessage, path: &str, table: FieldTable) -> Result<(), FilterError> {
    let type_name = msg.descriptor().full_name().to_owned();
    if type_name.starts_with("google.protobuf.") {
        return Ok(());
    }
    let Some((_, fields)) = table.iter().find(|(t, _)| *t == type_name) else {
        return Err(invalid(
            display(path),
            format!("{type_name} is not supported by Legate"),
        ));
    };
    for (field, value) in msg.fields() {
        let p = if path.is_empty() {
            field.name().to_owned()
        } else {
            format!("{path}.{}", field.name())
        };
        if !fields.contains(&field.name()) {
            return Err(invalid(p, "field not supported by Legate"));
        }
        check_value(value, &p, table)?;
    }
    Ok(())
}

fn check_value(value: &Value, path: &str, table: FieldTable) -> Result<(), FilterError> {
    match value {
        Value::Message(m) => check_fields(m, path, table),
        Value::List(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check_value(v, &format!("{path}[{i}]"), table)),
        Value::Map(map) => map.iter().try_for_each(|(k, v)| {
            let key = match k {
                legate_proto::MapKey::String(s) => format!("{s:?}"),
                other => format!("{other:?}"),
            };
            check_value(v, &format!("{path}[{key}]"), table)
        }),
        _ => Ok(()),
    }
}

fn display(path: &str) -> String {
    if path.is_empty() {
        "typed_config".to_owned()
    } else {
        path.to_owned()
    }
}

/// A non-negative protobuf duration.
pub(crate) fn duration(
    d: &legate_proto::pb::google::protobuf::Duration,
) -> Option<std::time::Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    Some(std::time::Duration::new(secs, 0) + std::time::Duration::from_nanos(u64::from(nanos)))
}

/// Envoy's `FractionalPercent` (and the default value of a `RuntimeFractionalPercent`;
/// Legate has no runtime layer, so the default always applies, as in an Envoy whose runtime
/// does not set the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fraction {
    numerator: u64,
    denominator: u64,
}

impl Fraction {
    pub(crate) fn new(p: &typepb::FractionalPercent) -> Self {
        let denominator = match p.denominator {
            1 => 10_000,
            2 => 1_000_000,
            _ => 100,
        };
        Fraction {
            numerator: u64::from(p.numerator).min(denominator),
            denominator,
        }
    }

    pub(crate) fn runtime(p: Option<&corepb::RuntimeFractionalPercent>) -> Option<Self> {
        Some(p?.default_value.as_ref().map_or(
            Fraction {
                numerator: 0,
                denominator: 100,
            },
            Self::new,
        ))
    }

    /// Draws once: true with the fraction's probability.
    pub(crate) fn sample(&self) -> bool {
        if self.numerator >= self.denominator {
            return true;
        }
        self.numerator > 0 && rand::random_range(0..self.denominator) < self.numerator
    }
}

/// What a `HeaderValueOption` does to a header that may already be there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

/// A compiled `envoy.config.core.v3.HeaderValueOption`.
#[derive(Debug, Clone)]
pub(crate) struct HeaderAdd {
    name: HeaderName,
    value: HeaderValue,
    action: AppendAction,
    keep_empty_value: bool,
}

impl HeaderAdd {
    /// Compiles an option. Values are literal: Envoy's `%COMMAND%` operators are refused. The
    /// deprecated `append` is refused by the filters' field tables.
    pub(crate) fn new(o: &corepb::HeaderValueOption, path: &str) -> Result<Self, FilterError> {
        let Some(h) = &o.header else {
            return Err(invalid(format!("{path}.header"), "required"));
        };
        if !h.raw_value.is_empty() {
            return Err(invalid(format!("{path}.header.raw_value"), "not supported"));
        }
        if h.key.starts_with(':') || h.key.eq_ignore_ascii_case("host") {
            return Err(invalid(
                format!("{path}.header.key"),
                format!("{}: pseudo-headers and host cannot be set here", h.key),
            ));
        }
        let name = HeaderName::from_bytes(h.key.as_bytes())
            .map_err(|e| invalid(format!("{path}.header.key"), e.to_string()))?;
        if h.value.contains('%') {
            return Err(invalid(
                format!("{path}.header.value"),
                "command operators (%...%) in header values are not supported",
            ));
        }
        let value = HeaderValue::from_str(&h.value)
            .map_err(|e| invalid(format!("{path}.header.value"), e.to_string()))?;
        let action = match o.append_action {
            0 => AppendAction::AppendIfExistsOrAdd,
            1 => AppendAction::AddIfAbsent,
            2 => AppendAction::OverwriteIfExistsOrAdd,
            3 => AppendAction::OverwriteIfExists,
            n => {
                return Err(invalid(
                    format!("{path}.append_action"),
                    format!("unknown action {n}"),
                ))
            }
        };
        Ok(HeaderAdd {
            name,
            value,
            action,
            keep_empty_value: o.keep_empty_value,
        })
    }

    /// Applies the option as Envoy's header parsers do.
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        if self.value.is_empty() && !self.keep_empty_value {
            return;
        }
        let present = headers.contains_key(&self.name);
        match self.action {
            AppendAction::AppendIfExistsOrAdd => {
                headers.append(self.name.clone(), self.value.clone());
            }
            AppendAction::AddIfAbsent if !present => {
                headers.insert(self.name.clone(), self.value.clone());
            }
            AppendAction::OverwriteIfExistsOrAdd => {
                headers.insert(self.name.clone(), self.value.clone());
            }
            AppendAction::OverwriteIfExists if present => {
                headers.insert(self.name.clone(), self.value.clone());
            }
            AppendAction::AddIfAbsent | AppendAction::OverwriteIfExists => {}
        }
    }
}

/// Compiles a list of header value options.
pub(crate) fn header_adds(
    list: &[corepb::HeaderValueOption],
    path: &str,
) -> Result<Vec<HeaderAdd>, FilterError> {
    list.iter()
        .enumerate()
        .map(|(i, o)| HeaderAdd::new(o, &format!("{path}[{i}]")))
        .collect()
}

/// A compiled `envoy.type.matcher.v3.StringMatcher`.
#[derive(Debug, Clone)]
pub(crate) enum StringMatch {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    Regex(regex::Regex),
}

impl StringMatch {
    pub(crate) fn new(m: &matcherpb::StringMatcher, path: &str) -> Result<Self, FilterError> {
        use matcherpb::string_matcher::MatchPattern as P;
        let ic = m.ignore_case;
        let norm = |s: &str| {
            if ic {
                s.to_ascii_lowercase()
            } else {
                s.to_owned()
            }
        };
        Ok(match &m.match_pattern {
            Some(P::Exact(s)) => StringMatch::Exact(norm(s), ic),
            Some(P::Prefix(s)) => StringMatch::Prefix(norm(s), ic),
            Some(P::Suffix(s)) => StringMatch::Suffix(norm(s), ic),
            Some(P::Contains(s)) => StringMatch::Contains(norm(s), ic),
            Some(P::SafeRegex(r)) => {
                if ic {
                    return Err(invalid(
                        format!("{path}.ignore_case"),
                        "cannot be combined with safe_regex",
                    ));
                }
                // Envoy's regexes match the whole value.
                let re = regex::Regex::new(&format!("^(?:{})$", r.regex))
                    .map_err(|e| invalid(format!("{path}.safe_regex.regex"), e.to_string()))?;
                StringMatch::Regex(re)
            }
            _ => return Err(invalid(path, "a match pattern is required")),
        })
    }

    pub(crate) fn matches(&self, value: &str) -> bool {
        let fold = |ic: bool| {
            if ic {
                std::borrow::Cow::Owned(value.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(value)
            }
        };
        match self {
            StringMatch::Exact(s, ic) => *fold(*ic) == **s,
            StringMatch::Prefix(s, ic) => fold(*ic).starts_with(s.as_str()),
            StringMatch::Suffix(s, ic) => fold(*ic).ends_with(s.as_str()),
            StringMatch::Contains(s, ic) => fold(*ic).contains(s.as_str()),
            StringMatch::Regex(re) => re.is_match(value),
        }
    }
}

/// A compiled `envoy.config.route.v3.HeaderMatcher`, matched as Envoy's
/// `HeaderUtility::matchHeaders`: several values of a header are joined with `,`; a missing
/// header matches only `present_match: false` (or, inverted, anything but a presence check)
/// unless `treat_missing_header_as_empty`.
#[derive(Debug, Clone)]
pub(crate) struct HeaderMatch {
    name: String,
    kind: HeaderMatchKind,
    invert: bool,
    missing_as_empty: bool,
}

#[derive(Debug, Clone)]
enum HeaderMatchKind {
    Present(bool),
    Value(StringMatch),
}

impl HeaderMatch {
    // Envoy still accepts the deprecated specifiers (`exact_match`, ...).
    #[allow(deprecated)]
    pub(crate) fn new(
        m: &legate_proto::pb::envoy::config::route::v3::HeaderMatcher,
        path: &str,
    ) -> Result<Self, FilterError> {
        use legate_proto::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier as S;
        let name = m.name.to_ascii_lowercase();
        if name.starts_with(':') && ![":path", ":method", ":authority"].contains(&name.as_str()) {
            return Err(invalid(
                format!("{path}.name"),
                format!("{name}: only :path, :method and :authority can be matched"),
            ));
        }
        let lit = |s: &str, f: fn(String, bool) -> StringMatch| f(s.to_owned(), false);
        let kind = match &m.header_match_specifier {
            Some(S::ExactMatch(v)) => HeaderMatchKind::Value(lit(v, StringMatch::Exact)),
            Some(S::PrefixMatch(v)) => HeaderMatchKind::Value(lit(v, StringMatch::Prefix)),
            Some(S::SuffixMatch(v)) => HeaderMatchKind::Value(lit(v, StringMatch::Suffix)),
            Some(S::ContainsMatch(v)) => HeaderMatchKind::Value(lit(v, StringMatch::Contains)),
            Some(S::SafeRegexMatch(r)) => HeaderMatchKind::Value(StringMatch::new(
                &matcherpb::StringMatcher {
                    ignore_case: false,
                    match_pattern: Some(matcherpb::string_matcher::MatchPattern::SafeRegex(
                        r.clone(),
                    )),
                },
                &format!("{path}.safe_regex_match"),
            )?),
            Some(S::StringMatch(sm)) => {
                HeaderMatchKind::Value(StringMatch::new(sm, &format!("{path}.string_match"))?)
            }
            Some(S::PresentMatch(p)) => HeaderMatchKind::Present(*p),
            Some(S::RangeMatch(_)) => {
                return Err(invalid(format!("{path}.range_match"), "not supported"))
            }
            // Envoy: no specifier means "present".
            None => HeaderMatchKind::Present(true),
        };
        Ok(HeaderMatch {
            name,
            kind,
            invert: m.invert_match,
            missing_as_empty: m.treat_missing_header_as_empty,
        })
    }

    pub(crate) fn matches(&self, req: &http::request::Parts) -> bool {
        let value: Option<std::borrow::Cow<'_, str>> = match self.name.as_str() {
            ":path" => req.uri.path_and_query().map(|p| p.as_str().into()),
            ":method" => Some(req.method.as_str().into()),
            ":authority" => req
                .uri
                .authority()
                .map(|a| a.as_str().into())
                .or_else(|| header_str(&req.headers, "host").map(Into::into)),
            name => header_str(&req.headers, name).map(Into::into),
        };
        let value = match value {
            Some(v) => v,
            None if self.missing_as_empty => "".into(),
            None => {
                let presence = matches!(self.kind, HeaderMatchKind::Present(_));
                return if self.invert {
                    !presence
                } else {
                    matches!(self.kind, HeaderMatchKind::Present(false))
                };
            }
        };
        let hit = match &self.kind {
            HeaderMatchKind::Present(p) => *p,
            HeaderMatchKind::Value(m) => m.matches(&value),
        };
        hit != self.invert
    }
}

/// All values of a header joined with `,`, as Envoy reads a header for matching.
fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut out = String::from_utf8_lossy(first.as_bytes()).into_owned();
    for v in values {
        out.push(',');
        out.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    Some(out)
}

/// Field lists shared by several filters' tables.
pub(crate) const HEADER_VALUE_OPTION: (&str, &[&str]) = (
    "envoy.config.core.v3.HeaderValueOption",
    &["header", "append_action", "keep_empty_value"],
);
pub(crate) const HEADER_VALUE: (&str, &[&str]) =
    ("envoy.config.core.v3.HeaderValue", &["key", "value"]);
pub(crate) const STRING_MATCHER: (&str, &[&str]) = (
    "envoy.type.matcher.v3.StringMatcher",
    &[
        "exact",
        "prefix",
        "suffix",
        "safe_regex",
        "contains",
        "ignore_case",
    ],
);
pub(crate) const REGEX_MATCHER: (&str, &[&str]) = (
    "envoy.type.matcher.v3.RegexMatcher",
    &["google_re2", "regex"],
);
pub(crate) const GOOGLE_RE2: (&str, &[&str]) =
    ("envoy.type.matcher.v3.RegexMatcher.GoogleRE2", &[]);
pub(crate) const HEADER_MATCHER: (&str, &[&str]) = (
    "envoy.config.route.v3.HeaderMatcher",
    &[
        "name",
        "exact_match",
        "safe_regex_match",
        "present_match",
        "prefix_match",
        "suffix_match",
        "contains_match",
        "string_match",
        "invert_match",
        "treat_missing_header_as_empty",
    ],
);
pub(crate) const FRACTIONAL_PERCENT: (&str, &[&str]) = (
    "envoy.type.v3.FractionalPercent",
    &["numerator", "denominator"],
);
pub(crate) const RUNTIME_FRACTIONAL_PERCENT: (&str, &[&str]) = (
    "envoy.config.core.v3.RuntimeFractionalPercent",
    &["default_value", "runtime_key"],
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_at_the_edges_are_certain() {
        let all = Fraction::new(&typepb::FractionalPercent {
            numerator: 100,
            denominator: 0,
        });
        let none = Fraction::new(&typepb::FractionalPercent {
            numerator: 0,
            denominator: 2,
        });
        assert!((0..100).all(|_| all.sample()));
        assert!((0..100).all(|_| !none.sample()));
        assert!(Fraction::runtime(None).is_none());
    }

    #[test]
    fn string_matchers_fold_case_when_asked() -> Result<(), FilterError> {
        let m = StringMatch::new(
            &matcherpb::StringMatcher {
                ignore_case: true,
                match_pattern: Some(matcherpb::string_matcher::MatchPattern::Prefix(
                    "X-Dev".into(),
                )),
            },
            "m",
        )?;
        assert!(m.matches("x-developer"));
        assert!(!m.matches("y-dev"));
        Ok(())
    }
}
