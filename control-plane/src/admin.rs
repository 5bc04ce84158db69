//! The admin HTTP endpoint: `/ready`, `/metrics` and `/debug/syncz`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::registry::ProxyRegistry;

/// What the admin endpoint reads.
pub struct AdminState {
    /// Set once the first model is loaded and the xDS server is listening.
    pub ready: AtomicBool,
    pub metrics: Arc<Metrics>,
    pub registry: Arc<ProxyRegistry>,
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

/// Answers one admin request.
pub fn handle(state: &AdminState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match path {
        "/ready" => {
            if state.ready.load(Ordering::Acquire) {
                reply(StatusCode::OK, "text/plain", "LIVE\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "PRE_INITIALIZING\n".into(),
                )
            }
        }
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.render(state.registry.len()),
        ),
        "/debug/syncz" => match serde_json::to_string_pretty(&state.registry.list()) {
            Ok(json) => reply(StatusCode::OK, "application/json", json + "\n"),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /ready, /metrics, /debug/syncz\n".into(),
        ),
    }
}

/// Serves the admin endpoint on `listener` until `shutdown` flips.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<Incoming>| {
                let response = handle(&state, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_flips_and_metrics_render() {
        let state = AdminState {
            ready: AtomicBool::new(false),
            metrics: Arc::default(),
            registry: Arc::default(),
        };
        assert_eq!(
            handle(&state, &Method::GET, "/ready").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        state.ready.store(true, Ordering::Release);
        assert_eq!(
            handle(&state, &Method::GET, "/ready").status(),
            StatusCode::OK
        );
        assert_eq!(
            handle(&state, &Method::GET, "/metrics").status(),
            StatusCode::OK
        );
        assert_eq!(
            handle(&state, &Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
        let text = state.metrics.render(0);
        assert!(
            text.contains("pilot_xds_pushes_total{type=\"cds\"} 0"),
            "{text}"
        );
        assert!(text.contains("pilot_xds_connected_proxies 0"), "{text}");
    }
}
