//! Session windows: adding an event to its group's sessions (merging those it bridges) and
//! when a session ends.

use super::{Scope, Session, Shape, Window};
use crate::event::Nanos;

/// End of a session: `gap` after its last event, but not past its `max_duration` boundary.
pub(super) fn session_end(shape: Shape, first: Nanos, last: Nanos) -> Nanos {
    match shape {
        Shape::Session { gap, max: Some(m) } => (last + gap).min((first.div_euclid(m) + 1) * m),
        Shape::Session { gap, max: None } => last + gap,
        _ => last,
    }
}

impl Window {
    /// Adds an event to sessions; false when it is late.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add_to_session(
        &mut self,
        scope: Scope,
        key: &str,
        vals: &[f64],
        t: Nanos,
        gap: Nanos,
        max: Option<Nanos>,
        wm: Nanos,
    ) -> bool {
        self.key.clear();
        self.key.push_str(key);
        if let Some(m) = max {
            self.key.push('\u{1e}');
            self.key.push_str(&t.div_euclid(m).to_string());
        }
        let shape = self.shape;
        let key: Box<str> = self.key.as_str().into();
        let skey = (scope.0, scope.1, key.clone());
        let sessions = self.state.sessions.entry(skey.clone()).or_default();
        // Open sessions this event touches: t within (first - gap, last + gap). A session whose
        // end the watermark has passed is closed even if it has not been emitted yet (emission
        // waits for the end of the batch): an event may not reopen it, or which events are late
        // would depend on where batches end.
        let touching: Vec<usize> = sessions
            .iter()
            .enumerate()
            .filter(|(_, s)| t > s.first - gap && t < s.last + gap && session_end(shape, s.first, s.last) > wm)
            .map(|(i, _)| i)
            .collect();
        if touching.is_empty() && session_end(shape, t, t) <= wm {
            if sessions.is_empty() {
                self.state.sessions.remove(&skey);
            }
            return false;
        }
        let plan = &self.plan;
        let mut merged = Session { first: t, last: t, cells: Vec::with_capacity(plan.stride), sketches: Vec::new() };
        plan.init(&mut merged.cells);
        plan.init_sketches(&mut merged.sketches);
        // Sessions that touch the same event never share an event time, so the order of merging
        // does not matter; the new event is added last, which breaks first/last ties by arrival.
        for &i in touching.iter().rev() {
            let mut acc = sessions.remove(i);
            self.timers.remove(&(session_end(shape, acc.first, acc.last), scope, key.clone(), acc.first));
            plan.merge(&mut acc.cells, &mut acc.sketches, &merged.cells, &merged.sketches);
            acc.first = acc.first.min(merged.first);
            acc.last = acc.last.max(merged.last);
            merged = acc;
        }
        plan.add_values(vals, t, &mut merged.cells, &mut merged.sketches, &mut self.skipped);
        merged.first = merged.first.min(t);
        merged.last = merged.last.max(t);
        self.timers.insert((session_end(shape, merged.first, merged.last), scope, key, merged.first));
        let pos = sessions.iter().position(|s| s.first > merged.first).unwrap_or(sessions.len());
        sessions.insert(pos, merged);
        true
    }
}
