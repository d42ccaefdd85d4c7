//! The gateway's state: bots, the usage ledger and per-user budgets.
//!
//! Each is an enum with an in-memory variant, so that shared stores (Redis, PostgreSQL)
//! can be added as variants without touching the routes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::SystemTime;

use palisade::cost::budget::BudgetLayer;
use palisade::cost::{Day, Money, SinkError, Totals, UsageRecord, UsageSink};

use crate::config::DAILY_BUDGET;
use serde::Serialize;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A bot: the platform's own object, owned by one user.
#[derive(Debug, Clone, Serialize)]
pub struct Bot {
    /// `bot_` and 24 hex digits, all random: an id says nothing about other bots.
    pub id: String,
    /// The store's creation order (set by the store; never shown: it would count the
    /// platform's bots).
    #[serde(skip)]
    pub seq: u64,
    /// The owner (never shown to others: another user's bot is a 404).
    #[serde(skip)]
    pub owner: Arc<str>,
    /// Display name.
    pub name: String,
    /// The model it chats with.
    pub model: String,
    /// Its system prompt.
    pub system_prompt: String,
    /// Its `max_tokens`.
    pub max_tokens: u64,
    /// Its temperature.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
}

/// Where bots live.
#[derive(Debug)]
pub enum Bots {
    /// In this process.
    Memory(MemoryBots),
}

/// Bots in memory.
#[derive(Debug, Default)]
pub struct MemoryBots {
    bots: RwLock<BTreeMap<String, Bot>>,
    next: AtomicU64,
}

impl Bots {
    /// An empty in-memory store.
    pub fn memory() -> Self {
        Bots::Memory(MemoryBots::default())
    }

    /// Stores a new bot and returns it with its id.
    pub async fn create(&self, mut bot: Bot) -> Bot {
        match self {
            Bots::Memory(m) => {
                let mut map = m.bots.write().unwrap_or_else(PoisonError::into_inner);
                // 96 random bits: a clash is as good as impossible, and is drawn again.
                loop {
                    bot.id = format!("bot_{:024x}", rand::random::<u128>() >> 32);
                    if !map.contains_key(&bot.id) {
                        break;
                    }
                }
                bot.seq = m.next.fetch_add(1, Ordering::Relaxed);
                map.insert(bot.id.clone(), bot.clone());
                bot
            }
        }
    }

    /// The owner's bots, oldest first.
    pub async fn list(&self, owner: &str) -> Vec<Bot> {
        match self {
            Bots::Memory(m) => {
                let map = m.bots.read().unwrap_or_else(PoisonError::into_inner);
                let mut bots: Vec<Bot> = map
                    .values()
                    .filter(|b| &*b.owner == owner)
                    .cloned()
                    .collect();
                bots.sort_by_key(|b| b.seq);
                bots
            }
        }
    }

    /// The bot `id` if `owner` owns it.
    pub async fn get(&self, owner: &str, id: &str) -> Option<Bot> {
        match self {
            Bots::Memory(m) => {
                let map = m.bots.read().unwrap_or_else(PoisonError::into_inner);
                map.get(id).filter(|b| &*b.owner == owner).cloned()
            }
        }
    }

    /// Deletes the bot `id` if `owner` owns it; `true` when it was deleted.
    pub async fn delete(&self, owner: &str, id: &str) -> bool {
        match self {
            Bots::Memory(m) => {
                let mut map = m.bots.write().unwrap_or_else(PoisonError::into_inner);
                if map.get(id).is_some_and(|b| &*b.owner == owner) {
                    map.remove(id);
                    true
                } else {
                    false
                }
            }
        }
    }
}

/// A usage record as the gateway keeps it.
#[derive(Debug, Clone)]
pub struct LedgerEntry {
    /// The meter's record (with the fallback that answered, if any, in its
    /// [`fallback`](UsageRecord::fallback)).
    pub record: UsageRecord,
}

/// The usage ledger: the usage recorder's sink and the source of `/v1/usage`.
#[derive(Debug, Clone)]
pub enum Ledger {
    /// In this process.
    Memory(Arc<MemoryLedger>),
}

/// The in-memory ledger (bounded: the oldest records go first).
#[derive(Debug, Default)]
pub struct MemoryLedger {
    entries: Mutex<std::collections::VecDeque<LedgerEntry>>,
    evicted: AtomicU64,
    /// The latest time of a dropped record (written under `entries`' lock).
    dropped_until: Mutex<Option<SystemTime>>,
}

/// The most records the in-memory ledger keeps (about 50 MB).
const MAX_LEDGER_ENTRIES: usize = 100_000;

impl Ledger {
    /// An empty in-memory ledger.
    pub fn memory() -> Self {
        Ledger::Memory(Arc::new(MemoryLedger::default()))
    }

    /// The entries between `from` (inclusive) and `to` (exclusive) that `filter` keeps.
    pub fn entries(
        &self,
        from: SystemTime,
        to: SystemTime,
        filter: impl Fn(&LedgerEntry) -> bool,
    ) -> Vec<LedgerEntry> {
        match self {
            Ledger::Memory(m) => lock(&m.entries)
                .iter()
                .filter(|e| e.record.time >= from && e.record.time < to && filter(e))
                .cloned()
                .collect(),
        }
    }

    /// Whether a record from `from` on may have been dropped because the ledger was full:
    /// totals over a range from `from` then leave some out.
    pub fn dropped_since(&self, from: SystemTime) -> bool {
        match self {
            Ledger::Memory(m) => lock(&m.dropped_until).is_some_and(|t| t >= from),
        }
    }

    /// Records dropped because the in-memory ledger was full.
    pub fn evicted(&self) -> u64 {
        match self {
            Ledger::Memory(m) => m.evicted.load(Ordering::Relaxed),
        }
    }

    fn add(&self, batch: &[UsageRecord]) {
        match self {
            Ledger::Memory(m) => {
                let mut entries = lock(&m.entries);
                for record in batch {
                    if entries.len() >= MAX_LEDGER_ENTRIES
                        && let Some(dropped) = entries.pop_front()
                    {
                        m.evicted.fetch_add(1, Ordering::Relaxed);
                        let mut until = lock(&m.dropped_until);
                        if until.is_none_or(|t| t < dropped.record.time) {
                            *until = Some(dropped.record.time);
                        }
                    }
                    entries.push_back(LedgerEntry {
                        record: record.clone(),
                    });
                }
            }
        }
    }
}

impl UsageSink for Ledger {
    async fn record_batch(&self, batch: &[UsageRecord]) -> Result<(), SinkError> {
        self.add(batch);
        Ok(())
    }
}

/// The per-user daily budget as `/admin/budgets/{user}` sees it: palisade's
/// [`BudgetLayer`] (reserve-then-settle, on the upstream stacks) and its `daily` budget.
///
/// A user's own limit (`PUT /admin/budgets/{user}`) lives in the layer, so in this process;
/// with `REDIS_URL` it is also written to a Redis hash that every instance reads back
/// (at start-up and every `PALISADE_GATEWAY_BUDGET_SYNC_INTERVAL`).
#[derive(Debug, Clone)]
pub struct Budgets {
    layer: Option<BudgetLayer>,
    #[cfg(feature = "redis")]
    shared: Option<SharedLimits>,
}

/// The Redis hash of users' own daily limits (dollars, or `none`), shared by every
/// instance.
#[cfg(feature = "redis")]
#[derive(Clone)]
pub struct SharedLimits {
    conn: RedisConn,
}

/// A connection to one Redis server or to a Cluster.
#[cfg(feature = "redis")]
#[derive(Clone)]
pub enum RedisConn {
    /// One server.
    Single(redis::aio::ConnectionManager),
    /// A Cluster.
    Cluster(redis::cluster_async::ClusterConnection),
}

#[cfg(feature = "redis")]
impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("key", &SHARED_LIMITS_KEY)
            .finish()
    }
}

/// The hash's key (one slot in a Cluster).
#[cfg(feature = "redis")]
const SHARED_LIMITS_KEY: &str = "{palisade-gateway}:budget-limits";

#[cfg(feature = "redis")]
impl RedisConn {
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            RedisConn::Single(c) => cmd.query_async(&mut c.clone()).await,
            RedisConn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }
}

/// A user's budget as `/admin/budgets/{user}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetView {
    /// The user.
    pub user: String,
    /// The daily limit in dollars, or `null` for none.
    pub daily_limit_usd: Option<String>,
    /// Spent today (UTC), in dollars: settled usage.
    pub spent_today_usd: String,
    /// Held by requests in flight, in dollars.
    pub reserved_usd: String,
    /// Whether an admin set this limit (else it is the default).
    pub custom: bool,
}

impl Budgets {
    /// The budgets `layer` enforces (`None`: no budgets, as with the layers off).
    pub fn new(layer: Option<BudgetLayer>) -> Self {
        Self {
            layer,
            #[cfg(feature = "redis")]
            shared: None,
        }
    }

    /// Shares users' own limits through Redis: reads those already set now, then every
    /// `interval` on a background task.
    #[cfg(feature = "redis")]
    pub async fn share(&mut self, conn: RedisConn, interval: std::time::Duration) {
        let shared = SharedLimits { conn };
        self.shared = Some(shared.clone());
        let Some(layer) = self.layer.clone() else {
            return;
        };
        if let Err(e) = pull(&shared, &layer).await {
            tracing::warn!(error = %e, "budget limits: cannot read the shared limits from Redis yet");
        }
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = pull(&shared, &layer).await {
                    tracing::warn!(error = %e, "budget limits: cannot read the shared limits from Redis");
                }
            }
        });
    }

    /// The layer, to stack on the upstream clients.
    pub fn layer(&self) -> Option<&BudgetLayer> {
        self.layer.as_ref()
    }

    /// Sets `user`'s daily limit (`None`: unlimited): `Ok(false)` when no `daily` budget
    /// is configured, `Err` when the shared store (Redis) cannot take it (then nothing
    /// changed).
    pub async fn set(&self, user: &str, limit: Option<Money>) -> Result<bool, String> {
        let Some(layer) = &self.layer else {
            return Ok(false);
        };
        if layer.limit(DAILY_BUDGET, user).is_none() {
            return Ok(false);
        }
        #[cfg(feature = "redis")]
        if let Some(shared) = &self.shared {
            let value = limit.map_or_else(|| "none".to_owned(), Money::dollars_string);
            shared
                .conn
                .query::<()>(
                    redis::cmd("HSET")
                        .arg(SHARED_LIMITS_KEY)
                        .arg(user)
                        .arg(value),
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(layer.set_limit(DAILY_BUDGET, user, limit))
    }

    /// The view of `user`'s budget.
    pub fn view(&self, user: &str) -> BudgetView {
        let layer = self.layer.as_ref();
        let (limit, custom) = layer
            .and_then(|l| l.limit(DAILY_BUDGET, user))
            .unwrap_or((None, false));
        let (spent, reserved) = layer
            .and_then(|l| l.spend(DAILY_BUDGET, user))
            .unwrap_or((Money::ZERO, Money::ZERO));
        BudgetView {
            user: user.to_owned(),
            daily_limit_usd: limit.map(Money::dollars_string),
            spent_today_usd: spent.dollars_string(),
            reserved_usd: reserved.dollars_string(),
            custom,
        }
    }
}

/// Applies the shared limits to `layer`.
#[cfg(feature = "redis")]
async fn pull(shared: &SharedLimits, layer: &BudgetLayer) -> Result<(), String> {
    let all: std::collections::HashMap<String, String> = shared
        .conn
        .query(redis::cmd("HGETALL").arg(SHARED_LIMITS_KEY))
        .await
        .map_err(|e| e.to_string())?;
    for (user, value) in all {
        let limit = if value == "none" {
            None
        } else {
            match Money::parse_dollars(&value) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(user = %user, error = %e, "budget limits: a shared limit is not a dollar amount; skipped");
                    continue;
                }
            }
        };
        if layer.limit(DAILY_BUDGET, &user) != Some((limit, true)) {
            layer.set_limit(DAILY_BUDGET, &user, limit);
        }
    }
    Ok(())
}

/// Whether a fallback served `record`'s request: a fallback answered it, without an error.
/// `/v1/usage` (`fallbacks`) and the dashboard count the same requests by it; a fallback
/// that failed as well served nothing (it is still in `by_fallback`, with its error).
pub fn served_by_fallback(record: &UsageRecord) -> bool {
    record.fallback.is_some() && record.status < 400 && !record.completion.is_error()
}

/// Totals grouped for `/v1/usage`.
#[derive(Debug, Default, Serialize)]
pub struct UsageReport {
    /// Everything in range.
    pub total: Totals,
    /// By model.
    pub by_model: BTreeMap<String, Totals>,
    /// By UTC day (`YYYY-MM-DD`).
    pub by_day: BTreeMap<String, Totals>,
    /// By bot.
    pub by_bot: BTreeMap<String, Totals>,
    /// By conversation.
    pub by_conversation: BTreeMap<String, Totals>,
    /// Requests a fallback served (answered without an error).
    pub fallbacks: u64,
    /// Everything a fallback answered, by fallback (`model:claude-haiku-4-5`, ...), errors
    /// included.
    pub by_fallback: BTreeMap<String, Totals>,
}

impl UsageReport {
    /// Groups `entries`.
    pub fn of(entries: &[LedgerEntry]) -> Self {
        let mut r = UsageReport::default();
        for e in entries {
            let rec = &e.record;
            r.total.add(rec);
            let model = rec.model.clone().unwrap_or_else(|| "unknown".into());
            r.by_model.entry(model).or_default().add(rec);
            let d = Day::of(rec.time);
            r.by_day
                .entry(format!("{:04}-{:02}-{:02}", d.year, d.month, d.day))
                .or_default()
                .add(rec);
            if let Some(bot) = &rec.attribution.bot {
                r.by_bot.entry(bot.clone()).or_default().add(rec);
            }
            if let Some(c) = &rec.attribution.conversation {
                r.by_conversation.entry(c.clone()).or_default().add(rec);
            }
            if let Some(fallback) = &rec.fallback {
                if served_by_fallback(rec) {
                    r.fallbacks += 1;
                }
                r.by_fallback.entry(fallback.clone()).or_default().add(rec);
            }
        }
        r
    }
}
