//! Socket requests (`add channel`, `add encoder`, `encoder spawn`) into config values, with the
//! config's own parser: the same rules, defaults and messages as the file.

use super::*;
use crate::api::{NewChannel, NewEncoder};

fn from_request<T: serde::de::DeserializeOwned>(
    what: &str,
    req: impl Serialize,
) -> Result<T, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        origin: None,
        location: None,
        message: format!("{what}: {message}"),
    };
    let value = serde_json::to_value(req).map_err(|e| invalid(e.to_string()))?;
    serde_json::from_value(value).map_err(|e| invalid(e.to_string()))
}

impl TryFrom<NewChannel> for Channel {
    type Error = ConfigError;

    fn try_from(req: NewChannel) -> Result<Self, ConfigError> {
        from_request("channel", req)
    }
}

impl TryFrom<NewEncoder> for Encoder {
    type Error = ConfigError;

    fn try_from(req: NewEncoder) -> Result<Self, ConfigError> {
        from_request("encoder", req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_take_the_configs_defaults_and_rules() {
        let ch = Channel::try_from(NewChannel {
            name: "cam3".into(),
            listen: "10.0.0.1:5004".into(),
            encoders: vec!["a".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ch.hold_down_ms, DEFAULT_HOLD_DOWN_MS);
        assert_eq!(ch.failback, Failback::Manual);
        let bad = Channel::try_from(NewChannel {
            failback: Some("sometimes".into()),
            ..NewChannel::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            bad.starts_with("channel: ") && bad.contains("sometimes"),
            "{bad}"
        );

        let mut health = serde_json::Map::new();
        health.insert("kind".into(), "udp".into());
        health.insert("port".into(), 9000.into());
        let e = Encoder::try_from(NewEncoder {
            name: "a".into(),
            address: "10.0.0.2".into(),
            health: Some(health),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (e.health.kind, e.health.port),
            (HealthKind::Udp, Some(9000))
        );
        let bad = Encoder::try_from(NewEncoder {
            name: "a".into(),
            address: "10.0.0.2:80".into(),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(bad.contains("invalid IP address"), "{bad}");
    }
}
