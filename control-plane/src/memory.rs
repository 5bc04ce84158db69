//! Handing freed memory back to the system.
//!
//! A burst of pushes (every proxy connecting at once, or a change to a resource every proxy
//! holds) encodes one response per proxy at the same time; once they are sent that memory is
//! free, but glibc keeps freed heap memory that is not at the top of a heap, so the process
//! would stay at its peak. [`run`] calls `malloc_trim` once pushes have been quiet for a
//! moment.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::Metrics;

/// How long pushes must have been quiet before memory is trimmed.
pub const QUIET: Duration = Duration::from_secs(2);

/// Trims the heap after each burst of pushes, until shutdown.
pub async fn run(metrics: Arc<Metrics>, mut shutdown: watch::Receiver<bool>) {
    let total = |m: &Metrics| -> u64 { m.pushes.iter().map(|c| c.load(Ordering::Relaxed)).sum() };
    let mut seen = total(&metrics);
    let mut dirty = true;
    let mut tick = tokio::time::interval(QUIET);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = total(&metrics);
        if now != seen {
            seen = now;
            dirty = true;
        } else if dirty {
            dirty = false;
            release_unused();
        }
    }
}

/// Returns the heap's free memory to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_unused() {
    // SAFETY: malloc_trim only walks glibc's own heap structures; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Returns the heap's free memory to the system (nothing to do off glibc).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_unused() {}
