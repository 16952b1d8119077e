//! Rows to messages for the `central` sink: templates over a row (device id, model, component,
//! property values) and the `Shaper` that builds each row's message body, properties and id.

use super::{message_id, valid_device_id, CentralConfig, OutMsg};
use crate::config::values::Parsed;
use crate::event::{Event, Kind, ValRef};
use crate::path::FieldPath;

/// Characters IoT Hub allows in property names and values over HTTPS (besides ASCII letters and digits).
pub(super) const PROPERTY_CHARS: &str = "!#$%&'*+-.^_`|~";

/// Makes a property value acceptable to IoT Hub's HTTPS API: other characters are percent-encoded.
fn property_value(v: &str) -> String {
    if v.chars().all(|c| c.is_ascii_alphanumeric() || PROPERTY_CHARS.contains(c) || c == ':') {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 8);
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || (PROPERTY_CHARS.as_bytes().contains(&b) && b != b'%') || b == b':' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Part {
    Lit(String),
    Field(FieldPath),
}

/// `text{field.path}text`: literal text and fields of the row.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
}

impl crate::config::values::Parse for Template {
    fn parse(text: &str) -> Result<Self, String> {
        Template::parse(text)
    }
}

impl Template {
    pub fn parse(t: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = t.chars();
        while let Some(c) = chars.next() {
            match c {
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("{t:?}: unclosed `{{`")),
                        }
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Field(FieldPath::parse(&name)?));
                }
                '}' => return Err(format!("{t:?}: `}}` without `{{`")),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        if parts.is_empty() {
            return Err("is empty".into());
        }
        Ok(Template { parts })
    }

    /// The text for a row; `None` when a field is missing or null.
    pub fn render(&self, ev: &Event) -> Option<String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Field(f) => match f.get(ev)? {
                    ValRef::Null => return None,
                    v => out.push_str(&crate::path::key_string(&v)),
                },
            }
        }
        Some(out)
    }

    pub(super) fn fields(&self) -> impl Iterator<Item = &FieldPath> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f),
            Part::Lit(_) => None,
        })
    }

    pub(super) fn is_static(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Lit(_)))
    }
}

/// Turns rows into messages.
pub(crate) struct Shaper {
    device: Template,
    model: Option<Template>,
    component: Option<Template>,
    creation: Vec<FieldPath>,
    measurements: Option<Vec<(String, FieldPath)>>,
    props: Vec<(String, Template)>,
    /// Top-level fields never sent as measurements by default.
    excluded: Vec<String>,
}

impl Shaper {
    pub(crate) fn new(cfg: &CentralConfig) -> anyhow::Result<Shaper> {
        let device = cfg.device_id.get()?;
        let creation = match &cfg.creation_time {
            Some(c) => vec![c.get()?],
            None => vec![FieldPath::parse("window_end").unwrap(), FieldPath::parse("enqueuedTime").unwrap()],
        };
        let mut excluded: Vec<String> = vec!["window_start".into(), "window_end".into()];
        excluded.extend(device.fields().map(|f| f.parts()[0].clone()));
        if let Some(c) = &cfg.creation_time {
            excluded.push(c.text().split('.').next().unwrap_or(c.text()).to_string());
        }
        let measurements = match &cfg.measurements {
            Some(m) => Some(m.pairs().into_iter().map(|(n, f)| Ok((n, f.get()?))).collect::<anyhow::Result<Vec<_>>>()?),
            None => None,
        };
        Ok(Shaper {
            model: cfg.model_id.as_ref().map(Parsed::get).transpose()?,
            component: cfg.component.as_ref().map(Parsed::get).transpose()?,
            props: cfg.properties.iter().map(|(k, v)| Ok((k.clone(), v.get()?))).collect::<anyhow::Result<_>>()?,
            device,
            creation,
            measurements,
            excluded,
        })
    }

    /// The message for a row, or why there is none.
    pub(crate) fn shape(&self, ev: &Event) -> Result<OutMsg, String> {
        let device = self.device.render(ev).ok_or("the row has no value for the device id")?;
        if !valid_device_id(&device) {
            return Err(format!("device id {device:?} is not valid (letters, digits and `- . _ :` only, at most 128)"));
        }
        let mut body = String::with_capacity(128);
        body.push('{');
        let mut n = 0;
        let mut field = |name: &str, v: ValRef<'_>, body: &mut String| {
            if v.is_null() {
                return;
            }
            if n > 0 {
                body.push(',');
            }
            crate::event::write_json_str(body, name);
            body.push(':');
            v.write_json(body);
            n += 1;
        };
        match &self.measurements {
            Some(m) => {
                for (name, path) in m {
                    if let Some(v) = path.get(ev) {
                        field(name, v, &mut body);
                    }
                }
            }
            None => match (ev.kind, ev.telemetry()) {
                (_, Some(t)) => {
                    for (k, v) in t.iter() {
                        field(k, v, &mut body);
                    }
                }
                (Kind::Export(_), None) => return Err("the export message has no telemetry".into()),
                _ => {
                    for (k, v) in ev.root().iter() {
                        if !self.excluded.iter().any(|x| x == k) {
                            field(k, v, &mut body);
                        }
                    }
                }
            },
        }
        body.push('}');
        if n == 0 {
            return Err("the row has none of the measurements".into());
        }
        let created =
            self.creation.iter().find_map(|p| p.get(ev).and_then(|v| v.as_time())).map(crate::time::format_rfc3339);
        let model = self.model.as_ref().and_then(|m| m.render(ev));
        let component = match &self.component {
            Some(c) => Some(c.render(ev).ok_or("the row has no value for the component")?),
            None => None,
        };
        let mut props = Vec::with_capacity(self.props.len());
        for (k, t) in &self.props {
            if let Some(v) = t.render(ev) {
                props.push((k.clone(), property_value(&v)));
            }
        }
        let size = body.len() + props.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() + 200;
        if size > crate::model::MAX_RECORD_BYTES {
            return Err(format!("the message would be {size} bytes, over IoT Hub's limit of 256 KiB"));
        }
        let id = message_id(&device, component.as_deref(), created.as_deref(), body.as_bytes());
        Ok(OutMsg { device, model, component, created, props, body: body.into_bytes(), id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn cfg(extra: serde_json::Value) -> CentralConfig {
        let mut v = serde_json::json!({"inputs": ["x"], "id_scope": "0ne00ABC", "group_key": "a2V5a2V5a2V5"});
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    fn export(json: &str) -> Event {
        crate::model::decode::decode_one(Bytes::from(json.to_string())).unwrap()
    }
    #[test]
    fn export_telemetry_becomes_a_message_of_the_same_device() {
        let s = Shaper::new(&cfg(serde_json::json!({"creation_time": "enqueuedTime"}))).unwrap();
        let ev = export(
            r#"{"messageSource":"telemetry","deviceId":"dev-1","enqueuedTime":"2026-11-01T00:00:00.5Z","telemetry":{"temp":70.5,"humidity":40}}"#,
        );
        let m = s.shape(&ev).unwrap();
        assert_eq!(m.device, "dev-1");
        assert_eq!(std::str::from_utf8(&m.body).unwrap(), r#"{"temp":70.5,"humidity":40}"#);
        assert_eq!(m.created.as_deref(), Some("2026-11-01T00:00:00.500Z"));
        assert_eq!(m.props, vec![("computed".to_string(), "true".to_string())]);
        assert_eq!(m.id.len(), 32);
        // deterministic
        assert_eq!(s.shape(&ev).unwrap().id, m.id);
    }

    #[test]
    fn window_rows_send_their_aggregates() {
        let s = Shaper::new(&cfg(serde_json::json!({}))).unwrap();
        let mut ev = Event::row();
        ev.push("deviceId", "d7".into());
        ev.push("window_start", crate::event::Value::Time(0));
        ev.push("window_end", crate::event::Value::Time(300_000_000_000));
        ev.push("count", crate::event::Value::Int(12));
        ev.push("temperature_avg", crate::event::Value::Float(21.25));
        let m = s.shape(&ev).unwrap();
        assert_eq!(std::str::from_utf8(&m.body).unwrap(), r#"{"count":12,"temperature_avg":21.25}"#);
        assert_eq!(m.created.as_deref(), Some("1970-01-01T00:05:00.000Z"));
        let s = Shaper::new(&cfg(
            serde_json::json!({"measurements": {"avgT": "temperature_avg"}, "device_id": "{deviceId}-agg"}),
        ))
        .unwrap();
        let m = s.shape(&ev).unwrap();
        assert_eq!(m.device, "d7-agg");
        assert_eq!(std::str::from_utf8(&m.body).unwrap(), r#"{"avgT":21.25}"#);
        let mut bad = Event::row();
        bad.push("deviceId", "has space".into());
        bad.push("x", crate::event::Value::Int(1));
        assert!(s.shape(&bad).unwrap_err().contains("not valid"));
    }

    #[test]
    fn templates_and_property_values() {
        assert!(Template::parse("{a").is_err());
        assert!(Template::parse("a}").is_err());
        let t = Template::parse("site-{enrichments.site}").unwrap();
        let ev = export(
            r#"{"messageSource":"telemetry","deviceId":"d","enqueuedTime":"2026-11-01T00:00:00Z","telemetry":{},"enrichments":{"site":"p1"}}"#,
        );
        assert_eq!(t.render(&ev).as_deref(), Some("site-p1"));
        assert_eq!(property_value("true"), "true");
        assert_eq!(property_value("a b/é"), "a%20b%2F%C3%A9");
    }
}
