//! `legate`: an Envoy-compatible L7 proxy. See `ARCHITECTURE.md` for the map.

pub mod accesslog;
pub mod admin;
pub mod body;
mod cli;
pub mod cluster;
pub mod config;
pub mod filter_body;
pub mod hcm;
pub mod hot_restart;
pub mod lb;
pub mod listener;
pub mod listener_manager;
pub mod memory;
pub mod route;
pub mod server;
pub mod services;
pub mod sniff;
pub mod stats;
pub mod tls;
pub mod tls_inspector;
pub mod upstream;
pub mod xds;

pub use cli::main_with_registry;
