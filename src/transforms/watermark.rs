//! Watermarks (of the window and of `device_context`): per input partition, the largest event time seen; overall, the minimum of those
//! over the partitions that are not idle, minus the allowed lateness. Never moves back.
//!
//! Idleness is the only thing measured on the wall clock, and only in `run` (ticks): a partition
//! that received nothing during `idle_timeout` stops holding the watermark back until it
//! receives an event again.

use serde::{Deserialize, Serialize};

use crate::event::Nanos;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Part {
    source: u16,
    partition: u32,
    max: Nanos,
    #[serde(skip)]
    seen: bool,
    #[serde(skip)]
    last_active: Nanos,
    #[serde(skip)]
    idle: bool,
}

/// The watermark of one window transform.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Watermark {
    parts: Vec<Part>,
    wm: Nanos,
    #[serde(skip)]
    pub lateness: Nanos,
    #[serde(skip)]
    pub idle_timeout: Nanos,
    #[serde(skip)]
    last_hit: usize,
}

impl Default for Watermark {
    fn default() -> Self {
        Watermark::new(0, 60_000_000_000)
    }
}

impl Watermark {
    pub fn new(lateness: Nanos, idle_timeout: Nanos) -> Watermark {
        Watermark { parts: Vec::new(), wm: i64::MIN, lateness, idle_timeout, last_hit: 0 }
    }

    /// The current watermark (`i64::MIN` before any event).
    pub fn current(&self) -> Nanos {
        self.wm
    }

    /// Records an event time of a partition.
    pub fn observe(&mut self, source: u16, partition: u32, t: Nanos) {
        let i = match self.parts.get(self.last_hit) {
            Some(p) if p.source == source && p.partition == partition => self.last_hit,
            _ => match self.parts.iter().position(|p| p.source == source && p.partition == partition) {
                Some(i) => i,
                None => {
                    self.parts.push(Part { source, partition, max: t, seen: true, last_active: 0, idle: false });
                    self.last_hit = self.parts.len() - 1;
                    self.recompute();
                    return;
                }
            },
        };
        self.last_hit = i;
        let p = &mut self.parts[i];
        p.seen = true;
        let was_idle = std::mem::replace(&mut p.idle, false);
        if t > p.max || was_idle {
            p.max = p.max.max(t);
            self.recompute();
        }
    }

    fn recompute(&mut self) {
        let active = self.parts.iter().filter(|p| !p.idle).map(|p| p.max).min();
        if let Some(m) = active {
            let candidate = m.saturating_sub(self.lateness);
            if candidate > self.wm {
                self.wm = candidate;
            }
        }
    }

    /// The watermark that decides lateness and closing for one partition, when state is kept
    /// per partition (scale-out): the partition's own (its largest event time minus the
    /// lateness), or, while it is idle, the least of the active partitions' if that is later.
    /// A partition never seen has none yet (nothing of it is late).
    pub fn partition(&self, source: u16, partition: u32) -> Nanos {
        let Some(p) = self.parts.iter().find(|p| p.source == source && p.partition == partition) else {
            return i64::MIN;
        };
        let own = p.max.saturating_sub(self.lateness);
        if !p.idle {
            return own;
        }
        let active = self.parts.iter().filter(|q| !q.idle).map(|q| q.max.saturating_sub(self.lateness)).min();
        active.map_or(own, |a| a.max(own))
    }

    /// The largest per-partition watermark (bounds which windows may close).
    pub fn highest_partition(&self) -> Nanos {
        self.parts.iter().map(|p| self.partition(p.source, p.partition)).max().unwrap_or(i64::MIN)
    }

    /// The largest event time seen of a partition, if any.
    pub fn partition_max(&self, source: u16, partition: u32) -> Option<Nanos> {
        self.parts.iter().find(|p| p.source == source && p.partition == partition).map(|p| p.max)
    }

    /// Partitions seen.
    pub fn partitions(&self) -> Vec<(u16, u32)> {
        self.parts.iter().map(|p| (p.source, p.partition)).collect()
    }

    /// Adopts a partition's progress (hand-over), or forgets the partition.
    pub fn set_partition(&mut self, source: u16, partition: u32, max: Option<Nanos>) {
        self.parts.retain(|p| !(p.source == source && p.partition == partition));
        self.last_hit = 0;
        if let Some(max) = max {
            self.parts.push(Part { source, partition, max, seen: true, last_active: 0, idle: false });
        }
    }

    /// How far the watermark is behind the wall clock `now`, in seconds (`None` before any event).
    pub fn lag_seconds(&self, now: Nanos) -> Option<f64> {
        (self.wm != i64::MIN).then(|| (now - self.wm) as f64 / 1e9)
    }

    /// Moves the watermark to at least `to`, overall and on every partition seen (as if each
    /// had seen an event at `to` plus the lateness). Never moves it back.
    pub fn advance_to(&mut self, to: Nanos) {
        let floor = to.saturating_add(self.lateness);
        for p in &mut self.parts {
            p.max = p.max.max(floor);
        }
        self.wm = self.wm.max(to);
    }

    /// Wall-clock tick (live mode): marks idle partitions. Returns whether the watermark moved
    /// (or a partition became idle, which may close its windows).
    pub fn tick(&mut self, now: Nanos) -> bool {
        let before = self.wm;
        let mut changed = false;
        for p in &mut self.parts {
            if p.seen || p.last_active == 0 {
                p.seen = false;
                p.last_active = now;
            } else if !p.idle && now - p.last_active >= self.idle_timeout {
                p.idle = true;
                changed = true;
            }
        }
        if changed && self.parts.iter().any(|p| !p.idle) {
            self.recompute();
        }
        changed || self.wm != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    #[test]
    fn minimum_over_partitions_minus_lateness_never_backwards() {
        let mut w = Watermark::new(10 * S, 60 * S);
        assert_eq!(w.current(), i64::MIN);
        w.observe(0, 0, 100 * S);
        assert_eq!(w.current(), 90 * S);
        w.observe(0, 1, 50 * S); // a slower partition appears: the watermark does not move back
        assert_eq!(w.current(), 90 * S);
        w.observe(0, 0, 200 * S);
        assert_eq!(w.current(), 90 * S, "held by partition 1 at 50s");
        w.observe(0, 1, 150 * S);
        assert_eq!(w.current(), 140 * S);
        w.observe(1, 1, 300 * S); // same partition number of another source is another partition
        assert_eq!(w.current(), 140 * S);
    }

    #[test]
    fn per_partition_watermarks_for_scale_out() {
        let mut w = Watermark::new(10 * S, 5 * S);
        assert_eq!(w.partition(0, 7), i64::MIN, "unknown: nothing is late yet");
        w.observe(0, 1, 100 * S);
        w.observe(0, 2, 30 * S);
        assert_eq!(w.partition(0, 1), 90 * S);
        assert_eq!(w.partition(0, 2), 20 * S, "its own, not the others'");
        assert_eq!(w.highest_partition(), 90 * S);
        w.set_partition(0, 3, Some(500 * S));
        assert_eq!(w.partition(0, 3), 490 * S, "adopted with its progress");
        w.set_partition(0, 3, None);
        assert_eq!(w.partition(0, 3), i64::MIN);
        // partition 2 goes idle: its windows close with the least active watermark
        w.tick(1_000 * S);
        w.observe(0, 1, 110 * S);
        w.tick(1_006 * S);
        assert_eq!(w.partition(0, 2), 100 * S);
    }

    #[test]
    fn advancing_moves_every_partition_and_never_back() {
        let mut w = Watermark::new(10 * S, 60 * S);
        w.observe(0, 1, 50 * S);
        w.observe(0, 0, 100 * S);
        assert_eq!(w.current(), 40 * S);
        w.advance_to(70 * S);
        assert_eq!(w.current(), 70 * S);
        assert_eq!(w.partition(0, 1), 70 * S, "the slow partition too");
        assert_eq!(w.partition(0, 0), 90 * S, "a partition ahead keeps its own");
        w.advance_to(20 * S);
        assert_eq!(w.current(), 70 * S, "never back");
        w.observe(0, 1, 75 * S);
        assert_eq!(w.current(), 70 * S);
    }

    #[test]
    fn idle_partitions_stop_holding_it_back() {
        let mut w = Watermark::new(0, 5 * S);
        w.observe(0, 1, 10 * S);
        w.observe(0, 0, 100 * S);
        assert_eq!(w.current(), 10 * S);
        assert!(!w.tick(1_000 * S)); // first tick: both active
        w.observe(0, 0, 110 * S);
        assert!(!w.tick(1_003 * S));
        w.observe(0, 0, 120 * S);
        assert!(w.tick(1_006 * S), "partition 1 idle for 6s");
        assert_eq!(w.current(), 120 * S);
        w.observe(0, 1, 20 * S); // back: does not pull the watermark back
        assert_eq!(w.current(), 120 * S);
        w.observe(0, 0, 130 * S);
        assert_eq!(w.current(), 120 * S, "held by partition 1 again");
    }
}
