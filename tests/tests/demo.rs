//! The README's "run it" command: `examples/mesh/run.sh --check` starts legate-pilot, an
//! ingress gateway and two workloads behind sidecars (all `legate`, all configured over xDS),
//! checks the paths through them and that a manifest edit reaches traffic, then stops
//! everything. Run here with the debug binaries, in its own loopback /24.

use std::time::Duration;

use anyhow::{ensure, Result};
use legate_tests::bins::{legate_bin, pilot_bin, workspace_root};
use legate_tests::process::{run_to_completion, TempDir};

#[test]
fn the_local_mesh_runs_and_follows_an_edit() -> Result<()> {
    let root = workspace_root();
    let args = vec![
        format!("LEGATE_BIN={}", legate_bin()?.display()),
        format!("LEGATE_PILOT_BIN={}", pilot_bin()?.display()),
        "MESH_NET=127.0.77".to_string(),
        "bash".to_string(),
        root.join("examples/mesh/run.sh").display().to_string(),
        "--check".to_string(),
    ];
    // The script finds the repository by its own path; the directory only holds its output.
    let dir = TempDir::new("mesh-demo")?;
    let done = run_to_completion(
        std::path::Path::new("/usr/bin/env"),
        &args,
        dir.path(),
        Duration::from_secs(90),
    )?;
    ensure!(
        done.status.success(),
        "examples/mesh/run.sh --check failed\n--- stdout\n{}\n--- stderr\n{}",
        done.stdout,
        done.stderr
    );
    for line in [
        "ok: gateway → productpage",
        "ok: the manifest edit",
        "ok: 3 proxies in sync",
    ] {
        ensure!(
            done.stdout.contains(line),
            "missing {line:?} in\n{}",
            done.stdout
        );
    }
    eprintln!("{}", done.stdout);
    Ok(())
}
