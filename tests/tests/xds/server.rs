//! Self-tests of the scriptable ADS server, driven by a hand-written client: the protocol rules
//! a conformance run relies on, checked without any proxy.

use std::time::Duration;

use anyhow::{Context, Result};
use legate_proto::pb::envoy::config::core::v3::Node;
use legate_proto::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use legate_proto::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use legate_proto::pb::google::rpc::Status;
use legate_tests::xds::resources::{eds_cluster, load_assignment};
use legate_tests::xds::{resource_name, XdsServer, CDS, EDS};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const STEP: Duration = Duration::from_secs(5);

async fn next<T>(responses: &mut Streaming<T>) -> Result<T> {
    tokio::time::timeout(STEP, responses.message())
        .await
        .context("no response before the deadline")??
        .context("stream closed")
}

fn names(r: &DiscoveryResponse) -> Result<Vec<String>> {
    r.resources.iter().map(resource_name).collect()
}

fn delta_names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

fn request(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn node() -> Option<Node> {
    Some(Node {
        id: "self-test".into(),
        ..Default::default()
    })
}

fn two_clusters(server: &XdsServer, version: &str) -> Result<()> {
    let addr = "127.0.0.1:9".parse()?;
    server.set_typed(version, &[eds_cluster("c1"), eds_cluster("c2")])?;
    server.set_typed(
        version,
        &[
            load_assignment("c1", &[addr]),
            load_assignment("c2", &[addr]),
        ],
    )
}

/// SotW: wildcard CDS, named EDS, stale nonces ignored, NACKs not answered by a resend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_self_test_sotw_subscriptions_and_nonces() -> Result<()> {
    let server = XdsServer::start().await?;
    two_clusters(&server, "1")?;
    let mut client =
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", server.addr())).await?;
    let (tx, rx) = mpsc::channel(8);
    let mut first = request(CDS, &[], "", "");
    first.node = node();
    tx.send(first).await?;
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();

    let cds = next(&mut responses).await?;
    assert_eq!(names(&cds)?, ["c1", "c2"], "wildcard CDS");
    assert_eq!(cds.version_info, "1");
    tx.send(request(CDS, &[], "1", &cds.nonce)).await?;
    tx.send(request(EDS, &["c1"], "", "")).await?;
    let eds = next(&mut responses).await?;
    assert_eq!(names(&eds)?, ["c1"], "only what is named");
    assert_ne!(eds.nonce, cds.nonce);
    tx.send(request(EDS, &["c1"], "1", &eds.nonce)).await?;

    // A stale nonce: the subscription to c2 it carries is ignored.
    tx.send(request(EDS, &["c1", "c2"], "1", "stale")).await?;
    two_clusters(&server, "2")?;
    let cds2 = next(&mut responses).await?;
    assert_eq!(
        (cds2.type_url.as_str(), cds2.version_info.as_str()),
        (CDS, "2")
    );
    let eds2 = next(&mut responses).await?;
    assert_eq!(eds2.version_info, "2");
    assert_eq!(names(&eds2)?, ["c1"], "the stale request changed nothing");

    // A NACK is not answered; the next version is pushed as usual.
    tx.send(DiscoveryRequest {
        error_detail: Some(Status {
            code: 13,
            message: "scripted rejection".into(),
            details: vec![],
        }),
        ..request(EDS, &["c1"], "1", &eds2.nonce)
    })
    .await?;
    assert_eq!(server.wait_for_nack(EDS, "2").await?, "scripted rejection");
    two_clusters(&server, "3")?;
    let cds3 = next(&mut responses).await?;
    assert_eq!(cds3.version_info, "3");
    let eds3 = next(&mut responses).await?;
    assert_eq!(eds3.version_info, "3", "not a resend of 2");

    server.wait_for_ack(CDS, "1").await?;
    let log = server.log();
    assert_eq!(log.requests[0].node_id.as_deref(), Some("self-test"));
    assert!(log.requests[0].first_on_stream);
    assert!(log.requests[1..].iter().all(|r| !r.first_on_stream));
    Ok(())
}

/// Delta: initial_resource_versions, explicit subscriptions, removals, unsubscribe; and a
/// restart on the same port with a fresh stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_self_test_delta_subscriptions_and_restart() -> Result<()> {
    let mut server = XdsServer::start().await?;
    let addr = server.addr();
    two_clusters(&server, "1")?;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await?;
    let (tx, rx) = mpsc::channel(8);
    // As on a reconnect: the client has c1 at version 1, and "gone", which no longer exists.
    tx.send(DeltaDiscoveryRequest {
        node: node(),
        type_url: CDS.into(),
        initial_resource_versions: [("c1", "1"), ("gone", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
    .await?;
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let cds = next(&mut responses).await?;
    assert_eq!(delta_names(&cds), ["c2"], "c1 is up to date");
    assert_eq!(cds.removed_resources, ["gone"]);

    // An explicit subscription is answered even for what does not exist.
    tx.send(DeltaDiscoveryRequest {
        type_url: EDS.into(),
        resource_names_subscribe: vec!["c1".into(), "missing".into()],
        ..Default::default()
    })
    .await?;
    let eds = next(&mut responses).await?;
    assert_eq!(delta_names(&eds), ["c1"]);
    assert_eq!(eds.removed_resources, ["missing"]);

    // After unsubscribing c1, its change is not sent; c2, subscribed next, is.
    tx.send(DeltaDiscoveryRequest {
        type_url: EDS.into(),
        response_nonce: eds.nonce.clone(),
        resource_names_unsubscribe: vec!["c1".into()],
        ..Default::default()
    })
    .await?;
    server
        .wait_for_request("the unsubscribe", |r| r.unsubscribe == ["c1"])
        .await?;
    let other = "127.0.0.1:10".parse()?;
    server.set_typed("2", &[load_assignment("c1", &[other])])?;
    // c2's assignment is gone now (set replaces the type): subscribing reports it removed.
    tx.send(DeltaDiscoveryRequest {
        type_url: EDS.into(),
        resource_names_subscribe: vec!["c2".into()],
        ..Default::default()
    })
    .await?;
    let eds2 = next(&mut responses).await?;
    assert!(eds2.resources.is_empty(), "{eds2:?}");
    assert_eq!(eds2.removed_resources, ["c2"]);
    // Removing a wildcard resource is pushed as a removal.
    server.set_typed("2", &[eds_cluster("c1")])?;
    let cds2 = next(&mut responses).await?;
    assert!(cds2.resources.is_empty(), "{cds2:?}");
    assert_eq!(cds2.removed_resources, ["c2"]);
    assert_eq!(cds2.system_version_info, "2");

    // Restart: same port, a new stream, nonces of its own.
    server.restart().await?;
    assert_eq!(server.addr(), addr);
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await?;
    let (tx, rx) = mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        node: node(),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await?;
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let cds3 = next(&mut responses).await?;
    assert_eq!(delta_names(&cds3), ["c1"]);
    assert_eq!(server.streams(), 2);
    let log = server.log();
    let stream2: Vec<_> = log.responses.iter().filter(|r| r.stream == 2).collect();
    assert_eq!(stream2.len(), 1);
    assert!(log
        .responses
        .iter()
        .filter(|r| r.stream == 1)
        .all(|r| r.nonce != stream2[0].nonce));
    drop(tx);
    Ok(())
}
