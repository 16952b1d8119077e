//! Keys and shared access signatures for devices of an IoT Central application.
//!
//! - device key = base64(HMAC-SHA256(key = base64decode(group key), message = device id));
//! - token = `SharedAccessSignature sr={enc(resource)}&sig={enc(sig)}&se={expiry}[&skn=registration]`
//!   with sig = base64(HMAC-SHA256(base64decode(device key), enc(resource) + "\n" + expiry)),
//!   `enc` being JavaScript's `encodeURIComponent` (the form the device SDKs and the device bridge
//!   send, and that DPS and IoT Hub verify).
//!
//! Derived keys and tokens never enter an error text or a log line (requests are described by
//! status and answer body, `Debug` of the key types prints `***`), so they are not registered
//! with [`crate::secret`]: a token per request would grow its list without bound. The group key
//! is a [`crate::secret::Secret`].

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

/// JavaScript's encodeURIComponent: everything but `A-Z a-z 0-9 - _ . ! ~ * ' ( )` is escaped.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// `encodeURIComponent(s)`.
pub fn enc(s: &str) -> String {
    utf8_percent_encode(s, URI_COMPONENT).to_string()
}

fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg);
    mac.finalize().into_bytes().to_vec()
}

/// The enrollment group's key, decoded once.
#[derive(Clone)]
pub struct GroupKey(Vec<u8>);

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupKey(***)")
    }
}

impl GroupKey {
    /// Decodes a base64 group key (the SAS-IoT-Devices enrollment group's primary or secondary key).
    pub fn parse(b64: &str) -> Result<GroupKey, String> {
        let bytes = B64.decode(b64.trim()).map_err(|_| "the group key is not base64".to_string())?;
        if bytes.is_empty() {
            return Err("the group key is empty".into());
        }
        Ok(GroupKey(bytes))
    }

    /// The device's key: base64(HMAC-SHA256(group key, device id)).
    pub fn device_key(&self, device_id: &str) -> DeviceKey {
        DeviceKey(hmac(&self.0, device_id.as_bytes()))
    }
}

/// A device's (derived) symmetric key, raw bytes.
#[derive(Clone)]
pub struct DeviceKey(Vec<u8>);

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceKey(***)")
    }
}

impl DeviceKey {
    /// The key as base64 (what IoT Central shows for a device).
    pub fn to_base64(&self) -> String {
        B64.encode(&self.0)
    }

    /// A SAS token for `resource` (not yet encoded) valid until `expiry` (Unix seconds).
    /// `skn` is `Some("registration")` for DPS and `None` for IoT Hub.
    pub fn token(&self, resource: &str, expiry: u64, skn: Option<&str>) -> String {
        let sr = enc(resource);
        let sig = B64.encode(hmac(&self.0, format!("{sr}\n{expiry}").as_bytes()));
        let mut t = format!("SharedAccessSignature sr={sr}&sig={}&se={expiry}", enc(&sig));
        if let Some(skn) = skn {
            t.push_str("&skn=");
            t.push_str(skn);
        }
        t
    }
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The DPS resource of a device: `{idScope}/registrations/{deviceId}`.
pub fn dps_resource(id_scope: &str, device: &str) -> String {
    format!("{id_scope}/registrations/{device}")
}

/// The IoT Hub resource of a device: `{hub}/devices/{deviceId}`.
pub fn hub_resource(hub: &str, device: &str) -> String {
    format!("{hub}/devices/{device}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers computed outside Rust, so that a mistake shared by this module and the hmac
    /// crate's use here cannot hide:
    /// ```text
    /// $ printf 'device-1' | openssl dgst -sha256 -mac HMAC \
    ///     -macopt key:'group key of forty bytes for the test...' -binary | base64
    /// xyQ2mqDdXzgOGJVOZpDlY5cDuWdSw3LyHJDzlJUtKEk=
    /// ```
    #[test]
    fn device_keys_are_derived_from_the_group_key() {
        let g = GroupKey::parse(&B64.encode(b"group key of forty bytes for the test...")).unwrap();
        assert_eq!(g.device_key("device-1").to_base64(), "xyQ2mqDdXzgOGJVOZpDlY5cDuWdSw3LyHJDzlJUtKEk=");
        assert!(GroupKey::parse("not base64!").is_err());
        let k = g.device_key("device-1");
        assert_eq!(format!("{g:?} {k:?}"), "GroupKey(***) DeviceKey(***)");
    }

    /// Azure's documented example ("Provision devices with symmetric keys" / legacy devices, DPS
    /// docs): enrollment group key `8isrFI1s…S9Egw==` and registration id
    /// `sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6` give the device key
    /// `Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=`. Checked again with
    /// ```text
    /// $ python3 -c "import hmac,hashlib,base64; k=base64.b64decode('8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw=='); \
    ///     print(base64.b64encode(hmac.new(k, b'sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6', hashlib.sha256).digest()).decode())"
    /// Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=
    /// ```
    #[test]
    fn azure_documented_device_key_example() {
        let g =
            GroupKey::parse("8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==")
                .unwrap();
        assert_eq!(
            g.device_key("sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6").to_base64(),
            "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="
        );
    }

    /// Whole tokens against signatures computed with Python's hmac:
    /// ```text
    /// $ python3 -c "import hmac,hashlib,base64; \
    ///     print(base64.b64encode(hmac.new(b'0123456789abcdef', b'0ne00ABC%2Fregistrations%2Fdev%201\n1700000000', hashlib.sha256).digest()).decode()); \
    ///     print(base64.b64encode(hmac.new(b'0123456789abcdef', b'hub.azure-devices.net%2Fdevices%2Fd\n5', hashlib.sha256).digest()).decode())"
    /// eeEtS+kgpRTfx5w0IHd8nIDJlqJXkYSEXnDpfUSocOg=
    /// CYxmEVmoM4Z4ORL72iCeq+KwYga4pa7XTDMuv/d9Aa8=
    /// ```
    /// (the signature is then URL-encoded: `+` `%2B`, `/` `%2F`, `=` `%3D`).
    #[test]
    fn tokens_sign_the_encoded_resource_and_expiry() {
        let key = DeviceKey(b"0123456789abcdef".to_vec());
        assert_eq!(
            key.token("0ne00ABC/registrations/dev 1", 1_700_000_000, Some("registration")),
            "SharedAccessSignature sr=0ne00ABC%2Fregistrations%2Fdev%201\
             &sig=eeEtS%2BkgpRTfx5w0IHd8nIDJlqJXkYSEXnDpfUSocOg%3D&se=1700000000&skn=registration"
        );
        assert_eq!(
            key.token(&hub_resource("hub.azure-devices.net", "d"), 5, None),
            "SharedAccessSignature sr=hub.azure-devices.net%2Fdevices%2Fd\
             &sig=CYxmEVmoM4Z4ORL72iCeq%2BKwYga4pa7XTDMuv%2Fd9Aa8%3D&se=5"
        );
    }

    #[test]
    fn encoding_is_encode_uri_component() {
        assert_eq!(enc("a-b_c.d!e~f*g'h(i)j k/l:m"), "a-b_c.d!e~f*g'h(i)j%20k%2Fl%3Am");
    }
}
