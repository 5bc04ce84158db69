//! One test per scenario file under `tests/scenarios/`, run against Envoy and Legate.
//!
//! `LEGATE_DIFF_ONLY=envoy` runs the Envoy side only (to check the corpus itself).

use legate_tests::scenario;

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        const LISTED: &[&str] = &[$(stringify!($name)),*];
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                scenario::run(stringify!($name)).await
            }
        )*
    };
}

scenarios! {
    route_case_insensitive,
    route_header_invert,
    route_header_present_range,
    route_header_string_match,
    route_path,
    route_path_separated_prefix,
    route_prefix,
    route_query_parameters,
    route_safe_regex,
    vhost_catch_all,
    vhost_exact,
    vhost_precedence,
    vhost_prefix_wildcard,
    vhost_suffix_wildcard,
}

/// Every file is listed above (so none is silently skipped) and the corpus stays broad.
#[test]
fn corpus_is_complete() -> anyhow::Result<()> {
    let files = scenario::scenario_names()?;
    let mut listed: Vec<String> = LISTED.iter().map(|s| s.to_string()).collect();
    listed.sort();
    anyhow::ensure!(
        files == listed,
        "tests/scenarios/*.yaml and the scenarios! list disagree:\n files: {files:?}\n listed: {listed:?}"
    );
    anyhow::ensure!(files.len() >= 45, "only {} scenarios", files.len());
    Ok(())
}
