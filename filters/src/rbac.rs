//! `envoy.filters.http.rbac`: allows or denies requests by policies of permissions (what is
//! asked) and principals (who asks), with shadow rules that are evaluated and only recorded.
//!
//! As in Envoy: a policy matches when one of its permissions and one of its principals match;
//! `ALLOW` lets a request through only if some policy matches, `DENY` refuses it if some
//! policy matches, `LOG` never refuses. A refusal is a 403 `RBAC: access denied` with response
//! flag `RBAC`. Shadow rules write `shadow_effective_policy_id` and `shadow_engine_result`
//! (prefixed with `shadow_rules_stat_prefix`) into the dynamic metadata of
//! `envoy.filters.http.rbac`. A per-route `RBACPerRoute` replaces the filter's rules and
//! shadow rules; one without `rbac` disables the filter on that route.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::StatusCode;
use legate_proto::pb::envoy::config::core::v3 as corepb;
use legate_proto::pb::envoy::config::rbac::v3 as rbacpb;
use legate_proto::pb::envoy::extensions::filters::http::rbac::v3 as pb;
use legate_proto::DynamicMessage;

use crate::api::{FilterStatus, HttpFilter, LocalReply, RequestContext, RouteConfig};
use crate::common::{self, FieldTable, HeaderMatch, StringMatch};
use crate::registry::{FilterConfig, FilterError, FilterFactory};

/// Type URL of the filter's config.
pub const RBAC_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const PER_ROUTE_TYPE: &str = "envoy.extensions.filters.http.rbac.v3.RBACPerRoute";
/// The dynamic-metadata namespace Envoy writes shadow results under.
const METADATA_NAMESPACE: &str = "envoy.filters.http.rbac";

/// The fields this filter implements.
pub const FIELDS: FieldTable = &[
    (
        "envoy.extensions.filters.http.rbac.v3.RBAC",
        &[
            "rules",
            "rules_stat_prefix",
            "shadow_rules",
            "shadow_rules_stat_prefix",
            "track_per_rule_stats",
        ],
    ),
    (PER_ROUTE_TYPE, &["rbac"]),
    ("envoy.config.rbac.v3.RBAC", &["action", "policies"]),
    (
        "envoy.config.rbac.v3.Policy",
        &["permissions", "principals"],
    ),
    (
        "envoy.config.rbac.v3.Permission",
        &[
            "and_rules",
            "or_rules",
            "any",
            "header",
            "url_path",
            "destination_ip",
            "destination_port",
            "destination_port_range",
            "not_rule",
            "requested_server_name",
        ],
    ),
    ("envoy.config.rbac.v3.Permission.Set", &["rules"]),
    (
        "envoy.config.rbac.v3.Principal",
        &[
            "and_ids",
            "or_ids",
            "any",
            "authenticated",
            "direct_remote_ip",
            "remote_ip",
            "header",
            "url_path",
            "not_id",
        ],
    ),
    ("envoy.config.rbac.v3.Principal.Set", &["ids"]),
    (
        "envoy.config.rbac.v3.Principal.Authenticated",
        &["principal_name"],
    ),
    (
        "envoy.config.core.v3.CidrRange",
        &["address_prefix", "prefix_len"],
    ),
    ("envoy.type.v3.Int32Range", &["start", "end"]),
    ("envoy.type.matcher.v3.PathMatcher", &["path"]),
    common::HEADER_MATCHER,
    common::STRING_MATCHER,
    common::REGEX_MATCHER,
    common::GOOGLE_RE2,
];

/// An IP prefix.
#[derive(Debug, Clone)]
struct Cidr {
    addr: IpAddr,
    len: u32,
}

impl Cidr {
    fn new(c: &corepb::CidrRange, path: &str) -> Result<Self, FilterError> {
        let addr: IpAddr = c.address_prefix.parse().map_err(|e| {
            common::invalid(
                format!("{path}.address_prefix"),
                format!("{}: {e}", c.address_prefix),
            )
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = c.prefix_len.as_ref().map_or(max, |v| v.value);
        if len > max {
            return Err(common::invalid(
                format!("{path}.prefix_len"),
                format!("{len} is longer than the address"),
            ));
        }
        Ok(Cidr { addr, len })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => prefix_eq(&a.octets(), &b.octets(), self.len),
            (IpAddr::V6(a), IpAddr::V6(b)) => prefix_eq(&a.octets(), &b.octets(), self.len),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u32) -> bool {
    let full = (bits / 8) as usize;
    if a[..full] != b[..full] {
        return false;
    }
    let rest = bits % 8;
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        (a[full] & mask) == (b[full] & mask)
    }
}

/// A compiled `Permission`.
#[derive(Debug)]
enum Permission {
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    Any,
    Header(HeaderMatch),
    UrlPath(StringMatch),
    DestinationIp(Cidr),
    DestinationPort(u32),
    DestinationPortRange(i64, i64),
    RequestedServerName(StringMatch),
}

/// A compiled `Principal`.
#[derive(Debug)]
enum Principal {
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    Any,
    Authenticated(StringMatch),
    DirectRemoteIp(Cidr),
    RemoteIp(Cidr),
    Header(HeaderMatch),
    UrlPath(StringMatch),
}

fn path_matcher(
    m: &legate_proto::pb::envoy::r#type::matcher::v3::PathMatcher,
    path: &str,
) -> Result<StringMatch, FilterError> {
    use legate_proto::pb::envoy::r#type::matcher::v3::path_matcher::Rule;
    match &m.rule {
        Some(Rule::Path(sm)) => StringMatch::new(sm, &format!("{path}.path")),
        None => Err(common::invalid(path, "path is required")),
    }
}

impl Permission {
    fn new(p: &rbacpb::Permission, path: &str) -> Result<Self, FilterError> {
        use rbacpb::permission::Rule as R;
        let set = |rules: &[rbacpb::Permission], p: String| -> Result<Vec<Self>, FilterError> {
            rules
                .iter()
                .enumerate()
                .map(|(i, r)| Permission::new(r, &format!("{p}.rules[{i}]")))
                .collect()
        };
        Ok(match &p.rule {
            Some(R::AndRules(s)) => Permission::And(set(&s.rules, format!("{path}.and_rules"))?),
            Some(R::OrRules(s)) => Permission::Or(set(&s.rules, format!("{path}.or_rules"))?),
            Some(R::NotRule(r)) => {
                Permission::Not(Box::new(Permission::new(r, &format!("{path}.not_rule"))?))
            }
            Some(R::Any(true)) => Permission::Any,
            Some(R::Header(h)) => {
                Permission::Header(HeaderMatch::new(h, &format!("{path}.header"))?)
            }
            Some(R::UrlPath(m)) => {
                Permission::UrlPath(path_matcher(m, &format!("{path}.url_path"))?)
            }
            Some(R::DestinationIp(c)) => {
                Permission::DestinationIp(Cidr::new(c, &format!("{path}.destination_ip"))?)
            }
            Some(R::DestinationPort(port)) => Permission::DestinationPort(*port),
            Some(R::DestinationPortRange(r)) => {
                Permission::DestinationPortRange(i64::from(r.start), i64::from(r.end))
            }
            Some(R::RequestedServerName(m)) => Permission::RequestedServerName(StringMatch::new(
                m,
                &format!("{path}.requested_server_name"),
            )?),
            _ => return Err(common::invalid(path, "a supported rule is required")),
        })
    }

    fn matches(&self, r: &Request<'_>) -> bool {
        match self {
            Permission::And(v) => v.iter().all(|p| p.matches(r)),
            Permission::Or(v) => v.iter().any(|p| p.matches(r)),
            Permission::Not(p) => !p.matches(r),
            Permission::Any => true,
            Permission::Header(h) => h.matches(r.parts),
            Permission::UrlPath(m) => m.matches(r.parts.uri.path()),
            Permission::DestinationIp(c) => {
                r.ctx.downstream_local.is_some_and(|a| c.contains(a.ip()))
            }
            Permission::DestinationPort(p) => r
                .ctx
                .downstream_local
                .is_some_and(|a| u32::from(a.port()) == *p),
            Permission::DestinationPortRange(start, end) => r
                .ctx
                .downstream_local
                .is_some_and(|a| (*start..*end).contains(&i64::from(a.port()))),
            Permission::RequestedServerName(m) => {
                m.matches(r.ctx.requested_server_name.as_deref().unwrap_or(""))
            }
        }
    }
}

impl Principal {
    fn new(p: &rbacpb::Principal, path: &str) -> Result<Self, FilterError> {
        use rbacpb::principal::Identifier as I;
        let set = |ids: &[rbacpb::Principal], p: String| -> Result<Vec<Self>, FilterError> {
            ids.iter()
                .enumerate()
                .map(|(i, r)| Principal::new(r, &format!("{p}.ids[{i}]")))
                .collect()
        };
        Ok(match &p.identifier {
            Some(I::AndIds(s)) => Principal::And(set(&s.ids, format!("{path}.and_ids"))?),
            Some(I::OrIds(s)) => Principal::Or(set(&s.ids, format!("{path}.or_ids"))?),
            Some(I::NotId(r)) => {
                Principal::Not(Box::new(Principal::new(r, &format!("{path}.not_id"))?))
            }
            Some(I::Any(true)) => Principal::Any,
            Some(I::Authenticated(a)) => match &a.principal_name {
                Some(m) => Principal::Authenticated(StringMatch::new(
                    m,
                    &format!("{path}.authenticated.principal_name"),
                )?),
                None => {
                    return Err(common::invalid(
                        format!("{path}.authenticated.principal_name"),
                        "required by Legate (any-certificate matching is not supported)",
                    ))
                }
            },
            Some(I::DirectRemoteIp(c)) => {
                Principal::DirectRemoteIp(Cidr::new(c, &format!("{path}.direct_remote_ip"))?)
            }
            Some(I::RemoteIp(c)) => {
                Principal::RemoteIp(Cidr::new(c, &format!("{path}.remote_ip"))?)
            }
            Some(I::Header(h)) => {
                Principal::Header(HeaderMatch::new(h, &format!("{path}.header"))?)
            }
            Some(I::UrlPath(m)) => {
                Principal::UrlPath(path_matcher(m, &format!("{path}.url_path"))?)
            }
            _ => return Err(common::invalid(path, "a supported identifier is required")),
        })
    }

    fn matches(&self, r: &Request<'_>) -> bool {
        match self {
            Principal::And(v) => v.iter().all(|p| p.matches(r)),
            Principal::Or(v) => v.iter().any(|p| p.matches(r)),
            Principal::Not(p) => !p.matches(r),
            Principal::Any => true,
            Principal::Authenticated(m) => r.ctx.peer_principals.iter().any(|n| m.matches(n)),
            Principal::DirectRemoteIp(c) => {
                r.ctx.downstream_remote.is_some_and(|a| c.contains(a.ip()))
            }
            Principal::RemoteIp(c) => r.remote_ip.is_some_and(|ip| c.contains(ip)),
            Principal::Header(h) => h.matches(r.parts),
            Principal::UrlPath(m) => m.matches(r.parts.uri.path()),
        }
    }
}

/// What the matchers look at.
struct Request<'a> {
    ctx: &'a RequestContext,
    parts: &'a http::request::Parts,
    /// The client address as Envoy's connection manager derives it: the last
    /// `x-forwarded-for` entry (the peer, once the manager has appended it), else the peer.
    remote_ip: Option<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
    Log,
}

/// A compiled `envoy.config.rbac.v3.RBAC`.
#[derive(Debug)]
struct Engine {
    action: Action,
    /// Sorted by name, as Envoy reports the first matching policy.
    policies: BTreeMap<String, (Vec<Permission>, Vec<Principal>)>,
}

impl Engine {
    fn new(r: &rbacpb::Rbac, path: &str) -> Result<Self, FilterError> {
        let action = match r.action {
            0 => Action::Allow,
            1 => Action::Deny,
            2 => Action::Log,
            n => {
                return Err(common::invalid(
                    format!("{path}.action"),
                    format!("unknown action {n}"),
                ))
            }
        };
        let mut policies = BTreeMap::new();
        for (name, p) in &r.policies {
            let pp = format!("{path}.policies[{name:?}]");
            let permissions = p
                .permissions
                .iter()
                .enumerate()
                .map(|(i, x)| Permission::new(x, &format!("{pp}.permissions[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            let principals = p
                .principals
                .iter()
                .enumerate()
                .map(|(i, x)| Principal::new(x, &format!("{pp}.principals[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            policies.insert(name.clone(), (permissions, principals));
        }
        Ok(Engine { action, policies })
    }

    /// Whether the request is allowed, and the policy that matched.
    fn evaluate(&self, r: &Request<'_>) -> (bool, Option<&str>) {
        let matched = self
            .policies
            .iter()
            .find(|(_, (perms, princs))| {
                perms.iter().any(|p| p.matches(r)) && princs.iter().any(|p| p.matches(r))
            })
            .map(|(name, _)| name.as_str());
        let allowed = match self.action {
            Action::Allow => matched.is_some(),
            Action::Deny => matched.is_none(),
            Action::Log => true,
        };
        (allowed, matched)
    }
}

/// A compiled filter config (the filter's or a route's).
#[derive(Debug)]
struct Rules {
    enforced: Option<Engine>,
    shadow: Option<Engine>,
    shadow_prefix: String,
}

impl Rules {
    fn new(c: &pb::Rbac) -> Result<Self, FilterError> {
        Ok(Rules {
            enforced: c
                .rules
                .as_ref()
                .map(|r| Engine::new(r, "rules"))
                .transpose()?,
            shadow: c
                .shadow_rules
                .as_ref()
                .map(|r| Engine::new(r, "shadow_rules"))
                .transpose()?,
            shadow_prefix: c.shadow_rules_stat_prefix.clone(),
        })
    }
}

/// The filter.
#[derive(Debug)]
pub struct RbacFilter {
    rules: Rules,
}

/// A per-route config: rules, or none (the filter is off on the route).
#[derive(Debug)]
struct PerRoute(Option<Rules>);

impl HttpFilter for RbacFilter {
    fn on_request_headers(
        &self,
        ctx: &mut RequestContext,
        parts: &mut http::request::Parts,
    ) -> FilterStatus {
        let rules = match ctx.route_config::<PerRoute>() {
            Some(PerRoute(None)) => return FilterStatus::Continue,
            Some(PerRoute(Some(r))) => r,
            None => &self.rules,
        };
        let remote_ip = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok()?.rsplit(',').next()?.trim().parse().ok())
            .or(ctx.downstream_remote.map(|a| a.ip()));
        let req = Request {
            ctx,
            parts,
            remote_ip,
        };
        let mut shadow_metadata = None;
        if let Some(engine) = &rules.shadow {
            let (allowed, policy) = engine.evaluate(&req);
            let mut m = BTreeMap::new();
            if let Some(p) = policy {
                m.insert(
                    format!("{}shadow_effective_policy_id", rules.shadow_prefix),
                    p.to_owned(),
                );
            }
            let result = if allowed { "allowed" } else { "denied" };
            m.insert(
                format!("{}shadow_engine_result", rules.shadow_prefix),
                result.to_owned(),
            );
            shadow_metadata = Some(m);
        }
        let allowed = rules.enforced.as_ref().is_none_or(|e| e.evaluate(&req).0);
        if let Some(m) = shadow_metadata {
            ctx.dynamic_metadata
                .entry(METADATA_NAMESPACE.to_owned())
                .or_default()
                .extend(m);
        }
        if allowed {
            return FilterStatus::Continue;
        }
        let mut reply = LocalReply::new(StatusCode::FORBIDDEN, "RBAC: access denied");
        reply.response_flag = Some("RBAC");
        FilterStatus::LocalReply(reply)
    }
}

/// Factory of [`RbacFilter`].
#[derive(Debug)]
pub struct RbacFactory;

impl FilterFactory for RbacFactory {
    fn type_url(&self) -> &'static str {
        RBAC_TYPE_URL
    }

    fn fields(&self) -> crate::registry::FieldTable {
        FIELDS
    }

    fn create(&self, name: &str, config: &DynamicMessage) -> Result<FilterConfig, FilterError> {
        let c: pb::Rbac = common::decode(config, FIELDS)?;
        Ok(FilterConfig::Filter {
            name: name.to_owned(),
            filter: Arc::new(RbacFilter {
                rules: Rules::new(&c)?,
            }),
        })
    }

    fn route_config_type(&self) -> Option<&'static str> {
        Some(PER_ROUTE_TYPE)
    }

    fn create_route_config(&self, config: &DynamicMessage) -> Result<RouteConfig, FilterError> {
        let c: pb::RbacPerRoute = common::decode(config, FIELDS)?;
        Ok(Arc::new(PerRoute(
            c.rbac.as_ref().map(Rules::new).transpose()?,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_ranges_match_by_prefix() -> Result<(), FilterError> {
        let c = Cidr::new(
            &corepb::CidrRange {
                address_prefix: "10.1.0.0".into(),
                prefix_len: Some(legate_proto::pb::google::protobuf::UInt32Value { value: 12 }),
            },
            "c",
        )?;
        assert!(c.contains(
            "10.15.255.1"
                .parse()
                .map_err(|_| common::invalid("ip", "bad"))?
        ));
        assert!(!c.contains(
            "10.16.0.1"
                .parse()
                .map_err(|_| common::invalid("ip", "bad"))?
        ));
        assert!(c.contains(
            "::ffff:10.1.2.3"
                .parse()
                .map_err(|_| common::invalid("ip", "bad"))?
        ));
        Ok(())
    }

    fn filter(json: serde_json::Value) -> Result<Arc<dyn HttpFilter>, Box<dyn std::error::Error>> {
        let msg =
            legate_proto::dynamic_from_json("envoy.extensions.filters.http.rbac.v3.RBAC", &json)?;
        match RbacFactory.create("rbac", &msg)? {
            FilterConfig::Filter { filter, .. } => Ok(filter),
            FilterConfig::Router(_) => Err("not a filter".into()),
        }
    }

    #[test]
    fn shadow_rules_record_and_never_refuse() -> Result<(), Box<dyn std::error::Error>> {
        let f = filter(serde_json::json!({
            "shadow_rules": {"action": "DENY", "policies": {"all": {
                "permissions": [{"any": true}], "principals": [{"any": true}]
            }}},
            "shadow_rules_stat_prefix": "p_"
        }))?;
        let mut ctx = RequestContext::default();
        let (mut req, ()) = http::Request::get("/").body(())?.into_parts();
        assert!(matches!(
            f.on_request_headers(&mut ctx, &mut req),
            FilterStatus::Continue
        ));
        let md = ctx
            .dynamic_metadata
            .get(METADATA_NAMESPACE)
            .ok_or("no metadata")?;
        assert_eq!(
            md.get("p_shadow_engine_result").map(String::as_str),
            Some("denied")
        );
        assert_eq!(
            md.get("p_shadow_effective_policy_id").map(String::as_str),
            Some("all")
        );
        Ok(())
    }

    #[test]
    fn empty_policies_allow_under_deny_and_refuse_under_allow(
    ) -> Result<(), Box<dyn std::error::Error>> {
        for (action, allowed) in [("DENY", true), ("ALLOW", false)] {
            let f = filter(serde_json::json!({"rules": {"action": action}}))?;
            let mut ctx = RequestContext::default();
            let (mut req, ()) = http::Request::get("/").body(())?.into_parts();
            let status = f.on_request_headers(&mut ctx, &mut req);
            assert_eq!(
                matches!(status, FilterStatus::Continue),
                allowed,
                "{action}"
            );
        }
        Ok(())
    }

    #[test]
    fn unimplemented_principals_are_refused_by_path() -> Result<(), Box<dyn std::error::Error>> {
        let err = filter(serde_json::json!({"rules": {"policies": {"p": {
            "permissions": [{"any": true}],
            "principals": [{"metadata": {"filter": "f", "path": [{"key": "k"}], "value": {"present_match": true}}}]
        }}}}))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains(r#"rules.policies["p"].principals[0].metadata"#),
            "{err}"
        );
        Ok(())
    }
}
