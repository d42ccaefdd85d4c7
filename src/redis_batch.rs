//! Natural batching of script calls ("group commit"), shared by the Redis stores (the rate
//! limiter's decisions, the budget's reservations and settlements): a call made while the
//! connection has room (fewer than two calls in flight) goes at once, alone; calls made
//! while it has none wait for a call to end and then go together, as one script call that
//! runs each of them in order, exactly as it would alone.
//!
//! Under no load this adds no wait; under load one round trip (and one script call, with
//! its fixed cost in Redis) serves many calls.
//!
//! A script takes part by implementing [`BatchScript`] and by accepting a batch call:
//! `EVALSHA sha KEYS... b COUNT` then, for each call, its mode, its key count and the rest
//! of its arguments, from the call's own `EVALSHA sha N KEYS... MODE ARGS...`. It answers
//! with each call's answer after its length (-1 for a call that failed: its error fails it
//! alone).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

/// The most calls one batch carries.
pub(crate) const MAX_BATCH: usize = 64;

/// The most calls waiting for room at once, in all slots of a Cluster together (128 full
/// batches, two in flight: 64 round trips). A call made while that many wait is failed at
/// once, and follows its failure mode: when Redis stalls, a burst does not pile up in
/// memory, nor run in Redis long after its callers were answered.
pub(crate) const MAX_QUEUED: usize = 128 * MAX_BATCH;

/// Script calls in flight on the connection at once: two, so that Redis runs one while
/// the answer of the other travels back and its callers are woken.
const MAX_IN_FLIGHT: usize = 2;

/// Redis Cluster's hash slots.
const SLOTS: usize = 16_384;

/// A script call's answer, or why it has none.
pub(crate) type Answer<T> = Result<Vec<T>, String>;

/// Runs `cmd`, an `EVALSHA` of `script`, on `conn`; when Redis does not know the script
/// (`NOSCRIPT`, after a restart or `SCRIPT FLUSH`: nothing ran) loads it and sends the call
/// again.
pub(crate) async fn eval_loading<C: redis::aio::ConnectionLike, T: redis::FromRedisValue>(
    conn: &mut C,
    script: &redis::Script,
    cmd: &redis::Cmd,
) -> redis::RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            let _: String = script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        answer => answer,
    }
}

/// A script whose calls can go to Redis in batches.
pub(crate) trait BatchScript: Send + Sync + 'static {
    /// One value of a call's answer.
    type Item: Send + 'static;

    /// The batchers of the connection the calls go through.
    fn batchers(&self) -> &Batchers<Self::Item>;

    /// The script's SHA1, for the batch call's `EVALSHA`.
    fn hash(&self) -> &str;

    /// Runs one `EVALSHA` of the script, loading it first when Redis does not know it
    /// (`NOSCRIPT`: nothing ran, so the call is sent again).
    fn eval(
        &self,
        cmd: &redis::Cmd,
    ) -> impl Future<Output = redis::RedisResult<Vec<Self::Item>>> + Send;

    /// The length that leads a call's answer in a batch's answer (negative for a call that
    /// failed), or `None` when the value is not one.
    fn length(item: &Self::Item) -> Option<i64>;

    /// Counts calls that went in a batch.
    fn batched(&self, calls: usize);
}

/// What a call does, for the queue's sake.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    /// A decision, a peek or a reservation: turned away when the queue is full, and not
    /// sent once its caller is gone (nobody would own its debit).
    Decision,
    /// A settlement or a reset: always queued and sent, awaited or not, since what it
    /// gives back stays counted otherwise. Each settles a reservation an earlier decision
    /// made, so they are bounded by those; resets are admin calls.
    Settlement,
}

/// A call waiting for the one in flight.
struct Pending<T> {
    cmd: redis::Cmd,
    tx: oneshot::Sender<Answer<T>>,
    kind: Kind,
}

impl<T> Pending<T> {
    /// A decision whose caller is gone.
    fn abandoned(&self) -> bool {
        self.kind == Kind::Decision && self.tx.is_closed()
    }
}

/// The calls of one connection, or on a Cluster of one slot: how many are in flight, and
/// those waiting for one to end. On a Cluster each slot waits only behind its own calls,
/// so a master that is held up (paused, failing over) holds up no key of another.
pub(crate) struct Batchers<T> {
    slots: Box<[Batcher<T>]>,
    /// Calls waiting, in every slot.
    queued: AtomicUsize,
    /// The runtime the batchers were made on: waiting calls are sent from it when the call
    /// that held the connection ends on a thread outside any runtime.
    runtime: Option<tokio::runtime::Handle>,
}

impl<T> Batchers<T> {
    /// The batchers of one connection: one per slot on a Cluster, else one. A store whose
    /// calls all fall in one slot (one hash tag) needs one on a Cluster too.
    pub(crate) fn new(cluster: bool) -> Self {
        let n = if cluster { SLOTS } else { 1 };
        Self {
            slots: (0..n).map(|_| Batcher::default()).collect(),
            queued: AtomicUsize::new(0),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// The runtime to run a task on: the current one, else the one the batchers were made
    /// on (if any).
    pub(crate) fn runtime(&self) -> Option<tokio::runtime::Handle> {
        tokio::runtime::Handle::try_current()
            .ok()
            .or_else(|| self.runtime.clone())
    }

    /// The batcher of a call (the only one unless slots are apart).
    fn of(&self, slot: usize) -> &Batcher<T> {
        &self.slots[slot % self.slots.len()]
    }

    /// The slot a call waits in.
    fn slot(&self, cmd: &redis::Cmd) -> usize {
        if self.slots.len() > 1 {
            slot_of(cmd)
        } else {
            0
        }
    }
}

struct Batcher<T> {
    state: Mutex<State<T>>,
}

impl<T> Default for Batcher<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                in_flight: 0,
                queue: Vec::new(),
            }),
        }
    }
}

struct State<T> {
    in_flight: usize,
    queue: Vec<Pending<T>>,
}

impl<T> Batcher<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Hands the connection on when the call that held it ends, answered or dropped.
struct Leader<S: BatchScript> {
    script: Arc<S>,
    slot: usize,
}

impl<S: BatchScript> Drop for Leader<S> {
    fn drop(&mut self) {
        hand_off(&self.script, self.slot);
    }
}

/// Frees the flush's place, and fails what waits when no call is left in flight to send
/// it, when a flush is dropped before it ends (its runtime shutting down).
struct FlushGuard<S: BatchScript> {
    script: Arc<S>,
    slot: usize,
    armed: bool,
}

impl<S: BatchScript> Drop for FlushGuard<S> {
    fn drop(&mut self) {
        if self.armed {
            let batchers = self.script.batchers();
            let mut state = batchers.of(self.slot).lock();
            state.in_flight -= 1;
            if state.in_flight == 0 {
                // Dropping the senders answers their callers with an error.
                let waiting = state.queue.len();
                batchers.queued.fetch_sub(waiting, Ordering::Relaxed);
                state.queue.clear();
            }
        }
    }
}

/// Runs one script call (an `EVALSHA` of the script) through its batcher.
pub(crate) async fn submit<S: BatchScript>(
    script: Arc<S>,
    cmd: redis::Cmd,
    kind: Kind,
) -> Answer<S::Item> {
    let batchers = script.batchers();
    let slot = batchers.slot(&cmd);
    let waiting = {
        let mut state = batchers.of(slot).lock();
        if state.in_flight >= MAX_IN_FLIGHT || !state.queue.is_empty() {
            // A place is taken before the call is queued (the slots' locks are apart, the
            // count is shared): a decision only while fewer than the bound wait.
            let queued = &batchers.queued;
            let full = |q: &AtomicUsize| {
                let full = q.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED;
                if full {
                    q.fetch_sub(1, Ordering::Relaxed);
                }
                full
            };
            if kind == Kind::Settlement {
                queued.fetch_add(1, Ordering::Relaxed);
            } else if full(queued) {
                let before = state.queue.len();
                state.queue.retain(|p| !p.abandoned());
                queued.fetch_sub(before - state.queue.len(), Ordering::Relaxed);
                if full(queued) {
                    return Err(format!(
                        "{MAX_QUEUED} Redis calls were already waiting for an answer"
                    ));
                }
            }
            let (tx, rx) = oneshot::channel();
            state.queue.push(Pending { cmd, tx, kind });
            Err(rx)
        } else {
            state.in_flight += 1;
            Ok(cmd)
        }
    };
    match waiting {
        Ok(cmd) => {
            let leader = Leader {
                script: script.clone(),
                slot,
            };
            let answer = script.eval(&cmd).await.map_err(|e| e.to_string());
            drop(leader);
            answer
        }
        Err(rx) => rx
            .await
            .unwrap_or_else(|_| Err("the Redis call was dropped before it was sent".to_owned())),
    }
}

/// Sends what waits, if anything, in the place of the call that ended, or frees its place.
fn hand_off<S: BatchScript>(script: &Arc<S>, slot: usize) {
    let batch = {
        let batchers = script.batchers();
        let mut state = batchers.of(slot).lock();
        let batch = take(&mut state.queue, &batchers.queued);
        if batch.is_empty() {
            state.in_flight -= 1;
            return;
        }
        batch
    };
    let flush = flush(script.clone(), slot, batch);
    match script.batchers().runtime() {
        Some(handle) => {
            handle.spawn(flush);
        }
        // No runtime to run them on: the flush, dropped, fails them.
        None => drop(flush),
    }
}

/// The first calls of the queue, at most a batch. A decision whose caller is gone
/// (cancelled, or answered by its timeout and no longer awaited) is not sent: nobody would
/// own what it debits.
fn take<T>(queue: &mut Vec<Pending<T>>, queued: &AtomicUsize) -> Vec<Pending<T>> {
    let before = queue.len();
    queue.retain(|p| !p.abandoned());
    let batch: Vec<Pending<T>> = if queue.len() <= MAX_BATCH {
        std::mem::take(queue)
    } else {
        queue.drain(..MAX_BATCH).collect()
    };
    queued.fetch_sub(before - queue.len(), Ordering::Relaxed);
    batch
}

/// Sends batches until nothing waits.
fn flush<S: BatchScript>(
    script: Arc<S>,
    slot: usize,
    batch: Vec<Pending<S::Item>>,
) -> impl Future<Output = ()> + Send + 'static {
    // Made before the future first runs, so that a flush dropped unpolled frees the
    // connection too.
    let guard = FlushGuard {
        script: script.clone(),
        slot,
        armed: true,
    };
    async move {
        let mut guard = guard;
        let mut batch = batch;
        loop {
            send_group(&*script, batch).await;
            let batchers = script.batchers();
            let mut state = batchers.of(slot).lock();
            batch = take(&mut state.queue, &batchers.queued);
            if batch.is_empty() {
                state.in_flight -= 1;
                guard.armed = false;
                return;
            }
        }
    }
}

/// CRC16 (XMODEM), whose value modulo 16384 is a key's Cluster slot.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            };
        }
    }
    crc
}

/// The Cluster slot of a call's first key (of its hash tag, when it has one). The stores
/// give every key of one call the same tag, and a batch holds the calls of one slot only,
/// so one script call may carry it.
fn slot_of(cmd: &redis::Cmd) -> usize {
    let key = match cmd.args_iter().nth(3) {
        Some(redis::Arg::Simple(key)) => key,
        _ => &[][..],
    };
    let tag = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let len = rest.iter().position(|&b| b == b'}')?;
        (len > 0).then(|| &rest[..len])
    });
    usize::from(crc16(tag.unwrap_or(key))) % SLOTS
}

/// One script call for these calls, alone or as a batch.
async fn send_group<S: BatchScript>(script: &S, mut group: Vec<Pending<S::Item>>) {
    if group.len() == 1 {
        let Some(p) = group.pop() else { return };
        let answer = script.eval(&p.cmd).await.map_err(|e| e.to_string());
        let _ = p.tx.send(answer);
        return;
    }
    let cmd = combine(script.hash(), &group);
    script.batched(group.len());
    match script.eval(&cmd).await {
        Ok(values) => {
            let mut values = values.into_iter();
            for p in group {
                let _ = p.tx.send(next_answer::<S>(&mut values));
            }
        }
        Err(e) => {
            // A failed batch fails each of its calls.
            let e = e.to_string();
            for p in group {
                let _ = p.tx.send(Err(e.clone()));
            }
        }
    }
}

/// The answer of the next call of a batch: its length, then that many values.
fn next_answer<S: BatchScript>(values: &mut impl Iterator<Item = S::Item>) -> Answer<S::Item> {
    let shape = || "the Redis script answered a batch in an unexpected shape".to_owned();
    match values.next().as_ref().and_then(S::length) {
        Some(len) if len >= 0 => {
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            let answer: Vec<S::Item> = values.by_ref().take(len).collect();
            if answer.len() == len {
                Ok(answer)
            } else {
                Err(shape())
            }
        }
        Some(_) => Err("the Redis script failed on this call of a batch".to_owned()),
        None => Err(shape()),
    }
}

/// The batch call: `EVALSHA sha KEYS... b COUNT` then, for each call, its mode, key count
/// and the rest of its arguments, from the call's own `EVALSHA sha N KEYS... MODE ARGS...`.
fn combine<T>(hash: &str, group: &[Pending<T>]) -> redis::Cmd {
    fn args<T>(p: &Pending<T>) -> Vec<&[u8]> {
        p.cmd
            .args_iter()
            .filter_map(|a| match a {
                redis::Arg::Simple(a) => Some(a),
                _ => None,
            })
            .collect()
    }
    let all: Vec<Vec<&[u8]>> = group.iter().map(args).collect();
    let count = |a: &[&[u8]]| -> usize {
        a.get(2)
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let keys: usize = all.iter().map(|a| count(a)).sum();
    let size: usize = all.iter().flatten().map(|a| a.len()).sum();
    let mut cmd = redis::Cmd::with_capacity(4 + all.iter().map(Vec::len).sum::<usize>(), size + 32);
    cmd.arg("EVALSHA").arg(hash).arg(keys);
    for a in &all {
        for key in a.iter().skip(3).take(count(a)) {
            cmd.arg(*key);
        }
    }
    cmd.arg("b").arg(group.len());
    for a in &all {
        let n = count(a);
        let rest = a.get(3 + n..).unwrap_or_default();
        // the mode, the key count, then the call's other arguments
        cmd.arg(rest.first().copied().unwrap_or_default()).arg(n);
        for arg in rest.iter().skip(1) {
            cmd.arg(*arg);
        }
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::crc16;

    #[test]
    fn crc16_is_the_one_of_cluster_slots() {
        // the check value of CRC16/XMODEM, and slots Redis gives (CLUSTER KEYSLOT)
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(crc16(b"somekey") % 16_384, 11_058);
        assert_eq!(crc16(b"hash_tag") % 16_384, 2_515);
    }
}
