//! Prometheus metrics: a `prometheus-client` registry and a minimal HTTP/1.1 endpoint serving it.
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
//! | `nsfail_encoder_packets_total` | counter | encoder |
//! | `nsfail_encoder_bytes_total` | counter | encoder |
//! | `nsfail_encoder_replies_total` | counter | encoder |
//! | `nsfail_encoder_drops_total` | counter | encoder, reason |
//! | `nsfail_probe_latency_seconds` | histogram | encoder |
//! | `nsfail_probe_failures_total` | counter | encoder |
//! | `nsfail_xdp_packets_total` | counter | reason |
//! | `nsfail_tc_packets_total` | counter | reason |

use std::{
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
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{JoinHandle, JoinSet},
    time::timeout,
};

use crate::api::Status;

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
        let mut snapshot = self.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        for old in &snapshot.status.channels {
            if !status.channels.iter().any(|c| c.name == old.name) {
                self.failovers.remove(&ChannelLabels {
                    channel: old.name.clone(),
                });
            }
        }
        for old in &snapshot.status.encoders {
            if !status.encoders.iter().any(|e| e.name == old.name) {
                let labels = EncoderLabels {
                    encoder: old.name.clone(),
                };
                self.probe_latency.remove(&labels);
                self.probe_failures.remove(&labels);
            }
        }
        *snapshot = Snapshot {
            status: status.clone(),
            drops: drops.to_vec(),
            xdp: xdp.to_vec(),
            tc: tc.to_vec(),
        };
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

/// The last data-plane snapshot given to [`Metrics::observe`].
#[derive(Debug, Default)]
struct Snapshot {
    status: Status,
    drops: Vec<(String, Vec<(&'static str, u64)>)>,
    xdp: Vec<(&'static str, u64)>,
    tc: Vec<(&'static str, u64)>,
}

/// Encodes the [`Snapshot`] at scrape time (names get the registry's `nsfail_` prefix).
#[derive(Debug)]
struct SnapshotCollector(Arc<Mutex<Snapshot>>);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let status = &snapshot.status;
        let channel = |name: &str| [("channel", name.to_owned())];
        let encoder_label = |name: &str| [("encoder", name.to_owned())];
        let flag = |on: bool| ConstGauge::new(i64::from(on));

        family(
            &mut encoder,
            "channel_packets",
            "Input packets received for the channel.",
            None,
            status
                .channels
                .iter()
                .map(|c| (channel(&c.name), ConstCounter::new(c.packets))),
        )?;
        // With a unit, the name is `channel` + `_bytes`, as OpenMetrics wants it.
        family(
            &mut encoder,
            "channel",
            "Input bytes (IP packet lengths) received for the channel.",
            Some(&Unit::Bytes),
            status
                .channels
                .iter()
                .map(|c| (channel(&c.name), ConstCounter::new(c.bytes))),
        )?;
        family(
            &mut encoder,
            "channel_idle",
            "Time since the channel's last input packet.",
            Some(&Unit::Seconds),
            status.channels.iter().filter_map(|c| {
                let idle = Duration::from_millis(c.idle_ms?).as_secs_f64();
                Some((channel(&c.name), ConstGauge::new(idle)))
            }),
        )?;
        family(
            &mut encoder,
            "srt_peer_idle",
            "SRT callers of a channel, by address and socket ID: time since the return path \
             last saw their session.",
            Some(&Unit::Seconds),
            status.channels.iter().flat_map(|c| {
                c.srt_peers.iter().map(move |p| {
                    (
                        [
                            ("channel", c.name.clone()),
                            ("caller", p.caller.to_string()),
                            ("socket_id", p.socket_id.to_string()),
                        ],
                        ConstGauge::new(Duration::from_millis(p.idle_ms).as_secs_f64()),
                    )
                })
            }),
        )?;
        family(
            &mut encoder,
            "channel_active_encoder",
            "1 for the encoder the channel is forwarded to now, 0 for its backups.",
            None,
            status.channels.iter().flat_map(|c| {
                let active = c.active.as_deref();
                let mut encoders: Vec<&str> = c.encoders.iter().map(String::as_str).collect();
                if let Some(a) = active.filter(|a| !encoders.contains(a)) {
                    encoders.push(a);
                }
                encoders.into_iter().map(move |e| {
                    (
                        [("channel", c.name.clone()), ("encoder", e.to_owned())],
                        flag(Some(e) == active),
                    )
                })
            }),
        )?;
        family(
            &mut encoder,
            "encoder_healthy",
            "1 when the encoder passes its health checks.",
            None,
            status
                .encoders
                .iter()
                .map(|e| (encoder_label(&e.name), flag(e.healthy))),
        )?;
        family(
            &mut encoder,
            "encoder_drained",
            "1 when an operator drained the encoder.",
            None,
            status
                .encoders
                .iter()
                .map(|e| (encoder_label(&e.name), flag(e.drained))),
        )?;
        family(
            &mut encoder,
            "encoder_packets",
            "Channel packets forwarded to the encoder.",
            None,
            status
                .encoders
                .iter()
                .map(|e| (encoder_label(&e.name), ConstCounter::new(e.packets))),
        )?;
        family(
            &mut encoder,
            "encoder",
            "Channel bytes forwarded to the encoder.",
            Some(&Unit::Bytes),
            status
                .encoders
                .iter()
                .map(|e| (encoder_label(&e.name), ConstCounter::new(e.bytes))),
        )?;
        family(
            &mut encoder,
            "encoder_replies",
            "Replies from the encoder returned to contribution sources.",
            None,
            status
                .encoders
                .iter()
                .map(|e| (encoder_label(&e.name), ConstCounter::new(e.replies))),
        )?;
        family(
            &mut encoder,
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

/// Bounds on what one client of the endpoint may cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest request head (request line and headers) accepted; longer ones get 431.
    pub max_request: usize,
    /// How long a client may take to send its request head (then it gets 408), and again to
    /// take the response.
    pub timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request: 8 * 1024,
            timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Binds the metrics endpoint on `addr` now, so that a taken port is an error before the daemon
/// reports ready, and serves it on a spawned task until `shutdown` turns true (or its sender is
/// dropped). Returns the bound address (useful with port 0) and that task.
///
/// `GET /metrics` (and `HEAD`) calls `refresh` (on a blocking thread, so it may lock and read
/// maps) and answers with [`Metrics::encode`]. Other paths get 404, other methods 405. One
/// request per connection.
pub async fn serve(
    addr: SocketAddr,
    limits: Limits,
    metrics: Arc<Metrics>,
    refresh: impl Fn() + Send + Sync + 'static,
    shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), MetricsError> {
    let bind_err = |source| MetricsError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let bound = listener.local_addr().map_err(bind_err)?;
    let refresh: Arc<dyn Fn() + Send + Sync> = Arc::new(refresh);
    let task = tokio::spawn(accept_loop(listener, limits, metrics, refresh, shutdown));
    Ok((bound, task))
}

async fn accept_loop(
    listener: TcpListener,
    limits: Limits,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Dropping the set when the loop ends aborts the connections still in flight.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept(), if connections.len() < limits.max_connections => {
                match accepted {
                    Ok((stream, peer)) => {
                        let (metrics, refresh) = (metrics.clone(), refresh.clone());
                        connections.spawn(async move {
                            if let Err(e) = handle(stream, limits, metrics, refresh).await {
                                debug!("metrics client {peer}: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        // Out of descriptors, typically: back off instead of spinning.
                        warn!("metrics endpoint: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}

/// Resolves when `shutdown` turns true or its sender is dropped (which also means stop).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: drop it here, not in the caller's select.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// How long a client gets to close its end after the response before it is closed anyway.
const LINGER: Duration = Duration::from_secs(1);

/// An HTTP response: status line, content type and body.
struct Reply {
    status: &'static str,
    content_type: &'static str,
    allow: bool,
    body: Vec<u8>,
    head_only: bool,
}

impl Reply {
    fn error(status: &'static str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            allow: false,
            body: format!("{status}\n").into_bytes(),
            head_only: false,
        }
    }
}

async fn handle(
    mut stream: TcpStream,
    limits: Limits,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
) -> io::Result<()> {
    let reply = match timeout(limits.timeout, read_head(&mut stream, limits.max_request)).await {
        Err(_) => Reply::error("408 Request Timeout"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Head::Closed)) => return Ok(()),
        Ok(Ok(Head::TooLarge)) => Reply::error("431 Request Header Fields Too Large"),
        Ok(Ok(Head::Complete(head))) => respond(&head, metrics, refresh).await,
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.content_type,
        reply.body.len()
    );
    if reply.allow {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !reply.head_only {
        out.extend_from_slice(&reply.body);
    }
    timeout(limits.timeout, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client did not take the response"))??;
    // Closing with unread input makes the kernel send a reset, which can destroy the response
    // before the client reads it: read until the client closes, for a moment at most.
    let mut sink = [0u8; 4096];
    let _ = timeout(LINGER, async {
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
    Ok(())
}

enum Head {
    /// The request line and headers, without the blank line.
    Complete(String),
    TooLarge,
    /// The client closed before finishing its request.
    Closed,
}

async fn read_head(stream: &mut TcpStream, max: usize) -> io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        // The terminator may straddle two reads.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf[from..]) {
            let end = from + end;
            if end > max {
                return Ok(Head::TooLarge);
            }
            return Ok(Head::Complete(
                String::from_utf8_lossy(&buf[..end]).into_owned(),
            ));
        }
        if buf.len() > max {
            return Ok(Head::TooLarge);
        }
    }
}

/// Where the blank line ending a request head starts: CRLF CRLF, or bare LF LF from lenient
/// clients.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn respond(head: &str, metrics: Arc<Metrics>, refresh: Arc<dyn Fn() + Send + Sync>) -> Reply {
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Reply::error("400 Bad Request");
    };
    if !version.starts_with("HTTP/1.") {
        return Reply::error("505 HTTP Version Not Supported");
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if path != "/metrics" {
        return Reply::error("404 Not Found");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return Reply {
                allow: true,
                ..Reply::error("405 Method Not Allowed")
            };
        }
    };
    match tokio::task::spawn_blocking(move || {
        refresh();
        metrics.encode()
    })
    .await
    {
        Ok(body) => Reply {
            status: "200 OK",
            content_type: CONTENT_TYPE,
            allow: false,
            body: body.into_bytes(),
            head_only,
        },
        Err(e) => {
            warn!("metrics endpoint: refreshing or encoding the metrics failed: {e}");
            Reply::error("500 Internal Server Error")
        }
    }
}

#[cfg(test)]
mod tests {
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
            address: "10.200.1.2".to_owned(),
            local: true,
            healthy,
            drained,
            packets,
            bytes: packets * 1316,
            replies: 7,
            drops: 3,
            active_for: Vec::new(),
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
                    x.name.starts_with(prefix)
                        && x.labels.get(label).map(String::as_str) == Some(value)
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

    #[test]
    fn head_end_finds_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody"), Some(23));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }
}
