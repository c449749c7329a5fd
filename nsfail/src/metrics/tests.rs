//! The registry's text, as a scraper reads it.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
};

use super::*;
use crate::api::{ChannelStatus, EncoderStatus};

#[derive(Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses every sample line (`name{k="v",...} value`); comments are skipped. Label values
/// here never contain `"`, `,` or `}`, which keeps the parser small.
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let value = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("closing brace");
                    let labels = inner
                        .split(',')
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').expect("k=v");
                            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                            (k.to_owned(), v.expect("quoted").to_owned())
                        })
                        .collect();
                    (name, labels)
                }
            };
            Sample {
                name: name.to_owned(),
                labels,
                value,
            }
        })
        .collect()
}

/// The value of the one sample named `name` with exactly `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let mut found = samples
        .iter()
        .filter(|s| s.name == name && s.labels == labels);
    let first = found.next().map(|s| s.value);
    assert!(found.next().is_none(), "{name} {labels:?} appears twice");
    first
}

fn channel(name: &str, active: Option<&str>, packets: u64, bytes: u64) -> ChannelStatus {
    ChannelStatus {
        name: name.to_owned(),
        listen: SocketAddr::from((Ipv4Addr::new(10, 200, 0, 1), 5000)),
        active: active.map(str::to_owned),
        encoders: vec!["enc-a".to_owned(), "enc-b".to_owned()],
        port: 5000,
        protocol: "srt".to_owned(),
        failback: "manual".to_owned(),
        packets,
        bytes,
        idle_ms: Some(1500),
        srt_peers: vec![crate::api::SrtPeerStatus {
            caller: SocketAddr::from((Ipv4Addr::new(10, 200, 0, 9), 40000)),
            socket_id: 7,
            idle_ms: 250,
        }],
    }
}

fn encoder(name: &str, healthy: bool, drained: bool, packets: u64) -> EncoderStatus {
    EncoderStatus {
        name: name.to_owned(),
        host: None,
        address: "10.200.1.2".to_owned(),
        local: true,
        healthy,
        drained,
        can_receive: Some(!drained),
        receive: Some("veth".into()),
        packets,
        bytes: packets * 1316,
        redirect_failed: 1,
        replies: 7,
        drops: 3,
        active_for: Vec::new(),
        health_kind: "udp".into(),
        health_interval_ms: 100,
    }
}

fn status() -> Status {
    Status {
        channels: vec![
            channel("cam1", Some("enc-b"), 100, 131_600),
            channel("cam2", None, 0, 0),
        ],
        encoders: vec![
            encoder("enc-a", false, false, 10),
            encoder("enc-b", true, true, 90),
        ],
        cluster: None,
    }
}

fn observed() -> Metrics {
    let metrics = Metrics::new();
    metrics.observe(
        &status(),
        &[("enc-a".to_owned(), vec![("denied", 2), ("no_route", 1)])],
        &[("redirected", 100), ("pass_not_ip", 4)],
        &[("reply_redirected", 7), ("error", 0)],
    );
    metrics
}

#[test]
fn snapshot_counters_and_gauges() {
    let s = samples(&observed().encode());
    let ch = |c| [("channel", c)];
    assert_eq!(
        value(&s, "nsfail_channel_packets_total", &ch("cam1")),
        Some(100.0)
    );
    assert_eq!(
        value(&s, "nsfail_channel_packets_total", &ch("cam2")),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "nsfail_channel_bytes_total", &ch("cam1")),
        Some(131_600.0)
    );
    assert_eq!(
        value(&s, "nsfail_channel_idle_seconds", &ch("cam1")),
        Some(1.5)
    );
    assert_eq!(
        value(
            &s,
            "nsfail_srt_peer_idle_seconds",
            &[
                ("channel", "cam1"),
                ("caller", "10.200.0.9:40000"),
                ("socket_id", "7")
            ]
        ),
        Some(0.25)
    );

    let active = |c, e| {
        value(
            &s,
            "nsfail_channel_active_encoder",
            &[("channel", c), ("encoder", e)],
        )
    };
    assert_eq!(active("cam1", "enc-b"), Some(1.0));
    assert_eq!(active("cam1", "enc-a"), Some(0.0));
    assert_eq!(active("cam2", "enc-a"), Some(0.0));
    assert_eq!(active("cam2", "enc-b"), Some(0.0));

    let enc = |e| [("encoder", e)];
    assert_eq!(
        value(&s, "nsfail_encoder_healthy", &enc("enc-a")),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "nsfail_encoder_healthy", &enc("enc-b")),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "nsfail_encoder_drained", &enc("enc-a")),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "nsfail_encoder_drained", &enc("enc-b")),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "nsfail_encoder_can_receive", &enc("enc-a")),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "nsfail_encoder_can_receive", &enc("enc-b")),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "nsfail_encoder_packets_total", &enc("enc-b")),
        Some(90.0)
    );
    assert_eq!(
        value(&s, "nsfail_encoder_bytes_total", &enc("enc-b")),
        Some(90.0 * 1316.0)
    );
    assert_eq!(
        value(&s, "nsfail_encoder_replies_total", &enc("enc-a")),
        Some(7.0)
    );

    let drop = |r| {
        value(
            &s,
            "nsfail_encoder_drops_total",
            &[("encoder", "enc-a"), ("reason", r)],
        )
    };
    assert_eq!(drop("denied"), Some(2.0));
    assert_eq!(drop("no_route"), Some(1.0));
    assert_eq!(
        value(&s, "nsfail_xdp_packets_total", &[("reason", "redirected")]),
        Some(100.0)
    );
    assert_eq!(
        value(&s, "nsfail_xdp_packets_total", &[("reason", "pass_not_ip")]),
        Some(4.0)
    );
    assert_eq!(
        value(
            &s,
            "nsfail_tc_packets_total",
            &[("reason", "reply_redirected")]
        ),
        Some(7.0)
    );
    assert_eq!(
        value(&s, "nsfail_tc_packets_total", &[("reason", "error")]),
        Some(0.0)
    );
}

#[test]
fn a_new_snapshot_replaces_the_old_one() {
    let metrics = observed();
    let mut next = status();
    next.channels[0].packets = 250;
    next.channels[0].active = Some("enc-a".to_owned());
    next.channels.pop();
    metrics.observe(&next, &[], &[], &[]);
    let s = samples(&metrics.encode());
    assert_eq!(
        value(&s, "nsfail_channel_packets_total", &[("channel", "cam1")]),
        Some(250.0)
    );
    assert_eq!(
        value(&s, "nsfail_channel_packets_total", &[("channel", "cam2")]),
        None
    );
    let active = |e| {
        value(
            &s,
            "nsfail_channel_active_encoder",
            &[("channel", "cam1"), ("encoder", e)],
        )
    };
    assert_eq!(active("enc-a"), Some(1.0));
    assert_eq!(active("enc-b"), Some(0.0));
    assert!(s.iter().all(|x| x.name != "nsfail_xdp_packets_total"));
    assert!(s.iter().all(|x| x.name != "nsfail_encoder_drops_total"));
}

#[test]
fn failovers_and_switchover() {
    let metrics = observed();
    metrics.record_failover("cam1", Some(Duration::from_millis(40)));
    metrics.record_failover("cam1", None);
    metrics.record_failover("cam2", Some(Duration::from_millis(400)));
    let s = samples(&metrics.encode());
    let failovers = |c| value(&s, "nsfail_channel_failovers_total", &[("channel", c)]);
    assert_eq!(failovers("cam1"), Some(2.0));
    assert_eq!(failovers("cam2"), Some(1.0));
    assert_eq!(value(&s, "nsfail_switchover_seconds_count", &[]), Some(2.0));
    let sum = value(&s, "nsfail_switchover_seconds_sum", &[]).unwrap();
    assert!((sum - 0.44).abs() < 1e-9, "{sum}");
    let bucket = |le| value(&s, "nsfail_switchover_seconds_bucket", &[("le", le)]);
    assert_eq!(bucket("0.025"), Some(0.0));
    assert_eq!(bucket("0.05"), Some(1.0));
    assert_eq!(bucket("0.3"), Some(1.0));
    assert_eq!(bucket("0.5"), Some(2.0));
    assert_eq!(bucket("+Inf"), Some(2.0));
}

#[test]
fn probes() {
    let metrics = observed();
    metrics.record_probe("enc-a", Some(Duration::from_micros(80)));
    metrics.record_probe("enc-a", Some(Duration::from_millis(3)));
    metrics.record_probe("enc-b", None);
    let s = samples(&metrics.encode());
    let enc = |e| [("encoder", e)];
    assert_eq!(
        value(&s, "nsfail_probe_latency_seconds_count", &enc("enc-a")),
        Some(2.0)
    );
    assert_eq!(
        value(&s, "nsfail_probe_latency_seconds_count", &enc("enc-b")),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "nsfail_probe_failures_total", &enc("enc-a")),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "nsfail_probe_failures_total", &enc("enc-b")),
        Some(1.0)
    );
    let bucket = |le| {
        value(
            &s,
            "nsfail_probe_latency_seconds_bucket",
            &[("encoder", "enc-a"), ("le", le)],
        )
    };
    assert_eq!(bucket("0.0001"), Some(1.0));
    assert_eq!(bucket("0.0025"), Some(1.0));
    assert_eq!(bucket("0.005"), Some(2.0));
}

#[test]
fn removed_names_lose_their_event_series() {
    let metrics = observed();
    metrics.record_failover("cam2", None);
    metrics.record_probe("enc-a", None);
    let series = |s: &[Sample], label: &str, value: &str, prefix: &str| {
        s.iter()
            .filter(|x| {
                x.name.starts_with(prefix) && x.labels.get(label).map(String::as_str) == Some(value)
            })
            .count()
    };
    let s = samples(&metrics.encode());
    assert!(
        series(&s, "channel", "cam2", "nsfail_") > 0,
        "cam2's series exist"
    );
    assert!(
        series(&s, "encoder", "enc-a", "nsfail_probe_") > 0,
        "enc-a's probe series exist"
    );
    let mut next = status();
    next.channels.retain(|c| c.name != "cam2");
    next.encoders.retain(|e| e.name != "enc-a");
    metrics.observe(&next, &[], &[], &[]);
    let s = samples(&metrics.encode());
    assert_eq!(series(&s, "channel", "cam2", "nsfail_"), 0);
    assert_eq!(series(&s, "encoder", "enc-a", "nsfail_probe_"), 0);
    assert!(
        series(&s, "channel", "cam1", "nsfail_") > 0,
        "cam1's series stay"
    );
}

#[test]
fn every_family_is_described_and_the_text_ends_with_eof() {
    let metrics = observed();
    metrics.record_failover("cam1", Some(Duration::from_millis(40)));
    metrics.record_probe("enc-a", Some(Duration::from_millis(1)));
    let text = metrics.encode();
    assert_eq!(text.lines().last(), Some("# EOF"));
    let described = |kind: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(kind))
            .map(|rest| rest.split(' ').next().unwrap().to_owned())
            .collect()
    };
    let (help, types) = (described("# HELP "), described("# TYPE "));
    assert_eq!(help, types);
    for sample in samples(&text) {
        assert!(sample.name.starts_with("nsfail_"), "{}", sample.name);
        let family = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| sample.name.strip_suffix(suffix))
            .filter(|base| types.iter().any(|t| t == base))
            .unwrap_or(&sample.name);
        assert!(
            types.iter().any(|t| t == family),
            "{} is not described",
            sample.name
        );
    }
}
