//! Bytes on the wire: frames, the sections of an AMQP message, SAS tokens and lock tokens.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Header, Message as AmqpMessage, MessageAnnotations};
use fe2o3_amqp::types::primitives::Value;
use hmac::{Hmac, Mac};
use percent_encoding::percent_decode_str;
use serde::Serialize;
use sha2::Sha256;

/// Message format of a batch: the body's data sections are whole encoded messages.
pub(crate) const BATCH_FORMAT: u32 = 0x8001_3700;

pub(crate) const SECTION_HEADER: u64 = 0x70;
pub(crate) const SECTION_DELIVERY_ANNOTATIONS: u64 = 0x71;
pub(crate) const SECTION_MESSAGE_ANNOTATIONS: u64 = 0x72;
pub(crate) const SECTION_PROPERTIES: u64 = 0x73;
pub(crate) const SECTION_APPLICATION_PROPERTIES: u64 = 0x74;
pub(crate) const SECTION_DATA: u64 = 0x75;

pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// One frame: size, doff 2, type, channel, body.
pub(crate) fn frame(frame_type: u8, channel: u16, body: &[&[u8]]) -> Vec<u8> {
    let len: usize = body.iter().map(|b| b.len()).sum();
    let mut out = Vec::with_capacity(8 + len);
    out.extend_from_slice(&((8 + len) as u32).to_be_bytes());
    out.push(2);
    out.push(frame_type);
    out.extend_from_slice(&channel.to_be_bytes());
    for b in body {
        out.extend_from_slice(b);
    }
    out
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_amqp::to_vec(value).expect("AMQP types always encode")
}

/// Number of bytes the encoded value starting at `buf[0]` takes, constructor included.
fn value_len(buf: &[u8]) -> Option<usize> {
    let c = *buf.first()?;
    let fixed = |n: usize| Some(1 + n);
    let var8 = || Some(2 + *buf.get(1)? as usize);
    let var32 = || {
        let n = u32::from_be_bytes(buf.get(1..5)?.try_into().ok()?) as usize;
        Some(5 + n)
    };
    match c {
        0x00 => {
            let d = value_len(&buf[1..])?;
            let v = value_len(buf.get(1 + d..)?)?;
            Some(1 + d + v)
        }
        0x40..=0x45 => fixed(0),
        0x50..=0x56 => fixed(1),
        0x60 | 0x61 => fixed(2),
        0x70..=0x74 => fixed(4),
        0x80..=0x84 => fixed(8),
        0x94 | 0x98 => fixed(16),
        0xa0 | 0xa1 | 0xa3 | 0xc0 | 0xc1 | 0xe0 => var8(),
        0xb0 | 0xb1 | 0xb3 | 0xd0 | 0xd1 | 0xf0 => var32(),
        _ => None,
    }
}

/// The descriptor code of a described value's descriptor (`0x53 code` or `0x80 code`).
fn descriptor_code(buf: &[u8]) -> Option<u64> {
    match *buf.first()? {
        0x53 => Some(*buf.get(1)? as u64),
        0x80 => Some(u64::from_be_bytes(buf.get(1..9)?.try_into().ok()?)),
        0x44 => Some(0),
        _ => None,
    }
}

/// Splits an encoded message into its sections: (section code, the section's bytes).
pub(crate) fn sections(payload: &[u8]) -> Result<Vec<(u64, std::ops::Range<usize>)>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let rest = &payload[at..];
        if rest[0] != 0x00 {
            return Err(format!("byte {at}: a message section must be a described value"));
        }
        let code = descriptor_code(&rest[1..]).ok_or_else(|| format!("byte {at}: unknown section descriptor"))?;
        let len = value_len(rest).ok_or_else(|| format!("byte {at}: malformed section"))?;
        if len > rest.len() {
            return Err(format!("byte {at}: section runs past the end of the message"));
        }
        out.push((code, at..at + len));
        at += len;
    }
    Ok(out)
}

/// The binary content of a data section's bytes.
pub(crate) fn data_section_bytes(section: &[u8]) -> Option<&[u8]> {
    // 0x00 0x53 0x75 then vbin8 / vbin32
    let value = section.get(3..)?;
    match *value.first()? {
        0xa0 => value.get(2..2 + *value.get(1)? as usize),
        0xb0 => {
            let n = u32::from_be_bytes(value.get(1..5)?.try_into().ok()?) as usize;
            value.get(5..5 + n)
        }
        _ => None,
    }
}

/// A message as the broker stores it: the sections it rewrites decoded, the rest as sent.
#[derive(Clone, Debug)]
pub(crate) struct Parts {
    pub header: Header,
    pub annotations: MessageAnnotations,
    /// The properties section as sent (empty if none).
    pub properties: Bytes,
    /// The application-properties section as sent (empty if none).
    pub application_properties: Bytes,
    /// Body sections and footer as sent.
    pub body: Bytes,
}

impl Parts {
    /// Parses one encoded message; delivery annotations are dropped (they are per hop).
    pub(crate) fn parse(payload: &Bytes) -> Result<Parts, String> {
        let mut parts = Parts {
            header: Header::default(),
            annotations: MessageAnnotations::default(),
            properties: Bytes::new(),
            application_properties: Bytes::new(),
            body: Bytes::new(),
        };
        let mut body_start = None;
        for (code, range) in sections(payload)? {
            let bytes = &payload[range.clone()];
            match code {
                SECTION_HEADER => {
                    parts.header = serde_amqp::from_slice(bytes).map_err(|e| format!("header: {e}"))?;
                }
                SECTION_DELIVERY_ANNOTATIONS => {}
                SECTION_MESSAGE_ANNOTATIONS => {
                    parts.annotations =
                        serde_amqp::from_slice(bytes).map_err(|e| format!("message annotations: {e}"))?;
                }
                SECTION_PROPERTIES => parts.properties = payload.slice(range),
                SECTION_APPLICATION_PROPERTIES => parts.application_properties = payload.slice(range),
                _ => {
                    if body_start.is_none() {
                        body_start = Some(range.start);
                    }
                }
            }
        }
        if let Some(start) = body_start {
            parts.body = payload.slice(start..);
        }
        Ok(parts)
    }

    /// The messages of a transfer: one, or each message of a batch.
    pub(crate) fn parse_transfer(format: u32, payload: &Bytes) -> Result<Vec<Parts>, String> {
        if format != BATCH_FORMAT {
            return Ok(vec![Parts::parse(payload)?]);
        }
        let mut out = Vec::new();
        for (code, range) in sections(payload)? {
            if code != SECTION_DATA {
                continue;
            }
            let section = &payload[range];
            let inner = data_section_bytes(section).ok_or("batch: malformed data section")?;
            out.push(Parts::parse(&Bytes::copy_from_slice(inner))?);
        }
        Ok(out)
    }

    pub(crate) fn app_properties(&self) -> ApplicationProperties {
        if self.application_properties.is_empty() {
            return ApplicationProperties::default();
        }
        serde_amqp::from_slice(&self.application_properties).unwrap_or_default()
    }

    pub(crate) fn set_app_properties(&mut self, props: &ApplicationProperties) {
        self.application_properties = Bytes::from(encode(props));
    }

    /// The encoded message with this header and these annotations.
    pub(crate) fn encode_with(&self, header: &Header, annotations: &MessageAnnotations) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.properties.len() + self.application_properties.len() + self.body.len() + 128);
        out.extend_from_slice(&encode_header(header));
        if !annotations.0.is_empty() {
            out.extend_from_slice(&encode(annotations));
        }
        out.extend_from_slice(&self.properties);
        out.extend_from_slice(&self.application_properties);
        out.extend_from_slice(&self.body);
        out
    }
}

/// The header with every field written out: a list encoding leaves trailing defaults out, and
/// the SDKs read a missing `delivery-count` as none rather than 0.
fn encode_header(h: &Header) -> Vec<u8> {
    let mut fields = Vec::with_capacity(16);
    fields.push(if h.durable { 0x41 } else { 0x42 });
    fields.extend_from_slice(&[0x50, h.priority.0]);
    match h.ttl {
        Some(ttl) => {
            fields.push(0x70);
            fields.extend_from_slice(&ttl.to_be_bytes());
        }
        None => fields.push(0x40),
    }
    fields.push(if h.first_acquirer { 0x41 } else { 0x42 });
    fields.push(0x70);
    fields.extend_from_slice(&h.delivery_count.to_be_bytes());
    let mut out = vec![0x00, 0x53, SECTION_HEADER as u8, 0xc0, fields.len() as u8 + 1, 5];
    out.extend_from_slice(&fields);
    out
}

/// A whole message decoded (requests on `$cbs` and `$management`).
pub(crate) type Request = AmqpMessage<Body<Value>>;

pub(crate) fn decode_request(payload: &[u8]) -> Result<Request, String> {
    use fe2o3_amqp::types::messaging::message::__private::Deserializable;
    serde_amqp::from_slice::<Deserializable<Request>>(payload).map(|d| d.0).map_err(|e| e.to_string())
}

pub(crate) fn encode_message(message: &Request) -> Vec<u8> {
    use fe2o3_amqp::types::messaging::message::__private::Serializable;
    serde_amqp::to_vec(&Serializable(message)).expect("messages always encode")
}

/// The lock token's bytes as AMQP encodes a uuid (RFC 4122 order) → the delivery tag, which
/// Microsoft's SDKs read as a .NET GUID (`uuid.UUID(bytes_le=tag)` in azure-servicebus).
pub(crate) fn delivery_tag_of(token: &[u8; 16]) -> [u8; 16] {
    let mut t = *token;
    t[0..4].reverse();
    t[4..6].reverse();
    t[6..8].reverse();
    t
}

/// The inverse of [`delivery_tag_of`] (the swap is its own inverse).
#[cfg(test)]
pub(crate) fn token_of_delivery_tag(tag: &[u8]) -> Option<[u8; 16]> {
    let tag: [u8; 16] = tag.try_into().ok()?;
    Some(delivery_tag_of(&tag))
}

/// A random (version 4) uuid.
pub(crate) fn new_token() -> [u8; 16] {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// Why a SAS token was refused.
pub(crate) fn verify_sas(token: &str, key_name: &str, key: &str, now_secs: i64) -> Result<String, String> {
    let fields = token.strip_prefix("SharedAccessSignature ").ok_or("not a SharedAccessSignature token")?;
    let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
    for pair in fields.split('&') {
        let (name, value) = pair.split_once('=').ok_or("malformed token field")?;
        match name.to_ascii_lowercase().as_str() {
            "sr" => sr = Some(value),
            "sig" => sig = Some(value),
            "se" => se = Some(value),
            "skn" => skn = Some(value),
            _ => {}
        }
    }
    let (sr, sig, se) = (sr.ok_or("no sr")?, sig.ok_or("no sig")?, se.ok_or("no se")?);
    let decode = |v: &str| percent_decode_str(&v.replace('+', " ")).decode_utf8_lossy().into_owned();
    let skn = skn.map(decode).ok_or("no skn")?;
    if skn != key_name {
        return Err(format!("unknown key name {skn:?}"));
    }
    let expiry: i64 = se.parse().map_err(|_| "se is not a number")?;
    if expiry < now_secs {
        return Err("token expired".into());
    }
    let expected = {
        let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
        mac.update(format!("{sr}\n{se}").as_bytes());
        B64.encode(mac.finalize().into_bytes())
    };
    if decode(sig) != expected {
        return Err("signature does not match".into());
    }
    Ok(decode(sr))
}

/// A token signed by `key`, as the SDKs make them.
#[cfg(test)]
pub(crate) fn sas_token(audience: &str, key_name: &str, key: &str, expiry_secs: i64) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    let sr = utf8_percent_encode(audience, NON_ALPHANUMERIC).to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(format!("{sr}\n{expiry_secs}").as_bytes());
    let sig = utf8_percent_encode(&B64.encode(mac.finalize().into_bytes()), NON_ALPHANUMERIC).to_string();
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry_secs}&skn={key_name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_and_fail() {
        let t = sas_token("sb://127.0.0.1:1/q", "Root", "k3y", 2_000_000_000);
        assert_eq!(verify_sas(&t, "Root", "k3y", 1_000).unwrap(), "sb://127.0.0.1:1/q");
        assert!(verify_sas(&t, "Root", "other", 1_000).is_err());
        assert!(verify_sas(&t, "Other", "k3y", 1_000).is_err());
        assert!(verify_sas(&t, "Root", "k3y", 2_000_000_001).is_err());
    }

    #[test]
    fn delivery_tag_is_the_dotnet_guid_order() {
        // uuid.UUID("00112233-4455-6677-8899-aabbccddeeff").bytes_le
        let token: [u8; 16] =
            [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff];
        let tag = delivery_tag_of(&token);
        assert_eq!(
            tag,
            [0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]
        );
        assert_eq!(token_of_delivery_tag(&tag), Some(token));
    }

    #[test]
    fn sections_of_a_message() {
        let msg = AmqpMessage::builder()
            .header(Header { delivery_count: 3, ..Default::default() })
            .application_properties(ApplicationProperties::builder().insert("a", 1i32).build())
            .data(fe2o3_amqp::types::primitives::Binary::from(b"hello".to_vec()))
            .build();
        let bytes = Bytes::from({
            use fe2o3_amqp::types::messaging::message::__private::Serializable;
            serde_amqp::to_vec(&Serializable(msg)).unwrap()
        });
        let parts = Parts::parse(&bytes).unwrap();
        assert_eq!(parts.header.delivery_count, 3);
        assert!(!parts.application_properties.is_empty());
        assert_eq!(data_section_bytes(&parts.body), Some(&b"hello"[..]));
        let header = Header { delivery_count: 0, ttl: Some(5), ..Default::default() };
        let encoded = parts.encode_with(&header, &MessageAnnotations::default());
        let again = Parts::parse(&Bytes::from(encoded)).unwrap();
        assert_eq!(again.header, header);
        assert_eq!(again.body, parts.body);
    }
}
