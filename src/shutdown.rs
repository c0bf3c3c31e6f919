//! One shutdown signal that every stage listens to.
//!
//! SIGINT or SIGTERM (or [`Shutdown::trigger`]) sets it once. Sources check it between
//! batches and stop fetching; the stages after them drain what is already in their channels,
//! so an interrupted replay still ends with a complete report and score file.

use std::sync::Arc;

use tokio::sync::watch;

/// A cloneable, set-once shutdown flag.
#[derive(Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
    /// When it was first triggered: the grace periods after it count from there.
    at: Arc<std::sync::OnceLock<std::time::Instant>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            tx: Arc::new(watch::Sender::new(false)),
            at: Arc::default(),
        }
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every stage to stop taking new input.
    pub fn trigger(&self) {
        self.at.get_or_init(std::time::Instant::now);
        self.tx.send_replace(true);
    }

    /// How long ago the shutdown was first asked for (None before).
    pub fn since(&self) -> Option<std::time::Duration> {
        self.at.get().map(|t| t.elapsed())
    }

    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Sleeps on a blocking thread for `d`, waking within 50 ms of a shutdown; false when
    /// the shutdown came first (a paced replay may wait for many minutes).
    pub fn sleep(&self, d: std::time::Duration) -> bool {
        let end = std::time::Instant::now() + d;
        loop {
            if self.is_triggered() {
                return false;
            }
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(std::time::Duration::from_millis(50)));
        }
    }

    /// Triggers on SIGINT or SIGTERM (spawned on the current tokio runtime).
    pub fn listen_for_signals(&self) {
        let s = self.clone();
        tokio::spawn(async move {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::warn!("cannot listen for SIGTERM: {e}");
                            let _ = ctrl_c.await;
                            s.trigger();
                            return;
                        }
                    };
                tokio::select! {
                    _ = ctrl_c => tracing::info!("SIGINT: stopping intake, draining"),
                    _ = term.recv() => tracing::info!("SIGTERM: stopping intake, draining"),
                }
            }
            #[cfg(not(unix))]
            let _ = ctrl_c.await;
            s.trigger();
        });
    }
}
