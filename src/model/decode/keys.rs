//! How the decoder treats each top-level key, and what it keeps of it under a projection:
//! shared by the serde_json path and the fast path ([`super::super::scan`]).

use crate::projection::Projection;

/// How the decoder treats a top-level key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(in crate::model) enum KeyKind {
    /// Envelope strings (`deviceId`, ...): must be strings or null.
    EnvString,
    MessageSource,
    EnqueuedTime,
    /// Payload objects decoded one level deep (`telemetry`, ...).
    Object,
    Properties,
    Other,
}

/// Dispatches on length first, then compares at most two candidates word-wise: faster than a
/// string `match`, which calls `memcmp` for every candidate of the same length.
pub(in crate::model) fn key_kind(k: &str) -> KeyKind {
    use crate::event::eq_short as eq;
    use KeyKind::*;
    match k.len() {
        5 if eq(k, "actor") => Object,
        6 if eq(k, "schema") || eq(k, "module") => EnvString,
        7 if eq(k, "updated") => Object,
        8 if eq(k, "deviceId") => EnvString,
        8 if eq(k, "resource") => Object,
        9 if eq(k, "telemetry") => Object,
        9 if eq(k, "component") => EnvString,
        10 if eq(k, "templateId") => EnvString,
        10 if eq(k, "properties") => Properties,
        11 if eq(k, "messageType") => EnvString,
        11 if eq(k, "enrichments") => Object,
        12 if eq(k, "enqueuedTime") => EnqueuedTime,
        13 if eq(k, "messageSource") => MessageSource,
        13 if eq(k, "applicationId") => EnvString,
        17 if eq(k, "messageProperties") => Object,
        _ => Other,
    }
}
/// What the decoder keeps of a top-level value: everything without a projection; else what the
/// projection covers (`messageSource` and `enqueuedTime` always), of `telemetry` only its listed
/// keys. Skipped values get the same checks.
pub(in crate::model) fn keep_for<'p>(proj: Option<&'p Projection>, key: &str, kind: KeyKind) -> Keep<'p> {
    match proj {
        None => Keep::All,
        Some(p) if p.covers_top(key) => match (kind, p.telemetry.as_deref()) {
            (KeyKind::Object, Some(keys)) if key == "telemetry" => Keep::Some(keys),
            _ => Keep::All,
        },
        Some(_) => Keep::Nothing,
    }
}

/// Which fields of an object the decoder keeps.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(in crate::model) enum Keep<'p> {
    All,
    Some(&'p [String]),
    Nothing,
}
