//! `failover`: kill-and-failover trials through the real daemon in a lab.
//!
//! - Sequenced UDP (1 packet/ms) to a channel on encoder A; A dies (its receiver and health
//!   responder stop; or only its receiver is killed, namespace alive, and its kernel's
//!   refusals of the stream fail it; or with the `flow` check its receiver hangs while the
//!   responder keeps answering); the gap is the run of sequence numbers that reached neither encoder, in ms of
//!   stream. 20 trials per detector by default.
//! - SRT: a real `srt-live-transmit` caller and listeners; the time from A's death to the first
//!   bytes at B's output, on an SRT channel (nsfail tells the caller to reconnect) and on the
//!   same stream declared `udp` (the caller's own ~5 s timeout), with `srt` health (the
//!   listener answers its own check), and the output gap of a `remap` with both encoders alive.
//!
//! Not a pass/fail test: the figures and the targets, side by side.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nsfail::lab::{INGEST4, SRC4};
use nsfail_tests::{
    daemon::{Bed, Policy, active, cli, status},
    srt,
    traffic::{Echo, Receiver, spawn_burst},
    wait_for,
};

use crate::report::{Figure, Goal, Limit, Report, percentile};

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn bed(policy: &Policy) -> Result<Bed> {
    Ok(Bed::new(policy))
}

/// How encoder A dies in a UDP trial.
#[derive(Clone, Copy, PartialEq)]
enum Death {
    /// Its receiver and its health responder stop.
    Dead,
    /// Only its receiver is killed; its namespace and health responder live (the kernel
    /// refuses the stream).
    ReceiverKilled,
    /// Its receiver hangs while the responder keeps answering (the `flow` check's case).
    Hung,
}

/// One UDP trial on cam2: returns the gap in ms.
fn udp_trial(bed: &mut Bed, death: Death) -> Result<f64> {
    let flow = death == Death::Hung;
    let (ea, eb) = (&bed.lab.encoders[0], &bed.lab.encoders[1]);
    let mut rx_a = Receiver::start(&ea.ns, sa(&format!("{}:7002", ea.addr4)));
    let rx_b = Receiver::start(&eb.ns, sa(&format!("{}:7002", eb.addr4)));
    let cam2 = sa(&format!("{INGEST4}:5002"));
    let src = sa(&format!("{SRC4}:40002"));
    let n = 2500u32;
    let sender = spawn_burst(
        &bed.lab.src.name,
        src,
        cam2,
        0..n,
        Duration::from_millis(1),
        Duration::from_millis(300),
    );
    thread::sleep(Duration::from_millis(800));
    match death {
        Death::Hung => rx_a.pause(true),
        Death::ReceiverKilled => rx_a.kill(),
        Death::Dead => {
            rx_a.kill();
            bed.echoes[0].stop();
        }
    }
    let took = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))?
        .sending;
    let (a, b) = (rx_a.settled(), rx_b.settled());
    if b.is_empty() {
        bail!("no failover: encoder B received nothing");
    }
    let lost = (0..n).filter(|s| !a.contains(s) && !b.contains(s)).count();
    drop(rx_a);
    drop(rx_b);
    // Bring A back and the channel with it, for the next trial.
    if death == Death::Dead {
        let ea = &bed.lab.encoders[0];
        bed.echoes[0] = Echo::start(&ea.ns, sa(&format!("{}:9000", ea.addr4)));
    }
    let healthy = wait_for(Duration::from_secs(10), || {
        status(&bed.daemon.socket)["encoders"][0]["healthy"]
            .as_bool()
            .filter(|h| *h)
    });
    if healthy.is_none() && !flow {
        bail!("encoder A did not come back healthy");
    }
    let out = cli(&bed.daemon.socket, &["remap", "cam2", "enc-a"]);
    if out.code != 0 {
        bail!("remap back to enc-a: {}", out.stderr.trim());
    }
    Ok(lost as f64 * took.as_secs_f64() * 1e3 / f64::from(n))
}

/// An SRT caller through cam1 to the listeners in A and B; A dies (or, `remap`, the channel
/// is moved with both alive). Returns ms until B's output grew by 10 datagrams.
fn srt_trial(protocol: &str, remap: bool, health: Option<&str>) -> Result<f64> {
    let mut bed = bed(&Policy {
        cam1_protocol: protocol,
        health: health.map_or(Policy::default().health, |h| [h, h]),
        ..Policy::default()
    })?;
    let mut session = srt::Session::start(&bed, None);
    session
        .growth(0, 50_000, Duration::from_secs(15))
        .context("encoder A never received the SRT stream")?;
    // The clock starts at the kill (or the remap request).
    let t0 = Instant::now();
    if remap {
        let out = cli(&bed.daemon.socket, &["remap", "cam1", "enc-b"]);
        if out.code != 0 {
            bail!("remap: {}", out.stderr.trim());
        }
    } else {
        session.kill(0);
        bed.echoes[0].stop();
    }
    session
        .growth(1, 10 * srt::DATAGRAM as u64, Duration::from_secs(20))
        .context("encoder B's output never grew")?;
    // Read at once: the check below runs the CLI, whose time is not the failover's.
    let took = t0.elapsed();
    if active(&bed.daemon.socket, "cam1") != "enc-b" {
        bail!("cam1 is not on enc-b");
    }
    Ok(took.as_secs_f64() * 1e3)
}

/// `trials` kill-and-failover trials ([`udp_trial`]) on one lab and daemon run with `policy`.
fn gap_trials(variant: &str, policy: &Policy, death: Death, trials: usize) -> Result<Figure> {
    let mut figure = Figure::new("gap", variant, "ms");
    let mut bed = bed(policy)?;
    for i in 0..trials {
        let g = udp_trial(&mut bed, death).with_context(|| format!("{variant} trial {i}"))?;
        eprintln!("  {variant} trial {i}: {g:.0} ms");
        figure.samples.push(g);
    }
    Ok(figure)
}

pub fn run(trials: usize, srt_trials: usize) -> Result<Report> {
    let mut report = Report::new("failover", "Failover: stream gap per detector (ms)", trials);
    report.method.push(format!(
        "UDP: {trials} kill-and-failover trials per detector on one lab and daemon; sequenced \
         UDP at 1 packet/ms; gap = packets that reached neither encoder x packet interval"
    ));
    report.method.push(format!(
        "SRT: {srt_trials} trials per variant, each on a fresh lab; time from the encoder's \
         death (or the remap) to 10 more datagrams at the backup listener's output (SRT's 120 ms \
         receive latency included)"
    ));
    let udp = gap_trials(
        "udp probes 100 ms, fall 3",
        &Policy::default(),
        Death::Dead,
        trials,
    )?;
    // The stream as the probe: only the receiver dies, its namespace (and the health
    // responder, which keeps the udp probe happy) live; its kernel refuses the stream.
    let refused = gap_trials(
        "receiver killed, namespace alive (refusals)",
        &Policy::default(),
        Death::ReceiverKilled,
        trials,
    )?;
    // The flow check at two settings: 50 ms windows, and 20 ms ones (judged every 20 ms, so
    // fall 2 means at least 40 ms without a reply: four SRT ACK periods).
    let flow_policy = |health| Policy {
        health: [health, "{ kind = \"udp\", port = 9000 }"],
        ..Policy::default()
    };
    let flow = gap_trials(
        "flow 50 ms, fall 2",
        &flow_policy("{ kind = \"flow\", interval_ms = 50, timeout_ms = 50, rise = 2, fall = 2 }"),
        Death::Hung,
        trials,
    )?;
    let flow_fast = gap_trials(
        "flow 20 ms, fall 2",
        &flow_policy("{ kind = \"flow\", interval_ms = 20, timeout_ms = 20, rise = 2, fall = 2 }"),
        Death::Hung,
        trials,
    )?;

    let mut srt = Figure::new("srt", "srt channel: encoder dies", "ms");
    let mut srt_udp = Figure::new("srt", "same stream on a udp channel", "ms");
    let mut srt_remap = Figure::new("srt", "srt channel: remap, both alive", "ms");
    let mut srt_health = Figure::new("srt", "srt health 100 ms: listener killed", "ms");
    const SRT_HEALTH: &str =
        "{ kind = \"srt\", interval_ms = 100, timeout_ms = 100, rise = 2, fall = 2 }";
    for i in 0..srt_trials {
        for (fig, protocol, remap, health) in [
            (&mut srt, "srt", false, None),
            (&mut srt_udp, "udp", false, None),
            (&mut srt_remap, "srt", true, None),
            (&mut srt_health, "srt", false, Some(SRT_HEALTH)),
        ] {
            let t = srt_trial(protocol, remap, health)
                .with_context(|| format!("srt trial {i} ({})", fig.variant))?;
            eprintln!("  {} trial {i}: {t:.0} ms", fig.variant);
            fig.samples.push(t);
        }
    }
    for f in [
        &udp,
        &refused,
        &flow,
        &flow_fast,
        &srt,
        &srt_udp,
        &srt_remap,
        &srt_health,
    ] {
        let mut sorted = f.samples.clone();
        sorted.sort_by(f64::total_cmp);
        report.notes.push(format!(
            "{}: p95 {:.0} ms over {} trials",
            f.variant,
            percentile(&sorted, 0.95),
            sorted.len()
        ));
    }
    report.limits.push(Limit {
        name: "udp probes: median gap".into(),
        value: udp.summary().median,
        unit: "ms".into(),
        goal: Goal::AtMost(300.0),
    });
    report.limits.push(Limit {
        name: "udp receiver killed, namespace alive: median gap".into(),
        value: refused.summary().median,
        unit: "ms".into(),
        goal: Goal::AtMost(20.0),
    });
    report.limits.push(Limit {
        name: "srt health 100 ms: data at the backup after kill -9 of the listener".into(),
        value: srt_health.summary().median,
        unit: "ms".into(),
        goal: Goal::AtMost(300.0),
    });
    for f in [&flow, &flow_fast] {
        report.limits.push(Limit {
            name: format!("{}: median gap", f.variant),
            value: f.summary().median,
            unit: "ms".into(),
            goal: Goal::AtMost(100.0),
        });
    }
    report.limits.push(Limit {
        name: "srt channel: data at the backup (3 probe intervals + 300 ms)".into(),
        value: srt.summary().median,
        unit: "ms".into(),
        goal: Goal::AtMost(600.0),
    });
    report.limits.push(Limit {
        name: "srt remap with both alive".into(),
        value: srt_remap.summary().median,
        unit: "ms".into(),
        goal: Goal::AtMost(300.0),
    });
    report.figures.extend([
        udp, refused, flow, flow_fast, srt, srt_udp, srt_remap, srt_health,
    ]);
    Ok(report)
}
