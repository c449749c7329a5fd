//! `cluster-scale`: many channels in etcd (issue 17, "What must be shown" 6: 10,000 channels,
//! start-up of a host to a fully programmed data plane <= 5 s, one change applied on all
//! hosts within 100 ms p99).
//!
//! Per size (1,000 and 10,000 channels): a fresh etcd; the channels seeded with `nsfail
//! apply`; host h1 (lab of four local encoders, each with a `udp` echo) started and timed
//! from `nsfail run` to the first packet forwarded on the last channel (a packet sent every
//! ms), to its pinned CHANNELS_V4 map holding every channel, and to etcd holding the new
//! leader's active encoder of every channel. Then hosts h2 and h3 (a lab of one encoder
//! each, which no channel uses: every channel is routed to h1's encoders) are started and
//! timed to their maps holding every channel. Then changes, each timed from the write to
//! the change seen in all three hosts' pinned maps (read directly, every 0.2 ms): a channel
//! put into etcd by another writer, and `nsfail remap` on the leader (CLI process start
//! included). Not a pass/fail test: the figures and the targets, side by side.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, MapData};
use etcd_client::{Client, GetOptions};
use nsfail_common::{ChannelKey4, ChannelTarget};
use nsfail_tests::{
    Entered, PinDir,
    cluster::{Etcd, PORT, cluster_section},
    daemon::{Daemon, TempDir, nsfail_bin},
    lab,
    traffic::Echo,
    unique,
};

use crate::{
    chain::{key4, pinned},
    report::{Figure, Goal, Limit, Report, percentile},
};

const SIZES: [usize; 2] = [1_000, 10_000];
/// Changes of each kind per size.
const CHANGES: usize = 100;
/// How long one start or one change may take before the run is reported as failed.
const LIMIT: Duration = Duration::from_secs(120);
const CHANGE_LIMIT: Duration = Duration::from_secs(10);
/// The pause after each change (seen on every host) before the next.
const GAP: Duration = Duration::from_millis(100);
const NAMES: [&str; 4] = ["enc-a", "enc-b", "enc-c", "enc-d"];

fn listen(i: usize) -> SocketAddr {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 80, 0, 0)) + i as u32 + 1);
    SocketAddr::new(ip.into(), 5000)
}

fn port(i: usize) -> u16 {
    10_000 + (i / 2) as u16
}

/// Encoder indexes (0..4) of channel `i`: primary, backup.
fn pair(i: usize) -> (usize, usize) {
    if i.is_multiple_of(2) { (0, 1) } else { (2, 3) }
}

fn channel_toml(name: &str, i: usize) -> String {
    let (a, b) = pair(i);
    format!(
        "[[channel]]\nname = \"{name}\"\nlisten = \"{}\"\nencoders = [\"{}\", \"{}\"]\nport = {}\n\n",
        listen(i),
        NAMES[a],
        NAMES[b],
        port(i)
    )
}

/// A host's file: its ingest, its encoders (named `names`), no channels.
fn host_toml(lab: &nsfail::lab::Lab, names: &[&str]) -> String {
    let mut s = format!(
        "[ingest]\ninterface = \"ing\"\nnetns = \"{}\"\nxdp_mode = \"native\"\n\n",
        lab.rt.name
    );
    for (e, name) in lab.encoders.iter().zip(names) {
        s += &format!(
            "[[encoder]]\nname = \"{name}\"\naddress = \"{}\"\ninterface = \"{}\"\nnetns = \"{}\"\n\
             health = {{ kind = \"udp\", port = 9000, interval_ms = 100, timeout_ms = 100 }}\n\n",
            e.addr4, e.host_if, e.ns.name
        );
    }
    s
}

type Channels = HashMap<MapData, ChannelKey4, ChannelTarget>;

/// A host's pinned CHANNELS_V4, once its daemon has pinned it.
fn channels_map(pins: &PinDir) -> Option<Channels> {
    pinned(&pins.pins, "CHANNELS_V4").ok()
}

fn count(map: &Channels) -> usize {
    map.keys().filter(Result::is_ok).count()
}

/// Polls (every 20 ms) until the host's map holds `n` channels; the time since `t0`.
fn until_all(pins: &PinDir, n: usize, t0: Instant) -> Result<Duration> {
    loop {
        if let Some(map) = channels_map(pins)
            && count(&map) >= n
        {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > LIMIT {
            bail!("the map did not hold {n} channels within {LIMIT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends to `to` every millisecond from the source namespace until `stop`.
fn sender(ns: String, to: SocketAddr, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let _ = nsfail::net::netns::in_netns(&ns, move || {
            let sock = UdpSocket::bind("10.77.0.2:0").expect("bind sender");
            let deadline = Instant::now() + LIMIT + Duration::from_secs(10);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let _ = sock.send_to(b"first", to);
                thread::sleep(Duration::from_millis(1));
            }
        });
    })
}

/// A blocking etcd client, connected from inside etcd's namespace.
struct Etcdc {
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl Etcdc {
    fn new(etcd: &Etcd) -> Result<Self> {
        let _inside = Entered::new(&etcd.ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // The connection is made at the first request: this one, inside etcd's namespace.
        let client = rt.block_on(async {
            let mut c = Client::connect([format!("http://127.0.0.1:{PORT}")], None).await?;
            c.status().await?;
            Ok::<_, etcd_client::Error>(c)
        })?;
        Ok(Self { rt, client })
    }

    fn count(&mut self, prefix: &str) -> Result<i64> {
        let opts = GetOptions::new().with_prefix().with_count_only();
        Ok(self
            .rt
            .block_on(self.client.get(prefix, Some(opts)))?
            .count())
    }

    fn put(&mut self, key: String, value: Vec<u8>) -> Result<()> {
        self.rt.block_on(self.client.put(key, value, None))?;
        Ok(())
    }
}

/// One size's figures.
struct Point {
    apply_s: f64,
    first_packet_s: f64,
    all_in_map_s: f64,
    actives_s: f64,
    followers_s: Vec<f64>,
    /// Per change: the slowest host's delay.
    add_ms: Vec<f64>,
    remap_ms: Vec<f64>,
    /// Changes slower than 100 ms: each host's delay (h1, h2, h3).
    slow: Vec<Vec<f64>>,
    /// Times h1's log says it lost etcd or its leadership.
    lost: usize,
}

/// Waits until `f` holds on every host's map; the time since `t0` on each host, in ms.
fn on_all(
    maps: &[Channels],
    t0: Instant,
    key: ChannelKey4,
    f: impl Fn(Option<ChannelTarget>) -> bool,
) -> Result<Vec<f64>> {
    let mut seen: Vec<Option<f64>> = vec![None; maps.len()];
    loop {
        for (s, map) in seen.iter_mut().zip(maps) {
            if s.is_none() && f(map.get(&key, 0).ok()) {
                *s = Some(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        if let Some(all) = seen.iter().copied().collect::<Option<Vec<f64>>>() {
            return Ok(all);
        }
        if t0.elapsed() > CHANGE_LIMIT {
            bail!("a change not seen on every host within {CHANGE_LIMIT:?}");
        }
        thread::sleep(Duration::from_micros(200));
    }
}

/// The slowest host's delay; a change slower than 100 ms is kept with every host's delay.
fn record(all: Vec<f64>, out: &mut Vec<f64>, slow: &mut Vec<Vec<f64>>) {
    let max = all.iter().copied().fold(0.0, f64::max);
    out.push(max);
    if max > 100.0 {
        // When it ended (UTC, as the daemons' logs stamp their lines), to find in them.
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let s = at.as_secs() % 86_400;
        eprintln!(
            "  slow change (h1, h2, h3 ms: {all:?}) ended at {:02}:{:02}:{:02}.{:03} UTC",
            s / 3600,
            s / 60 % 60,
            s % 60,
            at.subsec_millis()
        );
        slow.push(all);
    }
}

fn one(n: usize) -> Result<Point> {
    let (lab1, lab2, lab3) = (lab(4), lab(1), lab(1));
    lab1.src
        .ip(&["route", "add", "10.80.0.0/15", "via", "10.77.0.1"])?;
    let echo = |l: &nsfail::lab::Lab| -> Vec<Echo> {
        l.encoders
            .iter()
            .map(|e| Echo::start(&e.ns, format!("{}:9000", e.addr4).parse().expect("addr")))
            .collect()
    };
    let _echoes = [echo(&lab1), echo(&lab2), echo(&lab3)];
    let mut etcd = Etcd::new();
    let eps = [
        etcd.link(&lab1.rt.name, 1),
        etcd.link(&lab2.rt.name, 2),
        etcd.link(&lab3.rt.name, 3),
    ];
    etcd.start();
    let name = unique("s");
    let prefix = format!("/nsfail/{name}/");
    let dir = TempDir::new();

    let mut seed = host_toml(&lab1, &NAMES);
    seed.reserve(n * 110);
    for i in 0..n {
        seed += &channel_toml(&format!("ch{i}"), i);
    }
    seed += &cluster_section(&name, "seed", &format!("http://127.0.0.1:{PORT}"));
    let seed_path = dir.path.join("seed.toml");
    fs::write(&seed_path, seed)?;
    let t = Instant::now();
    let applied = etcd.nsfail(&["apply", "--config", seed_path.to_str().context("utf-8")?]);
    let apply_s = t.elapsed().as_secs_f64();
    if applied.code != 0 {
        bail!("apply: {}", applied.stderr);
    }

    let files = [
        (host_toml(&lab1, &NAMES), "h1"),
        (host_toml(&lab2, &["h2-enc"]), "h2"),
        (host_toml(&lab3, &["h3-enc"]), "h3"),
    ];
    let mut paths = Vec::new();
    for (k, (text, host)) in files.iter().enumerate() {
        let p = dir.path.join(format!("{host}.toml"));
        fs::write(&p, text.clone() + &cluster_section(&name, host, &eps[k]))?;
        paths.push(p);
    }
    let pins = [PinDir::new(), PinDir::new(), PinDir::new()];
    let socks: Vec<_> = (1..=3)
        .map(|k| dir.path.join(format!("h{k}.sock")))
        .collect();
    let mut client = Etcdc::new(&etcd)?;

    // (a) h1 starts on etcd's channels: first packet on the last channel, every channel in
    // its map, every active encoder written by it as the leader.
    let last = n - 1;
    let (primary, backup) = pair(last);
    let rxs = [primary, backup].map(|k| {
        nsfail::net::netns::in_netns(&lab1.encoders[k].ns.name, move || {
            UdpSocket::bind(("0.0.0.0", port(last)))
        })
    });
    let rxs: Vec<UdpSocket> = rxs
        .into_iter()
        .map(|r| -> Result<UdpSocket> {
            let s = r??;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let send = sender(lab1.src.name.clone(), listen(last), stop.clone());
    let t0 = Instant::now();
    let mut h1 = Daemon::spawn(&paths[0], &socks[0], &pins[0]);
    let mut buf = [0u8; 64];
    let first = 'wait: loop {
        for rx in &rxs {
            if let Ok((len, _)) = rx.recv_from(&mut buf)
                && &buf[..len] == b"first"
            {
                break 'wait t0.elapsed();
            }
        }
        if t0.elapsed() > LIMIT {
            stop.store(true, Ordering::Relaxed);
            bail!("{n} channels: no packet forwarded within {LIMIT:?}");
        }
        thread::sleep(Duration::from_millis(1));
    };
    stop.store(true, Ordering::Relaxed);
    let _ = send.join();
    let all_in_map = until_all(&pins[0], n, t0)?;
    let actives = loop {
        if client.count(&format!("{prefix}active/"))? >= n as i64 {
            break t0.elapsed();
        }
        if t0.elapsed() > LIMIT {
            bail!("{n} channels: the leader did not write every active encoder");
        }
        thread::sleep(Duration::from_millis(50));
    };
    h1.wait_up(&paths[0]);

    // h2 and h3 join: each timed from `nsfail run` to every channel in its map.
    let mut followers = Vec::new();
    let mut others = Vec::new();
    for k in 1..3 {
        let t0 = Instant::now();
        let d = Daemon::spawn(&paths[k], &socks[k], &pins[k]);
        followers.push(until_all(&pins[k], n, t0)?.as_secs_f64());
        others.push(d);
    }
    for (d, p) in others.iter_mut().zip(&paths[1..]) {
        d.wait_up(p);
    }
    let maps: Vec<Channels> = pins
        .iter()
        .map(|p| channels_map(p).context("a pinned CHANNELS_V4"))
        .collect::<Result<_>>()?;
    // Let the hosts settle (health published, leader's writes followed).
    thread::sleep(Duration::from_secs(2));

    // (b) changes, one at a time: [`GAP`] after each is seen everywhere.
    let mut add_ms = Vec::new();
    let mut slow = Vec::new();
    for k in 0..CHANGES {
        let i = n + k;
        let (a, b) = pair(i);
        let nc = nsfail::api::NewChannel {
            name: format!("add{k}"),
            listen: listen(i).to_string(),
            encoders: vec![NAMES[a].into(), NAMES[b].into()],
            port: Some(port(i)),
            ..Default::default()
        };
        let key = format!("{prefix}channels/add{k}");
        let value = serde_json::to_vec(&nc)?;
        let t0 = Instant::now();
        client.put(key, value)?;
        let all = on_all(&maps, t0, key4(listen(i)), |t| t.is_some())
            .with_context(|| format!("channel add{k}"))?;
        record(all, &mut add_ms, &mut slow);
        thread::sleep(GAP);
    }
    let mut remap_ms = Vec::new();
    for k in 0..CHANGES {
        // A channel not moved before, to its backup.
        let j = (k * 97) % n;
        let (_, b) = pair(j);
        let to: Ipv4Addr = lab1.encoders[b].addr4.parse()?;
        let t0 = Instant::now();
        let out = Command::new(nsfail_bin())
            .arg("--socket")
            .arg(&socks[0])
            .args(["remap", &format!("ch{j}"), NAMES[b]])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("remap ch{j}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let all = on_all(&maps, t0, key4(listen(j)), |t| {
            t.is_some_and(|t| t.addr[..4] == to.octets())
        })
        .with_context(|| format!("remap ch{j}"))?;
        record(all, &mut remap_ms, &mut slow);
        thread::sleep(GAP);
    }
    // NSFAIL_BENCH_KEEP_LOGS=DIR: the three daemons' logs kept there, to read what a slow
    // change waited for (`RUST_LOG=info,nsfail::daemon::actor=debug` logs the controller's
    // long work).
    if let Some(keep) = std::env::var_os("NSFAIL_BENCH_KEEP_LOGS") {
        let keep = std::path::PathBuf::from(keep);
        fs::create_dir_all(&keep)?;
        for (k, p) in paths.iter().enumerate() {
            let to = keep.join(format!("cluster-scale-{n}-h{}.log", k + 1));
            if let Err(e) = fs::copy(p.with_extension("log"), &to) {
                eprintln!("  keeping {}: {e}", to.display());
            }
        }
    }
    let log = fs::read_to_string(paths[0].with_extension("log")).unwrap_or_default();
    let lost = log
        .lines()
        .filter(|l| l.contains("etcd lost") || l.contains("no longer the leader"))
        .count();
    drop(others);
    drop(h1);
    Ok(Point {
        apply_s,
        first_packet_s: first.as_secs_f64(),
        all_in_map_s: all_in_map.as_secs_f64(),
        actives_s: actives.as_secs_f64(),
        followers_s: followers,
        add_ms,
        remap_ms,
        slow,
        lost,
    })
}

pub fn run() -> Result<Report> {
    // NSFAIL_BENCH_CLUSTER_SIZES=1000: other sizes, for a quick look.
    let sizes: Vec<usize> = match std::env::var("NSFAIL_BENCH_CLUSTER_SIZES") {
        Ok(list) => list
            .split(',')
            .map(|n| n.trim().parse().context("NSFAIL_BENCH_CLUSTER_SIZES"))
            .collect::<Result<_>>()?,
        Err(_) => SIZES.to_vec(),
    };
    let mut report = Report::new(
        "cluster-scale",
        "cluster: channels in etcd, a host's start-up and one change on every host",
        1,
    );
    report.method = vec![
        "etcd 3.4 in a namespace (heartbeat 50 ms, election timeout 500 ms), linked by a veth \
         to each host's ingest namespace; hosts with lease_s = 1; channels seeded with `nsfail \
         apply`, channel i on 10.80.0.0 + i + 1:5000 going to two of h1's four encoders"
            .into(),
        "start-up: h1 alone, `nsfail run` to the first packet forwarded on the last channel (a \
         packet sent every ms), to its pinned CHANNELS_V4 holding every channel (polled every \
         20 ms), to etcd holding every channel's active encoder (the leader's writes; polled \
         every 50 ms); then h2 and h3 (their channels all routed to h1's encoders), each \
         `nsfail run` to its map holding every channel"
            .into(),
        format!(
            "changes ({CHANGES} of each kind): a channel put into etcd by another client, and \
             `nsfail remap` of a channel to its backup on the leader h1 (CLI process start \
             included); each from just before the write to the change in all three hosts' \
             pinned maps (read every 0.2 ms); the slowest host's delay per change; {} ms \
             between changes, all adds then all remaps",
            GAP.as_millis()
        ),
    ];
    for &n in &sizes {
        eprintln!("  cluster-scale: {n} channels...");
        let p = one(n)?;
        eprintln!(
            "  {n}: apply {:.2} s, first packet {:.2} s, map full {:.2} s, actives {:.2} s, \
             followers {:?} s, add p50 {:.1} p99 {:.1} ms, remap p50 {:.1} p99 {:.1} ms, lost {}",
            p.apply_s,
            p.first_packet_s,
            p.all_in_map_s,
            p.actives_s,
            p.followers_s,
            pct(&p.add_ms, 0.5),
            pct(&p.add_ms, 0.99),
            pct(&p.remap_ms, 0.5),
            pct(&p.remap_ms, 0.99),
            p.lost
        );
        let single = |group: &str, unit: &str, v: f64| {
            let mut f = Figure::new(group, &format!("{n} channels"), unit);
            f.samples.push(v);
            f
        };
        report.figures.extend([
            single("nsfail apply of every channel", "s", p.apply_s),
            single(
                "h1: run to first packet on the last channel",
                "s",
                p.first_packet_s,
            ),
            single("h1: run to every channel in its map", "s", p.all_in_map_s),
            single(
                "h1 (leader): run to every active encoder in etcd",
                "s",
                p.actives_s,
            ),
        ]);
        for (k, s) in p.followers_s.iter().enumerate() {
            report.figures.push(single(
                &format!("h{}: run to every channel in its map", k + 2),
                "s",
                *s,
            ));
        }
        let mut add = Figure::new(
            "channel put into etcd: on all hosts",
            &format!("{n} channels"),
            "ms",
        );
        add.samples = p.add_ms.clone();
        let mut remap = Figure::new(
            "remap on the leader: on all hosts",
            &format!("{n} channels"),
            "ms",
        );
        remap.samples = p.remap_ms.clone();
        report.figures.extend([add, remap]);
        report.notes.push(format!(
            "{n} channels: channel put p50 {:.1} ms, p99 {:.1} ms; remap p50 {:.1} ms, p99 {:.1} ms",
            pct(&p.add_ms, 0.5),
            pct(&p.add_ms, 0.99),
            pct(&p.remap_ms, 0.5),
            pct(&p.remap_ms, 0.99)
        ));
        report.notes.push(format!(
            "{n} channels: changes over 100 ms, each host's delay (h1, h2, h3): {}",
            p.slow
                .iter()
                .map(|v| format!(
                    "[{}]",
                    v.iter()
                        .map(|x| format!("{x:.0}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        report.notes.push(format!(
            "{n} channels: h1's log says `etcd lost` or `no longer the leader` {} times",
            p.lost
        ));
        if n == 10_000 {
            let limit = |name: &str, value: f64, unit: &str, goal: f64| Limit {
                name: name.into(),
                value,
                unit: unit.into(),
                goal: Goal::AtMost(goal),
            };
            report.limits.extend([
                limit(
                    "10,000 channels: run to the first packet on the last channel",
                    p.first_packet_s,
                    "s",
                    5.0,
                ),
                limit(
                    "10,000 channels: run to every channel in the map",
                    p.all_in_map_s.max(p.first_packet_s),
                    "s",
                    5.0,
                ),
                limit(
                    "10,000 channels: channel put, on all hosts, p99",
                    pct(&p.add_ms, 0.99),
                    "ms",
                    100.0,
                ),
                limit(
                    "10,000 channels: remap, on all hosts, p99",
                    pct(&p.remap_ms, 0.99),
                    "ms",
                    100.0,
                ),
            ]);
        }
    }
    Ok(report)
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, p)
}
