//! The `legate-pilot` command line. (Having an integration test here also makes
//! `cargo test --workspace` build the binary that `tests/tests/pilot.rs` runs.)

use std::process::Command;

#[test]
fn a_missing_config_dir_is_reported() -> Result<(), Box<dyn std::error::Error>> {
    let output = Command::new(env!("CARGO_BIN_EXE_legate-pilot"))
        .args([
            "--config-dir",
            "/nonexistent/legate-pilot-test",
            "--xds-address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
        ])
        .output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--config-dir /nonexistent/legate-pilot-test"),
        "{stderr}"
    );
    Ok(())
}
