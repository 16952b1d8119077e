//! Building and changing events: appending fields, setting, removing and renaming values at
//! a path (objects on the way are created, or decoded from their JSON text, as needed).

use super::{eq_short, Event, Field, Text, Val, Value};

impl Event {
    pub(super) fn alloc(&mut self, s: &str) -> Text {
        let off = self.arena.len();
        self.arena.push_str(s);
        Text::arena(off, s.len())
    }

    pub(super) fn store(&mut self, v: &Value) -> Val {
        match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(*b),
            Value::Int(i) => Val::Int(*i),
            Value::Float(f) => Val::Float(*f),
            Value::Str(s) => Val::Str(self.alloc(s)),
            Value::Time(t) => Val::Time(*t),
            Value::Json(s) => Val::Json(self.alloc(s)),
            Value::Bytes(b) => match std::str::from_utf8(b) {
                Ok(s) => Val::Bytes(self.alloc(s)),
                Err(_) => {
                    // keep arbitrary bytes valid for the arena by base64-encoding them
                    use base64::Engine as _;
                    let enc = base64::engine::general_purpose::STANDARD.encode(b);
                    Val::Str(self.alloc(&enc))
                }
            },
        }
    }

    pub(super) fn push_field(&mut self, f: Field) {
        // The root is kept as the last range of the vector whenever we append to it.
        let (start, len) = self.root;
        if (start + len) as usize != self.fields.len() {
            let moved: Vec<Field> = self.fields[start as usize..(start + len) as usize].to_vec();
            self.root.0 = self.fields.len() as u32;
            self.fields.extend(moved);
        }
        self.fields.push(f);
        self.root.1 += 1;
        self.root_raw = Text::EMPTY;
        self.known_keys = false;
    }

    /// Appends a top-level field (no check for an existing key: use [`Event::set`] for that).
    pub fn push(&mut self, key: &str, v: Value) {
        self.materialize();
        let key = self.alloc(key);
        let val = self.store(&v);
        self.push_field(Field { key, val });
    }

    /// Appends a top-level field holding an object built from `fields`.
    pub fn push_object(&mut self, key: &str, fields: &[(&str, Value)]) {
        self.materialize();
        let key = self.alloc(key);
        let start = self.fields.len() as u32;
        let mut built = Vec::with_capacity(fields.len());
        for (k, v) in fields {
            let k = self.alloc(k);
            let v = self.store(v);
            built.push(Field { key: k, val: v });
        }
        // keep the root contiguous: move it behind the new object if needed
        self.fields.extend(built);
        let obj = Val::Obj { start, len: fields.len() as u32, raw: Text::EMPTY };
        self.push_field(Field { key, val: obj });
    }

    /// Sets the value at `path` (object keys from the top level), creating objects on the way.
    /// Returns false if the path crosses a value that is not an object.
    pub fn set(&mut self, path: &[&str], v: Value) -> bool {
        self.materialize();
        let val = self.store(&v);
        self.set_val(path, val)
    }

    fn set_val(&mut self, path: &[&str], val: Val) -> bool {
        let Some((last, parents)) = path.split_last() else {
            return false;
        };
        // Walk down, remembering the chain of (object range) so that we can rewrite it.
        let root = self.root;
        let mut chain: Vec<(u32, u32)> = vec![root];
        for key in parents {
            let (start, len) = *chain.last().unwrap();
            let found = self.find(start, len, key);
            match found.map(|i| self.fields[i].val) {
                Some(Val::Obj { start, len, .. }) => chain.push((start, len)),
                Some(Val::Json(t)) => {
                    // decode the JSON object one level so that it can be modified
                    let text = self.text(t).to_string();
                    match self.decode_json_object(&text) {
                        Some((s, l)) => {
                            let i = found.unwrap();
                            self.fields[i].val = Val::Obj { start: s, len: l, raw: Text::EMPTY };
                            chain.push((s, l));
                        }
                        None => return false,
                    }
                }
                Some(Val::Null) | None => {
                    // create an empty object
                    let s = self.fields.len() as u32;
                    let obj = Val::Obj { start: s, len: 0, raw: Text::EMPTY };
                    match found {
                        Some(i) => self.fields[i].val = obj,
                        None => {
                            let k = self.alloc(key);
                            let (ps, pl) = *chain.last().unwrap();
                            let (ns, nl) = self.append_to(ps, pl, Field { key: k, val: obj });
                            let last_idx = chain.len() - 1;
                            chain[last_idx] = (ns, nl);
                            self.relink(&chain, parents, last_idx);
                        }
                    }
                    chain.push((self.fields.len() as u32, 0));
                }
                Some(_) => return false,
            }
        }
        let (start, len) = *chain.last().unwrap();
        match self.find(start, len, last) {
            Some(i) => self.fields[i].val = val,
            None => {
                let k = self.alloc(last);
                let (ns, nl) = self.append_to(start, len, Field { key: k, val });
                let last_idx = chain.len() - 1;
                chain[last_idx] = (ns, nl);
                self.relink(&chain, parents, last_idx);
            }
        }
        // every object on the path is modified now
        self.clear_raw(&chain, parents);
        true
    }

    /// Decodes a JSON object text into fields appended to the vector; returns its range.
    fn decode_json_object(&mut self, text: &str) -> Option<(u32, u32)> {
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).ok()?;
        let start = self.fields.len() as u32;
        let mut built = Vec::with_capacity(map.len());
        for (k, v) in &map {
            let key = self.alloc(k);
            let val = self.store(&Value::from_json(v));
            built.push(Field { key, val });
        }
        self.fields.extend(built);
        Some((start, map.len() as u32))
    }

    fn find(&self, start: u32, len: u32, key: &str) -> Option<usize> {
        (start as usize..(start + len) as usize)
            .find(|&i| self.fields[i].key.len() == key.len() && eq_short(self.text(self.fields[i].key), key))
    }

    /// Appends a field to the object at `start..start+len`, moving it to the end of the vector
    /// unless it already is there. Returns the new range.
    fn append_to(&mut self, start: u32, len: u32, f: Field) -> (u32, u32) {
        if (start + len) as usize == self.fields.len() {
            self.fields.push(f);
            return (start, len + 1);
        }
        let moved: Vec<Field> = self.fields[start as usize..(start + len) as usize].to_vec();
        let ns = self.fields.len() as u32;
        self.fields.extend(moved);
        self.fields.push(f);
        (ns, len + 1)
    }

    /// After the object at `chain[idx]` moved, updates the reference to it in its parent.
    fn relink(&mut self, chain: &[(u32, u32)], keys: &[&str], idx: usize) {
        let (ns, nl) = chain[idx];
        if idx == 0 {
            self.root = (ns, nl);
            return;
        }
        let (ps, pl) = chain[idx - 1];
        if let Some(i) = self.find(ps, pl, keys[idx - 1]) {
            self.fields[i].val = Val::Obj { start: ns, len: nl, raw: Text::EMPTY };
        }
    }

    fn clear_raw(&mut self, chain: &[(u32, u32)], keys: &[&str]) {
        self.root_raw = Text::EMPTY;
        if chain.len() == 1 {
            self.known_keys = false; // a top-level field was added or removed
        }
        for idx in 1..chain.len() {
            let (ps, pl) = chain[idx - 1];
            if let Some(i) = self.find(ps, pl, keys[idx - 1]) {
                if let Val::Obj { start, len, .. } = self.fields[i].val {
                    self.fields[i].val = Val::Obj { start, len, raw: Text::EMPTY };
                }
            }
        }
    }

    /// Removes the value at `path`. Returns whether something was removed.
    pub fn remove(&mut self, path: &[&str]) -> bool {
        self.materialize();
        let Some((last, parents)) = path.split_last() else {
            return false;
        };
        let mut chain: Vec<(u32, u32)> = vec![self.root];
        for key in parents {
            let (start, len) = *chain.last().unwrap();
            match self.find(start, len, key).map(|i| self.fields[i].val) {
                Some(Val::Obj { start, len, .. }) => chain.push((start, len)),
                Some(Val::Json(t)) => {
                    let text = self.text(t).to_string();
                    let i = self.find(start, len, key).unwrap();
                    match self.decode_json_object(&text) {
                        Some((s, l)) => {
                            self.fields[i].val = Val::Obj { start: s, len: l, raw: Text::EMPTY };
                            chain.push((s, l));
                        }
                        None => return false,
                    }
                }
                _ => return false,
            }
        }
        let (start, len) = *chain.last().unwrap();
        let Some(i) = self.find(start, len, last) else {
            return false;
        };
        // shift the rest of the object left by one
        let end = (start + len) as usize;
        self.fields.copy_within(i + 1..end, i);
        let last_idx = chain.len() - 1;
        chain[last_idx] = (start, len - 1);
        self.relink(&chain, parents, last_idx);
        self.clear_raw(&chain, parents);
        true
    }

    /// Moves the value at `from` to `to`. Returns false if `from` does not exist.
    pub fn rename(&mut self, from: &[&str], to: &[&str]) -> bool {
        let Some(v) = self.get_path(from).map(|v| v.to_owned_value()) else {
            return false;
        };
        self.remove(from);
        self.set(to, v)
    }
}

#[cfg(test)]
mod tests {
    use crate::event::tests::decoded;
    use crate::event::{Event, Value};

    #[test]
    fn set_creates_and_overwrites_nested_fields() {
        let mut ev = decoded(
            r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"t":1.5,"loc":{"lat":1}}}"#,
        );
        assert!(ev.raw_json().is_some());
        assert!(ev.set(&["telemetry", "f"], Value::Float(34.7)));
        assert!(ev.set(&["telemetry", "t"], Value::Int(2)));
        assert!(ev.set(&["telemetry", "loc", "lon"], Value::Float(-1.0)));
        assert!(ev.set(&["new", "a"], Value::Str("x\"y".into())));
        assert!(ev.raw_json().is_none());
        let v: serde_json::Value = serde_json::from_str(&ev.to_json()).unwrap();
        assert_eq!(v["telemetry"]["t"], 2);
        assert_eq!(v["telemetry"]["f"], 34.7);
        assert_eq!(v["telemetry"]["loc"]["lon"], -1.0);
        assert_eq!(v["telemetry"]["loc"]["lat"], 1);
        assert_eq!(v["new"]["a"], "x\"y");
        assert!(!ev.set(&["messageSource", "x"], Value::Null), "cannot descend into a string");
    }

    #[test]
    fn remove_and_rename() {
        let mut ev = decoded(
            r#"{"messageSource":"telemetry","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{"a":1,"b":2,"c":3}}"#,
        );
        assert!(ev.remove(&["telemetry", "b"]));
        assert!(!ev.remove(&["telemetry", "zz"]));
        assert!(ev.rename(&["telemetry", "a"], &["telemetry", "alpha"]));
        let v: serde_json::Value = serde_json::from_str(&ev.to_json()).unwrap();
        assert_eq!(v["telemetry"], serde_json::json!({"c":3,"alpha":1}));
    }

    #[test]
    fn rows_serialize_as_json() {
        let mut ev = Event::row();
        ev.push("deviceId", "d1".into());
        ev.push("count", Value::Int(3));
        ev.push("avg", Value::Float(1.0));
        ev.push("nan", Value::Float(f64::NAN));
        ev.push("t", Value::Time(1_700_000_000_123_000_000));
        ev.push_object("o", &[("k", Value::Str("v\n".into()))]);
        assert_eq!(
            ev.to_json(),
            r#"{"deviceId":"d1","count":3,"avg":1.0,"nan":null,"t":"2023-11-14T22:13:20.123Z","o":{"k":"v\n"}}"#
        );
        assert_eq!(ev.get_path(&["o", "k"]).unwrap().as_str(), Some("v\n"));
    }
}
