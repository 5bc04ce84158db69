//! `legate-pilot`: a small, Istio-like control plane.
//!
//! It watches the mesh's services (a directory of Kubernetes manifests, [`source`], or the
//! Kubernetes API, [`kube`]), keeps
//! them in one immutable [`model`], translates that model per proxy group into Envoy v3
//! resources ([`translate`]), publishes consistent [`snapshot`]s through the [`cache`], and
//! serves them over ADS ([`xds`]) to Envoy and Legate. [`admin`] exposes readiness, metrics
//! and each proxy's sync state.

pub mod admin;
pub mod cache;
pub mod debounce;
pub mod gateway;
pub mod identity;
pub mod inbound;
pub mod kube;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod snapshot;
pub mod source;
pub mod tls;
pub mod translate;
pub mod xds;

#[cfg(test)]
mod test_support;
