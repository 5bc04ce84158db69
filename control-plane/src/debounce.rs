//! Debouncing model changes before translation.
//!
//! A burst of edits (a `kubectl apply` of many files, an editor writing a file twice) becomes
//! one translation: after a change, wait until no new change arrived for `delay`, but never
//! longer than [`MAX_DELAY_FACTOR`] × `delay` in total, so a steady trickle still converges.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::cache::SnapshotCache;
use crate::model::Model;

/// The longest a change waits, as a multiple of the debounce delay.
pub const MAX_DELAY_FACTOR: u32 = 10;

/// Feeds debounced models from `models` into `cache` until the sender is dropped or
/// `shutdown` flips.
pub async fn run(
    mut models: watch::Receiver<Arc<Model>>,
    cache: Arc<SnapshotCache>,
    delay: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = models.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
        let first = Instant::now();
        let max = delay * MAX_DELAY_FACTOR;
        loop {
            let remaining = max.saturating_sub(first.elapsed());
            if remaining.is_zero() {
                break;
            }
            match tokio::time::timeout(delay.min(remaining), models.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let model = models.borrow_and_update().clone();
        if let Err(error) = cache.set_model_seen_at(model, Some(first)) {
            tracing::error!(%error, "updating the snapshot cache");
        }
    }
}
