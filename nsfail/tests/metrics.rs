//! The metrics endpoint over real loopback TCP: what a scrape gets, what everything else gets,
//! and that slow, oversized and unfinished requests cannot hold it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use nsfail::{
    api::{ChannelStatus, EncoderStatus, Status},
    metrics::{CONTENT_TYPE, Limits, Metrics, MetricsError, serve},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
    time::timeout,
};
use tokio_util::sync::CancellationToken;

/// Bounds every wait on the server, so a regression fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(10);

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

fn status(packets: u64) -> Status {
    Status {
        channels: vec![ChannelStatus {
            name: "cam1".to_owned(),
            listen: "10.200.0.1:5000".parse().unwrap(),
            active: Some("enc-a".to_owned()),
            encoders: vec!["enc-a".to_owned(), "enc-b".to_owned()],
            port: 5000,
            protocol: "udp".to_owned(),
            failback: "manual".to_owned(),
            packets,
            bytes: packets * 1316,
            idle_ms: Some(20),
            srt_peers: Vec::new(),
        }],
        encoders: ["enc-a", "enc-b"]
            .into_iter()
            .map(|name| EncoderStatus {
                name: name.to_owned(),
                host: None,
                address: "10.200.1.2".to_owned(),
                local: true,
                healthy: name == "enc-a",
                drained: false,
                can_receive: Some(true),
                receive: None,
                packets,
                bytes: packets * 1316,
                redirect_failed: 0,
                replies: 0,
                drops: 0,
                active_for: Vec::new(),
                health_kind: "udp".into(),
                health_interval_ms: 100,
            })
            .collect(),
        cluster: None,
    }
}

struct Server {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Serves on a loopback port; every scrape's refresh counts one more packet on `cam1`, so a
/// scrape shows whether refresh ran first.
async fn start(limits: Limits) -> Server {
    let metrics = Arc::new(Metrics::new());
    metrics.record_failover("cam1", Some(Duration::from_millis(30)));
    metrics.record_probe("enc-a", Some(Duration::from_micros(300)));
    metrics.record_probe("enc-b", None);
    let scrapes = AtomicU64::new(0);
    let refresh = {
        let metrics = metrics.clone();
        move || {
            let packets = scrapes.fetch_add(1, Ordering::SeqCst) + 1;
            metrics.observe(
                &status(packets),
                &[("enc-b".to_owned(), vec![("denied", 5)])],
                &[("redirected", packets), ("pass_not_ip", 2)],
                &[("reply_redirected", 0)],
            );
        }
    };
    let stop = CancellationToken::new();
    let (addr, task) = serve(loopback(), limits, metrics.clone(), refresh, stop.clone())
        .await
        .expect("binding a loopback port");
    Server {
        addr,
        metrics,
        stop,
        task,
    }
}

/// Sends `request` and returns everything the server sends until it closes.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    timeout(PATIENCE, async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        String::from_utf8(answer).expect("a UTF-8 answer")
    })
    .await
    .expect("the server answers and closes")
}

struct Response {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

fn parse_response(text: &str) -> Response {
    let (head, body) = text
        .split_once("\r\n\r\n")
        .expect("a blank line after the head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts.next().unwrap().parse().expect("a numeric status");
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').expect("`Name: value`");
            (k.to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect::<BTreeMap<_, _>>();
    let length: usize = headers["content-length"].parse().unwrap();
    assert_eq!(length, body.len(), "Content-Length matches the body");
    Response {
        status,
        headers,
        body: body.to_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Response {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n");
    parse_response(&exchange(addr, request.as_bytes()).await)
}

/// One sample line: `name{k="v",...} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn is_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

fn parse_sample(line: &str) -> Sample {
    let end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("no value: {line}"));
    let name = &line[..end];
    assert!(is_name(name, true), "metric name {name:?} in {line}");
    let mut chars = line[end..].chars().peekable();
    let mut labels = BTreeMap::new();
    if chars.next_if_eq(&'{').is_some() {
        loop {
            let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
            assert!(is_name(&key, false), "label name {key:?} in {line}");
            assert_eq!(chars.next(), Some('='), "`=` after the label name: {line}");
            assert_eq!(chars.next(), Some('"'), "a quoted label value: {line}");
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some(c @ ('\\' | '"')) => value.push(c),
                        other => panic!("bad escape {other:?} in {line}"),
                    },
                    Some(c) => value.push(c),
                    None => panic!("unterminated label value: {line}"),
                }
            }
            assert!(
                labels.insert(key, value).is_none(),
                "duplicate label: {line}"
            );
            match chars.next() {
                Some(',') => {}
                Some('}') => break,
                other => panic!("{other:?} where `,` or `}}` belongs: {line}"),
            }
        }
    }
    let rest: String = chars.collect();
    let value = rest
        .strip_prefix(' ')
        .unwrap_or_else(|| panic!("one space before the value: {line}"));
    assert!(!value.contains(' '), "nothing after the value: {line}");
    let value = value
        .parse()
        .unwrap_or_else(|_| panic!("a float value: {line}"));
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

/// Checks `text` is an OpenMetrics text exposition: each family described once with HELP and
/// TYPE before its samples, every sample line `name{labels} value` belonging to the family
/// described last, histogram buckets labelled `le`, and `# EOF` last. Returns the samples.
fn validate(text: &str) -> Vec<Sample> {
    assert!(text.ends_with("# EOF\n"), "ends with # EOF");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.iter().filter(|l| **l == "# EOF").count(), 1);
    let mut described = BTreeSet::new();
    let mut help = BTreeSet::new();
    let mut current: Option<(String, String)> = None;
    let mut samples = Vec::new();
    for line in &lines[..lines.len() - 1] {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().expect("a family name"));
            let text = parts.next().expect("text after the name");
            assert!(is_name(name, true), "family name in {line}");
            match kind {
                "HELP" => {
                    assert!(!text.is_empty(), "help text in {line}");
                    assert!(help.insert(name.to_owned()), "HELP twice: {line}");
                }
                "TYPE" => {
                    assert!(help.contains(name), "HELP before TYPE: {line}");
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "stateset",
                            "unknown"
                        ]
                        .contains(&text),
                        "type in {line}"
                    );
                    assert!(described.insert(name.to_owned()), "TYPE twice: {line}");
                    current = Some((name.to_owned(), text.to_owned()));
                }
                "UNIT" => {
                    let (family, _) = current.as_ref().expect("UNIT after TYPE");
                    assert_eq!(family, name, "UNIT of the current family: {line}");
                    assert!(name.ends_with(&format!("_{text}")), "unit suffix: {line}");
                }
                _ => panic!("unknown comment: {line}"),
            }
            continue;
        }
        let sample = parse_sample(line);
        let (family, kind) = current.as_ref().expect("a sample after a TYPE line");
        let suffixes: &[&str] = match kind.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            _ => &[""],
        };
        let suffix = sample
            .name
            .strip_prefix(family.as_str())
            .filter(|s| suffixes.contains(s))
            .unwrap_or_else(|| panic!("{line} is not in family {family} ({kind})"));
        if suffix == "_bucket" {
            assert!(
                sample.labels.contains_key("le"),
                "bucket without le: {line}"
            );
        }
        samples.push(sample);
    }
    samples
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

#[tokio::test]
async fn a_scrape_gets_a_valid_refreshed_exposition() {
    let server = start(Limits::default()).await;
    let first = get(server.addr, "/metrics").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.headers["content-type"], CONTENT_TYPE);
    assert_eq!(first.headers["connection"], "close");
    let samples = validate(&first.body);
    let cam1 = [("channel", "cam1")];
    assert_eq!(
        value(&samples, "nsfail_channel_packets_total", &cam1),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "nsfail_channel_failovers_total", &cam1),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "nsfail_channel_active_encoder",
            &[("channel", "cam1"), ("encoder", "enc-a")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "nsfail_encoder_healthy", &[("encoder", "enc-b")]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &samples,
            "nsfail_encoder_drops_total",
            &[("encoder", "enc-b"), ("reason", "denied")]
        ),
        Some(5.0)
    );
    assert_eq!(
        value(
            &samples,
            "nsfail_probe_failures_total",
            &[("encoder", "enc-b")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "nsfail_switchover_seconds_count", &[]),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "nsfail_xdp_packets_total",
            &[("reason", "pass_not_ip")]
        ),
        Some(2.0)
    );

    // The query string is ignored; the second scrape sees the second refresh.
    let second = get(server.addr, "/metrics?format=openmetrics").await;
    assert_eq!(second.status, 200);
    let samples = validate(&second.body);
    assert_eq!(
        value(&samples, "nsfail_channel_packets_total", &cam1),
        Some(2.0)
    );
    assert_eq!(server.metrics.encode().lines().last(), Some("# EOF"));
}

#[tokio::test]
async fn head_gets_the_headers_only() {
    let server = start(Limits::default()).await;
    let answer = exchange(server.addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(body.is_empty());
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.trim())
        })
        .unwrap()
        .parse()
        .unwrap();
    assert!(length > 0);
}

#[tokio::test]
async fn other_paths_and_methods_are_refused() {
    let server = start(Limits::default()).await;
    for path in ["/other", "/", "/metrics/", "/metricsx"] {
        assert_eq!(get(server.addr, path).await.status, 404, "{path}");
    }
    let post = exchange(
        server.addr,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    let post = parse_response(&post);
    assert_eq!(post.status, 405);
    assert_eq!(post.headers["allow"], "GET, HEAD");
    let garbage = parse_response(&exchange(server.addr, b"hello\r\n\r\n").await);
    assert_eq!(garbage.status, 400);
}

#[tokio::test]
async fn an_unfinished_request_is_closed_after_the_timeout() {
    let limits = Limits {
        timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = start(limits).await;
    // A request line and a header, but never the blank line; then nothing at all. Each is let
    // go once the timeout has passed: closed, with a 408 where hyper can still send one.
    for request in [&b"GET /metrics HTTP/1.1\r\nHost: x\r\n"[..], b""] {
        let asked = Instant::now();
        let answer = exchange(server.addr, request).await;
        let held = asked.elapsed();
        assert!(
            held >= Duration::from_millis(250) && held < Duration::from_secs(3),
            "held {held:?}"
        );
        assert!(
            answer.is_empty() || parse_response(&answer).status == 408,
            "{answer:?}"
        );
    }
    // The server still serves others.
    assert_eq!(get(server.addr, "/metrics").await.status, 200);
}

#[tokio::test]
async fn an_oversized_request_is_refused() {
    // hyper reads at least 8 KiB: the smallest limit that holds.
    let limits = Limits {
        max_request: 8192,
        ..Limits::default()
    };
    let server = start(limits).await;
    // Never-ending headers.
    let endless = format!("GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n", "a".repeat(16384));
    let answer = exchange(server.addr, endless.as_bytes()).await;
    assert_eq!(parse_response(&answer).status, 431);
    // Complete, but longer than allowed.
    let long = format!(
        "GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(10240)
    );
    let answer = exchange(server.addr, long.as_bytes()).await;
    assert_eq!(parse_response(&answer).status, 431);
    // Just under the limit is fine.
    let fits = format!(
        "GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(7000)
    );
    assert_eq!(
        parse_response(&exchange(server.addr, fits.as_bytes()).await).status,
        200
    );
}

#[tokio::test]
async fn a_taken_port_is_an_error_at_bind_time() {
    let server = start(Limits::default()).await;
    let shutdown = CancellationToken::new();
    let taken = serve(
        server.addr,
        Limits::default(),
        Arc::new(Metrics::new()),
        || {},
        shutdown,
    )
    .await;
    match taken {
        Err(MetricsError::Bind { addr, source }) => {
            assert_eq!(addr, server.addr);
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
        }
        Ok((addr, _)) => panic!("bound {addr} twice"),
    }
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let server = start(Limits::default()).await;
    assert_eq!(get(server.addr, "/metrics").await.status, 200);
    server.stop.cancel();
    timeout(PATIENCE, server.task)
        .await
        .expect("the server stops")
        .expect("the server task does not panic");
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "nothing listens any more"
    );
}
