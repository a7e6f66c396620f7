//! Shutdown, handed to every task as a value: each wait has an arm for it.
//!
//! Our own small signal rather than a tokio `watch` channel: a connection task waits on it in
//! every pass of its loop, and `watch`'s wait future (160 bytes, rebuilt each pass) sat in the
//! state of every idle connection. Here waiting is a poll on the listener itself: the listener
//! keeps its task's waker in one slot of a shared table, registered once, and the trigger wakes
//! them all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// What the trigger and every listener share.
#[derive(Debug, Default)]
struct State {
    /// Set once, by the trigger (or its drop); never cleared.
    signalled: AtomicBool,
    /// The wakers of the listeners that are waiting, by slot; freed slots are reused.
    waiters: Mutex<Waiters>,
}

#[derive(Debug, Default)]
struct Waiters {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl State {
    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        // Every critical section is a push, a take or a store: a panic inside cannot leave it
        // half done.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn signal(&self) {
        self.signalled.store(true, Ordering::SeqCst);
        // Take the wakers out first: waking under the lock would let a woken listener on the
        // other core block on it.
        let wakers: Vec<Waker> = {
            let mut w = self.waiters();
            w.slots.iter_mut().filter_map(Option::take).collect()
        };
        for w in wakers {
            w.wake();
        }
    }
}

/// Triggers the shutdown: [`Trigger::send`]`(true)`, or drop it.
#[derive(Debug)]
pub struct Trigger {
    state: Arc<State>,
}

impl Trigger {
    /// Signals shutdown when `stop` is true (false does nothing: the signal cannot be taken
    /// back). Never fails; the `Result` keeps the shape of a channel send for callers.
    pub fn send(&self, stop: bool) -> Result<(), std::convert::Infallible> {
        if stop {
            self.state.signal();
        }
        Ok(())
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        self.state.signal();
    }
}

/// Listens for the broker-wide shutdown signal. Each clone listens on its own; a listener is
/// meant to be polled from one task (it keeps that task's waker, and re-registers only when
/// polled with another).
#[derive(Debug)]
pub struct Shutdown {
    state: Arc<State>,
    /// This listener's slot in `State::waiters` and the waker stored there, once it waited.
    registered: Option<(usize, Waker)>,
}

impl Clone for Shutdown {
    fn clone(&self) -> Shutdown {
        Shutdown {
            state: self.state.clone(),
            registered: None,
        }
    }
}

impl Shutdown {
    /// A listener and the trigger that fires it.
    pub fn new() -> (Trigger, Shutdown) {
        let state = Arc::new(State::default());
        (
            Trigger {
                state: state.clone(),
            },
            Shutdown {
                state,
                registered: None,
            },
        )
    }

    /// Has shutdown been signalled?
    pub fn is_shutdown(&self) -> bool {
        self.state.signalled.load(Ordering::SeqCst)
    }

    /// Ready once shutdown is signalled; otherwise the task of `cx` is woken when it is.
    pub fn poll_signalled(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_shutdown() {
            return Poll::Ready(());
        }
        match &mut self.registered {
            // The usual case, every pass of a connection's loop: no lock.
            Some((_, w)) if w.will_wake(cx.waker()) => {}
            Some((slot, w)) => {
                *w = cx.waker().clone();
                let mut waiters = self.state.waiters();
                if let Some(s) = waiters.slots.get_mut(*slot) {
                    *s = Some(w.clone());
                }
            }
            None => {
                let w = cx.waker().clone();
                let mut waiters = self.state.waiters();
                let slot = match waiters.free.pop() {
                    Some(slot) => {
                        waiters.slots[slot] = Some(w.clone());
                        slot
                    }
                    None => {
                        waiters.slots.push(Some(w.clone()));
                        waiters.slots.len() - 1
                    }
                };
                drop(waiters);
                self.registered = Some((slot, w));
            }
        }
        // Registered before this second look: a signal after the first look either finds
        // the waker in the table or is seen here.
        if self.is_shutdown() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Resolves once shutdown is signalled (or the trigger is gone).
    pub async fn recv(&mut self) {
        std::future::poll_fn(|cx| self.poll_signalled(cx)).await
    }
}

impl Drop for Shutdown {
    fn drop(&mut self) {
        if let Some((slot, _)) = self.registered.take() {
            let mut waiters = self.state.waiters();
            if let Some(s) = waiters.slots.get_mut(slot) {
                *s = None;
                waiters.free.push(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_waiting_listener_wakes_and_slots_are_reused() {
        let (trigger, shutdown) = Shutdown::new();
        let mut waiting = Vec::new();
        for _ in 0..3 {
            let mut s = shutdown.clone();
            waiting.push(tokio::spawn(async move { s.recv().await }));
        }
        tokio::task::yield_now().await;
        assert_eq!(shutdown.state.waiters().slots.len(), 3, "three tasks wait");
        // One that waited and went frees its slot for the next.
        let mut cx = Context::from_waker(Waker::noop());
        let mut gone = shutdown.clone();
        assert!(gone.poll_signalled(&mut cx).is_pending());
        assert_eq!(shutdown.state.waiters().slots.len(), 4);
        drop(gone);
        let mut again = shutdown.clone();
        assert!(again.poll_signalled(&mut cx).is_pending());
        assert_eq!(
            shutdown.state.waiters().slots.len(),
            4,
            "the freed slot is reused"
        );

        assert!(!shutdown.is_shutdown());
        trigger.send(false).unwrap_or_else(|e| match e {});
        assert!(!shutdown.is_shutdown());
        trigger.send(true).unwrap_or_else(|e| match e {});
        for w in waiting {
            tokio::time::timeout(std::time::Duration::from_secs(5), w)
                .await
                .expect("woken")
                .expect("task");
        }
        assert!(again.poll_signalled(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn dropping_the_trigger_signals() {
        let (trigger, mut shutdown) = Shutdown::new();
        let waiter = tokio::spawn(async move { shutdown.recv().await });
        tokio::task::yield_now().await;
        drop(trigger);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
    }
}
