//! `controller`, start-up series (issue 16): the daemon started on a config of 1,000, 10,000
//! and 100,000 channels, timed from `nsfail run` to the first packet forwarded on the last
//! channel of the file (the data plane fully programmed), then, on the running daemon:
//! resident memory, `nsfail status --json`, a metrics scrape, `nsfail remap` and `nsfail add
//! channel` (each the wall time of the CLI or HTTP client, median of a few).
//!
//! Four local encoders (a, b, c, d) on the lab's veths, each with a `udp` echo answering its
//! probes every 100 ms; channel `i` listens on 10.80.0.0 + i + 1, port 5000 and goes to
//! [a, b] when `i` is even, [c, d] when odd, on encoder-side port 10000 + i / 2 (an encoder
//! takes at most one channel per port: 100,000 channels need more than two encoders). One
//! sample per size: a 100,000-channel start is the measurement, not a repetition of it.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nsfail_tests::{ChildGuard, PinDir, daemon::TempDir, lab, traffic::Echo};

use crate::report::{Figure, Goal, Limit, Report};

pub const SIZES: [usize; 3] = [1_000, 10_000, 100_000];
/// How long one start may take before the size is reported as not reached.
const START_LIMIT: Duration = Duration::from_secs(300);
const METRICS_PORT: u16 = 9464;
/// Timed calls per operation (their median is reported).
const CALLS: usize = 5;
/// How long the daemon's idle CPU is measured, after the calls.
const IDLE_WINDOW: Duration = Duration::from_secs(5);

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

const NAMES: [&str; 4] = ["enc-a", "enc-b", "enc-c", "enc-d"];

fn config(lab: &nsfail::lab::Lab, channels: usize) -> String {
    let mut s = format!(
        "[ingest]\ninterface = \"ing\"\nnetns = \"{}\"\nmetrics = \"127.0.0.1:{METRICS_PORT}\"\n\n",
        lab.rt.name
    );
    for (k, e) in lab.encoders.iter().enumerate() {
        s += &format!(
            "[[encoder]]\nname = \"{}\"\naddress = \"{}\"\ninterface = \"{}\"\nnetns = \"{}\"\n\
             health = {{ kind = \"udp\", port = 9000, interval_ms = 100, timeout_ms = 100 }}\n\n",
            NAMES[k], e.addr4, e.host_if, e.ns.name
        );
    }
    s.reserve(channels * 110);
    for i in 0..channels {
        let (a, b) = pair(i);
        s += &format!(
            "[[channel]]\nname = \"ch{i}\"\nlisten = \"{}\"\nencoders = [\"{}\", \"{}\"]\nport = {}\n\n",
            listen(i),
            NAMES[a],
            NAMES[b],
            port(i)
        );
    }
    s
}

/// One size's figures.
struct Point {
    first_packet_s: f64,
    /// % of one core over [`IDLE_WINDOW`] after the calls.
    idle_cpu: f64,
    /// At the first packet.
    rss_first_mib: f64,
    /// After the status, scrape, remap and add calls.
    rss_mib: f64,
    peak_rss_mib: f64,
    status_ms: f64,
    scrape_ms: f64,
    remap_ms: f64,
    add_ms: f64,
    /// `nsfail reload` of the file with one channel more, after everything else (NaN when it
    /// did not answer).
    reload_ms: f64,
    /// VmRSS after that reload.
    rss_reload_mib: f64,
}

fn kib(pid: i32, field: &str) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .with_context(|| field.to_owned())?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

/// The nsfail binary measured: this build's, or `NSFAIL_BENCH_STARTUP_BIN` (another build, for
/// a before-and-after; sizes then from `NSFAIL_BENCH_STARTUP_SIZES`).
fn bin() -> std::path::PathBuf {
    std::env::var_os("NSFAIL_BENCH_STARTUP_BIN")
        .map(Into::into)
        .unwrap_or_else(nsfail_tests::daemon::nsfail_bin)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the CLI against the daemon; the wall time in ms.
fn cli_ms(socket: &Path, args: &[&str]) -> Result<f64> {
    let t = Instant::now();
    let out = Command::new(bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!(
            "nsfail {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(ms)
}

/// One `GET /metrics` inside the ingest namespace (the daemon serves there); the wall time in
/// ms and the body's size.
fn scrape_ms(ns: &str) -> Result<(f64, usize)> {
    nsfail::net::netns::in_netns(ns, || -> Result<(f64, usize)> {
        let t = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", METRICS_PORT))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut body = Vec::new();
        s.read_to_end(&mut body)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if !body.starts_with(b"HTTP/1.1 200") {
            bail!(
                "scrape: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            );
        }
        Ok((ms, body.len()))
    })?
}

/// Sends to the last channel every millisecond from the source namespace until `stop`.
fn sender(ns: String, to: SocketAddr, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let _ = nsfail::net::netns::in_netns(&ns, move || {
            let sock = UdpSocket::bind("10.77.0.2:0").expect("bind sender");
            let deadline = Instant::now() + START_LIMIT + Duration::from_secs(10);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let _ = sock.send_to(b"first", to);
                thread::sleep(Duration::from_millis(1));
            }
        });
    })
}

fn one(channels: usize) -> Result<Point> {
    let lab = lab(4);
    lab.src
        .ip(&["route", "add", "10.80.0.0/15", "via", "10.77.0.1"])?;
    let _echoes: Vec<Echo> = lab
        .encoders
        .iter()
        .map(|e| Echo::start(&e.ns, format!("{}:9000", e.addr4).parse().expect("addr")))
        .collect();
    let last = channels - 1;
    let (primary, backup) = pair(last);
    // The receiver of the last channel, on its primary encoder.
    let rx = nsfail::net::netns::in_netns(&lab.encoders[primary].ns.name, move || {
        UdpSocket::bind(("0.0.0.0", port(last)))
    })??;
    rx.set_read_timeout(Some(Duration::from_millis(50)))?;

    let dir = TempDir::new();
    let path = dir.path.join("nsfail.toml");
    fs::write(&path, config(&lab, channels))?;
    let socket = dir.path.join("nsfail.sock");
    let pins = PinDir::new();
    let log = fs::File::create(dir.path.join("nsfail.log"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let send = sender(lab.src.name.clone(), listen(last), stop.clone());
    let t0 = Instant::now();
    let daemon = ChildGuard {
        child: Command::new(bin())
            .arg("--socket")
            .arg(&socket)
            .args(["run", "--config"])
            .arg(&path)
            .arg("--pins")
            .arg(pins.pins.root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
    };
    let mut buf = [0u8; 64];
    let first = loop {
        if let Ok((n, _)) = rx.recv_from(&mut buf)
            && &buf[..n] == b"first"
        {
            break t0.elapsed();
        }
        if t0.elapsed() > START_LIMIT {
            stop.store(true, Ordering::Relaxed);
            bail!("{channels} channels: no packet forwarded within {START_LIMIT:?}");
        }
    };
    stop.store(true, Ordering::Relaxed);
    let _ = send.join();
    let pid = daemon.pid();
    let rss_first = kib(pid, "VmRSS:")?;
    // The control socket answers once the serve loop runs (right after programming).
    let up = Instant::now();
    while cli_ms(&socket, &["events"]).is_err() {
        if up.elapsed() > Duration::from_secs(60) {
            bail!("{channels} channels: forwarding, but the socket does not answer");
        }
        thread::sleep(Duration::from_millis(50));
    }
    // NSFAIL_BENCH_RSS_TRACE=1: resident memory after each step, on stderr.
    let trace = |what: &str| {
        if std::env::var_os("NSFAIL_BENCH_RSS_TRACE").is_some() {
            eprintln!(
                "    {what}: {:.0} MiB (peak {:.0} MiB)",
                kib(pid, "VmRSS:").unwrap_or(f64::NAN),
                kib(pid, "VmHWM:").unwrap_or(f64::NAN)
            );
        }
    };
    trace("socket up");
    let mut status = Vec::new();
    let mut scrape = Vec::new();
    let mut remap = Vec::new();
    let mut add = Vec::new();
    for k in 0..CALLS {
        status.push(cli_ms(&socket, &["status", "--json"])?);
        trace("status");
        scrape.push(scrape_ms(&lab.rt.name)?.0);
        trace("scrape");
        let to = if k % 2 == 0 { backup } else { primary };
        remap.push(cli_ms(
            &socket,
            &["remap", &format!("ch{last}"), NAMES[to]],
        )?);
        let i = channels + k;
        let (a, b) = pair(i);
        add.push(cli_ms(
            &socket,
            &[
                "add",
                "channel",
                &format!("ch{i}"),
                "--listen",
                &listen(i).to_string(),
                "--encoders",
                &format!("{},{}", NAMES[a], NAMES[b]),
                "--port",
                &port(i).to_string(),
            ],
        )?);
    }
    // The daemon's own cost while nothing happens (probes, ticks, the input watch).
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.context("CLK_TCK")? as f64;
    let t0 = crate::controller::cpu_ticks(pid)?;
    thread::sleep(IDLE_WINDOW);
    let idle_cpu =
        (crate::controller::cpu_ticks(pid)? - t0) as f64 / tick / IDLE_WINDOW.as_secs_f64() * 100.0;
    let mut point = Point {
        first_packet_s: first.as_secs_f64(),
        idle_cpu,
        rss_first_mib: rss_first,
        rss_mib: kib(pid, "VmRSS:")?,
        peak_rss_mib: kib(pid, "VmHWM:")?,
        status_ms: median(status),
        scrape_ms: median(scrape),
        remap_ms: median(remap),
        add_ms: median(add),
        reload_ms: f64::NAN,
        rss_reload_mib: f64::NAN,
    };
    // A reload of the file with one channel more: the daemon compares the whole file with
    // what it runs, and applies the one difference.
    let mut text = config(&lab, channels);
    let extra = channels + CALLS;
    let (a, b) = pair(extra);
    text += &format!(
        "[[channel]]\nname = \"ch{extra}\"\nlisten = \"{}\"\nencoders = [\"{}\", \"{}\"]\nport = {}\n",
        listen(extra),
        NAMES[a],
        NAMES[b],
        port(extra)
    );
    fs::write(&path, text)?;
    point.reload_ms = cli_ms(&socket, &["reload"]).unwrap_or_else(|e| {
        eprintln!("  {channels} channels: reload: {e:#}");
        f64::NAN
    });
    point.rss_reload_mib = kib(pid, "VmRSS:")?;
    drop(daemon);
    Ok(point)
}

/// Runs the series and adds its figures, limits and method to `report`.
pub fn run(report: &mut Report) -> Result<()> {
    // NSFAIL_BENCH_STARTUP_SIZES=1000,5000: other sizes, for a quick look.
    let sizes: Vec<usize> = match std::env::var("NSFAIL_BENCH_STARTUP_SIZES") {
        Ok(list) => list
            .split(',')
            .map(|n| n.trim().parse().context("NSFAIL_BENCH_STARTUP_SIZES"))
            .collect::<Result<_>>()?,
        Err(_) => SIZES.to_vec(),
    };
    let mut points = Vec::new();
    for n in sizes.iter().copied() {
        eprintln!("  start-up with {n} channels...");
        let p = one(n)?;
        eprintln!(
            "  {n} channels: first packet on the last channel after {:.2} s, {:.0} MiB \
             ({:.0} MiB after the calls, peak {:.0} MiB); status {:.0} ms, scrape {:.0} ms",
            p.first_packet_s, p.rss_first_mib, p.rss_mib, p.peak_rss_mib, p.status_ms, p.scrape_ms
        );
        eprintln!("  idle CPU {:.1} % of one core", p.idle_cpu);
        points.push((n, p));
    }
    let idle = IDLE_WINDOW.as_secs();
    report.method.push(format!(
        "start-up series: {} channels (one [[channel]] each, 4 local encoders probed every \
         100 ms); `nsfail run` to the first packet forwarded on the last channel (a packet \
         sent every ms) and VmRSS then, and the median of {CALLS} calls each of `nsfail status \
         --json`, a metrics scrape, `nsfail remap` and `nsfail add channel` (CLI wall time, \
         process start included), then VmRSS and VmHWM, then the daemon's CPU over {idle} s of idling, \
         then one `nsfail reload` of the file with one channel added (NaN: no answer within the CLI's 10 s); one start per size; no baseline run (the old controller \
         takes hours at 100,000)",
        sizes
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    type Get = fn(&Point) -> f64;
    let series: [(&str, &str, Get); 11] = [
        (
            "start-up: run to first packet on the last channel",
            "s",
            |p| p.first_packet_s,
        ),
        (
            "start-up: resident memory at the first packet",
            "MiB",
            |p| p.rss_first_mib,
        ),
        ("start-up: resident memory after the calls", "MiB", |p| {
            p.rss_mib
        }),
        ("start-up: peak resident memory (VmHWM)", "MiB", |p| {
            p.peak_rss_mib
        }),
        ("start-up: status --json", "ms", |p| p.status_ms),
        ("start-up: metrics scrape", "ms", |p| p.scrape_ms),
        ("start-up: remap", "ms", |p| p.remap_ms),
        ("start-up: add channel", "ms", |p| p.add_ms),
        (
            "start-up: reload of the file with one channel more",
            "ms",
            |p| p.reload_ms,
        ),
        ("start-up: resident memory after the reload", "MiB", |p| {
            p.rss_reload_mib
        }),
        (
            "start-up: idle CPU after the calls, % of one core",
            "%",
            |p| p.idle_cpu,
        ),
    ];
    let mut figures = Vec::new();
    for (group, unit, get) in series {
        for (n, p) in &points {
            let mut fig = Figure::new(group, &format!("{n} channels"), unit);
            fig.samples.push(get(p));
            figures.push(fig);
        }
    }
    report.figures.extend(figures);
    let at = |n: usize| points.iter().find(|(m, _)| *m == n).map(|(_, p)| p);
    let (Some(big), Some(mid)) = (at(100_000), at(10_000)) else {
        return Ok(());
    };
    let limit = |name: &str, value: f64, unit: &str, goal: Goal| Limit {
        name: name.into(),
        value,
        unit: unit.into(),
        goal,
    };
    report.limits.extend([
        limit(
            "100,000 channels: run to first packet",
            big.first_packet_s,
            "s",
            Goal::AtMost(10.0),
        ),
        limit(
            "growth 10,000 -> 100,000 channels / 10 (1 = linear)",
            big.first_packet_s / mid.first_packet_s / 10.0,
            "x",
            Goal::AtMost(1.0),
        ),
        limit(
            "100,000 channels: resident memory after the calls",
            big.rss_mib,
            "MiB",
            Goal::AtMost(200.0),
        ),
        limit(
            "100,000 channels: peak resident memory (the config's parse)",
            big.peak_rss_mib,
            "MiB",
            Goal::AtMost(200.0),
        ),
        limit(
            "100,000 channels: status --json",
            big.status_ms,
            "ms",
            Goal::AtMost(1000.0),
        ),
        limit(
            "100,000 channels: metrics scrape",
            big.scrape_ms,
            "ms",
            Goal::AtMost(1000.0),
        ),
        limit(
            "100,000 channels: remap",
            big.remap_ms,
            "ms",
            Goal::AtMost(10.0),
        ),
        limit(
            "100,000 channels: add channel",
            big.add_ms,
            "ms",
            Goal::AtMost(10.0),
        ),
    ]);
    Ok(())
}
