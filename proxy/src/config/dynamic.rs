//! `dynamic_resources`, and the resources that arrive over xDS: each is decoded with Envoy's
//! descriptors, checked field by field exactly like the bootstrap, and converted into the same
//! model. A rejected resource's error names the field.

use std::time::Duration;

use legate_filters::FilterRegistry;
use legate_proto::pb::envoy::config::bootstrap::v3 as bs;
use legate_proto::pb::envoy::config::cluster::v3 as cl;
use legate_proto::pb::envoy::config::core::v3 as core;
use legate_proto::pb::envoy::config::endpoint::v3 as ep;
use legate_proto::pb::envoy::config::listener::v3 as lis;
use legate_proto::pb::envoy::config::route::v3 as rt;
use legate_proto::pb::google::protobuf::Any;
use prost::Message;

use legate_proto::pb::envoy::extensions::transport_sockets::tls::v3::Secret;

use super::{duration, Ctx, RdsRef, Secrets};
use crate::cluster::{ClusterConfig, Discovery, LocalityConfig};
use crate::listener::ListenerConfig;
use crate::route::RouteTable;

pub const LISTENER: &str = "envoy.config.listener.v3.Listener";
pub const CLUSTER: &str = "envoy.config.cluster.v3.Cluster";
pub const ROUTE: &str = "envoy.config.route.v3.RouteConfiguration";
pub const ENDPOINTS: &str = "envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET: &str = "envoy.extensions.transport_sockets.tls.v3.Secret";

/// The ADS flavour (`ads_config.api_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdsProtocol {
    /// `GRPC` / `AGGREGATED_GRPC`: state of the world.
    StateOfTheWorld,
    /// `DELTA_GRPC` / `AGGREGATED_DELTA_GRPC`: incremental.
    Delta,
}

/// A validated `dynamic_resources`: everything comes over one ADS stream.
#[derive(Debug, Clone)]
pub struct DynamicConfig {
    /// The static cluster the ADS stream goes to.
    pub ads_cluster: String,
    pub protocol: AdsProtocol,
    /// Listeners come from LDS (`lds_config: {ads: {}}`).
    pub lds: bool,
    /// Clusters come from CDS (`cds_config: {ads: {}}`).
    pub cds: bool,
    /// How long the first response of a subscription may take before the proxy goes on
    /// without it (Envoy's default, 15 s; zero waits forever).
    pub initial_fetch_timeout: Duration,
    /// Route configurations named by static listeners (`rds` in a static listener).
    pub static_rds: Vec<RdsRef>,
}

const DEFAULT_INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// Checks a `ConfigSource` that must be `ads: {}`; returns its `initial_fetch_timeout`.
pub(crate) fn ads_source(
    cx: &mut Ctx<'_>,
    cs: Option<&core::ConfigSource>,
    path: &str,
) -> Option<Duration> {
    use core::config_source::ConfigSourceSpecifier as S;
    let Some(cs) = cs else {
        cx.err(path, "required");
        return None;
    };
    if !matches!(cs.config_source_specifier, Some(S::Ads(_))) {
        cx.err(
            path,
            "only ads: {} is supported (resources come over the ADS stream)",
        );
        return None;
    }
    if !matches!(cs.resource_api_version, 0 | 2) {
        cx.err(
            &format!("{path}.resource_api_version"),
            "only V3 is supported",
        );
    }
    Some(
        cs.initial_fetch_timeout
            .as_ref()
            .map_or(DEFAULT_INITIAL_FETCH_TIMEOUT, duration),
    )
}

pub(crate) fn dynamic_resources(
    cx: &mut Ctx<'_>,
    d: &bs::bootstrap::DynamicResources,
    path: &str,
) -> Option<DynamicConfig> {
    let mut timeout = DEFAULT_INITIAL_FETCH_TIMEOUT;
    let lds = d.lds_config.is_some();
    let cds = d.cds_config.is_some();
    for (source, field) in [(&d.lds_config, "lds_config"), (&d.cds_config, "cds_config")] {
        if let Some(cs) = source {
            if let Some(t) = ads_source(cx, Some(cs), &format!("{path}.{field}")) {
                timeout = t;
            }
        }
    }
    let Some(ads) = &d.ads_config else {
        cx.err(
            &format!("{path}.ads_config"),
            "required (Legate takes dynamic resources over ADS)",
        );
        return None;
    };
    let ap = format!("{path}.ads_config");
    let protocol = match ads.api_type {
        2 | 5 => AdsProtocol::StateOfTheWorld,
        3 | 6 => AdsProtocol::Delta,
        t => {
            cx.err(
                &format!("{ap}.api_type"),
                format!("api_type {t} is not supported: use GRPC or DELTA_GRPC"),
            );
            return None;
        }
    };
    if !matches!(ads.transport_api_version, 0 | 2) {
        cx.err(
            &format!("{ap}.transport_api_version"),
            "only V3 is supported",
        );
    }
    use core::grpc_service::TargetSpecifier as T;
    let cluster = match ads.grpc_services.as_slice() {
        [g] => match &g.target_specifier {
            Some(T::EnvoyGrpc(e)) if !e.cluster_name.is_empty() => e.cluster_name.clone(),
            _ => {
                cx.err(
                    &format!("{ap}.grpc_services[0]"),
                    "envoy_grpc with a cluster_name is required",
                );
                return None;
            }
        },
        _ => {
            cx.err(
                &format!("{ap}.grpc_services"),
                "exactly one gRPC service is required",
            );
            return None;
        }
    };
    Some(DynamicConfig {
        ads_cluster: cluster,
        protocol,
        lds,
        cds,
        initial_fetch_timeout: timeout,
        static_rds: Vec::new(),
    })
}

/// The name of a resource of one of the four types, read without validating it.
pub fn resource_name(type_name: &str, any: &Any) -> Result<String, String> {
    let bytes = any.value.as_slice();
    let err = |e: prost::DecodeError| format!("cannot decode {type_name}: {e}");
    let name = match type_name {
        LISTENER => lis::Listener::decode(bytes).map_err(err)?.name,
        CLUSTER => cl::Cluster::decode(bytes).map_err(err)?.name,
        ROUTE => rt::RouteConfiguration::decode(bytes).map_err(err)?.name,
        ENDPOINTS => {
            ep::ClusterLoadAssignment::decode(bytes)
                .map_err(err)?
                .cluster_name
        }
        SECRET => Secret::decode(bytes).map_err(err)?.name,
        other => return Err(format!("unsupported resource type {other}")),
    };
    if name.is_empty() {
        return Err("the resource has no name".into());
    }
    Ok(name)
}

/// A converted resource and what it names.
#[derive(Debug)]
pub struct Decoded<T> {
    /// `None` while a secret it names has not arrived.
    pub value: Option<T>,
    /// Route configurations it names (`rds`).
    pub rds: Vec<RdsRef>,
    /// Secrets it names through SDS.
    pub sds: Vec<String>,
}

/// Decodes, checks and converts one resource.
fn convert<T: Message + Default, R>(
    registry: &FilterRegistry,
    secrets: &Secrets,
    any: &Any,
    type_name: &str,
    http_filters: &[(String, String)],
    f: impl FnOnce(&mut Ctx<'_>, &T) -> Option<R>,
) -> Result<Decoded<R>, String> {
    let got = legate_proto::type_name_of(&any.type_url);
    if got != type_name {
        return Err(format!("expected {type_name}, got {}", any.type_url));
    }
    let msg = legate_proto::dynamic_from_bytes(type_name, &any.value).map_err(|e| e.to_string())?;
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    super::check::check_message(&msg, "", registry, &mut errors, &mut warnings);
    for w in &warnings {
        tracing::debug!("{type_name}: {w}");
    }
    let joined = |errors: &[super::Issue]| {
        errors
            .iter()
            .map(|i| {
                let path = i.path.trim_start_matches('.');
                if path.is_empty() {
                    i.message.clone()
                } else {
                    format!("{path}: {}", i.message)
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    if !errors.is_empty() {
        return Err(joined(&errors));
    }
    let typed = T::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
    let mut cx = Ctx {
        errors: Vec::new(),
        cluster_refs: Vec::new(),
        http_filters: http_filters.to_vec(),
        rds_refs: Vec::new(),
        secrets,
        sds_refs: Vec::new(),
        missing_secrets: Vec::new(),
        registry,
    };
    let out = f(&mut cx, &typed);
    if !cx.errors.is_empty() {
        return Err(joined(&cx.errors));
    }
    let mut sds = cx.sds_refs;
    sds.sort();
    sds.dedup();
    if !cx.missing_secrets.is_empty() {
        return Ok(Decoded {
            value: None,
            rds: cx.rds_refs,
            sds,
        });
    }
    match out {
        Some(value) => Ok(Decoded {
            value: Some(value),
            rds: cx.rds_refs,
            sds,
        }),
        None => Err("invalid resource".into()),
    }
}

/// A `Listener` from LDS, with the route configurations and secrets it names.
pub fn decode_listener(
    registry: &FilterRegistry,
    secrets: &Secrets,
    any: &Any,
) -> Result<Decoded<ListenerConfig>, String> {
    convert(
        registry,
        secrets,
        any,
        LISTENER,
        &[],
        |cx, l: &lis::Listener| super::listener::listener(cx, l, ""),
    )
}

/// A `Cluster` from CDS, with the secrets it names.
pub fn decode_cluster(
    registry: &FilterRegistry,
    secrets: &Secrets,
    any: &Any,
) -> Result<Decoded<ClusterConfig>, String> {
    convert(
        registry,
        secrets,
        any,
        CLUSTER,
        &[],
        |cx, c: &cl::Cluster| super::cluster::cluster(cx, c, ""),
    )
}

/// A `RouteConfiguration` from RDS, compiled for a connection manager's filters. Routes
/// naming a cluster that does not exist answer 503 at request time, as in Envoy
/// (`validate_clusters` defaults to false for RDS).
pub fn decode_route(
    registry: &FilterRegistry,
    any: &Any,
    http_filters: &[(String, String)],
) -> Result<RouteTable, String> {
    let d = convert(
        registry,
        &Secrets::new(),
        any,
        ROUTE,
        http_filters,
        |cx, r: &rt::RouteConfiguration| {
            let t = super::route::route_table(cx, r, "");
            cx.cluster_refs.clear();
            Some(t)
        },
    )?;
    d.value.ok_or_else(|| "invalid resource".into())
}

/// A `ClusterLoadAssignment` from EDS: its cluster (service) name and endpoints.
pub fn decode_cla(
    registry: &FilterRegistry,
    any: &Any,
) -> Result<(String, Vec<LocalityConfig>), String> {
    let d = convert(
        registry,
        &Secrets::new(),
        any,
        ENDPOINTS,
        &[],
        |cx, la: &ep::ClusterLoadAssignment| {
            Some((
                la.cluster_name.clone(),
                super::cluster::localities(cx, la, "", Discovery::Eds),
            ))
        },
    )?;
    d.value.ok_or_else(|| "invalid resource".into())
}

/// A `Secret` from SDS: a TLS certificate or a validation context. Its data sources are
/// read when a TLS context uses it.
pub fn decode_secret(registry: &FilterRegistry, any: &Any) -> Result<Secret, String> {
    use legate_proto::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type as T;
    let d = convert(
        registry,
        &Secrets::new(),
        any,
        SECRET,
        &[],
        |cx, s: &Secret| match &s.r#type {
            Some(T::TlsCertificate(_) | T::ValidationContext(_)) => Some(s.clone()),
            _ => {
                cx.err(
                    "",
                    "only tls_certificate and validation_context secrets are supported",
                );
                None
            }
        },
    )?;
    d.value.ok_or_else(|| "invalid resource".into())
}
