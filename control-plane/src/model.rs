//! The mesh as translation sees it: services, their endpoints, namespaces, ingresses, the
//! secrets ingresses name for TLS, and pods.
//!
//! Every source (today the watched directory, later the Kubernetes API) produces [`Object`]s
//! from Kubernetes manifests; [`Model::build`] turns a set of them into one immutable model.
//! Translation only ever reads a `Model`, so it never knows where the objects came from.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use base64::Engine as _;
use serde::Deserialize;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {index}: {reason}")]
    Document { index: usize, reason: String },
    #[error("document {index} ({kind} {name}): {reason}")]
    Object {
        index: usize,
        kind: String,
        name: String,
        reason: String,
    },
}

/// One Kubernetes object the control plane understands.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Namespace(String),
    Ingress(Ingress),
    Secret(Secret),
    Pod(Pod),
}

/// The secret type that carries a TLS certificate and its key.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// A `Secret` (v1): `data` (base64 in the manifest) merged with `stringData`, decoded.
///
/// Its `Debug` shows the keys, never the values, so a secret can be logged safely.
#[derive(Clone, PartialEq)]
pub struct Secret {
    pub name: String,
    pub namespace: String,
    /// `type`; `Opaque` when unset, as Kubernetes defaults it.
    pub secret_type: String,
    pub data: BTreeMap<String, Vec<u8>>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("secret_type", &self.secret_type)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A `Pod` (v1): who a workload is and whether it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// `status.podIP`, when assigned.
    pub ip: Option<IpAddr>,
    /// `status.phase` (`Pending`, `Running`, …), when reported.
    pub phase: Option<String>,
    /// The `Ready` condition of `status.conditions` is `True`.
    pub ready: bool,
}

/// One `spec.tls` entry of an Ingress: the hosts served with the secret's certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct IngressTls {
    /// Empty means every host (the entry's certificate is the default one).
    pub hosts: Vec<String>,
    /// A `kubernetes.io/tls` Secret in the Ingress's namespace.
    pub secret_name: Option<String>,
}

/// An `Ingress` (networking.k8s.io/v1): host and path rules to service backends.
#[derive(Debug, Clone, PartialEq)]
pub struct Ingress {
    pub name: String,
    pub namespace: String,
    pub class: Option<String>,
    pub default_backend: Option<IngressBackend>,
    pub rules: Vec<IngressRule>,
    /// `spec.tls`, in order.
    pub tls: Vec<IngressTls>,
}

/// One host of an Ingress; `host` is `None` for "every host".
#[derive(Debug, Clone, PartialEq)]
pub struct IngressRule {
    pub host: Option<String>,
    pub paths: Vec<IngressPath>,
}

/// How an Ingress path matches, per the Kubernetes API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathType {
    /// The exact path.
    Exact,
    /// Element-wise prefix: `/foo` matches `/foo` and `/foo/bar`, not `/foobar`.
    Prefix,
    /// Left to the implementation; Legate treats it as a plain string prefix.
    ImplementationSpecific,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IngressPath {
    pub path: String,
    pub path_type: PathType,
    pub backend: IngressBackend,
}

/// A service backend: a service in the Ingress's namespace, by port number or name.
#[derive(Debug, Clone, PartialEq)]
pub struct IngressBackend {
    pub service: String,
    pub port: BackendPort,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BackendPort {
    Number(u16),
    Name(String),
}

/// A `Service`: its name, cluster IP and ports.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `None` for headless services (`clusterIP: None`) or when unset.
    pub cluster_ip: Option<String>,
    pub ports: Vec<ServicePort>,
}

/// One port of a `Service`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePort {
    /// Empty when the port is unnamed (allowed for single-port services).
    pub name: String,
    pub port: u16,
    /// `TCP` unless the manifest says otherwise.
    pub protocol: String,
    pub app_protocol: Option<String>,
}

/// An `EndpointSlice`: the addresses behind (part of) a service.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSlice {
    pub name: String,
    pub namespace: String,
    /// From the `kubernetes.io/service-name` label.
    pub service: Option<String>,
    pub address_type: String,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

/// A port of an EndpointSlice; `name` matches the service port's name.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointPort {
    pub name: String,
    pub port: u16,
}

/// One endpoint (usually a pod) of an EndpointSlice.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub addresses: Vec<String>,
    /// `conditions.ready`; an absent value means ready, as Kubernetes specifies.
    pub ready: bool,
    pub zone: Option<String>,
}

/// The immutable model translation reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Model {
    /// Keyed by (namespace, name).
    pub services: BTreeMap<(String, String), Service>,
    /// Keyed by (namespace, name).
    pub endpoint_slices: BTreeMap<(String, String), EndpointSlice>,
    pub namespaces: BTreeSet<String>,
    /// Keyed by (namespace, name).
    pub ingresses: BTreeMap<(String, String), Ingress>,
    /// Keyed by (namespace, name).
    pub secrets: BTreeMap<(String, String), Secret>,
    /// Keyed by (namespace, name).
    pub pods: BTreeMap<(String, String), Pod>,
    /// The keys of each service's EndpointSlices, by (namespace, service name): translation
    /// looks slices up per service and per proxy, so a scan of every slice would make it
    /// quadratic in the size of the mesh.
    slices_by_service: HashMap<(String, String), Vec<(String, String)>>,
    /// The services (namespace, name) with an EndpointSlice listing an address, by address:
    /// what a sidecar's inbound side serves.
    services_by_address: HashMap<String, BTreeSet<(String, String)>>,
}

impl Model {
    /// Builds a model from objects; a later object with the same kind, namespace and name
    /// replaces an earlier one.
    pub fn build(objects: impl IntoIterator<Item = Object>) -> Self {
        let mut model = Model::default();
        for object in objects {
            match object {
                Object::Service(s) => {
                    model.namespaces.insert(s.namespace.clone());
                    model
                        .services
                        .insert((s.namespace.clone(), s.name.clone()), s);
                }
                Object::EndpointSlice(e) => {
                    model
                        .endpoint_slices
                        .insert((e.namespace.clone(), e.name.clone()), e);
                }
                Object::Namespace(n) => {
                    model.namespaces.insert(n);
                }
                Object::Ingress(i) => {
                    model
                        .ingresses
                        .insert((i.namespace.clone(), i.name.clone()), i);
                }
                Object::Secret(s) => {
                    model
                        .secrets
                        .insert((s.namespace.clone(), s.name.clone()), s);
                }
                Object::Pod(p) => {
                    model.pods.insert((p.namespace.clone(), p.name.clone()), p);
                }
            }
        }
        for (key, slice) in &model.endpoint_slices {
            let Some(service) = &slice.service else {
                continue;
            };
            let owner = (slice.namespace.clone(), service.clone());
            for address in slice.endpoints.iter().flat_map(|e| e.addresses.iter()) {
                model
                    .services_by_address
                    .entry(address.clone())
                    .or_default()
                    .insert(owner.clone());
            }
            model
                .slices_by_service
                .entry(owner)
                .or_default()
                .push(key.clone());
        }
        model
    }

    /// The services (namespace, name) that an EndpointSlice lists `address` for, in order.
    pub fn services_with_address(&self, address: &str) -> impl Iterator<Item = &Service> {
        self.services_by_address
            .get(address)
            .into_iter()
            .flatten()
            .filter_map(|key| self.services.get(key))
    }

    /// The secret `name` in `namespace`.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<&Secret> {
        self.secrets.get(&(namespace.to_string(), name.to_string()))
    }

    /// The pod with IP `ip` (a sidecar's own workload); running pods first, then by
    /// namespace/name, so a finished pod that kept its IP does not shadow the live one.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        let mut pods = self.pods.values().filter(|p| p.ip == Some(ip));
        let first = pods.next()?;
        if first.phase.as_deref() == Some("Running") {
            return Some(first);
        }
        Some(
            pods.find(|p| p.phase.as_deref() == Some("Running"))
                .unwrap_or(first),
        )
    }

    /// The EndpointSlices of a service.
    pub fn slices_of<'a>(
        &'a self,
        service: &'a Service,
    ) -> impl Iterator<Item = &'a EndpointSlice> {
        self.slices_by_service
            .get(&(service.namespace.clone(), service.name.clone()))
            .into_iter()
            .flatten()
            .filter_map(|key| self.endpoint_slices.get(key))
    }
}

// ---- manifest parsing -------------------------------------------------------------------

#[derive(Deserialize)]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct ServiceManifest {
    metadata: Meta,
    #[serde(default)]
    spec: ServiceSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default)]
    ports: Vec<ServicePortSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServicePortSpec {
    #[serde(default)]
    name: Option<String>,
    port: i64,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    app_protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SliceManifest {
    metadata: Meta,
    #[serde(default)]
    address_type: Option<String>,
    #[serde(default)]
    ports: Option<Vec<SlicePortSpec>>,
    #[serde(default)]
    endpoints: Option<Vec<EndpointSpec>>,
}

#[derive(Deserialize)]
struct SlicePortSpec {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    port: Option<i64>,
}

#[derive(Deserialize)]
struct EndpointSpec {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Option<Conditions>,
    #[serde(default)]
    zone: Option<String>,
}

#[derive(Deserialize)]
struct Conditions {
    #[serde(default)]
    ready: Option<bool>,
}

#[derive(Deserialize)]
struct IngressManifest {
    metadata: Meta,
    #[serde(default)]
    spec: IngressSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct IngressSpec {
    #[serde(default)]
    ingress_class_name: Option<String>,
    #[serde(default)]
    default_backend: Option<BackendSpec>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
    #[serde(default)]
    tls: Option<Vec<TlsSpec>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TlsSpec {
    #[serde(default)]
    hosts: Option<Vec<String>>,
    #[serde(default)]
    secret_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecretManifest {
    metadata: Meta,
    #[serde(default, rename = "type")]
    secret_type: Option<String>,
    #[serde(default)]
    data: Option<BTreeMap<String, String>>,
    #[serde(default)]
    string_data: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct PodManifest {
    metadata: Meta,
    #[serde(default)]
    status: Option<PodStatusSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatusSpec {
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default)]
    phase: Option<String>,
    #[serde(default)]
    conditions: Option<Vec<PodConditionSpec>>,
}

#[derive(Deserialize)]
struct PodConditionSpec {
    #[serde(rename = "type")]
    condition_type: String,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Deserialize)]
struct RuleSpec {
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    http: Option<HttpRuleSpec>,
}

#[derive(Deserialize)]
struct HttpRuleSpec {
    #[serde(default)]
    paths: Vec<PathSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PathSpec {
    #[serde(default)]
    path: Option<String>,
    path_type: String,
    backend: BackendSpec,
}

#[derive(Deserialize)]
struct BackendSpec {
    #[serde(default)]
    service: Option<ServiceBackendSpec>,
}

#[derive(Deserialize)]
struct ServiceBackendSpec {
    name: String,
    port: ServiceBackendPortSpec,
}

#[derive(Deserialize)]
struct ServiceBackendPortSpec {
    #[serde(default)]
    number: Option<i64>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct NamespaceManifest {
    metadata: Meta,
}

fn port(value: i64, what: &str) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what}: {value} is not a port (1-65535)"))
}

fn namespace_of(meta: &Meta) -> String {
    meta.namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

/// Parses a (multi-document) YAML or JSON manifest into the objects Legate understands.
/// Kinds it does not use are skipped; a malformed document of a known kind fails the whole
/// text, so that a half-read file never reaches the model.
pub fn parse_manifests(text: &str) -> Result<Vec<Object>, ManifestError> {
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| ManifestError::Document {
            index,
            reason: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| ManifestError::Document {
                index,
                reason: "no kind".into(),
            })?
            .to_string();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_string();
        let object_error = |reason: String| ManifestError::Object {
            index,
            kind: kind.clone(),
            name: name.clone(),
            reason,
        };
        if name.is_empty()
            && matches!(
                kind.as_str(),
                "Service" | "EndpointSlice" | "Namespace" | "Ingress" | "Secret" | "Pod"
            )
        {
            return Err(object_error("metadata.name is required".into()));
        }
        let object = match kind.as_str() {
            "Service" => {
                let m: ServiceManifest =
                    serde_yaml::from_value(value).map_err(|e| object_error(e.to_string()))?;
                Object::Service(service(m).map_err(object_error)?)
            }
            "EndpointSlice" => {
                let m: SliceManifest =
                    serde_yaml::from_value(value).map_err(|e| object_error(e.to_string()))?;
                Object::EndpointSlice(slice(m).map_err(object_error)?)
            }
            "Ingress" => {
                let m: IngressManifest =
                    serde_yaml::from_value(value).map_err(|e| object_error(e.to_string()))?;
                Object::Ingress(ingress(m).map_err(object_error)?)
            }
            "Secret" => {
                let m: SecretManifest =
                    serde_yaml::from_value(value).map_err(|e| object_error(e.to_string()))?;
                Object::Secret(secret(m).map_err(object_error)?)
            }
            "Pod" => {
                let m: PodManifest =
                    serde_yaml::from_value(value).map_err(|e| object_error(e.to_string()))?;
                Object::Pod(pod(m).map_err(object_error)?)
            }
            "Namespace" => {
                let m: NamespaceManifest =
                    serde_yaml::from_value(value).map_err(|e| object_error(e.to_string()))?;
                Object::Namespace(m.metadata.name)
            }
            _ => continue,
        };
        out.push(object);
    }
    Ok(out)
}

fn service(m: ServiceManifest) -> Result<Service, String> {
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, p) in m.spec.ports.into_iter().enumerate() {
        let number = port(p.port, &format!("spec.ports[{i}].port"))?;
        let name = p.name.unwrap_or_default();
        if !seen.insert(name.clone()) {
            return Err(format!(
                "spec.ports[{i}].name: duplicate port name {name:?}"
            ));
        }
        ports.push(ServicePort {
            name,
            port: number,
            protocol: p.protocol.unwrap_or_else(|| "TCP".into()),
            app_protocol: p.app_protocol.map(|a| a.to_ascii_lowercase()),
        });
    }
    let cluster_ip = m
        .spec
        .cluster_ip
        .filter(|ip| !ip.is_empty() && !ip.eq_ignore_ascii_case("none"));
    Ok(Service {
        namespace: namespace_of(&m.metadata),
        name: m.metadata.name,
        cluster_ip,
        ports,
    })
}

fn backend(b: BackendSpec, at: &str) -> Result<IngressBackend, String> {
    let s = b
        .service
        .ok_or_else(|| format!("{at}.service is required (resource backends are not supported)"))?;
    let port = match (s.port.number, s.port.name) {
        (Some(n), None) => BackendPort::Number(port(n, &format!("{at}.service.port.number"))?),
        (None, Some(name)) if !name.is_empty() => BackendPort::Name(name),
        _ => return Err(format!("{at}.service.port: exactly one of number or name")),
    };
    Ok(IngressBackend {
        service: s.name,
        port,
    })
}

fn ingress(m: IngressManifest) -> Result<Ingress, String> {
    let default_backend = m
        .spec
        .default_backend
        .map(|b| backend(b, "spec.defaultBackend"))
        .transpose()?;
    let mut rules = Vec::new();
    for (i, rule) in m.spec.rules.into_iter().enumerate() {
        let mut paths = Vec::new();
        for (j, p) in rule
            .http
            .map(|h| h.paths)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let at = format!("spec.rules[{i}].http.paths[{j}]");
            let path_type = match p.path_type.as_str() {
                "Exact" => PathType::Exact,
                "Prefix" => PathType::Prefix,
                "ImplementationSpecific" => PathType::ImplementationSpecific,
                other => return Err(format!("{at}.pathType: unknown {other:?}")),
            };
            let path = p.path.unwrap_or_else(|| "/".into());
            if !path.starts_with('/') {
                return Err(format!("{at}.path: must start with /"));
            }
            paths.push(IngressPath {
                path,
                path_type,
                backend: backend(p.backend, &format!("{at}.backend"))?,
            });
        }
        rules.push(IngressRule {
            host: rule.host.filter(|h| !h.is_empty()),
            paths,
        });
    }
    Ok(Ingress {
        namespace: namespace_of(&m.metadata),
        name: m.metadata.name,
        class: m.spec.ingress_class_name,
        default_backend,
        rules,
        tls: m
            .spec
            .tls
            .unwrap_or_default()
            .into_iter()
            .map(|t| IngressTls {
                hosts: t
                    .hosts
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|h| !h.is_empty())
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
                secret_name: t.secret_name.filter(|n| !n.is_empty()),
            })
            .collect(),
    })
}

/// Decodes `data` (standard base64; line breaks allowed, as `kubectl` accepts) and merges
/// `stringData` over it, as the API server does on write. Values never enter an error.
fn secret(m: SecretManifest) -> Result<Secret, String> {
    let mut data = BTreeMap::new();
    for (key, value) in m.data.unwrap_or_default() {
        let compact: String = value.split_whitespace().collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map_err(|_| format!("data.{key}: not valid base64"))?;
        data.insert(key, bytes);
    }
    for (key, value) in m.string_data.unwrap_or_default() {
        data.insert(key, value.into_bytes());
    }
    Ok(Secret {
        namespace: namespace_of(&m.metadata),
        name: m.metadata.name,
        secret_type: m
            .secret_type
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "Opaque".into()),
        data,
    })
}

fn pod(m: PodManifest) -> Result<Pod, String> {
    let status = m.status;
    let ip = status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty())
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| format!("status.podIP: {ip:?} is not an IP address"))
        })
        .transpose()?;
    let ready = status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.condition_type == "Ready" && c.status.as_deref() == Some("True"))
        });
    Ok(Pod {
        namespace: namespace_of(&m.metadata),
        name: m.metadata.name,
        labels: m.metadata.labels,
        ip,
        phase: status.and_then(|s| s.phase),
        ready,
    })
}

fn slice(m: SliceManifest) -> Result<EndpointSlice, String> {
    let mut ports = Vec::new();
    for (i, p) in m.ports.unwrap_or_default().into_iter().enumerate() {
        let Some(number) = p.port else {
            // A port with no number means "all ports" in Kubernetes; Legate needs a number.
            return Err(format!("ports[{i}].port is required"));
        };
        ports.push(EndpointPort {
            name: p.name.unwrap_or_default(),
            port: port(number, &format!("ports[{i}].port"))?,
        });
    }
    let endpoints = m
        .endpoints
        .unwrap_or_default()
        .into_iter()
        .map(|e| Endpoint {
            addresses: e.addresses,
            ready: e.conditions.and_then(|c| c.ready).unwrap_or(true),
            zone: e.zone.filter(|z| !z.is_empty()),
        })
        .collect();
    Ok(EndpointSlice {
        namespace: namespace_of(&m.metadata),
        service: m.metadata.labels.get(SERVICE_NAME_LABEL).cloned(),
        name: m.metadata.name,
        address_type: m.address_type.unwrap_or_else(|| "IPv4".into()),
        ports,
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.96.0.7
  ports:
  - {name: http, port: 80, targetPort: 9080}
  - {name: grpc-api, port: 9090, appProtocol: GRPC}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-abc
  namespace: shop
  labels: {kubernetes.io/service-name: reviews}
addressType: IPv4
ports: [{name: http, port: 9080}]
endpoints:
- addresses: [10.0.0.1]
  zone: z1
- addresses: [10.0.0.2]
  conditions: {ready: false}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"#;

    #[test]
    fn parses_services_slices_and_namespaces() -> Result<(), ManifestError> {
        let model = Model::build(parse_manifests(MANIFESTS)?);
        assert!(model.namespaces.contains("shop"));
        let svc = &model.services[&("shop".to_string(), "reviews".to_string())];
        assert_eq!(svc.cluster_ip.as_deref(), Some("10.96.0.7"));
        assert_eq!(svc.ports[1].app_protocol.as_deref(), Some("grpc"));
        let slices: Vec<_> = model.slices_of(svc).collect();
        assert_eq!(slices.len(), 1);
        assert!(slices[0].endpoints[0].ready, "absent ready means ready");
        assert!(!slices[0].endpoints[1].ready);
        assert_eq!(slices[0].endpoints[0].zone.as_deref(), Some("z1"));
        Ok(())
    }

    #[test]
    fn rejects_bad_ports_with_the_field() {
        let bad = "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 70000}]}\n";
        let err = parse_manifests(bad).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("document 0 (Service a): spec.ports[0].port: 70000 is not a port (1-65535)")
        );
    }

    #[test]
    fn rejects_bad_ingress_paths() {
        let bad = "kind: Ingress\nmetadata: {name: i}\nspec:\n  rules:\n  - http:\n      paths:\n      - {path: /a, pathType: Regex, backend: {service: {name: s, port: {number: 80}}}}\n";
        let err = parse_manifests(bad).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("document 0 (Ingress i): spec.rules[0].http.paths[0].pathType: unknown \"Regex\"")
        );
    }

    #[test]
    fn parses_secrets_pods_and_ingress_tls() -> Result<(), ManifestError> {
        // "Y2VydA==" is "cert", "a2V5\n" a line-broken "key".
        let text = r#"
kind: Secret
metadata: {name: shop-tls, namespace: shop}
type: kubernetes.io/tls
data: {tls.crt: "Y2VydA==", tls.key: "a2V5\n"}
stringData: {tls.key: "override"}
---
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
status:
  podIP: 10.0.0.7
  phase: Running
  conditions: [{type: Ready, status: "True"}]
---
kind: Pod
metadata: {name: pending}
---
kind: Ingress
metadata: {name: shop, namespace: shop}
spec:
  tls:
  - {hosts: [Shop.Example.com, ""], secretName: shop-tls}
  - {}
"#;
        let model = Model::build(parse_manifests(text)?);
        let secret = model
            .secret("shop", "shop-tls")
            .ok_or_else(|| ManifestError::Document {
                index: 0,
                reason: "no secret".into(),
            })?;
        assert_eq!(secret.secret_type, TLS_SECRET_TYPE);
        assert_eq!(secret.data["tls.crt"], b"cert");
        assert_eq!(secret.data["tls.key"], b"override", "stringData wins");
        let debug = format!("{secret:?}");
        assert!(
            !debug.contains("cert\"") && !debug.contains("override"),
            "{debug}"
        );
        let pod = model.pod_by_ip("10.0.0.7".parse().map_err(|_| ManifestError::Document {
            index: 0,
            reason: "ip".into(),
        })?);
        assert_eq!(
            pod.map(|p| (p.name.as_str(), p.ready, p.labels["app"].as_str())),
            Some(("web-1", true, "web"))
        );
        let pending = &model.pods[&("default".to_string(), "pending".to_string())];
        assert!(pending.ip.is_none() && !pending.ready);
        let ingress = &model.ingresses[&("shop".to_string(), "shop".to_string())];
        assert_eq!(
            ingress.tls,
            [
                IngressTls {
                    hosts: vec!["shop.example.com".into()],
                    secret_name: Some("shop-tls".into())
                },
                IngressTls {
                    hosts: vec![],
                    secret_name: None
                }
            ]
        );
        Ok(())
    }

    #[test]
    fn rejects_bad_base64_without_echoing_it() {
        let bad = "kind: Secret\nmetadata: {name: s}\ndata: {tls.key: \"c2VjcmV0!!\"}\n";
        let err = parse_manifests(bad).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("document 0 (Secret s): data.tls.key: not valid base64")
        );
    }

    #[test]
    fn rejects_yaml_syntax_errors() {
        assert!(parse_manifests("kind: Service\nmetadata: {name: [\n").is_err());
    }
}
