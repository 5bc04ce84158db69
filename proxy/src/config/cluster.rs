//! `Cluster` → [`ClusterConfig`].

use std::sync::Arc;
use std::time::Duration;

use legate_proto::pb::envoy::config::cluster::v3 as cl;
use legate_proto::pb::envoy::extensions::transport_sockets::tls::v3 as tlspb;
use legate_proto::pb::envoy::extensions::upstreams::http::v3 as up;

use super::listener::{certificate, decode, validation};
use super::{duration, Ctx};
use crate::cluster::*;
use crate::lb::LbPolicy;
use crate::tls::ClientTlsSpec;
use crate::upstream::UpstreamTls;

const HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const UPSTREAM_TLS: &str = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

pub(crate) fn cluster(cx: &mut Ctx<'_>, c: &cl::Cluster, path: &str) -> Option<ClusterConfig> {
    use cl::cluster::ClusterDiscoveryType as CDT;
    if c.name.is_empty() {
        cx.err(&format!("{path}.name"), "required");
        return None;
    }
    let discovery = match &c.cluster_discovery_type {
        Some(CDT::Type(0)) | None => Discovery::Static,
        Some(CDT::Type(1)) => Discovery::StrictDns,
        Some(CDT::Type(2)) => Discovery::LogicalDns,
        Some(CDT::Type(3)) => Discovery::Eds,
        Some(CDT::Type(t)) => {
            cx.err(
                &format!("{path}.type"),
                format!("discovery type {} is not supported yet", type_name(*t)),
            );
            return None;
        }
        Some(_) => {
            cx.err(
                &format!("{path}.cluster_type"),
                "custom cluster types are not supported",
            );
            return None;
        }
    };
    let lb = match c.lb_policy {
        0 => LbPolicy::RoundRobin,
        1 => {
            let choice_count = match &c.lb_config {
                Some(cl::cluster::LbConfig::LeastRequestLbConfig(l)) => {
                    l.choice_count.map_or(2, |v| v.value)
                }
                _ => 2,
            };
            LbPolicy::LeastRequest {
                choice_count: choice_count.max(2),
            }
        }
        2 => {
            let (min_ring, max_ring) = match &c.lb_config {
                Some(cl::cluster::LbConfig::RingHashLbConfig(r)) => (
                    r.minimum_ring_size.map_or(1024, |v| v.value),
                    r.maximum_ring_size.map_or(8 * 1024 * 1024, |v| v.value),
                ),
                _ => (1024, 8 * 1024 * 1024),
            };
            LbPolicy::RingHash { min_ring, max_ring }
        }
        3 => LbPolicy::Random,
        5 => {
            let table_size = match &c.lb_config {
                Some(cl::cluster::LbConfig::MaglevLbConfig(m)) => {
                    m.table_size.map_or(65_537, |v| v.value)
                }
                _ => 65_537,
            };
            LbPolicy::Maglev { table_size }
        }
        other => {
            cx.err(
                &format!("{path}.lb_policy"),
                format!("lb_policy {other} is not supported"),
            );
            return None;
        }
    };
    let localities = match &c.load_assignment {
        Some(la) => localities(cx, la, &format!("{path}.load_assignment"), discovery),
        None => Vec::new(),
    };
    let eds_service_name = if discovery == Discovery::Eds {
        let eds = c.eds_cluster_config.as_ref();
        super::dynamic::ads_source(
            cx,
            eds.and_then(|e| e.eds_config.as_ref()),
            &format!("{path}.eds_cluster_config.eds_config"),
        );
        Some(
            eds.map(|e| e.service_name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| c.name.clone()),
        )
    } else {
        if c.eds_cluster_config.is_some() {
            cx.err(
                &format!("{path}.eds_cluster_config"),
                "only an EDS cluster takes eds_cluster_config",
            );
        }
        None
    };
    if discovery == Discovery::LogicalDns
        && localities.iter().map(|l| l.endpoints.len()).sum::<usize>() != 1
    {
        cx.err(
            &format!("{path}.load_assignment"),
            "LOGICAL_DNS clusters must have exactly one endpoint",
        );
    }
    let mut protocol = UpstreamProtocol::Http1;
    let mut idle_timeout = None;
    for (k, any) in &c.typed_extension_protocol_options {
        let p = format!("{path}.typed_extension_protocol_options[\"{k}\"]");
        if k != "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" {
            cx.err(
                &p,
                "only envoy.extensions.upstreams.http.v3.HttpProtocolOptions is supported",
            );
            continue;
        }
        let Some(opts) = decode::<up::HttpProtocolOptions>(cx, any, HTTP_OPTIONS, &p) else {
            continue;
        };
        use up::http_protocol_options::explicit_http_config::ProtocolConfig as PC;
        use up::http_protocol_options::UpstreamProtocolOptions as UPO;
        protocol = match &opts.upstream_protocol_options {
            Some(UPO::ExplicitHttpConfig(e)) => match &e.protocol_config {
                Some(PC::Http2ProtocolOptions(_)) => UpstreamProtocol::Http2,
                Some(PC::HttpProtocolOptions(_)) | None => UpstreamProtocol::Http1,
                Some(PC::Http3ProtocolOptions(_)) => {
                    cx.err(
                        &format!("{p}.explicit_http_config"),
                        "HTTP/3 is not supported",
                    );
                    continue;
                }
            },
            Some(UPO::AutoConfig(_)) => UpstreamProtocol::Alpn,
            Some(UPO::UseDownstreamProtocolConfig(_)) => {
                cx.err(
                    &format!("{p}.use_downstream_protocol_config"),
                    "field not supported by Legate",
                );
                continue;
            }
            None => UpstreamProtocol::Http1,
        };
        idle_timeout = opts
            .common_http_protocol_options
            .as_ref()
            .and_then(|o| o.idle_timeout.as_ref())
            .map(duration);
    }
    let tls = match &c.transport_socket {
        Some(ts) => Some(Arc::new(upstream_tls(
            cx,
            ts,
            protocol,
            &format!("{path}.transport_socket"),
        )?)),
        None => None,
    };
    let dns_family = match c.dns_lookup_family {
        0 => DnsFamily::Auto,
        1 => DnsFamily::V4Only,
        2 => DnsFamily::V6Only,
        3 => DnsFamily::V4Preferred,
        _ => DnsFamily::All,
    };
    Some(ClusterConfig {
        name: c.name.clone(),
        discovery,
        eds_service_name,
        connect_timeout: c
            .connect_timeout
            .as_ref()
            .map_or(Duration::from_secs(5), duration),
        lb,
        localities,
        tls,
        protocol,
        dns_refresh: c
            .dns_refresh_rate
            .as_ref()
            .map(duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(5)),
        dns_family,
        buffer_limit: c.per_connection_buffer_limit_bytes.map(|v| v.value),
        idle_timeout,
    })
}

fn type_name(t: i32) -> &'static str {
    match t {
        3 => "EDS",
        4 => "ORIGINAL_DST",
        _ => "unknown",
    }
}

fn upstream_tls(
    cx: &mut Ctx<'_>,
    ts: &legate_proto::pb::envoy::config::core::v3::TransportSocket,
    protocol: UpstreamProtocol,
    path: &str,
) -> Option<UpstreamTls> {
    use legate_proto::pb::envoy::config::core::v3::transport_socket::ConfigType;
    let Some(ConfigType::TypedConfig(any)) = &ts.config_type else {
        cx.err(path, "typed_config is required");
        return None;
    };
    let p = format!("{path}.typed_config");
    let ctx: tlspb::UpstreamTlsContext = decode(cx, any, UPSTREAM_TLS, &p)?;
    let common = ctx.common_tls_context.unwrap_or_default();
    let cp = format!("{p}.common_tls_context");
    let (trusted_ca, san_matchers) = validation(cx, &common, &cp);
    let client_cert = certificate(cx, &common, &cp);
    let alpn = match protocol {
        UpstreamProtocol::Http2 => vec![b"h2".to_vec()],
        UpstreamProtocol::Alpn => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        UpstreamProtocol::Http1 => common
            .alpn_protocols
            .iter()
            .map(|a| a.as_bytes().to_vec())
            .collect(),
    };
    let sni = if ctx.sni.is_empty() {
        None
    } else {
        match rustls_pki_types::ServerName::try_from(ctx.sni.clone()) {
            Ok(n) => Some(n),
            Err(_) => {
                cx.err(&format!("{p}.sni"), "invalid server name");
                return None;
            }
        }
    };
    let spec = ClientTlsSpec {
        trusted_ca,
        san_matchers,
        client_cert,
        alpn,
        send_sni: sni.is_some(),
    };
    match crate::tls::client_config(spec) {
        Ok(config) => Some(UpstreamTls { config, sni }),
        Err(e) => {
            cx.err(&p, e.to_string());
            None
        }
    }
}

/// A `ClusterLoadAssignment`'s endpoints by locality. Endpoints whose `health_status` is
/// `UNHEALTHY`, `DRAINING` or `TIMEOUT` take no traffic and are left out.
pub(crate) fn localities(
    cx: &mut Ctx<'_>,
    la: &legate_proto::pb::envoy::config::endpoint::v3::ClusterLoadAssignment,
    path: &str,
    discovery: Discovery,
) -> Vec<LocalityConfig> {
    let mut localities = Vec::new();
    for (i, l) in la.endpoints.iter().enumerate() {
        let lp = format!("{path}.endpoints[{i}]");
        let mut endpoints = Vec::new();
        for (j, e) in l.lb_endpoints.iter().enumerate() {
            let ep = format!("{lp}.lb_endpoints[{j}]");
            use legate_proto::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier as HI;
            let Some(HI::Endpoint(endpoint)) = &e.host_identifier else {
                cx.err(&format!("{ep}.endpoint"), "required");
                continue;
            };
            use legate_proto::pb::envoy::config::core::v3::address::Address as A;
            use legate_proto::pb::envoy::config::core::v3::socket_address::PortSpecifier as PS;
            let Some(A::SocketAddress(sa)) =
                endpoint.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                cx.err(
                    &format!("{ep}.endpoint.address"),
                    "a socket_address is required",
                );
                continue;
            };
            let Some(PS::PortValue(port)) = sa.port_specifier else {
                cx.err(
                    &format!("{ep}.endpoint.address.socket_address.port_value"),
                    "required",
                );
                continue;
            };
            let Ok(port) = u16::try_from(port) else {
                cx.err(
                    &format!("{ep}.endpoint.address.socket_address.port_value"),
                    "not a port",
                );
                continue;
            };
            let host = sa
                .address
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            if matches!(discovery, Discovery::Static | Discovery::Eds)
                && host.parse::<std::net::IpAddr>().is_err()
            {
                cx.err(
                    &format!("{ep}.endpoint.address.socket_address.address"),
                    format!("{host:?} is not an IP address (a STATIC cluster needs IPs)"),
                );
                continue;
            }
            endpoints.push(EndpointConfig {
                hostname: if endpoint.hostname.is_empty() {
                    host.clone()
                } else {
                    endpoint.hostname.clone()
                },
                host,
                port,
                weight: e.load_balancing_weight.map_or(1, |v| v.value).max(1),
            });
        }
        localities.push(LocalityConfig {
            zone: l
                .locality
                .as_ref()
                .map(|l| l.zone.clone())
                .unwrap_or_default(),
            priority: l.priority,
            endpoints,
        });
    }
    localities
}
