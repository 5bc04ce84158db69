//! The differential corpus: one YAML file per scenario under `tests/scenarios/`.
//!
//! A scenario is a bootstrap template, the named upstreams it needs, and requests with
//! expectations. It runs against Envoy and Legate with the same rendered bootstrap and the
//! same requests; each proxy must meet the explicit expectations (so a scenario cannot pass
//! vacuously) and Legate must observe the same values as Envoy for every compared key.
//!
//! Placeholders in `bootstrap`: `$UPSTREAM_<NAME>_PORT` (upper-cased upstream name),
//! `$CERT_DIR` (see [`crate::certs`]), `$UNUSED_PORT` (a reserved port nobody listens on).
//! An `admin:` block on `127.0.0.1:0` is appended when the template has none.
//!
//! `LEGATE_DIFF_ONLY=envoy` (or `legate`) runs one side only, checking expectations alone.

mod send;
mod spec;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::bins::ProxyKind;
use crate::certs::{SharedPki, TestPki};
use crate::observe::{observe, summary, Outcome};
use crate::process::TempDir;
use crate::proxy::Proxy;
use crate::upstream::Upstream;

/// An upper bound for one scenario, so a hung proxy cannot stall the suite.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(120);

pub use spec::{
    CertChoice, ClientProtocol, Expect, OneOrMany, RequestSpec, Scenario, UpstreamProtocol,
    UpstreamSpec,
};

/// `tests/scenarios/`.
pub fn scenario_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

/// Every scenario name (file stem), sorted.
pub fn scenario_names() -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(scenario_dir())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            if let Some(stem) = path.file_stem() {
                names.push(stem.to_string_lossy().into_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// The proxies to run, from `LEGATE_DIFF_ONLY` (`envoy`, `legate`, or unset for both).
pub fn sides() -> Result<Vec<ProxyKind>> {
    match std::env::var("LEGATE_DIFF_ONLY").ok().as_deref() {
        None | Some("") | Some("both") => Ok(vec![ProxyKind::Envoy, ProxyKind::Legate]),
        Some("envoy") => Ok(vec![ProxyKind::Envoy]),
        Some("legate") => Ok(vec![ProxyKind::Legate]),
        Some(other) => bail!("LEGATE_DIFF_ONLY={other:?}: expected envoy, legate or both"),
    }
}

/// Loads `tests/scenarios/<name>.yaml`.
pub fn load(name: &str) -> Result<Scenario> {
    let path = scenario_dir().join(format!("{name}.yaml"));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let scenario: Scenario =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for r in &scenario.requests {
        let keys: Vec<String> = r.expect.keys().into_iter().map(|(k, _)| k).collect();
        if keys.is_empty() {
            bail!("{name}: request {:?} has no expectations", r.name);
        }
        for key in r.legate_differs.keys() {
            if !keys.contains(key) && !r.compare.contains(key) {
                bail!(
                    "{name}: request {:?}: legate_differs names {key:?}, which is not compared",
                    r.name
                );
            }
        }
    }
    if scenario.requests.is_empty() {
        bail!("{name}: no requests");
    }
    Ok(scenario)
}

/// Substitutes the placeholders and appends an admin block if missing.
pub fn render(template: &str, vars: &BTreeMap<String, String>) -> Result<String> {
    let mut out = template.to_string();
    // Longest names first so `$UPSTREAM_AB_PORT` is not eaten by `$UPSTREAM_A...`.
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        out = out.replace(&format!("${name}"), &vars[name]);
    }
    let bytes = out.as_bytes();
    for (i, w) in bytes.windows(2).enumerate() {
        if w[0] == b'$' && w[1].is_ascii_uppercase() {
            let rest: String = out[i..].chars().take(30).collect();
            bail!("unknown placeholder at {rest:?}");
        }
    }
    if !out.lines().any(|l| l.starts_with("admin:")) {
        out.push_str(
            "\nadmin:\n  address:\n    socket_address: { address: 127.0.0.1, port_value: 0 }\n",
        );
    }
    Ok(out)
}

/// Runs the named scenario against the configured sides and fails with a report of every
/// mismatch.
pub async fn run(name: &str) -> Result<()> {
    match tokio::time::timeout(SCENARIO_TIMEOUT, run_inner(name)).await {
        Ok(result) => result,
        Err(_) => bail!("scenario {name} did not finish within {SCENARIO_TIMEOUT:?}"),
    }
}

async fn run_inner(name: &str) -> Result<()> {
    let scenario = load(name)?;
    let sides = sides()?;
    let dir = TempDir::new(name)?;
    let pki = TestPki::generate(&dir.path().join("certs"))?;

    let mut vars = BTreeMap::new();
    vars.insert("CERT_DIR".to_string(), pki.dir.display().to_string());
    let mut upstreams = Vec::new();
    for spec in &scenario.upstreams {
        let upstream = match spec.protocol {
            UpstreamProtocol::H1 | UpstreamProtocol::H2c => Upstream::plain(&spec.name).await?,
            UpstreamProtocol::Tls => Upstream::tls(&spec.name, &pki).await?,
        };
        vars.insert(
            format!("UPSTREAM_{}_PORT", spec.name.to_ascii_uppercase()),
            upstream.addr.port().to_string(),
        );
        upstreams.push(upstream);
    }
    // Bound but never listening: connecting is refused, and nobody else can take the port.
    let reserved = tokio::net::TcpSocket::new_v4()?;
    reserved.bind("127.0.0.1:0".parse()?)?;
    vars.insert(
        "UNUSED_PORT".into(),
        reserved.local_addr()?.port().to_string(),
    );

    let rendered = render(&scenario.bootstrap, &vars)?;
    let config = dir.path().join("bootstrap.yaml");
    std::fs::write(&config, &rendered)?;

    let started = futures_util::future::join_all(
        sides
            .iter()
            .map(|&kind| Proxy::start(kind, &config, dir.path())),
    )
    .await;
    let mut proxies = Vec::new();
    for p in started {
        proxies.push(p?);
    }

    let (failures, report) = match exercise(&scenario, &proxies, &pki).await {
        Ok(result) => result,
        Err(e) => bail!("scenario {name}: {e:#}\n{}", outputs(&proxies)),
    };
    if !failures.is_empty() {
        bail!(
            "scenario {name} ({}): {} mismatch(es)\n  {}\nobserved:\n  {}\n{}",
            scenario.description,
            failures.len(),
            failures.join("\n  "),
            report.join("\n  "),
            outputs(&proxies)
        );
    }
    drop(upstreams);
    Ok(())
}

fn outputs(proxies: &[Proxy]) -> String {
    proxies
        .iter()
        .map(|p| p.output())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Sends every request to every proxy; returns the mismatches and a per-request report.
async fn exercise(
    scenario: &Scenario,
    proxies: &[Proxy],
    pki: &SharedPki,
) -> Result<(Vec<String>, Vec<String>)> {
    let mut failures = Vec::new();
    let mut report = Vec::new();
    // A proxy that let one request time out is not sent more: it would only time out again,
    // and a broken build must not stretch the suite past its budget.
    let mut hung: Vec<ProxyKind> = Vec::new();
    for request in &scenario.requests {
        let per_side = futures_util::future::join_all(proxies.iter().map(|p| {
            let skip = hung.contains(&p.kind);
            async move {
                if skip {
                    let skipped = Outcome::Error("skipped: an earlier request timed out".into());
                    return Ok(vec![skipped; request.repeat]);
                }
                send::attempts(p, request, pki).await
            }
        }))
        .await;
        let mut keys: Vec<String> = request.expect.keys().into_iter().map(|(k, _)| k).collect();
        keys.extend(request.compare.iter().cloned());
        let mut observed: BTreeMap<ProxyKind, BTreeMap<String, Value>> = BTreeMap::new();
        for (proxy, outcomes) in proxies.iter().zip(per_side) {
            let outcomes = outcomes?;
            if outcomes.iter().any(Outcome::timed_out) && !hung.contains(&proxy.kind) {
                hung.push(proxy.kind);
            }
            let mut values: BTreeMap<String, Value> = keys
                .iter()
                .map(|k| (k.clone(), observe(k, &outcomes)))
                .collect();
            values.insert("attempts".into(), summary(&outcomes));
            observed.insert(proxy.kind, values);
        }
        failures.extend(check(request, &keys, &observed));
        let observed: BTreeMap<&str, &BTreeMap<String, Value>> =
            observed.iter().map(|(k, v)| (k.name(), v)).collect();
        report.push(format!("[{}] {}", request.name, json!(observed)));
    }
    Ok((failures, report))
}

/// Each proxy against the expectations, then Legate against Envoy on every compared key;
/// returns one line per mismatch. `keys` are the expectation keys plus `compare`.
pub fn check(
    request: &RequestSpec,
    keys: &[String],
    observed: &BTreeMap<ProxyKind, BTreeMap<String, Value>>,
) -> Vec<String> {
    let mut failures = Vec::new();
    let name = &request.name;
    let differs = |key: &str| request.legate_differs.contains_key(key);
    for (kind, values) in observed {
        for (key, want) in request.expect.keys() {
            if *kind == ProxyKind::Legate && differs(&key) {
                continue;
            }
            let got = values.get(&key).unwrap_or(&Value::Null);
            if *got != want {
                failures.push(format!(
                    "[{name}] {kind}: {key}: expected {want}, got {got}"
                ));
            }
        }
    }
    if let (Some(envoy), Some(legate)) = (
        observed.get(&ProxyKind::Envoy),
        observed.get(&ProxyKind::Legate),
    ) {
        for key in keys.iter().filter(|k| !differs(k)) {
            let (e, l) = (envoy.get(key), legate.get(key));
            if e != l {
                failures.push(format!(
                    "[{name}] legate differs from envoy on {key}: envoy={} legate={}",
                    json!(e),
                    json!(l)
                ));
            }
        }
    }
    failures
}
