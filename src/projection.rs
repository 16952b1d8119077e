//! The projection: which fields of a source's events the pipeline reads, so that the decoder
//! keeps only those (and checks everything else just as strictly), and where it put them.
//!
//! Everything about it is here: the type, its slots, what a field path adds to it and which
//! slot answers a path ([`Projection::add_path`], [`Projection::slot_of`],
//! [`Projection::covers`]), and computing it for a source from the components downstream
//! ([`for_source`]). It depends on nothing else in the crate: the decoder (`model::decode`)
//! fills events by it, events ([`crate::event::Event`]) hold it, and field paths
//! ([`crate::path::FieldPath`]) read through it.
//!
//! A projection is shared by reference counting: the plan holds one per source, each decoded
//! event holds one. Sources that decode on several threads give each unit of work its own copy
//! ([`Projection::copy`]), so that threads do not contend on one count; copies keep the
//! original's [`Projection::id`], which caches of slot positions are keyed by.

use std::sync::atomic::{AtomicU64, Ordering};

/// The fields a pipeline reads of the events of one source.
#[derive(Debug, Clone, Default)]
pub struct Projection {
    /// Top-level keys kept (besides `messageSource` and `enqueuedTime`, always kept).
    pub top: Vec<String>,
    /// When `telemetry` is kept: its keys kept, or `None` for all of them.
    pub telemetry: Option<Vec<String>>,
    id: u64,
}

impl PartialEq for Projection {
    fn eq(&self, other: &Self) -> bool {
        self.top == other.top && self.telemetry == other.telemetry
    }
}

impl Eq for Projection {}

/// Slots per projected event: where the decoder put the first fields of the projection
/// (`messageSource`, `enqueuedTime`, then `top`, then the `telemetry` keys, in order), so that
/// readers find them without comparing keys. Each holds a field index, [`SLOT_ABSENT`] or
/// [`SLOT_UNKNOWN`].
pub const SLOTS: usize = 16;
/// The field is not in the message.
pub const SLOT_ABSENT: u8 = u8::MAX;
/// The field's position is not recorded (look it up by key).
pub const SLOT_UNKNOWN: u8 = u8::MAX - 1;

/// Records that the field at `index` fills `slot` (the first occurrence, as a lookup by key
/// finds it).
pub fn record_slot(slots: &mut [u8; SLOTS], slot: Option<usize>, index: usize) {
    if let Some(s) = slot {
        if slots[s] == SLOT_ABSENT {
            slots[s] = if index < SLOT_UNKNOWN as usize { index as u8 } else { SLOT_UNKNOWN };
        }
    }
}

/// String equality tuned for short keys: compares whole words instead of calling `memcmp`,
/// which costs more than the comparison itself for keys of a few bytes.
#[inline]
pub fn eq_short(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if n >= 8 {
        if n <= 16 {
            let w = |x: &[u8], at: usize| u64::from_le_bytes(x[at..at + 8].try_into().unwrap());
            return w(a, 0) == w(b, 0) && w(a, n - 8) == w(b, n - 8);
        }
        return a == b;
    }
    let mut i = 0;
    while i < n {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Projection {
    /// A projection keeping these top-level keys and, when `telemetry` is kept, these of its
    /// keys (`None`: all of them).
    pub fn new(top: Vec<String>, telemetry: Option<Vec<String>>) -> Projection {
        Projection { top, telemetry, id: NEXT_ID.fetch_add(1, Ordering::Relaxed) }
    }

    /// Identifies this projection and its copies (never reused within a process).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// A copy with its own reference count (see the module documentation).
    pub fn copy(&self) -> std::sync::Arc<Projection> {
        std::sync::Arc::new(self.clone())
    }

    /// Whether the top-level key `key` is kept.
    pub fn covers_top(&self, key: &str) -> bool {
        eq_short(key, "messageSource") || eq_short(key, "enqueuedTime") || self.top.iter().any(|k| eq_short(k, key))
    }

    /// Whether `telemetry.key` is kept.
    pub fn covers_telemetry(&self, key: &str) -> bool {
        self.covers_top("telemetry") && self.telemetry.as_ref().is_none_or(|ks| ks.iter().any(|k| k == key))
    }

    /// Whether the whole telemetry object is kept.
    pub fn covers_all_telemetry(&self) -> bool {
        self.covers_top("telemetry") && self.telemetry.is_none()
    }

    /// The slot of a kept top-level key (see [`SLOTS`]).
    pub fn top_slot(&self, key: &str) -> Option<usize> {
        let s = match key {
            "messageSource" => 0,
            "enqueuedTime" => 1,
            _ => self.top.iter().position(|k| eq_short(k, key))? + 2,
        };
        (s < SLOTS).then_some(s)
    }

    /// The slot of a kept telemetry key (only when `telemetry` lists its keys).
    pub fn telemetry_slot(&self, key: &str) -> Option<usize> {
        let s = self.telemetry.as_ref()?.iter().position(|k| k == key)? + 2 + self.top.len();
        (s < SLOTS).then_some(s)
    }

    /// The slot of the `index`th kept telemetry key.
    pub fn telemetry_slot_at(&self, index: usize) -> Option<usize> {
        let s = index + 2 + self.top.len();
        (s < SLOTS).then_some(s)
    }

    /// The slot a field path starts with, and how many of its segments the slot stands for.
    /// `export_key`: the path's first segment is a key of the export format.
    pub fn slot_of(&self, parts: &[String], export_key: bool) -> Option<(usize, usize)> {
        let first = parts[0].as_str();
        match first {
            "telemetry" => Some((self.telemetry_slot(parts.get(1)?)?, 2)),
            "meta" => None,
            _ if export_key => Some((self.top_slot(first)?, 1)),
            _ => Some((self.telemetry_slot(first)?, 1)),
        }
    }

    /// Whether the projection keeps what a field path reads, for an event whose top-level keys
    /// are all the export format's (`only_export_keys`) or not.
    pub fn covers(&self, parts: &[String], export_key: bool, only_export_keys: bool) -> bool {
        let first = parts[0].as_str();
        match first {
            "telemetry" => match parts.get(1) {
                None => self.covers_all_telemetry(),
                Some(k) => self.covers_telemetry(k),
            },
            "meta" => only_export_keys,
            _ if export_key => self.covers_top(first),
            // a bare telemetry name: unless an unknown top-level key could be it
            _ => only_export_keys && self.covers_telemetry(first),
        }
    }

    /// Adds what a field path reads. `all_telemetry` is set when the path reads the whole
    /// telemetry object (applied by [`Projection::finish`]).
    pub fn add_path(&mut self, parts: &[String], export_key: bool, all_telemetry: &mut bool) {
        let first = parts[0].as_str();
        match first {
            "meta" => {}
            "telemetry" => match parts.get(1) {
                Some(k) => self.add_telemetry_key(k),
                None => {
                    *all_telemetry = true;
                    self.add_top("telemetry");
                }
            },
            _ if export_key => self.add_top(first),
            _ => self.add_telemetry_key(first),
        }
    }

    fn add_top(&mut self, key: &str) {
        if !self.top.iter().any(|t| t == key) {
            self.top.push(key.to_string());
        }
    }

    fn add_telemetry_key(&mut self, key: &str) {
        self.add_top("telemetry");
        let keys = self.telemetry.get_or_insert_with(Vec::new);
        if !keys.iter().any(|x| x == key) {
            keys.push(key.to_string());
        }
    }
}

/// What one component of a pipeline reads, for [`for_source`].
#[derive(Debug, Clone)]
pub struct Reader {
    /// Upstream (component index, output port).
    pub inputs: Vec<(usize, usize)>,
    /// The field paths it reads, as (segments, first segment is an export key); `None`: it may
    /// read anything (it writes whole events, or evaluates arbitrary expressions).
    pub reads: Option<Vec<(Vec<String>, bool)>>,
    /// It passes the events it receives on to its main output (a filter does).
    pub forwards: bool,
}

/// The fields the pipeline reads of the events of source `src`: the union of what the
/// components reached through main outputs read, following components that pass events on.
/// Secondary outputs (late events, dead letters) are left out: their rare readers decode the
/// events they get whole. `None` when some component may read anything.
pub fn for_source(readers: &[Reader], src: usize) -> Option<Projection> {
    let mut p = Projection::new(Vec::new(), None);
    let mut all_telemetry = false;
    let mut stack = vec![src];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(up) = stack.pop() {
        for (i, r) in readers.iter().enumerate() {
            if !r.inputs.iter().any(|(u, port)| *u == up && *port == 0) || !seen.insert(i) {
                continue;
            }
            for (parts, export_key) in r.reads.as_ref()? {
                p.add_path(parts, *export_key, &mut all_telemetry);
            }
            if r.forwards {
                stack.push(i);
            }
        }
    }
    if all_telemetry {
        p.telemetry = None;
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str, export_key: bool) -> (Vec<String>, bool) {
        (s.split('.').map(str::to_string).collect(), export_key)
    }

    #[test]
    fn a_source_projection_follows_forwarding_components_only() {
        // 0 source -> 1 filter (forwards) -> 2 window; 0 -> 3 sink on the dead-letter port
        let readers = vec![
            Reader { inputs: vec![], reads: Some(vec![]), forwards: false },
            Reader { inputs: vec![(0, 0)], reads: Some(vec![path("messageSource", true)]), forwards: true },
            Reader {
                inputs: vec![(1, 0)],
                reads: Some(vec![path("deviceId", true), path("temperature", false)]),
                forwards: false,
            },
            Reader { inputs: vec![(0, 1)], reads: None, forwards: false },
        ];
        let p = for_source(&readers, 0).expect("nothing on the main path reads everything");
        assert_eq!(p.top, vec!["messageSource", "deviceId", "telemetry"]);
        assert_eq!(p.telemetry, Some(vec!["temperature".to_string()]));
        assert_eq!(p.top_slot("deviceId"), Some(3));
        assert_eq!(p.slot_of(&path("temperature", false).0, false), Some((5, 1)));
        assert!(p.covers(&path("telemetry.temperature", true).0, true, true));
        assert!(!p.covers(&path("humidity", false).0, false, true));
    }

    #[test]
    fn a_reader_of_everything_means_no_projection() {
        let readers = vec![
            Reader { inputs: vec![], reads: Some(vec![]), forwards: false },
            Reader { inputs: vec![(0, 0)], reads: None, forwards: false },
        ];
        assert_eq!(for_source(&readers, 0), None);
    }

    #[test]
    fn copies_share_the_id_and_new_projections_do_not() {
        let a = Projection::new(vec!["deviceId".into()], None);
        let b = Projection::new(vec!["deviceId".into()], None);
        assert_eq!(a.copy().id(), a.id());
        assert_ne!(a.id(), b.id());
        assert_eq!(a, b, "equal by content");
    }
}
