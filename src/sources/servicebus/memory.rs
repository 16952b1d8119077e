//! What the `servicebus` source remembers of the messages it has processed, to recognise a copy
//! that Service Bus delivers again (after a lost lock, a dropped connection or a crash), and the
//! clock that forgets them. Every method takes the time (Unix ms), so the clock is testable.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long a completion that may not have taken effect is remembered (Service Bus locks last
/// at most five minutes; a message whose lock ran out comes back soon after).
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

const FORGET_MS: i64 = FORGET_AFTER.as_millis() as i64;

/// What a checkpoint keeps: hashes of processed messages not known to be completed, with the
/// time (Unix ms) after which each may be forgotten (0: not yet completed).
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct State {
    processed: Vec<(u128, i64)>,
    /// Of those, the messages to dead-letter, with why ([`DeadNote`]).
    dead: Vec<(u128, DeadNote)>,
}

/// A checkpoint written before dead letters were settled at the commit (no `dead`).
#[derive(Deserialize)]
struct StateV1 {
    processed: Vec<(u128, i64)>,
}

impl State {
    pub(super) fn decode(bytes: &[u8]) -> Result<State, postcard::Error> {
        crate::sources::message::decode_state(bytes, |v1: StateV1| State { processed: v1.processed, dead: Vec::new() })
    }
}

/// Why a message goes to the `$DeadLetterQueue`: `DeadLetterReason` and
/// `DeadLetterErrorDescription`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct DeadNote {
    pub reason: String,
    pub description: String,
}

/// Processed messages by a 128-bit hash of message id, sequence number and body.
#[derive(Default)]
pub(super) struct Memory {
    /// Hash -> forget after (Unix ms; 0 while not completed). Its keys are xxh3 digests
    /// already: ahash, not SipHash, which showed in the profile.
    processed: HashMap<u128, i64, ahash::RandomState>,
    /// The processed messages that go to the `$DeadLetterQueue`, not completed.
    dead: HashMap<u128, DeadNote, ahash::RandomState>,
    /// When the connection was lost: the time until the next one does not count towards
    /// [`FORGET_AFTER`] ([`Memory::reconnected`]).
    disconnected_at: Option<i64>,
}

impl Memory {
    /// The memory a checkpoint kept. How long ago the stop was is not known, and nothing comes
    /// back before the first connection: each message is remembered for [`FORGET_AFTER`] from
    /// `now` at least.
    pub fn restore(st: State, now: i64) -> Memory {
        let forget = now + FORGET_MS;
        Memory {
            processed: st.processed.into_iter().map(|(h, f)| (h, f.max(forget))).collect(),
            dead: st.dead.into_iter().collect(),
            disconnected_at: None,
        }
    }

    pub fn state(&self) -> State {
        State {
            processed: self.processed.iter().map(|(h, f)| (*h, *f)).collect(),
            dead: self.dead.iter().map(|(h, d)| (*h, d.clone())).collect(),
        }
    }

    pub fn knows(&self, hash: u128) -> bool {
        self.processed.contains_key(&hash)
    }

    /// Why a remembered message is dead-lettered; `None` for one that is completed.
    pub fn dead_note(&self, hash: u128) -> Option<&DeadNote> {
        self.dead.get(&hash)
    }

    /// A message processed now (again, for a redelivered copy): held until its commit.
    pub fn hold(&mut self, hash: u128) {
        self.processed.insert(hash, 0);
    }

    /// A message that cannot be decoded: held until its commit dead-letters it.
    pub fn hold_dead(&mut self, hash: u128, note: DeadNote) {
        self.processed.insert(hash, 0);
        self.dead.insert(hash, note);
    }

    /// A held message was settled at its commit: forgotten at once if the namespace confirmed
    /// it while its lock still held (`sure`), else remembered for [`FORGET_AFTER`] from `now`
    /// in case it comes back.
    pub fn settled(&mut self, hash: u128, sure: bool, now: i64) {
        if sure {
            self.processed.remove(&hash);
            self.dead.remove(&hash);
        } else if let Some(f) = self.processed.get_mut(&hash) {
            *f = now + FORGET_MS;
        }
    }

    /// The connection is gone with the deliveries held on it: their messages come back when
    /// their locks run out, and are recognised until [`FORGET_AFTER`] of connected time later.
    pub fn disconnected(&mut self, held: impl Iterator<Item = u128>, now: i64) {
        for h in held {
            if let Some(f) = self.processed.get_mut(&h) {
                if *f == 0 {
                    *f = now + FORGET_MS;
                }
            }
        }
        self.disconnected_at.get_or_insert(now);
    }

    /// On a new connection: a message remembered until it comes back comes back only while
    /// connected, so the outage does not count: each deadline moves on by its length. (Counting
    /// it forgot messages over an outage longer than [`FORGET_AFTER`], and their redelivered
    /// copies were processed again; starting afresh at each connection would forget nothing
    /// while the connection keeps dropping.)
    pub fn reconnected(&mut self, now: i64) {
        let Some(lost) = self.disconnected_at.take() else { return };
        let outage = (now - lost).max(0);
        for f in self.processed.values_mut() {
            if *f != 0 {
                *f += outage;
            }
        }
    }

    /// Forgets what is past its deadline.
    pub fn expire(&mut self, now: i64) {
        self.processed.retain(|_, f| *f == 0 || *f > now);
        if !self.dead.is_empty() {
            self.dead.retain(|h, _| self.processed.contains_key(h));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn note() -> DeadNote {
        DeadNote { reason: "not JSON".into(), description: "centralflow: q#4".into() }
    }

    #[test]
    fn a_checkpoint_from_before_dead_notes_still_restores() {
        let v1 = postcard::to_allocvec(&vec![(7u128, 0i64), (9u128, 1_000i64)]).unwrap();
        let st = State::decode(&v1).unwrap();
        assert_eq!(st.processed, vec![(7, 0), (9, 1_000)]);
        assert!(st.dead.is_empty());
        let now = State { processed: vec![(7, 0)], dead: vec![(7, note())] };
        assert_eq!(State::decode(&postcard::to_allocvec(&now).unwrap()).unwrap(), now);
        assert!(State::decode(&[0xff, 0xff]).is_err());
    }

    #[test]
    fn an_outage_does_not_count_towards_forgetting() {
        let mut m = Memory::default();
        m.hold(1);
        m.hold_dead(2, note());
        m.hold(3);
        // 3 was completed for sure; 1 and 2 were held when the connection dropped at minute 1
        m.settled(3, true, 0);
        m.disconnected([1, 2].into_iter(), MIN);
        // a second drop before reconnecting does not move the outage's start
        m.disconnected(std::iter::empty(), 5 * MIN);
        // back after 30 minutes: both are still remembered, for ten more connected minutes
        m.reconnected(31 * MIN);
        m.expire(31 * MIN);
        assert!(m.knows(1) && m.knows(2) && !m.knows(3));
        m.expire(41 * MIN - 1);
        assert!(m.knows(1) && m.dead_note(2) == Some(&note()));
        m.expire(41 * MIN);
        assert!(!m.knows(1) && !m.knows(2) && m.dead_note(2).is_none());
    }

    #[test]
    fn a_connection_that_keeps_dropping_still_forgets() {
        let mut m = Memory::default();
        m.hold(1);
        m.settled(1, false, 0);
        // a drop every minute, each outage a second: ten minutes of connected time run out
        for i in 1..=11 {
            m.disconnected(std::iter::empty(), i * MIN);
            m.reconnected(i * MIN + 1000);
        }
        m.expire(11 * MIN + 1000);
        assert!(!m.knows(1), "the outages were 11 s; the deadline moved to 10 min 11 s");
    }

    #[test]
    fn a_restored_memory_lasts_from_the_restart() {
        let mut before = Memory::default();
        before.hold(1);
        before.hold_dead(2, note());
        before.settled(1, false, 0);
        let st = State::decode(&postcard::to_allocvec(&before.state()).unwrap()).unwrap();
        // restored an hour later: the deadline at minute 10 is long past, yet the stop's
        // length is not known, so both last ten minutes from now
        let mut m = Memory::restore(st, 60 * MIN);
        m.expire(70 * MIN - 1);
        assert!(m.knows(1) && m.knows(2) && m.dead_note(2).is_some());
        m.expire(70 * MIN);
        assert!(!m.knows(1) && !m.knows(2));
    }
}
