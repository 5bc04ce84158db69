//! `--mode validate`: a good bootstrap is accepted with Envoy's message, a bad one is rejected
//! with the path of the offending field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Result};
use legate_tests::bins::ProxyKind;
use legate_tests::process::{run_to_completion, Finished, TempDir};
use legate_tests::scenario::sides;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/validate")
        .join(name)
}

fn validate(kind: ProxyKind, config: &Path) -> Result<Finished> {
    let dir = TempDir::new("validate")?;
    let args = vec![
        "--mode".to_string(),
        "validate".to_string(),
        "-c".to_string(),
        config.display().to_string(),
        "--disable-hot-restart".to_string(),
        "-l".to_string(),
        "warning".to_string(),
    ];
    run_to_completion(&kind.binary()?, &args, dir.path(), Duration::from_secs(60))
}

fn describe(kind: ProxyKind, f: &Finished) -> String {
    format!(
        "{kind} exited with {}\n--- stdout ---\n{}--- stderr ---\n{}",
        f.status, f.stdout, f.stderr
    )
}

#[test]
fn validate_accepts_a_good_bootstrap() -> Result<()> {
    let config = fixture("good.yaml");
    for kind in sides()? {
        let f = validate(kind, &config)?;
        ensure!(f.status.success(), "{}", describe(kind, &f));
        let want = format!("configuration '{}' OK", config.display());
        ensure!(
            f.stdout.contains(&want),
            "expected {want:?} on stdout\n{}",
            describe(kind, &f)
        );
    }
    Ok(())
}

/// Runs `--mode validate` on the fixture `file` with `kind`, and checks it fails with every
/// needle in its output.
fn expect_rejected(kind: ProxyKind, file: &str, needles: &[&str]) -> Result<()> {
    let f = validate(kind, &fixture(file))?;
    ensure!(!f.status.success(), "{file}: {}", describe(kind, &f));
    let output = format!("{}{}", f.stdout, f.stderr);
    for needle in needles {
        ensure!(
            output.contains(needle),
            "{file}: expected {needle:?} in the output\n{}",
            describe(kind, &f)
        );
    }
    Ok(())
}

/// Whether this run includes Legate (`LEGATE_DIFF_ONLY` may pick Envoy alone).
fn legate_side() -> Result<bool> {
    Ok(sides()?.contains(&ProxyKind::Legate))
}

#[test]
fn validate_rejects_an_unknown_field_by_path() -> Result<()> {
    for kind in sides()? {
        expect_rejected(kind, "unknown_field.yaml", &["clusters[0]", "bogus_field"])?;
    }
    Ok(())
}

/// Envoy accepts this (it implements subsets); Legate must refuse a field it would otherwise
/// silently ignore, naming it.
#[test]
fn validate_rejects_an_unsupported_field_by_path() -> Result<()> {
    if legate_side()? {
        expect_rejected(
            ProxyKind::Legate,
            "unsupported_field.yaml",
            &["clusters[0]", "lb_subset_config"],
        )?;
    }
    Ok(())
}

/// Configurations that parse but cannot work: both proxies refuse them and name
/// what is wrong.
#[test]
fn validate_rejects_semantic_errors() -> Result<()> {
    for (file, needle) in [
        ("unknown_cluster.yaml", "ghost"),
        ("bad_regex.yaml", "[0-9"),
    ] {
        for kind in sides()? {
            expect_rejected(kind, file, &[needle])?;
        }
    }
    Ok(())
}

/// A filter whose `@type` neither proxy knows is refused by both, naming the type; Legate
/// also names the filter's path.
#[test]
fn validate_rejects_an_unknown_filter_type() -> Result<()> {
    for kind in sides()? {
        let mut needles = vec!["example.filters.NoSuchFilter"];
        if kind == ProxyKind::Legate {
            needles.push("http_filters[0].typed_config");
        }
        expect_rejected(kind, "unknown_filter_type.yaml", &needles)?;
    }
    Ok(())
}

/// Envoy runs its decompressor filter; Legate does not implement it and must say so with the full
/// type URL and the filter's path rather than run without it.
#[test]
fn validate_rejects_an_unregistered_filter_by_type_url_and_path() -> Result<()> {
    if legate_side()? {
        expect_rejected(
            ProxyKind::Legate,
            "unregistered_filter.yaml",
            &[
                "listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0].typed_config",
                "type.googleapis.com/envoy.extensions.filters.http.decompressor.v3.Decompressor",
            ],
        )?;
    }
    Ok(())
}

/// A known filter with a field that is not in its proto: both proxies name the field.
#[test]
fn validate_rejects_an_unknown_filter_field_by_name() -> Result<()> {
    for kind in sides()? {
        expect_rejected(
            kind,
            "filter_unknown_field.yaml",
            &["http_filters[0]", "bogus_action"],
        )?;
    }
    Ok(())
}

/// A known filter with a valid field Legate does not implement: refused by name and path.
#[test]
fn validate_rejects_an_unsupported_filter_field_by_path() -> Result<()> {
    if legate_side()? {
        expect_rejected(
            ProxyKind::Legate,
            "filter_unsupported_field.yaml",
            &["http_filters[0].typed_config.local_rate_limit_per_downstream_connection"],
        )?;
    }
    Ok(())
}
