//! Counter stores: where request counts per agent and window live.
//!
//! Windows are fixed and aligned to the Unix epoch (a second, a minute), so
//! every instance sharing a store agrees on where a window starts without
//! talking to the others.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Second,
    Minute,
}

impl Window {
    pub fn millis(self) -> u64 {
        match self {
            Window::Second => 1_000,
            Window::Minute => 60_000,
        }
    }
}

/// Where the window containing `now_ms` starts.
pub fn window_start(w: Window, now_ms: u64) -> u64 {
    now_ms - now_ms % w.millis()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub window: Window,
    pub max: u32,
}

/// One window's state after a request was counted (or refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowStatus {
    pub limit: Limit,
    /// Requests admitted in this window so far.
    pub count: u32,
    pub remaining: u32,
    /// Milliseconds until this window ends.
    pub reset_ms: u64,
    /// This request did not fit in this window.
    pub over: bool,
}

/// A store failure. Transient: the same call may succeed later.
#[derive(Debug, Clone, thiserror::Error)]
#[error("counter store unavailable: {0}")]
pub struct StoreError(pub String);

/// Atomic check-and-count across all windows of one scope (an agent, a
/// team or a project: `agent:build-bot`, `team:infra`).
///
/// `acquire` admits `hits` only if every window has room for all of them,
/// and then counts them in every window; otherwise it counts nothing. Doing
/// the check and the increment as one step is what keeps the admitted count
/// at or under the limit however many instances race (DESIGN.md §5).
#[async_trait::async_trait]
pub trait CounterStore: Send + Sync {
    async fn acquire(
        &self,
        scope: &str,
        limits: &[Limit],
        hits: u32,
        now_ms: u64,
    ) -> Result<Vec<WindowStatus>, StoreError>;

    /// Take back an admitted `acquire` (same arguments) when a later scope
    /// refused the request, so it does not count where it was not served.
    async fn release(
        &self,
        scope: &str,
        limits: &[Limit],
        hits: u32,
        now_ms: u64,
    ) -> Result<(), StoreError>;
}

/// A scope's windows: (window, window start, count).
type Slots = Vec<(Window, u64, u32)>;
type Counters = HashMap<String, Slots>;

/// In-process counters for one node (the `clawgress up` default).
#[derive(Debug, Default)]
pub struct MemoryStore {
    // scope -> per window: (window, window start, count). Looked up by &str,
    // so a request allocates nothing once its scope has been seen. One lock:
    // the critical section is a few map operations, shorter than any
    // contention it causes.
    counters: Mutex<Counters>,
}

impl MemoryStore {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Counters>, StoreError> {
        self.counters
            .lock()
            .map_err(|_| StoreError("memory store lock poisoned".into()))
    }
}

/// The current count of `w` in `slots` for the window starting at `start`.
fn current(slots: &[(Window, u64, u32)], w: Window, start: u64) -> u32 {
    slots
        .iter()
        .find(|(sw, s, _)| *sw == w && *s == start)
        .map(|(_, _, c)| *c)
        .unwrap_or(0)
}

#[async_trait::async_trait]
impl CounterStore for MemoryStore {
    async fn acquire(
        &self,
        scope: &str,
        limits: &[Limit],
        hits: u32,
        now_ms: u64,
    ) -> Result<Vec<WindowStatus>, StoreError> {
        let mut map = self.lock()?;
        if !map.contains_key(scope) {
            map.insert(scope.to_string(), Vec::with_capacity(limits.len()));
        }
        let slots = map
            .get_mut(scope)
            .ok_or_else(|| StoreError("memory store lost a scope".into()))?;
        let fits = limits.iter().all(|l| {
            let c = current(slots, l.window, window_start(l.window, now_ms));
            u64::from(c) + u64::from(hits) <= u64::from(l.max)
        });
        let mut out = Vec::with_capacity(limits.len());
        for l in limits {
            let start = window_start(l.window, now_ms);
            let mut count = current(slots, l.window, start);
            let over = u64::from(count) + u64::from(hits) > u64::from(l.max);
            if fits {
                count = count.saturating_add(hits);
                match slots.iter_mut().find(|(w, _, _)| *w == l.window) {
                    Some(slot) => *slot = (l.window, start, count),
                    None => slots.push((l.window, start, count)),
                }
            }
            out.push(WindowStatus {
                limit: *l,
                count,
                remaining: l.max.saturating_sub(count),
                reset_ms: start + l.window.millis() - now_ms,
                over,
            });
        }
        Ok(out)
    }

    async fn release(
        &self,
        scope: &str,
        limits: &[Limit],
        hits: u32,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut map = self.lock()?;
        if let Some(slots) = map.get_mut(scope) {
            for l in limits {
                let start = window_start(l.window, now_ms);
                for (w, s, c) in slots.iter_mut() {
                    if *w == l.window && *s == start {
                        *c = c.saturating_sub(hits);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_acquires_never_exceed_the_limit() {
        let store = Arc::new(MemoryStore::default());
        let limits = [Limit {
            window: Window::Second,
            max: 50,
        }];
        let now = 1_700_000_000_000;
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut admitted = 0u32;
                for _ in 0..10 {
                    let st = s.acquire("a", &limits, 1, now).await.expect("store");
                    admitted += u32::from(!st[0].over);
                }
                admitted
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("task");
        }
        assert_eq!(total, 50, "exactly the limit is admitted out of 640 tries");
    }
}
