//! The broker: entities, their messages, locks, settlement and dead-lettering. Everything here is
//! synchronous under one mutex; connections take messages out and settle them through it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{Header, MessageAnnotations};
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Timestamp, Uuid, Value};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::wire::{self, delivery_tag_of, Parts};
use super::Stats;

pub(crate) type Token = [u8; 16];
pub(crate) type StoreId = usize;

pub(crate) const DEAD_LETTER_REASON: &str = "DeadLetterReason";
pub(crate) const DEAD_LETTER_DESCRIPTION: &str = "DeadLetterErrorDescription";
pub(crate) const MAX_DELIVERY_COUNT_EXCEEDED: &str = "MaxDeliveryCountExceeded";

/// A message in a store.
struct Stored {
    parts: Parts,
    seq: i64,
    enqueued_ms: i64,
    delivery_count: u32,
    dead_letter_source: Option<String>,
    lock: Option<Token>,
}

/// A queue, a subscription, or the dead-letter sub-queue of either.
pub(crate) struct Store {
    /// The path as configured (`q`, `t/Subscriptions/s`, `q/$DeadLetterQueue`).
    pub path: String,
    messages: BTreeMap<i64, Stored>,
    available: BTreeSet<i64>,
    lock_duration: Duration,
    max_delivery_count: u32,
    dead_letter: Option<StoreId>,
    next_seq: i64,
    stats: Stats,
}

struct Lock {
    store: StoreId,
    seq: i64,
    until: Instant,
}

/// What a send link targets.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Queue(StoreId),
    Topic(String),
}

pub(crate) struct State {
    pub stores: Vec<Store>,
    /// Lower-cased path → store (queues, subscriptions, dead-letter queues).
    by_path: HashMap<String, StoreId>,
    /// Lower-cased topic name → its subscriptions, and the topic's sequence numbers.
    topics: HashMap<String, (Vec<StoreId>, i64)>,
    locks: HashMap<Token, Lock>,
    /// When the janitor is set to wake next.
    next_expiry: Option<Instant>,
}

/// How the client settled a delivery, or asked `$management` to.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    Complete,
    /// `released`: back to the queue as it was.
    Release,
    /// `modified`: back to the queue, the delivery count up if `failed`.
    Abandon {
        failed: bool,
    },
    DeadLetter {
        reason: Option<String>,
        description: Option<String>,
    },
}

#[derive(Debug)]
pub(crate) struct LockLost;

pub(crate) struct Broker {
    state: Mutex<State>,
    /// Bumped whenever a message becomes available somewhere: connections look for work.
    pub available: watch::Sender<u64>,
    /// Wakes the janitor when a lock expires sooner than it planned for.
    pub janitor: Notify,
}

pub(crate) struct Delivery {
    pub payload: Vec<u8>,
    pub token: Token,
    pub delivery_tag: [u8; 16],
}

impl Broker {
    pub(crate) fn new(cfg: &super::Config) -> Arc<Broker> {
        let mut state = State {
            stores: Vec::new(),
            by_path: HashMap::new(),
            topics: HashMap::new(),
            locks: HashMap::new(),
            next_expiry: None,
        };
        let add = |state: &mut State, path: String| -> StoreId {
            let dlq_path = format!("{path}/$DeadLetterQueue");
            let dlq = state.push(dlq_path, cfg, None);
            state.push(path, cfg, Some(dlq))
        };
        for q in &cfg.queues {
            add(&mut state, q.clone());
        }
        for (t, subs) in &cfg.topics {
            let mut ids = Vec::new();
            for s in subs {
                ids.push(add(&mut state, format!("{t}/Subscriptions/{s}")));
            }
            state.topics.insert(t.to_ascii_lowercase(), (ids, 1));
        }
        Arc::new(Broker { state: Mutex::new(state), available: watch::channel(0).0, janitor: Notify::new() })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        self.available.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Enqueues messages to a queue or topic.
    pub(crate) fn enqueue(&self, target: &Target, messages: Vec<Parts>) -> Result<(), String> {
        {
            let mut st = self.lock();
            let now = wire::now_ms();
            for parts in messages {
                match target {
                    Target::Queue(id) => {
                        let store = &mut st.stores[*id];
                        let seq = store.next_seq;
                        store.next_seq += 1;
                        store.insert(parts, seq, now);
                    }
                    Target::Topic(name) => {
                        let (subs, next) = st.topics.get_mut(&name.to_ascii_lowercase()).ok_or("no such topic")?;
                        let seq = *next;
                        *next += 1;
                        let subs = subs.clone();
                        for id in subs {
                            st.stores[id].insert(parts.clone(), seq, now);
                        }
                    }
                }
            }
        }
        self.wake();
        Ok(())
    }

    /// Takes up to `n` available messages of a store, locked (peek-lock) or removed
    /// (receive-and-delete), encoded for delivery.
    pub(crate) fn take(&self, id: StoreId, n: usize, peek_lock: bool) -> Vec<Delivery> {
        let mut st = self.lock();
        let mut out = Vec::new();
        let now = Instant::now();
        let mut earliest = None;
        for _ in 0..n {
            let store = &mut st.stores[id];
            let Some(seq) = store.available.pop_first() else { break };
            let until = now + store.lock_duration;
            let token = wire::new_token();
            let msg = store.messages.get_mut(&seq).expect("available messages are stored");
            let locked_until_ms = wire::now_ms() + store.lock_duration.as_millis() as i64;
            let payload = encode_delivery(msg, peek_lock.then_some((token, locked_until_ms)), &store.path);
            store.stats.deliveries += 1;
            if msg.delivery_count > 0 {
                store.stats.redeliveries += 1;
            }
            if peek_lock {
                msg.lock = Some(token);
                st.locks.insert(token, Lock { store: id, seq, until });
                earliest = Some(until);
            } else {
                store.messages.remove(&seq);
                store.stats.completed += 1;
            }
            out.push(Delivery { payload, token, delivery_tag: delivery_tag_of(&token) });
        }
        if peek_lock {
            let store = &mut st.stores[id];
            let locked = (store.messages.len() - store.available.len()) as u64;
            store.stats.peak_locked = store.stats.peak_locked.max(locked);
        }
        if let Some(until) = earliest {
            if st.next_expiry.is_none_or(|t| until < t) {
                st.next_expiry = Some(until);
                drop(st);
                self.janitor.notify_one();
            }
        }
        out
    }

    /// Settles a locked message. A lock that expired or is unknown is lost.
    pub(crate) fn settle(&self, token: &Token, outcome: Outcome) -> Result<(), LockLost> {
        let woke = {
            let mut st = self.lock();
            let lock = st.take_lock(token)?;
            st.apply(lock.store, lock.seq, outcome)
        };
        if woke {
            self.wake();
        }
        Ok(())
    }

    /// Renews locks; the new expiry of each, in order.
    pub(crate) fn renew(&self, tokens: &[Token]) -> Result<Vec<i64>, LockLost> {
        let mut st = self.lock();
        let now = Instant::now();
        let mut out = Vec::new();
        for token in tokens {
            let lock = st.locks.get(token).ok_or(LockLost)?;
            if lock.until <= now {
                return Err(LockLost);
            }
        }
        for token in tokens {
            let lock = st.locks.get(token).expect("checked above");
            let store_id = lock.store;
            let duration = st.stores[store_id].lock_duration;
            st.locks.get_mut(token).expect("checked above").until = now + duration;
            st.stores[store_id].stats.lock_renewals += 1;
            out.push(wire::now_ms() + duration.as_millis() as i64);
        }
        Ok(out)
    }

    /// Expires every lock that is due; returns when the next one is.
    pub(crate) fn expire_locks(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut woke = false;
        let next = {
            let mut st = self.lock();
            let due: Vec<Token> = st.locks.iter().filter(|(_, l)| l.until <= now).map(|(t, _)| *t).collect();
            for token in due {
                let lock = st.locks.remove(&token).expect("listed above");
                st.stores[lock.store].stats.lock_expiries += 1;
                woke |= st.apply(lock.store, lock.seq, Outcome::Abandon { failed: true });
            }
            let next = st.locks.values().map(|l| l.until).min();
            st.next_expiry = next;
            next
        };
        if woke {
            self.wake();
        }
        next
    }

    /// Messages from `from_seq` on, available or locked, without locking them.
    pub(crate) fn peek(&self, id: StoreId, from_seq: i64, count: usize) -> Vec<Vec<u8>> {
        let st = self.lock();
        let store = &st.stores[id];
        store.messages.range(from_seq..).take(count).map(|(_, m)| encode_delivery(m, None, &store.path)).collect()
    }

    pub(crate) fn store(&self, path: &str) -> Option<StoreId> {
        self.lock().by_path.get(&path.to_ascii_lowercase()).copied()
    }

    pub(crate) fn send_target(&self, path: &str) -> Option<Target> {
        let st = self.lock();
        let lower = path.to_ascii_lowercase();
        if st.topics.contains_key(&lower) {
            return Some(Target::Topic(lower));
        }
        let id = *st.by_path.get(&lower)?;
        // Only queues take sends: not subscriptions, not dead-letter queues.
        (!lower.contains('/')).then_some(Target::Queue(id))
    }

    pub(crate) fn stats(&self, path: &str) -> Option<Stats> {
        let st = self.lock();
        let id = *st.by_path.get(&path.to_ascii_lowercase())?;
        let store = &st.stores[id];
        let mut stats = store.stats.clone();
        stats.available = store.available.len() as u64;
        stats.locked = (store.messages.len() - store.available.len()) as u64;
        stats.dead_lettered = store.dead_letter.map(|d| st.stores[d].messages.len() as u64).unwrap_or(0);
        Some(stats)
    }
}

impl State {
    fn push(&mut self, path: String, cfg: &super::Config, dead_letter: Option<StoreId>) -> StoreId {
        let id = self.stores.len();
        self.by_path.insert(path.to_ascii_lowercase(), id);
        self.stores.push(Store {
            path,
            messages: BTreeMap::new(),
            available: BTreeSet::new(),
            lock_duration: cfg.lock_duration,
            max_delivery_count: cfg.max_delivery_count,
            dead_letter,
            next_seq: 1,
            stats: Stats::default(),
        });
        id
    }

    fn take_lock(&mut self, token: &Token) -> Result<Lock, LockLost> {
        let lock = self.locks.remove(token).ok_or(LockLost)?;
        if lock.until <= Instant::now() {
            // Due but not yet expired by the janitor: expire it here, as the janitor would.
            self.stores[lock.store].stats.lock_expiries += 1;
            self.apply(lock.store, lock.seq, Outcome::Abandon { failed: true });
            return Err(LockLost);
        }
        Ok(lock)
    }

    /// Applies an outcome to a message that was locked; true if a message became available.
    fn apply(&mut self, id: StoreId, seq: i64, outcome: Outcome) -> bool {
        let store = &mut self.stores[id];
        let Some(msg) = store.messages.get_mut(&seq) else { return false };
        msg.lock = None;
        let dead_letter = match outcome {
            Outcome::Complete => {
                store.messages.remove(&seq);
                store.stats.completed += 1;
                return false;
            }
            Outcome::Release => None,
            Outcome::Abandon { failed } => {
                if failed {
                    msg.delivery_count += 1;
                }
                (msg.delivery_count >= store.max_delivery_count).then(|| {
                    (
                        Some(MAX_DELIVERY_COUNT_EXCEEDED.to_string()),
                        Some(format!(
                            "Message could not be consumed after {} delivery attempts.",
                            store.max_delivery_count
                        )),
                    )
                })
            }
            Outcome::DeadLetter { reason, description } => Some((reason, description)),
        };
        match (dead_letter, store.dead_letter) {
            (Some((reason, description)), Some(dlq)) => {
                let mut msg = store.messages.remove(&seq).expect("present above");
                let mut props = msg.parts.app_properties();
                if let Some(r) = reason {
                    props.0.insert(DEAD_LETTER_REASON.to_string(), SimpleValue::String(r));
                }
                if let Some(d) = description {
                    props.0.insert(DEAD_LETTER_DESCRIPTION.to_string(), SimpleValue::String(d));
                }
                msg.parts.set_app_properties(&props);
                msg.dead_letter_source = Some(store.path.clone());
                let dlq = &mut self.stores[dlq];
                dlq.available.insert(seq);
                dlq.messages.insert(seq, msg);
                true
            }
            // A dead-letter queue's own messages stay (Azure has no dead-letter queue of one).
            _ => {
                store.available.insert(seq);
                true
            }
        }
    }
}

impl Store {
    fn insert(&mut self, parts: Parts, seq: i64, now_ms: i64) {
        self.messages.insert(
            seq,
            Stored { parts, seq, enqueued_ms: now_ms, delivery_count: 0, dead_letter_source: None, lock: None },
        );
        self.available.insert(seq);
    }
}

fn key(name: &str) -> OwnedKey {
    OwnedKey::Symbol(Symbol::from(name))
}

/// The message as delivered: header with the delivery count, the broker's annotations.
fn encode_delivery(msg: &Stored, lock: Option<(Token, i64)>, _path: &str) -> Vec<u8> {
    let header = Header { delivery_count: msg.delivery_count, ..msg.parts.header.clone() };
    let mut annotations = MessageAnnotations(msg.parts.annotations.0.clone());
    annotations.0.insert(key("x-opt-sequence-number"), Value::Long(msg.seq));
    annotations.0.insert(key("x-opt-enqueued-time"), Value::Timestamp(Timestamp::from_milliseconds(msg.enqueued_ms)));
    if let Some((token, until_ms)) = lock {
        annotations.0.insert(key("x-opt-locked-until"), Value::Timestamp(Timestamp::from_milliseconds(until_ms)));
        annotations.0.insert(key("x-opt-lock-token"), Value::Uuid(Uuid::from(token)));
    }
    if let Some(source) = &msg.dead_letter_source {
        annotations.0.insert(key("x-opt-deadletter-source"), Value::String(source.clone()));
    }
    msg.parts.encode_with(&header, &annotations)
}
