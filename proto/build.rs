//! Compiles the Envoy API `.proto` files that ship inside the `envoy-types` crate into one
//! `FileDescriptorSet`, so that Legate can read Envoy's proto3 JSON/YAML configuration with
//! the exact field names, enums and `Any` handling that Envoy uses. Nothing is copied: the
//! files are read from the pinned `envoy-types` package in cargo's registry.

use std::path::{Path, PathBuf};

const ENVOY_TYPES_VERSION: &str = "0.7.7";

/// The files Legate understands; their imports are compiled too.
const FILES: &[&str] = &[
    "envoy/config/bootstrap/v3/bootstrap.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
    "envoy/extensions/access_loggers/file/v3/file.proto",
    "envoy/extensions/access_loggers/stream/v3/stream.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
    "envoy/service/discovery/v3/ads.proto",
    "envoy/admin/v3/config_dump.proto",
    "envoy/extensions/filters/http/local_ratelimit/v3/local_rate_limit.proto",
    "envoy/extensions/filters/http/fault/v3/fault.proto",
    "envoy/extensions/filters/http/cors/v3/cors.proto",
    "envoy/extensions/filters/http/rbac/v3/rbac.proto",
    "envoy/extensions/filters/http/header_mutation/v3/header_mutation.proto",
    "envoy/extensions/filters/http/buffer/v3/buffer.proto",
    "envoy/extensions/filters/http/health_check/v3/health_check.proto",
    "envoy/extensions/filters/http/compressor/v3/compressor.proto",
    "envoy/extensions/compression/gzip/compressor/v3/gzip.proto",
    "envoy/extensions/filters/http/ext_authz/v3/ext_authz.proto",
    "envoy/extensions/filters/http/grpc_web/v3/grpc_web.proto",
    // Not implemented: readable so that a config using it is refused by type URL and path.
    "envoy/extensions/filters/http/decompressor/v3/decompressor.proto",
    "envoy/extensions/compression/gzip/decompressor/v3/gzip.proto",
];

const INCLUDE_DIRS: &[&str] = &[
    "data-plane-api",
    "xds",
    "googleapis",
    "protoc-gen-validate",
    "cel-spec/proto",
    "opentelemetry-proto",
    "client_model",
];

fn registry_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        roots.push(PathBuf::from(home));
    }
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(Path::new(&home).join(".cargo"));
    }
    roots
}

fn find_proto_root() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("LEGATE_ENVOY_PROTO_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let wanted = format!("envoy-types-{ENVOY_TYPES_VERSION}");
    for root in registry_roots() {
        let src = root.join("registry").join("src");
        let Ok(entries) = std::fs::read_dir(&src) else {
            continue;
        };
        for entry in entries.flatten() {
            let candidate = entry.path().join(&wanted).join("proto");
            if candidate.join("data-plane-api").is_dir() {
                return Ok(candidate);
            }
        }
    }
    Err(format!(
        "cannot find the .proto files of {wanted} in cargo's registry; set LEGATE_ENVOY_PROTO_DIR \
         to its proto/ directory"
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LEGATE_ENVOY_PROTO_DIR");
    let root = find_proto_root()?;
    let includes: Vec<PathBuf> = INCLUDE_DIRS.iter().map(|d| root.join(d)).collect();
    let fds = protox::compile(FILES, includes)?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("envoy_descriptors.bin");
    std::fs::write(out, prost::Message::encode_to_vec(&fds))?;
    Ok(())
}
