//! Events held until the watermark passes them: kept as events in memory, written to a
//! checkpoint as their JSON text and metadata, and decoded again when a checkpoint is restored.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::event::{Event, Kind, Meta, Nanos, Value};

/// A held event.
#[derive(Debug)]
pub enum Held {
    Live(Box<Event>),
    Stored(Stored),
}

/// A held event as a checkpoint stores it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stored {
    json: String,
    /// An export message (decoded again as one) or a row (rebuilt field by field).
    export: bool,
    time: Nanos,
    source: u16,
    partition: u32,
    offset: i64,
    origin: Option<String>,
    enqueued: Nanos,
    attrs: Vec<(String, String)>,
}

impl Held {
    pub fn of(ev: &Event) -> Held {
        Held::Live(Box::new(ev.clone()))
    }

    fn stored(ev: &Event) -> Stored {
        Stored {
            json: ev.to_json(),
            export: matches!(ev.kind, Kind::Export(_)),
            time: ev.time,
            source: ev.meta.source,
            partition: ev.meta.partition,
            offset: ev.meta.offset,
            origin: ev.meta.origin.as_deref().map(str::to_string),
            enqueued: ev.meta.enqueued,
            attrs: ev.meta.attrs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        }
    }

    /// The event again.
    pub fn into_event(self) -> Result<Event, String> {
        let s = match self {
            Held::Live(ev) => return Ok(*ev),
            Held::Stored(s) => s,
        };
        let mut ev = if s.export {
            crate::model::decode::decode_object(Bytes::from(s.json))?
        } else {
            let v: serde_json::Value = serde_json::from_str(&s.json).map_err(|e| e.to_string())?;
            let mut ev = Event::row();
            for (k, v) in v.as_object().into_iter().flatten() {
                ev.push(k, Value::from_json(v));
            }
            ev
        };
        ev.time = s.time;
        ev.meta = Meta {
            source: s.source,
            partition: s.partition,
            offset: s.offset,
            origin: s.origin.map(Arc::from),
            enqueued: s.enqueued,
            attrs: s.attrs.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        };
        Ok(ev)
    }
}

impl Serialize for Held {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Held::Live(ev) => Held::stored(ev).serialize(s),
            Held::Stored(st) => st.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Held {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Stored::deserialize(d).map(Held::Stored)
    }
}
