//! Who a proxy is, from its Envoy `Node`, the way Istio's proxies say it.
//!
//! `node.id` is `TYPE~IP~NAME.NAMESPACE~NAMESPACE.svc.DOMAIN`, `TYPE` being `sidecar` or
//! `router` (a gateway). `node.metadata` may add `NAMESPACE`, `LABELS` and, for local runs
//! and tests, `LEGATE_OUTBOUND_PORT` (the port of the sidecar's outbound listener; 15001
//! by default, 0 for an ephemeral port), `LEGATE_INBOUND_PORT` (15006), and for a gateway
//! `LEGATE_GATEWAY_HTTP_PORT` (8080) and `LEGATE_GATEWAY_HTTPS_PORT` (8443).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use legate_proto::pb::envoy::config::core::v3::Node;
use legate_proto::pb::google::protobuf::{value::Kind, Struct};

/// The default port of a sidecar's outbound listener.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;

/// The metadata key that overrides the outbound listener's port.
pub const OUTBOUND_PORT_KEY: &str = "LEGATE_OUTBOUND_PORT";

/// The default port of a sidecar's inbound listener.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;

/// The metadata key that overrides the inbound listener's port.
pub const INBOUND_PORT_KEY: &str = "LEGATE_INBOUND_PORT";

/// The default port of a gateway's HTTP listener.
pub const DEFAULT_GATEWAY_HTTP_PORT: u16 = 8080;

/// The metadata key that overrides the gateway's HTTP port.
pub const GATEWAY_HTTP_PORT_KEY: &str = "LEGATE_GATEWAY_HTTP_PORT";

/// The default port of a gateway's HTTPS listener.
pub const DEFAULT_GATEWAY_HTTPS_PORT: u16 = 8443;

/// The metadata key that overrides the gateway's HTTPS port.
pub const GATEWAY_HTTPS_PORT_KEY: &str = "LEGATE_GATEWAY_HTTPS_PORT";

/// Why a node could not be identified.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IdentityError {
    #[error("the first request on the stream carries no node")]
    NoNode,
    #[error("node.id {0:?}: expected TYPE~IP~NAME.NAMESPACE~NAMESPACE.svc.DOMAIN")]
    Shape(String),
    #[error("node.id {0:?}: type must be sidecar or router")]
    Role(String),
    #[error("node.id {id:?}: {ip:?} is not an IP address")]
    Ip { id: String, ip: String },
    #[error("node.metadata.{key}: {reason}")]
    Metadata { key: &'static str, reason: String },
}

/// The role a proxy plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Sidecar,
    Router,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Sidecar => "sidecar",
            Role::Router => "router",
        }
    }
}

/// A proxy's identity: everything translation may depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyIdentity {
    pub id: String,
    pub role: Role,
    pub ip: IpAddr,
    pub name: String,
    pub namespace: String,
    pub domain: String,
    pub labels: BTreeMap<String, String>,
    /// The sidecar's outbound port or the gateway's HTTP port.
    pub listener_port: u16,
    /// The sidecar's inbound port (unused by gateways).
    pub inbound_port: u16,
    /// The gateway's HTTPS port (unused by sidecars, always the default for them).
    pub https_port: u16,
}

/// Proxies that get the same resources. Translation is a function of the group only, so one
/// snapshot serves every proxy in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProxyGroup {
    pub role: Role,
    pub ip: IpAddr,
    pub namespace: String,
    pub listener_port: u16,
    pub inbound_port: u16,
    pub https_port: u16,
}

impl fmt::Display for ProxyGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}~{}~{}~{}",
            self.role.name(),
            self.ip,
            self.namespace,
            self.listener_port
        )?;
        match self.role {
            Role::Sidecar => write!(f, "~{}", self.inbound_port)?,
            Role::Router => write!(f, "~{}", self.https_port)?,
        }
        Ok(())
    }
}

impl ProxyIdentity {
    /// Reads the identity from a node.
    pub fn from_node(node: Option<&Node>) -> Result<Self, IdentityError> {
        let node = node.ok_or(IdentityError::NoNode)?;
        let id = node.id.clone();
        let parts: Vec<&str> = id.split('~').collect();
        let [role, ip, name_ns, domain] = parts.as_slice() else {
            return Err(IdentityError::Shape(id));
        };
        let role = match *role {
            "sidecar" => Role::Sidecar,
            "router" => Role::Router,
            _ => return Err(IdentityError::Role(id)),
        };
        let ip: IpAddr = ip.parse().map_err(|_| IdentityError::Ip {
            id: id.clone(),
            ip: (*ip).to_string(),
        })?;
        // `default.svc.cluster.local` → namespace `default`, domain `cluster.local`.
        let (domain_ns, domain) = match domain.split_once(".svc.") {
            Some((ns, d)) => (ns.to_string(), d.to_string()),
            None => (String::new(), (*domain).to_string()),
        };
        let metadata = node.metadata.as_ref();
        let namespace = match string_field(metadata, "NAMESPACE") {
            Some(ns) => ns,
            None if !domain_ns.is_empty() => domain_ns,
            None => name_ns
                .split_once('.')
                .map(|(_, ns)| ns.to_string())
                .ok_or_else(|| IdentityError::Shape(id.clone()))?,
        };
        let name = name_ns
            .strip_suffix(&format!(".{namespace}"))
            .unwrap_or(name_ns)
            .to_string();
        let (key, default_port) = match role {
            Role::Sidecar => (OUTBOUND_PORT_KEY, DEFAULT_OUTBOUND_PORT),
            Role::Router => (GATEWAY_HTTP_PORT_KEY, DEFAULT_GATEWAY_HTTP_PORT),
        };
        let port_of =
            |key: &'static str, default: u16| match metadata.and_then(|m| m.fields.get(key)) {
                None => Ok(default),
                Some(v) => port_value(v.kind.as_ref()).ok_or_else(|| IdentityError::Metadata {
                    key,
                    reason: "must be a port number (0-65535)".into(),
                }),
            };
        let listener_port = port_of(key, default_port)?;
        let inbound_port = port_of(INBOUND_PORT_KEY, DEFAULT_INBOUND_PORT)?;
        let https_port = match role {
            Role::Sidecar => DEFAULT_GATEWAY_HTTPS_PORT,
            Role::Router => port_of(GATEWAY_HTTPS_PORT_KEY, DEFAULT_GATEWAY_HTTPS_PORT)?,
        };
        if role == Role::Router && https_port == listener_port && https_port != 0 {
            return Err(IdentityError::Metadata {
                key: GATEWAY_HTTPS_PORT_KEY,
                reason: format!("{https_port} is also the gateway's HTTP port"),
            });
        }
        let labels = metadata
            .and_then(|m| m.fields.get("LABELS"))
            .and_then(|v| match &v.kind {
                Some(Kind::StructValue(s)) => Some(
                    s.fields
                        .iter()
                        .filter_map(|(k, v)| match &v.kind {
                            Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                            _ => None,
                        })
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Self {
            id,
            role,
            ip,
            name,
            namespace,
            domain,
            labels,
            listener_port,
            inbound_port,
            https_port,
        })
    }

    pub fn group(&self) -> ProxyGroup {
        ProxyGroup {
            role: self.role,
            ip: self.ip,
            namespace: self.namespace.clone(),
            listener_port: self.listener_port,
            inbound_port: self.inbound_port,
            https_port: self.https_port,
        }
    }
}

fn string_field(metadata: Option<&Struct>, key: &str) -> Option<String> {
    match metadata?.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn port_value(kind: Option<&Kind>) -> Option<u16> {
    match kind? {
        Kind::StringValue(s) => s.trim().parse().ok(),
        Kind::NumberValue(n) if n.fract() == 0.0 && (0.0..=65535.0).contains(n) => Some(*n as u16),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use legate_proto::pb::google::protobuf::Value;

    fn node(id: &str, metadata: &[(&str, Kind)]) -> Node {
        Node {
            id: id.into(),
            metadata: Some(Struct {
                fields: metadata
                    .iter()
                    .map(|(k, v)| {
                        (
                            (*k).to_string(),
                            Value {
                                kind: Some(v.clone()),
                            },
                        )
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn reads_istio_style_ids() -> Result<(), IdentityError> {
        let id = ProxyIdentity::from_node(Some(&node(
            "sidecar~127.0.0.2~app-7d9.default~default.svc.cluster.local",
            &[],
        )))?;
        assert_eq!(id.role, Role::Sidecar);
        assert_eq!(id.ip.to_string(), "127.0.0.2");
        assert_eq!(id.name, "app-7d9");
        assert_eq!(id.namespace, "default");
        assert_eq!(id.domain, "cluster.local");
        assert_eq!(id.listener_port, DEFAULT_OUTBOUND_PORT);
        Ok(())
    }

    #[test]
    fn metadata_overrides_namespace_and_port() -> Result<(), IdentityError> {
        let id = ProxyIdentity::from_node(Some(&node(
            "router~10.0.0.1~gw.istio-system~istio-system.svc.cluster.local",
            &[
                ("NAMESPACE", Kind::StringValue("edge".into())),
                (GATEWAY_HTTP_PORT_KEY, Kind::StringValue("0".into())),
                (GATEWAY_HTTPS_PORT_KEY, Kind::NumberValue(0.0)),
            ],
        )))?;
        assert_eq!(id.role, Role::Router);
        assert_eq!(id.namespace, "edge");
        assert_eq!(id.listener_port, 0);
        assert_eq!(id.https_port, 0, "both ephemeral is allowed");
        let default = ProxyIdentity::from_node(Some(&node(
            "router~10.0.0.1~gw.istio-system~istio-system.svc.cluster.local",
            &[],
        )))?;
        assert_eq!(
            (default.listener_port, default.https_port),
            (DEFAULT_GATEWAY_HTTP_PORT, DEFAULT_GATEWAY_HTTPS_PORT)
        );
        let same = ProxyIdentity::from_node(Some(&node(
            "router~10.0.0.1~gw.istio-system~istio-system.svc.cluster.local",
            &[(GATEWAY_HTTP_PORT_KEY, Kind::StringValue("8443".into()))],
        )));
        assert!(
            matches!(same, Err(IdentityError::Metadata { key, .. }) if key == GATEWAY_HTTPS_PORT_KEY)
        );
        Ok(())
    }

    #[test]
    fn rejects_malformed_ids() {
        let err = |id: &str| ProxyIdentity::from_node(Some(&node(id, &[]))).err();
        assert!(matches!(
            err("sidecar~1.2.3.4"),
            Some(IdentityError::Shape(_))
        ));
        assert!(matches!(
            err("waypoint~1.2.3.4~a.b~b.svc.cluster.local"),
            Some(IdentityError::Role(_))
        ));
        assert!(matches!(
            err("sidecar~nope~a.b~b.svc.cluster.local"),
            Some(IdentityError::Ip { .. })
        ));
        assert_eq!(
            ProxyIdentity::from_node(None).err(),
            Some(IdentityError::NoNode)
        );
        let bad_port = node(
            "sidecar~1.2.3.4~a.b~b.svc.cluster.local",
            &[(OUTBOUND_PORT_KEY, Kind::NumberValue(70000.0))],
        );
        assert!(matches!(
            ProxyIdentity::from_node(Some(&bad_port)),
            Err(IdentityError::Metadata { .. })
        ));
    }
}
