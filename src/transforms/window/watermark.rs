//! Watermarks: per input partition, the largest event time seen; overall, the minimum of those
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

    /// Wall-clock tick (live mode): marks idle partitions. Returns whether the watermark moved.
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
        self.wm != before
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
