//! Emitting windows: the rows of the windows the watermark has passed, as events or as
//! columns.

use sketches_ddsketch::DDSketch;

use super::keys::sorted_order;
use super::{Scope, Shape, Window};
use crate::event::{Event, Nanos, Value};
use crate::runtime::{Emitter, Port};

impl Window {
    fn row(&self, key: &str, start: Nanos, end: Nanos, cells: &[f64], sketches: &[DDSketch]) -> Event {
        let mut row = Event::from_layout(&self.layout, key.len());
        let key = key.split('\u{1e}').next().unwrap_or(key);
        for (i, part) in key.split('\u{1f}').enumerate().take(self.group_cols.len()) {
            let (tag, text) = part.split_at(1);
            match tag {
                "s" => row.set_str_at(i, text),
                _ => row.set_at(i, &Self::key_value(tag, text)),
            }
        }
        let g = self.group_cols.len();
        row.set_at(g, &Value::Time(start));
        row.set_at(g + 1, &Value::Time(end));
        row.set_at(g + 2, &Value::Int(cells[0] as i64));
        self.plan.finish_at(cells, sketches, &mut row, g + 3);
        row.time = start;
        row
    }

    /// Emits every window that the watermark has passed (all of them with `all`).
    pub(super) fn emit_ready(&mut self, all: bool, out: &mut Emitter) {
        match self.shape {
            Shape::Tumbling { size } | Shape::Hopping { size, .. } => {
                let ready: Vec<(u16, u32, Nanos)> = if self.partitioned {
                    self.state
                        .panes
                        .keys()
                        .filter(|(src, part, start)| all || start + size <= self.state.watermark.partition(*src, *part))
                        .copied()
                        .collect()
                } else {
                    let wm = self.state.watermark.current();
                    self.state.panes.keys().take_while(|(_, _, start)| all || start + size <= wm).copied().collect()
                };
                let as_columns = out.wants_columns(Port::MAIN);
                for pk in ready {
                    let pane = self.state.panes.remove(&pk).unwrap();
                    let start = pk.2;
                    let order = sorted_order(&pane.keys);
                    if as_columns {
                        if let Some(rows) = self.pane_columns(&pane, &order, start, start + size) {
                            out.emit_columns(Port::MAIN, rows);
                            continue;
                        }
                    }
                    let (stride, ns) = (self.plan.stride, self.plan.sketches);
                    let rows: Vec<Event> = order
                        .into_iter()
                        .map(|i| {
                            self.row(
                                &pane.keys[i],
                                start,
                                start + size,
                                &pane.cells[i * stride..(i + 1) * stride],
                                &pane.sketches[i * ns..(i + 1) * ns],
                            )
                        })
                        .collect();
                    out.emit_all(rows);
                }
                self.last_pane = None;
            }
            Shape::Session { .. } => {
                let limit = if self.partitioned {
                    self.state.watermark.highest_partition()
                } else {
                    self.state.watermark.current()
                };
                let ready: Vec<(Nanos, Scope, Box<str>, Nanos)> = self
                    .timers
                    .iter()
                    .take_while(|(end, ..)| all || *end <= limit)
                    .filter(|(end, scope, ..)| all || !self.partitioned || *end <= self.watermark_of(*scope))
                    .cloned()
                    .collect();
                for t in ready {
                    self.timers.remove(&t);
                    let (end, scope, key, first) = t;
                    let skey = (scope.0, scope.1, key);
                    let Some(list) = self.state.sessions.get_mut(&skey) else { continue };
                    let Some(i) = list.iter().position(|s| s.first == first) else { continue };
                    let s = list.remove(i);
                    if list.is_empty() {
                        self.state.sessions.remove(&skey);
                    }
                    let row = self.row(&skey.2, s.first, end, &s.cells, &s.sketches);
                    out.emit(row);
                }
            }
        }
        self.update_gauges();
    }
}
