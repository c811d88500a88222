//! Counters in Redis or Redis Cluster, shared by any number of ratelimit
//! instances (DESIGN.md §5, §9).
//!
//! Every window of a scope is one key, `clawgress:{scope}:<window>:<start>`,
//! expiring shortly after its window ends. The hash tag `{scope}` puts all
//! of a scope's windows in one Cluster slot, so the check-and-count script
//! below touches one node and stays atomic there.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use tokio::sync::Mutex;

use crate::store::{window_start, CounterStore, Limit, StoreError, WindowStatus};

/// Check every window, then count in all of them or none.
///
/// Why a script: Redis runs it as one step, so no other ratelimit instance
/// can run between the GETs and the INCRBYs. Done from the client as GET
/// then INCR, two instances could both see "one left" and both admit — over
/// the limit. MULTI/EXEC cannot branch on what it read; WATCH would retry
/// under contention, which is exactly when limits matter.
///
/// KEYS[i]: window counters. ARGV[1]: hits. ARGV[1+i]: the limit of
/// KEYS[i]. ARGV[1+n+i]: its TTL in ms. Returns {fits, count_1..count_n}.
const ACQUIRE: &str = r#"
local hits = tonumber(ARGV[1])
local n = #KEYS
local counts = {}
local fits = 1
for i = 1, n do
  counts[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  if counts[i] + hits > tonumber(ARGV[1 + i]) then fits = 0 end
end
if fits == 1 then
  for i = 1, n do
    counts[i] = redis.call('INCRBY', KEYS[i], hits)
    if counts[i] == hits then redis.call('PEXPIRE', KEYS[i], ARGV[1 + n + i]) end
  end
end
table.insert(counts, 1, fits)
return counts
"#;

/// Undo an admitted acquire: take `hits` back from each window that still
/// exists (an expired window has nothing to undo).
const RELEASE: &str = r#"
local hits = tonumber(ARGV[1])
for i = 1, #KEYS do
  local c = tonumber(redis.call('GET', KEYS[i]) or '0')
  if c > 0 then
    redis.call('DECRBY', KEYS[i], math.min(c, hits))
  end
end
return {1}
"#;

/// Per-call bound: Envoy waits 250 ms for the whole RLS answer.
const CALL_TIMEOUT: Duration = Duration::from_millis(200);

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

enum Target {
    Single(redis::Client),
    Cluster(Box<redis::cluster::ClusterClient>),
}

/// A Redis-backed [`CounterStore`]. Connects lazily and reconnects by
/// itself: Redis being away fails requests (closed), it never stops the
/// service, and when Redis returns requests are admitted again.
pub struct RedisStore {
    target: Target,
    conn: Mutex<Option<Conn>>,
    acquire: redis::Script,
    release: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisStore")
    }
}

impl RedisStore {
    /// `redis://host:port[/db]` or `redis-cluster://h1:p1,h2:p2,...`.
    pub fn new(url: &str) -> Result<RedisStore, StoreError> {
        let target = if let Some(nodes) = url.strip_prefix("redis-cluster://") {
            let nodes: Vec<String> = nodes
                .split(',')
                .filter(|n| !n.is_empty())
                .map(|n| format!("redis://{n}"))
                .collect();
            if nodes.is_empty() {
                return Err(StoreError(
                    "redis-cluster:// needs at least one host:port".into(),
                ));
            }
            Target::Cluster(Box::new(
                redis::cluster::ClusterClient::builder(nodes)
                    .connection_timeout(CALL_TIMEOUT)
                    .response_timeout(CALL_TIMEOUT)
                    .build()
                    .map_err(|e| StoreError(format!("bad cluster URL: {e}")))?,
            ))
        } else if url.starts_with("redis://") {
            Target::Single(
                redis::Client::open(url).map_err(|e| StoreError(format!("bad Redis URL: {e}")))?,
            )
        } else {
            return Err(StoreError(format!(
                "{url:?} is not redis://host:port or redis-cluster://h1:p1,h2:p2"
            )));
        };
        Ok(RedisStore {
            target,
            conn: Mutex::new(None),
            acquire: redis::Script::new(ACQUIRE),
            release: redis::Script::new(RELEASE),
        })
    }

    async fn connection(&self) -> Result<Conn, StoreError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let conn = match &self.target {
            Target::Single(client) => {
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CALL_TIMEOUT))
                    .set_response_timeout(Some(CALL_TIMEOUT));
                Conn::Single(
                    tokio::time::timeout(
                        CALL_TIMEOUT,
                        ConnectionManager::new_with_config(client.clone(), cfg),
                    )
                    .await
                    .map_err(|_| StoreError("redis connect timed out".into()))?
                    .map_err(|e| StoreError(format!("redis connect: {e}")))?,
                )
            }
            Target::Cluster(client) => Conn::Cluster(
                tokio::time::timeout(CALL_TIMEOUT, client.get_async_connection())
                    .await
                    .map_err(|_| StoreError("redis cluster connect timed out".into()))?
                    .map_err(|e| StoreError(format!("redis cluster connect: {e}")))?,
            ),
        };
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn run(
        &self,
        script: &redis::Script,
        keys: &[String],
        args: &[u64],
    ) -> Result<Vec<i64>, StoreError> {
        let conn = self.connection().await?;
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(*a);
        }
        let call = async {
            match conn {
                Conn::Single(mut c) => inv.invoke_async::<Vec<i64>>(&mut c).await,
                Conn::Cluster(mut c) => inv.invoke_async::<Vec<i64>>(&mut c).await,
            }
        };
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError(format!("redis: {e}"))),
            Err(_) => Err(StoreError("redis call timed out".into())),
        }
    }
}

/// Scope ids come from config and identity claims; braces would break the
/// hash tag, so they are escaped.
fn key(scope: &str, l: &Limit, now_ms: u64) -> String {
    let scope = scope
        .replace('%', "%25")
        .replace('{', "%7B")
        .replace('}', "%7D");
    let w = match l.window {
        crate::store::Window::Second => "s",
        crate::store::Window::Minute => "m",
    };
    format!(
        "clawgress:{{{scope}}}:{w}:{}",
        window_start(l.window, now_ms)
    )
}

#[async_trait::async_trait]
impl CounterStore for RedisStore {
    async fn acquire(
        &self,
        scope: &str,
        limits: &[Limit],
        hits: u32,
        now_ms: u64,
    ) -> Result<Vec<WindowStatus>, StoreError> {
        let keys: Vec<String> = limits.iter().map(|l| key(scope, l, now_ms)).collect();
        let mut args = vec![u64::from(hits)];
        args.extend(limits.iter().map(|l| u64::from(l.max)));
        // Keep a window's key a little past its end: clocks of instances differ.
        args.extend(limits.iter().map(|l| l.window.millis() + 2_000));
        let out = self.run(&self.acquire, &keys, &args).await?;
        if out.len() != limits.len() + 1 {
            return Err(StoreError(format!("unexpected script reply {out:?}")));
        }
        let fits = out[0] == 1;
        Ok(limits
            .iter()
            .zip(&out[1..])
            .map(|(l, &count)| {
                let count = u32::try_from(count.max(0)).unwrap_or(u32::MAX);
                let start = window_start(l.window, now_ms);
                WindowStatus {
                    limit: *l,
                    count,
                    remaining: l.max.saturating_sub(count),
                    reset_ms: start + l.window.millis() - now_ms,
                    over: if fits {
                        false
                    } else {
                        u64::from(count) + u64::from(hits) > u64::from(l.max)
                    },
                }
            })
            .collect())
    }

    async fn release(
        &self,
        scope: &str,
        limits: &[Limit],
        hits: u32,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let keys: Vec<String> = limits.iter().map(|l| key(scope, l, now_ms)).collect();
        self.run(&self.release, &keys, &[u64::from(hits)]).await?;
        Ok(())
    }
}
