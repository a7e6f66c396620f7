//! Shutdown, handed to every task as a value: each `select!` has an arm for it.

use tokio::sync::watch;

/// Listens for the broker-wide shutdown signal.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    /// A listener and the sender that triggers it (send `true`, or drop the sender).
    pub fn new() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown { rx })
    }

    /// Has shutdown been signalled?
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown is signalled (or the sender is gone).
    pub async fn recv(&mut self) {
        // An error means the sender was dropped, which also means "stop".
        let _ = self.rx.wait_for(|v| *v).await;
    }
}
