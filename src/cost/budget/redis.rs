//! [`RedisBudgetStore`]: budget accounts shared by every instance through Redis (feature
//! `redis`).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use redis::Script;
use redis::aio::ConnectionLike;

use super::Period;
use super::layer::Settlement;
use super::store::{BoxFuture, BudgetStore, BudgetStoreError, Charge, Crossing, Hold, Reserve};
use crate::cost::pricing::Money;
use crate::redis_batch::{self, Answer, BatchScript, Batchers, Kind};

/// One script for reservations and settlements, alone or in batches.
static SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("money.lua"),
        "\n",
        include_str!("period.lua"),
        "\n",
        include_str!("reserve.lua"),
        "\n",
        include_str!("settle.lua"),
        "\n",
        include_str!("calls.lua"),
    ))
});

/// Budget accounts in Redis (or Redis Cluster): each reservation and each settlement is
/// one script call, on Redis's own clock, all or nothing across the request's budgets.
///
/// - Calls are batched: a call made while two are in flight on the connection waits for
///   one to end and goes with the others waiting, reservations and settlements alike, as
///   one script call that runs each of them in order, exactly as it would alone (one
///   `TIME` serves the batch). Under no load nothing waits; under load one round trip
///   serves many requests. A batch that fails fails each of its calls (the layer then
///   follows its failure mode); a call that fails inside a batch fails alone.
///   [`RedisBudgetStore::batched_calls`] counts the calls that went in a batch.
/// - A settlement is sent even when the future [`BudgetStore::settle`] returned is
///   dropped: it runs on a task of the current tokio runtime or, settled on a thread
///   outside any, of the runtime the store was made on. (A store made outside a runtime
///   sends it there only while the future is polled.) A reservation still waiting when its
///   caller is gone is not sent.
/// - Keys are `palisade:budget:{<tag>}:<budget>:<subject>` (a `%` or `:` in either
///   written `%25` or `%3A`, see [`RedisBudgetStore::key`]), every one with the same hash
///   tag (`budget` by default), so a request's accounts, and every call of a batch, sit in
///   one Cluster slot and one script can check them together. Budgets are a few keys per
///   user: one slot carries them; give each layer its own tag to spread several.
/// - Each account is a hash that expires a day after its period could matter, and not
///   before the end of any hold it keeps.
/// - What a request reserves is held for a while, not for ever: for at least
///   [`hold_ttl`](RedisBudgetStore::hold_ttl) (15 minutes by default) and at most twice
///   that, then it frees itself. A reservation whose answer never reached the gateway (a
///   response timeout, a connection dropped after the call was sent) and the reservations
///   of a gateway that crashed or was stopped between reservation and settlement thus
///   hold nothing for long. A request that outlives its hold no longer holds money
///   against others; its actual cost is still charged when it settles. Accounts written
///   by earlier versions keep their reserved amount in the field `r`: it still counts,
///   and drains as the requests of the older instances settle, so a rolling upgrade
///   neither frees nor counts twice what is held. Older instances read `r` alone, though:
///   until the last is replaced, what they admit does not count the holds of newer ones,
///   so the budget may be overspent by what those hold meanwhile.
/// - Amounts are kept and compared exactly, as `MemoryBudgetStore` does, for any amount
///   [`Money`] holds: the scripts store pico-dollars as decimal strings and compute on
///   them digit by digit, never through Lua's doubles (exact only below about $9,007).
/// - When Redis fails, the layer follows its failure mode (`fail_open`): 503 by default.
///
/// ```no_run
/// use palisade::cost::budget::{Budget, BudgetLayer, Period, RedisBudgetStore, Scope};
/// use palisade::cost::Money;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let client = redis::Client::open("redis://127.0.0.1:6379/").unwrap();
/// let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
/// let layer = BudgetLayer::builder()
///     .budget(Budget::new("daily", Scope::User, Period::Day, Money::parse_dollars("5").unwrap()))
///     .store(RedisBudgetStore::new(conn))
///     .build()
///     .unwrap();
/// # drop(layer);
/// # }
/// ```
pub struct RedisBudgetStore<C> {
    link: Arc<Link<C>>,
    tag: Arc<str>,
    hold_ms: u64,
}

/// The default of [`RedisBudgetStore::hold_ttl`].
const HOLD_TTL: Duration = Duration::from_secs(15 * 60);

/// The longest hold (2^40 ms, about 35 years): every time the scripts compute from it
/// stays exact in Lua's doubles.
const LONGEST_HOLD_MS: u64 = 1 << 40;

/// The connection and the calls waiting for it.
struct Link<C> {
    conn: C,
    batchers: Batchers<redis::Value>,
    batched: AtomicU64,
}

impl<C> fmt::Debug for RedisBudgetStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBudgetStore")
            .field("tag", &self.tag)
            .field("hold_ttl", &Duration::from_millis(self.hold_ms))
            .finish_non_exhaustive()
    }
}

impl<C> RedisBudgetStore<C> {
    /// A store over `conn` (a `ConnectionManager`, or a cluster connection).
    pub fn new(conn: C) -> Self {
        Self {
            link: Arc::new(Link {
                conn,
                // every key carries the store's hash tag: one slot, on a Cluster too
                batchers: Batchers::new(false),
                batched: AtomicU64::new(0),
            }),
            tag: "budget".into(),
            hold_ms: u64::try_from(HOLD_TTL.as_millis()).unwrap_or(LONGEST_HOLD_MS),
        }
    }

    /// How long a reservation holds its amount at least (default 15 minutes; at most
    /// twice this, then it frees itself, settled or not). Make it longer than any request
    /// may take: a request that outlives its hold no longer holds money against others,
    /// though its actual cost is still charged when it settles. Durations are counted in
    /// whole milliseconds, from 1 ms to about 35 years.
    #[must_use]
    pub fn hold_ttl(mut self, ttl: Duration) -> Self {
        self.hold_ms = u64::try_from(ttl.as_millis())
            .unwrap_or(LONGEST_HOLD_MS)
            .clamp(1, LONGEST_HOLD_MS);
        self
    }

    /// Uses `tag` as the keys' hash tag (default `budget`; an empty tag keeps the default,
    /// since Redis Cluster ignores an empty `{}`).
    #[must_use]
    pub fn hash_tag(mut self, tag: &str) -> Self {
        let tag = tag.replace(['{', '}'], "");
        if !tag.is_empty() {
            self.tag = tag.into();
        }
        self
    }

    /// The Redis key of an account. A `%` or `:` in the budget's name or the subject is
    /// written `%25` or `%3A`, so that no two accounts share a key (`daily` of `vip:ann`
    /// and `daily:vip` of `ann`); other names are kept as they are.
    pub fn key(&self, charge: &Charge) -> String {
        fn part(s: &str) -> std::borrow::Cow<'_, str> {
            if s.contains(['%', ':']) {
                s.replace('%', "%25").replace(':', "%3A").into()
            } else {
                s.into()
            }
        }
        format!(
            "palisade:budget:{{{}}}:{}:{}",
            self.tag,
            part(&charge.budget.name),
            part(&charge.subject)
        )
    }

    /// Calls (reservations and settlements) that went to Redis in a batch with others,
    /// since the store was made.
    pub fn batched_calls(&self) -> u64 {
        self.link.batched.load(Ordering::Relaxed)
    }

    /// A script call of mode `mode` on the accounts of `charges`; its arguments follow.
    fn call(&self, charges: &[Charge], mode: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(SCRIPT.get_hash()).arg(charges.len());
        for c in charges {
            cmd.arg(self.key(c));
        }
        cmd.arg(mode);
        cmd
    }

    /// The script call settling `reserved` with `actual` on `charges`, granted in `hold`.
    fn settle_command(
        &self,
        charges: &[Charge],
        hold: Hold,
        reserved: Money,
        actual: Money,
    ) -> redis::Cmd {
        let mut cmd = self.call(charges, "s");
        cmd.arg(reserved.picos().to_string())
            .arg(actual.picos().to_string());
        match hold.get() {
            0 => cmd.arg("-"),
            until => cmd.arg(until),
        };
        for c in charges.iter() {
            let (kind, window, ttl) = shape(c.budget.period);
            let thresholds: Vec<String> = c.budget.thresholds.iter().map(u16::to_string).collect();
            cmd.arg(c.budget.limit.picos().to_string())
                .arg(kind)
                .arg(window)
                .arg(ttl)
                .arg(if thresholds.is_empty() {
                    "-".to_owned()
                } else {
                    thresholds.join(",")
                });
        }
        cmd
    }
}

impl<C> BatchScript for Link<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    type Item = redis::Value;

    fn batchers(&self) -> &Batchers<redis::Value> {
        &self.batchers
    }

    fn hash(&self) -> &str {
        SCRIPT.get_hash()
    }

    fn eval(
        &self,
        cmd: &redis::Cmd,
    ) -> impl Future<Output = redis::RedisResult<Vec<redis::Value>>> + Send {
        let mut conn = self.conn.clone();
        async move { redis_batch::eval_loading(&mut conn, &SCRIPT, cmd).await }
    }

    fn length(item: &redis::Value) -> Option<i64> {
        match item {
            redis::Value::Int(n) => Some(*n),
            _ => None,
        }
    }

    fn batched(&self, calls: usize) {
        self.batched
            .fetch_add(u64::try_from(calls).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

fn shape(period: Period) -> (&'static str, u64, u64) {
    const DAY: u64 = 86_400_000;
    match period {
        Period::Day => ("d", 0, 2 * DAY),
        Period::Month => ("m", 0, 32 * DAY),
        Period::Rolling(w) => {
            // at most 2^62 ms (146 million years): its expiry (a day more, from now) is
            // one Redis can set, and every amount of time the script computes fits an i64
            const LONGEST: u64 = 1 << 62;
            let w = u64::try_from(w.as_millis()).map_or(LONGEST, |w| w.min(LONGEST));
            ("r", w, w + DAY)
        }
    }
}

/// An amount the scripts returned (a decimal string); one past what `Money` holds (a sum
/// of reservations can be) saturates, as `MemoryBudgetStore` does.
fn picos(text: &str) -> Money {
    match text.parse::<u128>() {
        Ok(n) => Money::from_picos(n),
        Err(_) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
            Money::from_picos(u128::MAX)
        }
        Err(_) => Money::ZERO,
    }
}

impl<C> BudgetStore for RedisBudgetStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn reserve<'a>(
        &'a self,
        charges: &'a [Charge],
        amount: Money,
        _now: SystemTime,
    ) -> BoxFuture<'a, Result<Reserve, BudgetStoreError>> {
        let mut cmd = self.call(charges, "r");
        cmd.arg(amount.picos().to_string()).arg(self.hold_ms);
        for c in charges {
            let (kind, window, ttl) = shape(c.budget.period);
            cmd.arg(c.budget.limit.picos().to_string())
                .arg(kind)
                .arg(window)
                .arg(ttl);
        }
        let call = redis_batch::submit(Arc::clone(&self.link), cmd, Kind::Decision);
        Box::pin(async move {
            let reply = call.await.map_err(BudgetStoreError)?;
            let int = |v: Option<&redis::Value>| -> i64 {
                match v {
                    Some(redis::Value::Int(n)) => *n,
                    _ => 0,
                }
            };
            if int(reply.first()) == 0 {
                // the time the hold expires: never 0, which would settle from `r`
                let until = u64::try_from(int(reply.get(1))).unwrap_or(0);
                return Ok(Reserve::Granted(Hold::new(until)));
            }
            let spent = match reply.get(2) {
                Some(redis::Value::BulkString(b)) => picos(&String::from_utf8_lossy(b)),
                _ => Money::ZERO,
            };
            let retry = int(reply.get(3));
            Ok(Reserve::Refused {
                index: usize::try_from(int(reply.get(1))).unwrap_or(0),
                spent,
                retry_after: u64::try_from(retry).ok().map(Duration::from_millis),
            })
        })
    }

    /// Settles a reservation made without a hold (by an earlier version, whose amount is
    /// in the field `r`); the layer settles through [`BudgetStore::settle_hold`].
    fn settle(
        &self,
        charges: Arc<[Charge]>,
        reserved: Money,
        actual: Money,
        now: SystemTime,
    ) -> BoxFuture<'static, Result<Vec<Crossing>, BudgetStoreError>> {
        self.settle_hold(charges, Hold::NONE, reserved, actual, now)
    }

    fn settle_hold(
        &self,
        charges: Arc<[Charge]>,
        hold: Hold,
        reserved: Money,
        actual: Money,
        _now: SystemTime,
    ) -> BoxFuture<'static, Result<Vec<Crossing>, BudgetStoreError>> {
        let cmd = self.settle_command(&charges, hold, reserved, actual);
        let call = redis_batch::submit(Arc::clone(&self.link), cmd, Kind::Settlement);
        // Sent from a task of its own, so that it lands even when this future is dropped:
        // what it releases would stay reserved otherwise.
        // Outside a runtime, the task runs on the one the store was made on.
        let call: BoxFuture<'static, Answer<redis::Value>> = match self.link.batchers.runtime() {
            Some(rt) => {
                let task = rt.spawn(call);
                Box::pin(async move {
                    task.await
                        .unwrap_or_else(|e| Err(format!("the settlement's task failed: {e}")))
                })
            }
            None => Box::pin(call),
        };
        Box::pin(async move { crossings(call.await) })
    }

    /// Reports from the settlement's own task (the one that makes it land even when
    /// nobody waits for it): one task a settlement.
    fn settle_and_report(
        &self,
        charges: Arc<[Charge]>,
        hold: Hold,
        reserved: Money,
        actual: Money,
        now: SystemTime,
        report: Settlement,
    ) {
        let Some(rt) = self.link.batchers.runtime() else {
            report.after(self.settle_hold(charges, hold, reserved, actual, now));
            return;
        };
        let call = redis_batch::submit(
            Arc::clone(&self.link),
            self.settle_command(&charges, hold, reserved, actual),
            Kind::Settlement,
        );
        rt.spawn(async move { report.report(crossings(call.await)) });
    }

    fn spend(&self, _charge: &Charge, _now: SystemTime) -> Option<(Money, Money)> {
        None // a network store cannot answer without a round trip
    }
}

/// The thresholds a settlement's reply reports crossed.
fn crossings(reply: Answer<redis::Value>) -> Result<Vec<Crossing>, BudgetStoreError> {
    let reply = reply.map_err(BudgetStoreError)?;
    let mut out = Vec::new();
    for triple in reply.chunks(3) {
        if let [redis::Value::Int(i), redis::Value::Int(p), spent] = triple {
            let spent = match spent {
                redis::Value::BulkString(b) => picos(&String::from_utf8_lossy(b)),
                _ => Money::ZERO,
            };
            out.push(Crossing {
                index: usize::try_from(*i).unwrap_or(0),
                permille: u16::try_from(*p).unwrap_or(0),
                spent,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::budget::{Budget, Scope};

    /// Redis Cluster hashes the whole key when its first `{…}` is empty: an empty tag
    /// would put a request's accounts in different slots (CROSSSLOT on every script).
    #[test]
    fn an_empty_hash_tag_keeps_the_default() {
        let charge = Charge {
            budget: Arc::new(Budget::new(
                "daily",
                Scope::User,
                Period::Day,
                Money::from_picos(1),
            )),
            subject: "ann".into(),
        };
        for tag in ["", "{}", "}{"] {
            let store = RedisBudgetStore::new(()).hash_tag(tag);
            assert_eq!(
                store.key(&charge),
                "palisade:budget:{budget}:daily:ann",
                "{tag:?}"
            );
        }
        let store = RedisBudgetStore::new(()).hash_tag("{team}");
        assert_eq!(store.key(&charge), "palisade:budget:{team}:daily:ann");
    }

    /// A hold of 0 ms would divide by zero in the script, and one past 2^40 ms would
    /// leave the integers Lua's doubles hold exactly: both are brought into range.
    #[test]
    fn hold_lifetimes_are_kept_in_what_the_script_computes_exactly() {
        let ms = |ttl| RedisBudgetStore::new(()).hold_ttl(ttl).hold_ms;
        assert_eq!(RedisBudgetStore::new(()).hold_ms, 15 * 60 * 1000);
        assert_eq!(ms(Duration::ZERO), 1);
        assert_eq!(ms(Duration::from_micros(1500)), 1);
        assert_eq!(ms(Duration::from_secs(2)), 2000);
        assert_eq!(ms(Duration::MAX), LONGEST_HOLD_MS);
    }
}
