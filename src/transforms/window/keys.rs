//! Group keys: how an event's group-by values are written into one key string, hashed, sorted
//! for output, and read back into values for the rows.

use super::Window;
use crate::event::{Event, ValRef, Value, NO_TIME};
use crate::path::FieldPath;

/// Hashes group keys (fixed seeds: the table is rebuilt after a restore anyway).
pub(super) fn key_hash(key: &str) -> u64 {
    static STATE: std::sync::LazyLock<ahash::RandomState> =
        std::sync::LazyLock::new(|| ahash::RandomState::with_seeds(0x5ca1ab1e, 0xdecade, 0xfeed, 0xc0ffee));
    STATE.hash_one(key)
}

/// The indices of `keys` in ascending key order. A pane's keys mostly share a prefix (a type
/// tag and a device-id stem): sorting on the 8 bytes after the common prefix, packed into an
/// integer, and comparing whole keys only on ties costs a fraction of comparing strings
/// throughout (which was 3% of W1).
pub(super) fn sorted_order(keys: &[Box<str>]) -> Vec<usize> {
    let Some(first) = keys.first() else { return Vec::new() };
    let mut common = first.len();
    for k in &keys[1..] {
        common = first.as_bytes()[..common].iter().zip(k.as_bytes()).take_while(|(a, b)| a == b).count();
    }
    let mut order: Vec<(u64, u32)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let rest = &k.as_bytes()[common..];
            let mut word = [0u8; 8];
            let n = rest.len().min(8);
            word[..n].copy_from_slice(&rest[..n]);
            (u64::from_be_bytes(word), i as u32)
        })
        .collect();
    order.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| keys[a.1 as usize].cmp(&keys[b.1 as usize])));
    order.into_iter().map(|(_, i)| i as usize).collect()
}

/// Appends the group key of an event to `key`: per field a type tag and the text, fields
/// separated by U+001F.
pub(super) fn write_key(group_by: &[FieldPath], ev: &Event, key: &mut String) {
    for (i, g) in group_by.iter().enumerate() {
        if i > 0 {
            key.push('\u{1f}');
        }
        // the common case, a string the decoder recorded, without building a `ValRef`
        if let Some(Some(crate::event::Val::Str(t))) = g.get_stored(ev) {
            key.push('s');
            key.push_str(ev.text(t));
            continue;
        }
        match g.get(ev) {
            None | Some(ValRef::Null) => key.push('z'),
            Some(ValRef::Str(s)) => {
                key.push('s');
                key.push_str(&s);
            }
            Some(ValRef::Num(n)) => {
                key.push('n');
                key.push_str(n);
            }
            Some(ValRef::Int(n)) => {
                key.push('n');
                key.push_str(&n.to_string());
            }
            Some(ValRef::Float(f)) => {
                key.push('n');
                key.push_str(&f.to_string());
            }
            Some(ValRef::Bool(b)) => key.push_str(if b { "btrue" } else { "bfalse" }),
            Some(ValRef::Time(t)) => {
                key.push('t');
                key.push_str(&t.to_string());
            }
            Some(other) => {
                key.push('j');
                key.push_str(&other.to_json());
            }
        }
    }
}

impl Window {
    /// A group-by value from its part of the group key (see [`write_key`]).
    pub(super) fn key_value(tag: &str, text: &str) -> Value {
        match tag {
            "s" => Value::Str(text.to_string()),
            "n" => {
                text.parse::<i64>().map(Value::Int).unwrap_or_else(|_| Value::Float(text.parse().unwrap_or(f64::NAN)))
            }
            "b" => Value::Bool(text == "true"),
            "t" => Value::Time(text.parse().unwrap_or(NO_TIME)),
            "j" => Value::Json(text.to_string()),
            _ => Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Sorting a pane's keys on their packed bytes after the common prefix gives string order.
        #[test]
        fn pane_keys_sort_in_string_order(
            stem in "[a-z0-9\\x00-]{0,10}",
            tails in prop::collection::vec("[a-c\\x00é]{0,12}", 0..60),
        ) {
            let keys: Vec<Box<str>> = tails.iter().map(|t| format!("s{stem}{t}").into()).collect();
            let got: Vec<&str> = sorted_order(&keys).into_iter().map(|i| &*keys[i]).collect();
            let mut want: Vec<&str> = keys.iter().map(|k| &**k).collect();
            want.sort();
            prop_assert_eq!(got, want);
        }
    }
}
