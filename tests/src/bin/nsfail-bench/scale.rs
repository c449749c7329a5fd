//! `scale`: nsfail's per-packet cost with 250 to 100,000 channels in CHANNELS_V4, and the latency
//! of one failover (userspace call to the first packet at the new encoder). At every size the
//! traffic goes to the same `ACTIVE` channels; the rest are configured and idle, so only the
//! map size varies between data planes.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    maps::{HashMap, MapData},
    programs::{TestRun, TestRunOptions},
};
use nsfail::{Dataplane, EncoderLink, EncoderSpec, XdpMode, lab::Netns};
use nsfail_common::{ChannelKey4, ChannelTarget, xdp_reason};
use nsfail_tests::{Entered, PinDir, frames::Frame};
use rand::Rng as _;

use crate::{
    chain,
    object::{self, BenchObject, GenerateRun, Source},
    report::{Figure, Goal, Limit, Ratio, Report, summarize},
    sys,
};

/// Channels in each data plane: the active set alone, then with idle channels up to 100,000.
const CHANNEL_COUNTS: [usize; 5] = [ACTIVE, 1_000, 10_000, 50_000, 100_000];
/// The channels that carry traffic, the same ones at every size: one chain walk's worth, so
/// that each test run visits every one of them once.
const ACTIVE: usize = chain::MAX_WALK as usize;
/// The live series' channels: the first of the active ones, as many as the generator rotates
/// through (its template count is a power of two).
const LIVE: usize = 1 << ACTIVE.ilog2();
/// Test runs per per-packet sample (each a walk of `chain::MAX_WALK` channels).
const CALLS: usize = 400;
/// Map updates timed per repetition and channel count, for each kind of update.
const UPDATE_TRIALS: usize = 200;
/// Failovers timed end to end per repetition and channel count.
const E2E_TRIALS: usize = 40;
/// How long a failover may take before the trial counts as lost.
const E2E_TIMEOUT: Duration = Duration::from_millis(200);
/// Live forwarding per sample: generator run time and test-run size.
const LIVE_TIME: Duration = Duration::from_millis(1_000);
const LIVE_CHUNK: u32 = 250_000;
/// Time for frames in flight to land after the generator stops.
const SETTLE: Duration = Duration::from_millis(50);
/// The failover channel and its two encoders.
const FAILOVER_LISTEN: &str = "10.92.0.1:5000";
const FAILOVER_PORT: u16 = 7000;

/// One data plane with `n` chained channels plus the failover channel, with its veths:
/// `g{k}`→`i{k}` (generator → ingest for failovers, nsfail attached to `i{k}`), `h{k}`→`j{k}`
/// (generator → ingest for forwarding, nsfail attached to `j{k}` too, whose NAPI is threaded
/// on the router core), `c{k}`/`p{k}` (the chain's encoders, sink on `p{k}`), `a{k}`/`x{k}`
/// and `b{k}`/`y{k}` (failover encoders, sinks on `x{k}`, `y{k}`).
struct Plane {
    n: usize,
    g_ifindex: u32,
    h_ifindex: u32,
    /// `j{k}`'s NAPI threads.
    napi: Vec<i32>,
    dp: Dataplane,
    _pins: PinDir,
    sink_chain: BenchObject,
    sink_a: BenchObject,
    sink_b: BenchObject,
    channels: HashMap<MapData, ChannelKey4, ChannelTarget>,
}

pub fn run(reps: usize) -> Result<Report> {
    let ns = sys::namespace("nbs")?;
    sys::veth(&ns, "gs", "gsp", None)?;
    for k in 0..CHANNEL_COUNTS.len() {
        for (a, b) in [("g", "i"), ("h", "j"), ("c", "p"), ("a", "x"), ("b", "y")] {
            sys::veth(&ns, &format!("{a}{k}"), &format!("{b}{k}"), None)?;
        }
    }
    let entered = Entered::new(&ns);
    let mut generator = BenchObject::load()?;
    generator.attach(object::GENERATOR, sys::link(&ns, "gs")?.ifindex)?;
    let failover: SocketAddr = FAILOVER_LISTEN.parse()?;
    let failover_frame =
        Frame::udp(SocketAddr::V4(chain::SOURCE), failover, &[0x5a; 64 - 42]).bytes();

    let mut planes = Vec::new();
    for (k, &n) in CHANNEL_COUNTS.iter().enumerate() {
        eprintln!("  scale: filling a data plane with {n} channel(s)");
        planes.push(plane(&ns, k, n).with_context(|| format!("data plane with {n} channels"))?);
    }

    let mut report = Report::new(
        "scale",
        "nsfail with 250 to 100,000 channels: per-packet cost and failover latency",
        reps,
    );
    report.method = vec![
        format!(
            "per packet: BPF_PROG_TEST_RUN, {CALLS} test runs x repeat {} per sample, 64 B \
             frames; each test run walks the {ACTIVE} active channels, which form a chain \
             (every one forwards to the next one's ingest address), starting at a random one; \
             the same {ACTIVE} channels (keys) at every size, the others idle, so only the map \
             size varies; a walk before each sample puts every active channel's source in \
             SOURCES (steady state: a source sends at least once a second)",
            chain::MAX_WALK
        ),
        format!(
            "failover: {UPDATE_TRIALS} timed `Dataplane::activate` calls and {UPDATE_TRIALS} \
             timed raw CHANNELS_V4 updates (bpf_map_update_elem) per repetition; end to end: \
             {E2E_TRIALS} failovers per repetition with frames flowing (generator on CPU0, \
             64-frame batches), from just before `activate` to the arrival time at the new \
             encoder's sink (bpf_ktime_get_ns); figures are the median per repetition, p99 over \
             all trials"
        ),
        format!(
            "live: {} ms of frames (64 B) to {LIVE} of the {ACTIVE} active channels in turn \
             (generator on CPU0, the ingest veth's NAPI thread on CPU1), counted at the chain \
             encoders' sink from just before the run to {} ms after it and divided by that \
             window; router CPU = schedstat run time of that NAPI thread and ksoftirqd/1 per \
             delivered packet",
            LIVE_TIME.as_millis(),
            SETTLE.as_millis()
        ),
        format!(
            "data planes hold the chain plus one failover channel and {} encoders",
            chain::ENCODERS + 2
        ),
    ];
    let label = |n: usize| match n {
        ACTIVE => format!("{n} channels, all active"),
        n => format!("{n} channels"),
    };
    for (group, unit) in [
        ("per-packet cost", "ns/packet"),
        ("forwarded, live", "Mpps"),
        ("router CPU per packet, live", "ns/packet"),
        ("activate() call", "us"),
        ("raw map update", "us"),
        ("activate() to first packet", "us"),
    ] {
        for &n in &CHANNEL_COUNTS {
            report.figures.push(Figure::new(group, &label(n), unit));
        }
    }
    let mut unaccounted = 0u64;
    let mut lost = vec![0usize; CHANNEL_COUNTS.len()];
    let mut walk_checked = false;
    let mut sources: Vec<Source> = Vec::new();
    for rep in 0..reps {
        for j in 0..planes.len() {
            let k = (j + rep) % planes.len();
            let plane = &mut planes[k];
            let n = plane.n;
            let cost = per_packet(plane)?;
            if !walk_checked && n == 1_000 {
                check_walk(plane)?;
                walk_checked = true;
            }
            let (activate, raw) = update_latency(plane, failover)?;
            let live = live_forward(plane, &ns, &mut generator)?;
            unaccounted += live.unaccounted;
            if !sources.contains(&live.source) {
                sources.push(live.source);
            }
            generator.set_templates(&[object::template(&failover_frame)])?;
            let (e2e, timeouts) = end_to_end(plane, &ns, &generator, &failover_frame, failover)?;
            lost[k] += timeouts;
            let fig = |report: &mut Report, group: &str| -> usize {
                report
                    .figures
                    .iter()
                    .position(|f| f.group == group && f.variant == label(n))
                    .expect("figure")
            };
            for (group, value) in [
                ("per-packet cost", cost),
                ("forwarded, live", live.mpps),
                ("router CPU per packet, live", live.cpu_ns),
            ] {
                let i = fig(&mut report, group);
                report.figures[i].samples.push(value);
            }
            for (group, trials) in [
                ("activate() call", activate),
                ("raw map update", raw),
                ("activate() to first packet", e2e),
            ] {
                let i = fig(&mut report, group);
                report.figures[i].samples.push(summarize(&trials).median);
                report.figures[i].pooled.extend(trials);
            }
        }
    }
    for source in &sources {
        report.method.push(format!(
            "live and end-to-end generator: {}",
            source.describe()
        ));
    }
    let per_packet = |report: &Report, n: usize| {
        report
            .figure("per-packet cost", &label(n))
            .expect("figure")
            .clone()
    };
    let active_only = per_packet(&report, ACTIVE);
    for &n in &CHANNEL_COUNTS[1..] {
        let goal = (n == 100_000).then_some(Goal::AtMost(1.1));
        report.ratios.push(Ratio::of(
            &format!("cost with {n} / with the {ACTIVE} active channels alone"),
            &per_packet(&report, n),
            &active_only,
            goal,
        ));
    }
    let live_cpu = |report: &Report, n: usize| {
        report
            .figure("router CPU per packet, live", &label(n))
            .expect("figure")
            .clone()
    };
    let live_active_only = live_cpu(&report, ACTIVE);
    for &n in &CHANNEL_COUNTS[1..] {
        report.ratios.push(Ratio::of(
            &format!("live router CPU with {n} / with the {ACTIVE} active channels alone"),
            &live_cpu(&report, n),
            &live_active_only,
            None,
        ));
    }
    report.limits.push(Limit {
        name: "live: sum of |redirected - delivered|".into(),
        value: unaccounted as f64,
        unit: "packets".into(),
        goal: Goal::AtMost(0.0),
    });
    for &n in &CHANNEL_COUNTS {
        let fig = report
            .figure("activate() to first packet", &label(n))
            .expect("figure");
        report.limits.push(Limit {
            name: format!("failover median, {n} channels"),
            value: summarize(&fig.pooled).median,
            unit: "us".into(),
            goal: Goal::AtMost(50.0),
        });
    }
    for (k, &n) in CHANNEL_COUNTS.iter().enumerate() {
        if lost[k] > 0 {
            report.notes.push(format!(
                "{n} channels: {} failovers saw no packet at the new encoder within {} ms \
                 (left out of the latency figures)",
                lost[k],
                E2E_TIMEOUT.as_millis()
            ));
        }
    }
    drop(planes);
    drop(generator);
    drop(entered);
    drop(ns);
    Ok(report)
}

fn plane(ns: &Netns, k: usize, n: usize) -> Result<Plane> {
    let pins = PinDir::new();
    let mut dp = Dataplane::open(pins.pins.clone()).context("opening a data plane")?;
    dp.attach_ingest(&format!("i{k}"), XdpMode::Native)?;
    chain::build(
        &mut dp,
        &pins.pins,
        &format!("c{k}"),
        sys::link(ns, &format!("p{k}"))?.mac,
        n,
        ACTIVE,
    )?;
    let mut sinks = Vec::new();
    for (name, addr, host, inner) in [
        ("fa", "10.92.1.2", format!("a{k}"), format!("x{k}")),
        ("fb", "10.92.2.2", format!("b{k}"), format!("y{k}")),
    ] {
        let inner_link = sys::link(ns, &inner)?;
        dp.upsert_encoder(&EncoderSpec {
            name: name.into(),
            addr: addr.parse()?,
            mac: inner_link.mac,
            link: EncoderLink::Local { ifname: host },
        })?;
        let mut sink = BenchObject::load()?;
        sink.attach(object::SINK, inner_link.ifindex)?;
        sinks.push(sink);
    }
    dp.set_channel(
        FAILOVER_LISTEN.parse()?,
        FAILOVER_PORT,
        "fa",
        &["fa", "fb"],
        false,
    )?;
    // The same program on a second ingest veth, for live forwarding on the router core.
    dp.attach_ingest(&format!("j{k}"), XdpMode::Native)?;
    let napi = sys::threaded_napi(ns, &format!("j{k}"), sys::ROUTER_CPU)?;
    let mut sink_chain = BenchObject::load()?;
    sink_chain.attach(object::SINK, sys::link(ns, &format!("p{k}"))?.ifindex)?;
    let channels = chain::pinned(&pins.pins, "CHANNELS_V4")?;
    let sink_b = sinks.pop().expect("two sinks");
    let sink_a = sinks.pop().expect("two sinks");
    Ok(Plane {
        n,
        g_ifindex: sys::link(ns, &format!("g{k}"))?.ifindex,
        h_ifindex: sys::link(ns, &format!("h{k}"))?.ifindex,
        napi,
        dp,
        sink_chain,
        _pins: pins,
        sink_a,
        sink_b,
        channels,
    })
}

/// Walks the active chain once (learning every source), then returns the mean ns per packet
/// of `CALLS` walks from random active channels.
fn per_packet(plane: &mut Plane) -> Result<f64> {
    let n = plane.n;
    let repeat = chain::MAX_WALK;
    let prog = plane.dp.ingress_program();
    let run = |start: usize| -> Result<u128> {
        let frame = chain::frame(start, 64 - 42);
        let r = prog.test_run(TestRunOptions {
            data_in: Some(&frame),
            repeat,
            ..Default::default()
        })?;
        if r.return_value != object::XDP_REDIRECT {
            bail!("test run returned {}, expected a redirect", r.return_value);
        }
        Ok(r.duration.as_nanos())
    };
    run(0)?;
    let before = redirected(&plane.dp)?;
    let mut rng = rand::rng();
    let mut total = 0u128;
    for _ in 0..CALLS {
        total += run(rng.random_range(0..ACTIVE))?;
    }
    let got = redirected(&plane.dp)? - before;
    let want = CALLS as u64 * u64::from(repeat);
    if got != want {
        bail!("{n} channels: {got} packets redirected, expected {want}");
    }
    Ok(total as f64 / CALLS as f64)
}

fn redirected(dp: &Dataplane) -> Result<u64> {
    Ok(dp.xdp_count(xdp_reason::REDIRECTED)?)
}

/// The walks really visit every active channel (the kernel does not restore the frame
/// between runs), and no idle one.
fn check_walk(plane: &Plane) -> Result<()> {
    for i in 0..plane.n {
        let packets = plane.dp.channel_stats(chain::listen(i))?.packets;
        if i < ACTIVE && packets == 0 {
            bail!("active channel {i} saw no packet: test runs do not walk the chain");
        }
        if i >= ACTIVE && packets != 0 {
            bail!("idle channel {i} saw {packets} packets");
        }
    }
    Ok(())
}

/// One live forwarding run.
struct Live {
    source: Source,
    mpps: f64,
    cpu_ns: f64,
    /// Packets nsfail counted as redirected that the sink did not receive, or the other way
    /// round.
    unaccounted: u64,
}

/// Live frames to the first `LIVE` of the `ACTIVE` channels in turn (generator on CPU0,
/// `j{k}`'s NAPI thread on CPU1), delivered to the chain encoders' sink: delivered rate over
/// the time it was counted and the router threads' CPU time per packet.
fn live_forward(plane: &mut Plane, ns: &Netns, generator: &mut BenchObject) -> Result<Live> {
    let templates: Vec<_> = (0..LIVE)
        .map(|j| {
            let mut f = Frame::udp(
                SocketAddr::V4(chain::SOURCE),
                chain::listen(j),
                &[0x5a; 64 - 42],
            );
            f.ttl = 64;
            object::template(&f.bytes())
        })
        .collect();
    generator.set_templates(&templates)?;
    let frame = chain::frame(0, 64 - 42);
    let ksoftirqd = sys::ksoftirqd(sys::ROUTER_CPU)?;
    let runtime = |plane: &Plane| -> Result<u64> {
        plane
            .napi
            .iter()
            .chain([&ksoftirqd])
            .map(|tid| sys::thread_runtime_ns(*tid))
            .sum()
    };
    let counting = Instant::now();
    let sink_before = plane.sink_chain.sink_count()?.0;
    let redirected_before = redirected(&plane.dp)?;
    let cpu_before = runtime(plane)?;
    let generated = GenerateRun {
        ns: &ns.name,
        ifindex: plane.h_ifindex,
        frame,
        chunk: LIVE_CHUNK,
        frames: 40_000_000,
        limit: LIVE_TIME,
    }
    .run(generator)?;
    thread::sleep(SETTLE);
    let cpu = runtime(plane)? - cpu_before;
    let delivered = plane.sink_chain.sink_count()?.0 - sink_before;
    let counted = counting.elapsed();
    let redirected = redirected(&plane.dp)? - redirected_before;
    Ok(Live {
        source: generated.source,
        mpps: delivered as f64 / counted.as_secs_f64() / 1e6,
        cpu_ns: cpu as f64 / delivered.max(1) as f64,
        unaccounted: redirected.abs_diff(delivered),
    })
}

/// Latency of `activate` and of a bare CHANNELS_V4 update, in µs, alternating the two encoders.
fn update_latency(plane: &mut Plane, failover: SocketAddr) -> Result<(Vec<f64>, Vec<f64>)> {
    let key = chain::key4(failover);
    let mut targets = Vec::new();
    for enc in ["fb", "fa"] {
        plane.dp.activate(failover, enc)?;
        targets.push(plane.channels.get(&key, 0)?);
    }
    let mut activate = Vec::with_capacity(UPDATE_TRIALS);
    let mut raw = Vec::with_capacity(UPDATE_TRIALS);
    for t in 0..UPDATE_TRIALS {
        let enc = if t % 2 == 0 { "fb" } else { "fa" };
        let start = Instant::now();
        plane.dp.activate(failover, enc)?;
        activate.push(start.elapsed().as_secs_f64() * 1e6);
    }
    for t in 0..UPDATE_TRIALS {
        let target = targets[t % 2];
        let start = Instant::now();
        plane.channels.insert(key, target, 0)?;
        raw.push(start.elapsed().as_secs_f64() * 1e6);
    }
    plane.dp.activate(failover, "fa")?;
    Ok((activate, raw))
}

/// Failovers with traffic flowing: from just before `activate` to the first packet at the new
/// encoder, in µs. Returns the latencies and the number of trials that timed out.
fn end_to_end(
    plane: &mut Plane,
    ns: &Netns,
    generator: &BenchObject,
    frame: &[u8],
    failover: SocketAddr,
) -> Result<(Vec<f64>, usize)> {
    let run = GenerateRun {
        ns: &ns.name,
        ifindex: plane.g_ifindex,
        frame: frame.to_vec(),
        chunk: 1_000_000,
        frames: 2_000_000_000,
        limit: Duration::from_secs(60),
    };
    plane.dp.activate(failover, "fa")?;
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let handle = s.spawn(|| run.run_on_this_thread(generator, &stop));
        let result = failovers(plane, failover);
        stop.store(true, Ordering::Relaxed);
        let generated = handle
            .join()
            .map_err(|_| anyhow::anyhow!("generator thread panicked"))?;
        sys::unpin_self()?;
        generated?;
        result
    })
}

fn failovers(plane: &mut Plane, failover: SocketAddr) -> Result<(Vec<f64>, usize)> {
    sys::pin_self(sys::ROUTER_CPU)?;
    // Wait (bounded) until the active encoder receives the stream.
    let start = Instant::now();
    let base = plane.sink_a.sink_count()?.0;
    while plane.sink_a.sink_count()?.0 < base + 10_000 {
        if start.elapsed() > Duration::from_secs(5) {
            bail!("no traffic reached the active encoder within 5 s");
        }
        thread::sleep(Duration::from_millis(1));
    }
    let mut latencies = Vec::with_capacity(E2E_TRIALS);
    let mut timeouts = 0;
    for t in 0..E2E_TRIALS {
        let (enc, sink) = if t % 2 == 0 {
            ("fb", &mut plane.sink_b)
        } else {
            ("fa", &mut plane.sink_a)
        };
        sink.zero_first()?;
        let t0 = sys::monotonic_ns();
        plane.dp.activate(failover, enc)?;
        let first = loop {
            let first = sink.first_ns()?;
            if first != 0 {
                break Some(first);
            }
            if sys::monotonic_ns() - t0 > E2E_TIMEOUT.as_nanos() as u64 {
                break None;
            }
        };
        match first {
            Some(first) => latencies.push(first.saturating_sub(t0) as f64 / 1e3),
            None => timeouts += 1,
        }
        // Let packets in flight to the old encoder land before its time is zeroed next.
        thread::sleep(Duration::from_millis(2));
    }
    Ok((latencies, timeouts))
}
