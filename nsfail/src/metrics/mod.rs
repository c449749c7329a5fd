//! Prometheus metrics: a `prometheus-client` registry and an HTTP/1.1 endpoint (hyper) serving it.
//!
//! Two kinds of metric live here. Events the controller sees happen (failovers, probe results)
//! are counted and observed as they happen, in ordinary registered families. Cumulative
//! data-plane counters already live in BPF maps; copying them into `Counter`s would need
//! `inc_by(delta)` bookkeeping, so the last snapshot given to [`Metrics::observe`] is kept and a
//! [`Collector`] encodes it at scrape time instead.
//!
//! The exposition is OpenMetrics text (it ends with `# EOF`), served with [`CONTENT_TYPE`].
//! Every name starts with `nsfail_`:
//!
//! | name | type | labels |
//! |---|---|---|
//! | `nsfail_channel_packets_total` | counter | channel |
//! | `nsfail_channel_bytes_total` | counter | channel |
//! | `nsfail_channel_idle_seconds` | gauge | channel (only once a packet was seen) |
//! | `nsfail_channel_active_encoder` | gauge (1 active, 0 backup) | channel, encoder |
//! | `nsfail_channel_failovers_total` | counter | channel |
//! | `nsfail_switchover_seconds` | histogram | |
//! | `nsfail_encoder_healthy` | gauge (0/1) | encoder |
//! | `nsfail_encoder_drained` | gauge (0/1) | encoder |
//! | `nsfail_encoder_can_receive` | gauge (0/1) | encoder (local encoders, once checked) |
//! | `nsfail_encoder_packets_total` | counter | encoder |
//! | `nsfail_encoder_bytes_total` | counter | encoder |
//! | `nsfail_encoder_replies_total` | counter | encoder |
//! | `nsfail_encoder_drops_total` | counter | encoder, reason |
//! | `nsfail_probe_latency_seconds` | histogram | encoder |
//! | `nsfail_probe_failures_total` | counter | encoder |
//! | `nsfail_xdp_packets_total` | counter | reason |
//! | `nsfail_tc_packets_total` | counter | reason |

use std::{
    borrow::Borrow,
    collections::HashSet,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use log::{debug, warn};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text},
    metrics::{
        TypedMetric,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::{Registry, Unit},
};
use tokio::{
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
    time::timeout,
};
use tokio_util::sync::CancellationToken;

use crate::api::{ChannelStatus, EncoderStatus, Status};

mod http;

pub use self::http::{Limits, MetricsError, serve};

/// The `Content-Type` of [`Metrics::encode`]'s output (OpenMetrics text 1.0.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of `nsfail_switchover_seconds`: from a fast in-process failover to a slow one.
const SWITCHOVER_BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0];
/// Upper bounds of `nsfail_probe_latency_seconds`: a veth round trip is tens of microseconds, a
/// probe timeout is at most about a second.
const PROBE_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabels {
    channel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EncoderLabels {
    encoder: String,
}

type ProbeLatency = Family<EncoderLabels, Histogram, fn() -> Histogram>;

/// The registry and every metric family nsfail exports. Shared (in an `Arc`) by the controller,
/// which records into it, and the HTTP endpoint, which encodes it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    snapshot: Arc<Mutex<Snapshot>>,
    failovers: Family<ChannelLabels, Counter>,
    switchover: Histogram,
    probe_latency: ProbeLatency,
    probe_failures: Family<EncoderLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nsfail");
        let failovers = Family::<ChannelLabels, Counter>::default();
        registry.register(
            "channel_failovers",
            "Times the channel was moved to another encoder, automatically or by an operator",
            failovers.clone(),
        );
        let switchover = Histogram::new(SWITCHOVER_BUCKETS);
        registry.register_with_unit(
            "switchover",
            "Time from detecting an encoder failure to the channel's map update",
            Unit::Seconds,
            switchover.clone(),
        );
        let probe_latency: ProbeLatency =
            Family::new_with_constructor(|| Histogram::new(PROBE_BUCKETS));
        registry.register_with_unit(
            "probe_latency",
            "Round-trip time of successful health probes",
            Unit::Seconds,
            probe_latency.clone(),
        );
        let probe_failures = Family::<EncoderLabels, Counter>::default();
        registry.register(
            "probe_failures",
            "Health probes that failed or timed out",
            probe_failures.clone(),
        );
        let snapshot = Arc::new(Mutex::new(Snapshot::default()));
        registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
        Self {
            registry,
            snapshot,
            failovers,
            switchover,
            probe_latency,
            probe_failures,
        }
    }

    /// Replaces the data-plane snapshot the next scrapes report. `drops` holds, per encoder,
    /// its drop counters by reason; `xdp` and `tc` the programs' outcome counters by reason
    /// (as [`crate::Dataplane::xdp_stats`] and [`crate::Dataplane::tc_stats`] return them).
    ///
    /// Channels and encoders that were in the previous snapshot and are gone from this one
    /// also lose their failover and probe series, so a removed encoder does not linger.
    pub fn observe(
        &self,
        status: &Status,
        drops: &[(String, Vec<(&'static str, u64)>)],
        xdp: &[(&'static str, u64)],
        tc: &[(&'static str, u64)],
    ) {
        self.observe_channels(&status.channels, &status.encoders, drops, xdp, tc);
    }

    /// [`Metrics::observe`] of a status whose channels come one at a time (a
    /// [`crate::control::StatusView`]'s): none of them is kept beyond its sample.
    pub fn observe_channels<C: Borrow<ChannelStatus>>(
        &self,
        channels: impl IntoIterator<Item = C>,
        encoders: &[EncoderStatus],
        drops: &[(String, Vec<(&'static str, u64)>)],
        xdp: &[(&'static str, u64)],
        tc: &[(&'static str, u64)],
    ) {
        let next = Snapshot::of(channels, encoders, drops, xdp, tc);
        let mut snapshot = self.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        let channels: HashSet<&str> = next.channels.iter().map(|c| &*c.name).collect();
        for old in &snapshot.channels {
            if !channels.contains(&*old.name) {
                self.failovers.remove(&ChannelLabels {
                    channel: old.name.to_string(),
                });
            }
        }
        let encoders: HashSet<&str> = encoders.iter().map(|e| e.name.as_str()).collect();
        for old in &snapshot.encoders {
            if !encoders.contains(old.name.as_str()) {
                let labels = EncoderLabels {
                    encoder: old.name.clone(),
                };
                self.probe_latency.remove(&labels);
                self.probe_failures.remove(&labels);
            }
        }
        *snapshot = next;
    }

    /// Counts a failover of `channel`; `switchover` is how long it took from detection to the
    /// map update, when the move was a reaction to a failure.
    pub fn record_failover(&self, channel: &str, switchover: Option<Duration>) {
        self.failovers
            .get_or_create(&ChannelLabels {
                channel: channel.to_owned(),
            })
            .inc();
        if let Some(took) = switchover {
            self.switchover.observe(took.as_secs_f64());
        }
    }

    /// Records one measured switchover (old encoder's last packet to the new one's first),
    /// without counting a failover (that was counted when the move was made).
    pub fn record_switchover(&self, gap: Duration) {
        self.switchover.observe(gap.as_secs_f64());
    }

    /// Records one health probe of `encoder`: its latency when it succeeded, `None` when it
    /// failed. Both series exist from the first probe on, so rates work from the start.
    pub fn record_probe(&self, encoder: &str, latency: Option<Duration>) {
        let labels = EncoderLabels {
            encoder: encoder.to_owned(),
        };
        let histogram = self.probe_latency.get_or_create(&labels);
        let failures = self.probe_failures.get_or_create(&labels);
        match latency {
            Some(took) => histogram.observe(took.as_secs_f64()),
            None => {
                failures.inc();
            }
        }
    }

    /// The exposition: every metric, in OpenMetrics text, ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Like `ToString`: writing into a String cannot fail, and no metric here reports an
        // error of its own (the only one the crate has is for bucketless native histograms).
        text::encode(&mut out, &self.registry).expect("encoding metrics into a String");
        out
    }
}

/// The last data-plane snapshot given to [`Metrics::observe`], compact: it is kept between
/// scrapes, and a status of 100,000 channels is mostly names that repeat (encoders, their
/// lists, protocol and failback), held here once.
#[derive(Debug, Default)]
struct Snapshot {
    channels: Vec<ChannelSample>,
    encoders: Vec<EncoderStatus>,
    /// Encoder names the channels refer to by index.
    names: Vec<String>,
    /// Encoder lists (priority order) the channels refer to by index.
    lists: Vec<Vec<u32>>,
    drops: Vec<(String, Vec<(&'static str, u64)>)>,
    xdp: Vec<(&'static str, u64)>,
    tc: Vec<(&'static str, u64)>,
}

/// One channel of a [`Snapshot`].
#[derive(Debug)]
struct ChannelSample {
    name: Box<str>,
    packets: u64,
    bytes: u64,
    idle_ms: Option<u64>,
    /// Index into [`Snapshot::names`].
    active: Option<u32>,
    /// Index into [`Snapshot::lists`].
    encoders: u32,
    srt_peers: Box<[crate::api::SrtPeerStatus]>,
}

impl Snapshot {
    fn of<C: Borrow<ChannelStatus>>(
        channels: impl IntoIterator<Item = C>,
        encoders: &[EncoderStatus],
        drops: &[(String, Vec<(&'static str, u64)>)],
        xdp: &[(&'static str, u64)],
        tc: &[(&'static str, u64)],
    ) -> Self {
        let mut names: Vec<String> = Vec::new();
        let mut name_ids: std::collections::HashMap<String, u32> = Default::default();
        let mut lists: Vec<Vec<u32>> = Vec::new();
        let mut list_ids: std::collections::HashMap<Vec<u32>, u32> = Default::default();
        let mut id = |name: &str, names: &mut Vec<String>| -> u32 {
            if let Some(&i) = name_ids.get(name) {
                return i;
            }
            names.push(name.to_owned());
            let i = names.len() as u32 - 1;
            name_ids.insert(name.to_owned(), i);
            i
        };
        let channels = channels
            .into_iter()
            .map(|c| {
                let c = c.borrow();
                let list: Vec<u32> = c.encoders.iter().map(|e| id(e, &mut names)).collect();
                let encoders = match list_ids.get(&list) {
                    Some(&l) => l,
                    None => {
                        lists.push(list.clone());
                        list_ids.insert(list, lists.len() as u32 - 1);
                        lists.len() as u32 - 1
                    }
                };
                ChannelSample {
                    name: c.name.as_str().into(),
                    packets: c.packets,
                    bytes: c.bytes,
                    idle_ms: c.idle_ms,
                    active: c.active.as_deref().map(|a| id(a, &mut names)),
                    encoders,
                    srt_peers: c.srt_peers.clone().into_boxed_slice(),
                }
            })
            .collect();
        Self {
            channels,
            encoders: encoders.to_vec(),
            names,
            lists,
            drops: drops.to_vec(),
            xdp: xdp.to_vec(),
            tc: tc.to_vec(),
        }
    }
}

/// Encodes the [`Snapshot`] at scrape time (names get the registry's `nsfail_` prefix).
#[derive(Debug)]
struct SnapshotCollector(Arc<Mutex<Snapshot>>);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        channel_families(&snapshot, &mut encoder)?;
        encoder_families(&snapshot, &mut encoder)?;
        family(
            &mut encoder,
            "xdp_packets",
            "Packets seen by the XDP ingest program, by outcome.",
            None,
            reasons(&snapshot.xdp),
        )?;
        family(
            &mut encoder,
            "tc_packets",
            "Packets seen by the TC egress program on encoder veths, by outcome.",
            None,
            reasons(&snapshot.tc),
        )
    }
}

fn flag(on: bool) -> ConstGauge {
    ConstGauge::new(i64::from(on))
}

/// The per-channel families: input, idle time, SRT callers, active encoder.
fn channel_families(
    snapshot: &Snapshot,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let channels = &snapshot.channels;
    let channel = |name: &str| [("channel", name.to_owned())];
    family(
        encoder,
        "channel_packets",
        "Input packets received for the channel.",
        None,
        channels
            .iter()
            .map(|c| (channel(&c.name), ConstCounter::new(c.packets))),
    )?;
    // With a unit, the name is `channel` + `_bytes`, as OpenMetrics wants it.
    family(
        encoder,
        "channel",
        "Input bytes (IP packet lengths) received for the channel.",
        Some(&Unit::Bytes),
        channels
            .iter()
            .map(|c| (channel(&c.name), ConstCounter::new(c.bytes))),
    )?;
    family(
        encoder,
        "channel_idle",
        "Time since the channel's last input packet.",
        Some(&Unit::Seconds),
        channels.iter().filter_map(|c| {
            let idle = Duration::from_millis(c.idle_ms?).as_secs_f64();
            Some((channel(&c.name), ConstGauge::new(idle)))
        }),
    )?;
    family(
        encoder,
        "srt_peer_idle",
        "SRT callers of a channel, by address and socket ID: time since the return path \
             last saw their session.",
        Some(&Unit::Seconds),
        channels.iter().flat_map(|c| {
            c.srt_peers.iter().map(move |p| {
                (
                    [
                        ("channel", c.name.to_string()),
                        ("caller", p.caller.to_string()),
                        ("socket_id", p.socket_id.to_string()),
                    ],
                    ConstGauge::new(Duration::from_millis(p.idle_ms).as_secs_f64()),
                )
            })
        }),
    )?;
    let name = |i: u32| snapshot.names[i as usize].as_str();
    family(
        encoder,
        "channel_active_encoder",
        "1 for the encoder the channel is forwarded to now, 0 for its backups.",
        None,
        channels.iter().flat_map(|c| {
            let active = c.active;
            let mut encoders = snapshot.lists[c.encoders as usize].clone();
            if let Some(a) = active.filter(|a| !encoders.contains(a)) {
                encoders.push(a);
            }
            encoders.into_iter().map(move |e| {
                (
                    [
                        ("channel", c.name.to_string()),
                        ("encoder", name(e).to_owned()),
                    ],
                    flag(Some(e) == active),
                )
            })
        }),
    )?;
    Ok(())
}

/// The per-encoder families: health, drain, receive readiness, counters, egress drops. Long
/// because it is the list of those families, one short block each.
fn encoder_families(
    snapshot: &Snapshot,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let encoder_label = |name: &str| [("encoder", name.to_owned())];
    let status = snapshot;
    family(
        encoder,
        "encoder_healthy",
        "1 when the encoder passes its health checks.",
        None,
        status
            .encoders
            .iter()
            .map(|e| (encoder_label(&e.name), flag(e.healthy))),
    )?;
    family(
        encoder,
        "encoder_drained",
        "1 when an operator drained the encoder.",
        None,
        status
            .encoders
            .iter()
            .map(|e| (encoder_label(&e.name), flag(e.drained))),
    )?;
    family(
        encoder,
        "encoder_can_receive",
        "1 when the local encoder's interface takes XDP-redirected frames; 0 is a silent \
             loss nsfail could not repair (the encoder is failed over).",
        None,
        status
            .encoders
            .iter()
            .filter_map(|e| Some((encoder_label(&e.name), flag(e.can_receive?)))),
    )?;
    family(
        encoder,
        "encoder_packets",
        "Channel packets forwarded to the encoder.",
        None,
        status
            .encoders
            .iter()
            .map(|e| (encoder_label(&e.name), ConstCounter::new(e.packets))),
    )?;
    family(
        encoder,
        "encoder",
        "Channel bytes forwarded to the encoder.",
        Some(&Unit::Bytes),
        status
            .encoders
            .iter()
            .map(|e| (encoder_label(&e.name), ConstCounter::new(e.bytes))),
    )?;
    family(
        encoder,
        "encoder_replies",
        "Replies from the encoder returned to contribution sources.",
        None,
        status
            .encoders
            .iter()
            .map(|e| (encoder_label(&e.name), ConstCounter::new(e.replies))),
    )?;
    family(
        encoder,
        "encoder_drops",
        "Packets leaving the encoder that its egress policy dropped, by reason.",
        None,
        snapshot.drops.iter().flat_map(|(name, reasons)| {
            reasons.iter().map(move |(reason, n)| {
                (
                    [("encoder", name.clone()), ("reason", (*reason).to_owned())],
                    ConstCounter::new(*n),
                )
            })
        }),
    )?;
    Ok(())
}

fn reasons(
    counts: &[(&'static str, u64)],
) -> impl Iterator<Item = ([(&'static str, &'static str); 1], ConstCounter)> {
    counts
        .iter()
        .map(|(reason, n)| ([("reason", *reason)], ConstCounter::new(*n)))
}

/// Encodes one metric family from `(labels, value)` samples; a family without samples is left
/// out entirely rather than described with nothing under it.
fn family<L, M>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error>
where
    L: EncodeLabelSet,
    M: EncodeMetric + TypedMetric,
{
    let mut samples = samples.into_iter().peekable();
    if samples.peek().is_none() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, unit, M::TYPE)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
