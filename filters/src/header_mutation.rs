//! `envoy.filters.http.header_mutation`: adds, overwrites and removes request and response
//! headers, from the filter's config and from the route's `HeaderMutationPerRoute`.
//!
//! As in Envoy, the filter-level mutations run first and the per-route ones after them, on
//! the request and on the response. Legate resolves one per-route config per route (the
//! route's, else the virtual host's), so the virtual host's mutations do not also run when
//! the route has its own.

use http::header::HeaderName;
use http::HeaderMap;
use legate_proto::pb::envoy::config::common::mutation_rules::v3 as rulespb;
use legate_proto::pb::envoy::extensions::filters::http::header_mutation::v3 as pb;
use legate_proto::DynamicMessage;

use crate::api::{FilterStatus, HttpFilter, RequestContext, RouteConfig};
use crate::common::{self, FieldTable, HeaderAdd, StringMatch};
use crate::registry::{FilterConfig, FilterError, FilterFactory};

/// Type URL of the filter's config.
pub const HEADER_MUTATION_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation";
const PER_ROUTE_TYPE: &str =
    "envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute";

/// The fields this filter implements.
pub const FIELDS: FieldTable = &[
    (
        "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        &["mutations", "most_specific_header_mutations_wins"],
    ),
    (PER_ROUTE_TYPE, &["mutations"]),
    (
        "envoy.extensions.filters.http.header_mutation.v3.Mutations",
        &["request_mutations", "response_mutations"],
    ),
    (
        "envoy.config.common.mutation_rules.v3.HeaderMutation",
        &["remove", "append", "remove_on_match"],
    ),
    (
        "envoy.config.common.mutation_rules.v3.HeaderMutation.RemoveOnMatch",
        &["key_matcher"],
    ),
    common::HEADER_VALUE_OPTION,
    common::HEADER_VALUE,
    common::STRING_MATCHER,
    common::REGEX_MATCHER,
    common::GOOGLE_RE2,
];

/// One compiled mutation.
#[derive(Debug)]
enum Mutation {
    Remove(HeaderName),
    Append(HeaderAdd),
    RemoveOnMatch(StringMatch),
}

impl Mutation {
    fn apply(&self, headers: &mut HeaderMap) {
        match self {
            Mutation::Remove(name) => {
                headers.remove(name);
            }
            Mutation::Append(add) => add.apply(headers),
            Mutation::RemoveOnMatch(m) => {
                let doomed: Vec<HeaderName> = headers
                    .keys()
                    .filter(|k| m.matches(k.as_str()))
                    .cloned()
                    .collect();
                for k in doomed {
                    headers.remove(k);
                }
            }
        }
    }
}

/// Request and response mutations, applied in order.
#[derive(Debug, Default)]
struct Mutations {
    request: Vec<Mutation>,
    response: Vec<Mutation>,
}

impl Mutations {
    fn new(m: Option<&pb::Mutations>) -> Result<Self, FilterError> {
        let Some(m) = m else {
            return Ok(Self::default());
        };
        Ok(Mutations {
            request: compile(&m.request_mutations, "mutations.request_mutations")?,
            response: compile(&m.response_mutations, "mutations.response_mutations")?,
        })
    }
}

fn compile(list: &[rulespb::HeaderMutation], path: &str) -> Result<Vec<Mutation>, FilterError> {
    use rulespb::header_mutation::Action;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let p = format!("{path}[{i}]");
            match &m.action {
                Some(Action::Remove(name)) => HeaderName::from_bytes(name.as_bytes())
                    .map(Mutation::Remove)
                    .map_err(|e| common::invalid(format!("{p}.remove"), e.to_string())),
                Some(Action::Append(o)) => {
                    HeaderAdd::new(o, &format!("{p}.append")).map(Mutation::Append)
                }
                Some(Action::RemoveOnMatch(r)) => {
                    let Some(km) = &r.key_matcher else {
                        return Err(common::invalid(
                            format!("{p}.remove_on_match.key_matcher"),
                            "required",
                        ));
                    };
                    StringMatch::new(km, &format!("{p}.remove_on_match.key_matcher"))
                        .map(Mutation::RemoveOnMatch)
                }
                None => Err(common::invalid(p, "an action is required")),
            }
        })
        .collect()
}

/// The filter.
#[derive(Debug)]
pub struct HeaderMutationFilter {
    mutations: Mutations,
}

impl HttpFilter for HeaderMutationFilter {
    fn on_request_headers(
        &self,
        ctx: &mut RequestContext,
        headers: &mut http::request::Parts,
    ) -> FilterStatus {
        for m in &self.mutations.request {
            m.apply(&mut headers.headers);
        }
        if let Some(route) = ctx.route_config::<Mutations>() {
            for m in &route.request {
                m.apply(&mut headers.headers);
            }
        }
        FilterStatus::Continue
    }

    fn on_response_headers(
        &self,
        ctx: &mut RequestContext,
        headers: &mut http::response::Parts,
    ) -> FilterStatus {
        for m in &self.mutations.response {
            m.apply(&mut headers.headers);
        }
        if let Some(route) = ctx.route_config::<Mutations>() {
            for m in &route.response {
                m.apply(&mut headers.headers);
            }
        }
        FilterStatus::Continue
    }
}

/// Factory of [`HeaderMutationFilter`].
#[derive(Debug)]
pub struct HeaderMutationFactory;

impl FilterFactory for HeaderMutationFactory {
    fn type_url(&self) -> &'static str {
        HEADER_MUTATION_TYPE_URL
    }

    fn fields(&self) -> crate::registry::FieldTable {
        FIELDS
    }

    fn create(&self, name: &str, config: &DynamicMessage) -> Result<FilterConfig, FilterError> {
        let c: pb::HeaderMutation = common::decode(config, FIELDS)?;
        // With one per-route config per route, the order among per-route levels that this
        // flag chooses does not arise.
        let _ = c.most_specific_header_mutations_wins;
        Ok(FilterConfig::Filter {
            name: name.to_owned(),
            filter: std::sync::Arc::new(HeaderMutationFilter {
                mutations: Mutations::new(c.mutations.as_ref())?,
            }),
        })
    }

    fn route_config_type(&self) -> Option<&'static str> {
        Some(PER_ROUTE_TYPE)
    }

    fn create_route_config(&self, config: &DynamicMessage) -> Result<RouteConfig, FilterError> {
        let c: pb::HeaderMutationPerRoute = common::decode(config, FIELDS)?;
        Ok(std::sync::Arc::new(Mutations::new(c.mutations.as_ref())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(json: serde_json::Value) -> DynamicMessage {
        match legate_proto::dynamic_from_json(
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            &json,
        ) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn an_unimplemented_field_is_named() {
        let msg = dynamic(serde_json::json!({"mutations": {
            "query_parameter_mutations": [{"remove": "q"}]
        }}));
        let err = HeaderMutationFactory.create("hm", &msg).err();
        assert!(
            matches!(&err, Some(FilterError::InvalidConfig { field, .. })
                if field == "mutations.query_parameter_mutations"),
            "{err:?}"
        );
    }

    #[test]
    fn request_mutations_apply_in_order() -> Result<(), Box<dyn std::error::Error>> {
        let msg = dynamic(serde_json::json!({"mutations": {"request_mutations": [
            {"append": {"header": {"key": "x-a", "value": "1"}}},
            {"append": {"header": {"key": "x-a", "value": "2"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}},
            {"remove": "x-gone"},
            {"remove_on_match": {"key_matcher": {"prefix": "x-drop-"}}}
        ]}}));
        let FilterConfig::Filter { filter, .. } = HeaderMutationFactory.create("hm", &msg)? else {
            panic!("not a filter")
        };
        let (mut parts, ()) = http::Request::builder()
            .header("x-gone", "v")
            .header("x-drop-me", "v")
            .header("x-keep", "v")
            .body(())?
            .into_parts();
        let mut ctx = RequestContext::default();
        filter.on_request_headers(&mut ctx, &mut parts);
        let h = &parts.headers;
        assert_eq!(h.get_all("x-a").iter().count(), 1);
        assert_eq!(h.get("x-a").map(|v| v.as_bytes()), Some(&b"2"[..]));
        assert!(!h.contains_key("x-gone") && !h.contains_key("x-drop-me"));
        assert!(h.contains_key("x-keep"));
        Ok(())
    }
}
