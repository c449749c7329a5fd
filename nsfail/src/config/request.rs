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

    fn cam(sources: &[&str], srt_peer_limit: Option<u32>) -> NewChannel {
        NewChannel {
            name: "cam3".into(),
            listen: "10.0.0.1:5004".into(),
            encoders: vec!["a".into()],
            protocol: Some("srt".into()),
            sources: sources.iter().map(|s| s.to_string()).collect(),
            srt_peer_limit,
            ..Default::default()
        }
    }

    /// `sources` and `srt_peer_limit` of an `add channel` request: parsed as the file's keys
    /// are, and checked as a new channel of the running config is.
    #[test]
    fn channel_requests_take_sources_and_the_srt_peer_limit() {
        let cfg = Config::parse(
            "[ingest]\ninterface = \"eth0\"\n\n\
             [[encoder]]\nname = \"a\"\naddress = \"10.0.0.2\"\nmac = \"02:00:00:00:00:01\"\n\
             health = { kind = \"udp\", port = 9 }\n",
            "t.toml",
        )
        .unwrap();
        let lookup = cfg.lookup();
        let ch = Channel::try_from(cam(&["203.0.113.0/24", "198.51.100.7"], Some(4))).unwrap();
        assert_eq!(
            ch.sources,
            [
                "203.0.113.0/24".parse::<SourcePrefix>().unwrap(),
                "198.51.100.7/32".parse().unwrap()
            ]
        );
        assert_eq!(ch.srt_peer_limit(), 4);
        cfg.check_new_channel(&lookup, &ch).unwrap();
        let ch = Channel::try_from(cam(&[], None)).unwrap();
        assert!(ch.sources.is_empty());
        assert_eq!(ch.srt_peer_limit(), SRT_PEER_LIMIT_DEFAULT);

        for (source, why) in [
            (
                "203.0.113.1/24",
                "host bits set (the network is 203.0.113.0/24)",
            ),
            ("camera", "not an IP address or prefix"),
            ("10.0.0.0/33", "prefix length must be 0 to 32"),
        ] {
            let err = Channel::try_from(cam(&[source], None))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("channel: ") && err.contains(why), "{err}");
        }
        for (sources, limit, want) in [
            (
                &["2001:db8::/32"][..],
                None,
                "channel \"cam3\" listens on IPv4 10.0.0.1:5004 but source 2001:db8::/32 is IPv6",
            ),
            (
                &[],
                Some(0),
                "channel \"cam3\": srt_peer_limit 0 must be 1 to 16",
            ),
            (
                &[],
                Some(17),
                "channel \"cam3\": srt_peer_limit 17 must be 1 to 16",
            ),
        ] {
            let ch = Channel::try_from(cam(sources, limit)).unwrap();
            let err = cfg.check_new_channel(&lookup, &ch).unwrap_err().to_string();
            assert_eq!(err, want);
        }
        let err = serde_json::from_str::<NewChannel>(
            r#"{"name":"c","listen":"10.0.0.1:5004","encoders":["a"],"srt_peer_limit":-1}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("invalid value: integer `-1`"), "{err}");
    }
}
