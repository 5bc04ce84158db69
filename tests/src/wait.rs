//! Polling with a deadline, for conditions a test waits for.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Polls `f` every `every` until it returns `Ok(Some(_))`, or fails after `within` with the
/// last error (or "not yet").
pub async fn eventually_within<T, F, Fut>(
    what: &str,
    within: Duration,
    every: Duration,
    mut f: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    loop {
        let last = match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "not yet".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("{what}: not reached within {within:?} (last: {last})");
        }
        tokio::time::sleep(every).await;
    }
}
