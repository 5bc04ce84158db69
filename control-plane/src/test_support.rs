//! What the unit tests share: a proxy group and a snapshot translated from manifests.

use crate::identity::{ProxyGroup, Role};
use crate::model::{parse_manifests, Model};
use crate::snapshot::Snapshot;
use crate::translate::{translate, TranslateOptions};

/// A proxy group of `role` at `ip` in namespace `default`, on the default ports.
pub fn group(role: Role, ip: [u8; 4]) -> ProxyGroup {
    ProxyGroup {
        role,
        ip: std::net::IpAddr::from(ip),
        namespace: "default".into(),
        listener_port: 15001,
        inbound_port: 15006,
        https_port: 8443,
    }
}

/// The sidecar at 127.0.0.1.
pub fn sidecar() -> ProxyGroup {
    group(Role::Sidecar, [127, 0, 0, 1])
}

/// The snapshot of [`sidecar`] for `manifests`, at `version`, after `previous`.
pub fn sidecar_snapshot(
    manifests: &str,
    version: u64,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, Box<dyn std::error::Error>> {
    let model = Model::build(parse_manifests(manifests)?);
    let resources = translate(&model, &sidecar(), &TranslateOptions::default());
    Ok(Snapshot::build(&resources, previous, version)?)
}
