//! Legate's integration tests: the differential corpus against Envoy, malformed input over raw
//! TCP, `--mode validate`, and xDS conformance against a scripted ADS server.

mod demo;
mod ext_authz;
mod harness;
mod hot_restart;
mod kube;
mod lifecycle;
mod malformed;
mod malformed_h2;
mod pilot;
mod scenarios;
mod user_filter;
mod validate;
mod xds;
