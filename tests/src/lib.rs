//! Test support for Legate's integration tests.
//!
//! The pieces a test composes: [`certs`] makes a throwaway PKI, [`upstream`] runs named echo
//! servers (HTTP/1.1, h2c, TLS, gRPC), [`proxy`] starts Envoy or Legate from a bootstrap and
//! learns the ports they bound, [`client`] sends requests over h1/h2c/TLS, [`raw`] speaks bytes
//! for the cases a well-behaved client cannot produce, and [`scenario`] runs the differential
//! corpus under `tests/scenarios/` against both proxies and compares what a user would see.
//! [`xds`] is a scriptable ADS server that records what an xDS client asks for and ACKs;
//! [`kube_api`] is a fake Kubernetes API server (list and watch) for `legate-pilot`'s source.
//! [`mesh`] has what the pilot's tests share: a proxy's ADS bootstrap and which upstream answered.

pub mod bins;
pub mod certs;
pub mod client;
pub mod grpc;
pub mod kube_api;
pub mod mesh;
pub mod process;
pub mod proxy;
pub mod raw;
pub mod scenario;
pub mod upstream;
pub mod xds;

mod observe;
pub mod wait;
