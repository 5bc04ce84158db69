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
    action_auto_host_rewrite,
    action_cluster_header,
    action_host_rewrite_literal,
    action_prefix_rewrite,
    action_regex_rewrite,
    action_timeout,
    action_weighted_clusters,
    cluster_static,
    cluster_strict_dns,
    connection_reuse,
    direct_response,
    downstream_h2c,
    downstream_h2c_only,
    downstream_tls_alpn,
    downstream_tls_redirect,
    expect_continue,
    filter_buffer,
    filter_compressor,
    filter_cors_policy,
    filter_fault_abort,
    filter_fault_delay,
    filter_grpc_web,
    filter_header_mutation_request_response,
    filter_health_check_modes,
    filter_local_ratelimit_token_bucket,
    filter_no_route,
    filter_rbac_authenticated,
    filter_rbac_policies,
    grpc_no_route,
    grpc_streaming,
    grpc_unary,
    headers_all_levels,
    headers_route_level,
    hop_by_hop_headers,
    large_body,
    lb_least_request,
    lb_maglev,
    lb_random,
    lb_ring_hash,
    lb_round_robin,
    listener_ipv6,
    max_request_headers,
    method_and_path_passthrough,
    no_route,
    redirect_host_path,
    redirect_scheme,
    request_body_chunked,
    request_id,
    response_body_streaming,
    route_case_insensitive,
    route_header_invert,
    route_header_present_range,
    route_header_pseudo,
    route_header_string_match,
    route_match_order,
    route_path,
    route_path_separated_prefix,
    route_prefix,
    route_query_parameters,
    route_safe_regex,
    server_header_transformation,
    server_name,
    tls_mtls,
    tls_mtls_san_match,
    tls_server_names,
    tls_server_names_default_chain,
    tls_static_secrets,
    unknown_cluster,
    upstream_connect_failure,
    upstream_http2,
    upstream_status_passthrough,
    upstream_tls,
    upstream_tls_h2,
    upstream_tls_untrusted,
    vhost_catch_all,
    vhost_exact,
    vhost_precedence,
    vhost_prefix_wildcard,
    vhost_suffix_wildcard,
    wire_http1,
    xff_default,
    xff_skip_append,
    xff_use_remote_address,
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
