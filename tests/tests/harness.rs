//! Self-tests of the harness: the parts whose mistakes would make a scenario pass vacuously.

use std::collections::BTreeMap;

use anyhow::Result;
use legate_tests::bins::ProxyKind;
use legate_tests::scenario::{check, render, RequestSpec};
use serde_json::{json, Value};

#[test]
fn render_substitutes_and_rejects_unknown_placeholders() -> Result<()> {
    let vars = BTreeMap::from([
        ("UPSTREAM_A_PORT".to_string(), "1111".to_string()),
        ("UPSTREAM_AB_PORT".to_string(), "2222".to_string()),
    ]);
    let out = render(
        "a: $UPSTREAM_A_PORT\nb: $UPSTREAM_AB_PORT\nre: \"^/x$\"\n",
        &vars,
    )?;
    assert!(out.contains("a: 1111\nb: 2222\n"), "{out}");
    assert!(out.contains("\nadmin:\n"), "admin block appended: {out}");
    assert!(render("a: $UPSTREAM_Z_PORT\n", &vars).is_err());
    let with_admin = render("admin:\n  address: {}\n", &vars)?;
    assert_eq!(with_admin.matches("admin:").count(), 1);
    Ok(())
}

#[test]
fn listeners_are_parsed_from_envoys_shape() -> Result<()> {
    let body = r#"{"listener_statuses":[{"name":"main","local_address":{"socket_address":{"address":"127.0.0.1","port_value":4242}}}]}"#;
    let listeners = legate_tests::proxy::parse_listeners(body)?;
    assert_eq!(listeners["main"].port(), 4242);
    assert!(legate_tests::proxy::parse_listeners(
        r#"{"listener_statuses":[{"name":"x","local_address":{"socket_address":{"address":"127.0.0.1"}}}]}"#
    )
    .is_err());
    Ok(())
}

#[test]
fn grpc_frames_round_trip() -> Result<()> {
    let messages = vec![
        bytes::Bytes::from("a"),
        bytes::Bytes::new(),
        bytes::Bytes::from("ccc"),
    ];
    let encoded = legate_tests::grpc::encode(&messages);
    assert_eq!(legate_tests::grpc::decode(&encoded)?, messages);
    assert!(legate_tests::grpc::decode(&encoded[..encoded.len() - 1]).is_err());
    Ok(())
}

fn request(yaml: &str) -> Result<RequestSpec> {
    Ok(serde_yaml::from_str(yaml)?)
}

fn observed(envoy: Value, legate: Value) -> BTreeMap<ProxyKind, BTreeMap<String, Value>> {
    let to_map =
        |v: Value| -> BTreeMap<String, Value> { serde_json::from_value(v).unwrap_or_default() };
    BTreeMap::from([
        (ProxyKind::Envoy, to_map(envoy)),
        (ProxyKind::Legate, to_map(legate)),
    ])
}

#[test]
fn check_compares_expectations_and_sides() -> Result<()> {
    let req = request("{name: r, expect: {status: 200, upstream: a}, compare: ['header:x']}")?;
    let keys = vec![
        "status".to_string(),
        "echo.upstream".into(),
        "header:x".into(),
    ];
    let same = json!({"status": 200, "echo.upstream": "a", "header:x": "1"});
    assert!(check(&req, &keys, &observed(same.clone(), same.clone())).is_empty());

    // Both wrong the same way: still a failure (no vacuous passes).
    let wrong = json!({"status": 404, "echo.upstream": "a", "header:x": "1"});
    assert_eq!(check(&req, &keys, &observed(wrong.clone(), wrong)).len(), 2);

    // Legate differs on a compare-only key.
    let other = json!({"status": 200, "echo.upstream": "a", "header:x": "2"});
    let failures = check(&req, &keys, &observed(same.clone(), other.clone()));
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].contains("legate differs from envoy on header:x"));

    // ...unless declared.
    let req = request(
        "{name: r, expect: {status: 200}, compare: ['header:x'], legate_differs: {'header:x': because}}",
    )?;
    let keys = vec!["status".to_string(), "header:x".into()];
    assert!(check(&req, &keys, &observed(same, other)).is_empty());
    Ok(())
}
