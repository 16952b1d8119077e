//! JSON-array files: telling one from JSON lines, and sending its messages.

use bytes::Bytes;
use tokio::sync::mpsc;

use super::reader::{Closed, Reader};
use super::{Position, ReaderMsg};
use crate::event::Event;
use crate::model::format::MessageDecoder;
use crate::model::generic::Transport;

impl Reader {
    /// Sends the messages of a JSON-array file; the position counts elements, so that a restart
    /// skips the `skip` already sent.
    pub(super) fn emit_array_file(
        &self,
        idx: usize,
        all: Bytes,
        skip: u64,
        tx: &mpsc::Sender<ReaderMsg>,
    ) -> anyhow::Result<()> {
        let f = &self.files[idx];
        let mut out = Vec::new();
        decode_record_into_unbounded(&self.decoder, all.clone(), &mut out);
        let here = |line: u64| Position { file: idx, path: f.path.to_string(), line };
        let mut events = Vec::new();
        let mut dead = Vec::new();
        for (i, r) in out.into_iter().enumerate().skip(skip as usize) {
            match r {
                Ok(mut ev) if ev.time >= self.from && ev.time < self.to => {
                    ev.meta.partition = f.partition;
                    ev.meta.offset = i as i64;
                    ev.meta.origin = Some(f.display.clone());
                    events.push(ev);
                }
                Ok(_) => {}
                Err(reason) => {
                    let payload = if all.len() <= crate::model::MAX_RECORD_BYTES { all.clone() } else { Bytes::new() };
                    dead.push(Event::dead_letter(payload, &reason, &format!("{}[{i}]", f.display), &self.component));
                }
            }
            if events.len() >= self.batch_size.max(1) {
                let batch = std::mem::take(&mut events);
                tx.blocking_send(ReaderMsg::Batch {
                    events: batch,
                    dead: std::mem::take(&mut dead),
                    pos: here(i as u64 + 1),
                })
                .map_err(|_| Closed)?;
            }
        }
        let next = Position {
            file: idx + 1,
            path: self.files.get(idx + 1).map(|f| f.path.to_string()).unwrap_or_default(),
            line: 0,
        };
        tx.blocking_send(ReaderMsg::Batch { events, dead, pos: next }).map_err(|_| Closed)?;
        Ok(())
    }
}

/// A JSON-array file: its elements are decoded one by one (the whole file may exceed the
/// per-record limit, each message may not).
fn decode_record_into_unbounded(decoder: &MessageDecoder, all: Bytes, out: &mut Vec<Result<Event, String>>) {
    let text = match std::str::from_utf8(&all) {
        Ok(t) => t,
        Err(e) => {
            out.push(Err(format!("invalid UTF-8 at byte {}", e.valid_up_to())));
            return;
        }
    };
    let elems: Vec<&serde_json::value::RawValue> = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            out.push(Err(format!("malformed JSON array file: {e}")));
            return;
        }
    };
    for elem in elems {
        let off = elem.get().as_ptr() as usize - text.as_ptr() as usize;
        decoder.decode_each(all.slice(off..off + elem.get().len()), None, &Transport::NONE, |r| out.push(r));
    }
}

/// A file is one JSON array when it starts with `[` and its first line is not a complete JSON
/// value on its own (JSON lines whose lines are arrays also start with `[`).
pub(super) fn looks_like_array_file(head: &[u8], eof: bool) -> bool {
    let trimmed = head.iter().position(|b| !b.is_ascii_whitespace());
    let Some(start) = trimmed else { return false };
    if head[start] != b'[' {
        return false;
    }
    let line_end = memchr::memchr(b'\n', &head[start..]).map(|i| start + i);
    match line_end {
        Some(e) => serde_json::from_slice::<serde::de::IgnoredAny>(&head[start..e]).is_err(),
        None => !eof || serde_json::from_slice::<serde::de::IgnoredAny>(&head[start..]).is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_files_are_told_from_json_lines() {
        assert!(looks_like_array_file(b"[\n {\"a\":1},\n {\"a\":2}\n]\n", true));
        assert!(looks_like_array_file(b"[{\"a\":1},{\"a\":2}]", true));
        assert!(!looks_like_array_file(b"[{\"a\":1}]\n[{\"a\":2}]\n", true), "JSON lines of arrays");
        assert!(!looks_like_array_file(b"{\"a\":1}\n", true));
        assert!(!looks_like_array_file(b"  ", true));
    }
}
