//! `nsfail lab demo`: the data plane at work in a throw-away lab. A source namespace streams
//! UDP to the ingest address; XDP forwards it to encoder A; half-way through, one map write
//! moves it to encoder B. Every second a line shows the counters, read from the data plane.
//! Namespaces and pins are removed at the end, and on Ctrl-C.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use crate::{
    Dataplane, EncoderLink, EncoderSpec, XdpMode,
    lab::{INGEST_IF, INGEST4, Lab, Netns, SRC4},
    net::netns,
    paths::{self, Pins},
};

const PREFIX: &str = "nsfdemo-";
const PORT: u16 = 7000;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// A thread inside a namespace that counts datagrams on `bind` and answers each one.
fn receiver(ns: &Netns, bind: SocketAddr, count: Arc<AtomicU64>) -> Result<JoinHandle<()>> {
    let name = ns.name.clone();
    let sock = ns
        .run(move || UdpSocket::bind(bind))?
        .with_context(|| format!("bind {bind} in {name}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !STOP.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                count.fetch_add(1, Ordering::Relaxed);
                let _ = sock.send_to(&buf[..n.min(8)], from);
            }
        }
    }))
}

pub fn run(seconds: u64) -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }.context("install signal handler")?;
    }
    let pins = Pins::new(format!("{}/nsfail-demo", paths::BPFFS));
    // A demo that was killed may have left its namespaces and pins behind.
    for leftover in ["rt", "src", "ea", "eb"] {
        drop(Netns {
            name: format!("{PREFIX}{leftover}"),
        });
    }
    Dataplane::teardown(&pins)?;

    println!("building the lab: namespaces {PREFIX}{{rt,src,ea,eb}}, veths, addresses");
    let lab = Lab::new(PREFIX, 2)?;
    let result = demo(&lab, &pins, seconds);
    STOP.store(true, Ordering::Relaxed);
    Dataplane::teardown(&pins)?;
    drop(lab);
    println!("lab removed: namespaces, veths, XDP/TC programs and pins are gone");
    result
}

/// The demo's data plane: loaded, attached in the lab's ingest namespace, with enc-a and
/// enc-b as encoders.
fn demo_dataplane(lab: &Lab, pins: &Pins, names: [&str; 2]) -> Result<Dataplane> {
    let mut specs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let e = &lab.encoders[i];
        specs.push(EncoderSpec {
            name: name.to_string(),
            addr: e.addr4.parse()?,
            mac: lab.encoder_mac(i)?,
            link: EncoderLink::Local {
                ifname: e.host_if.clone(),
            },
        });
    }
    // Attaching resolves interface names, so it runs inside the lab's ingest namespace.
    let pins2 = pins.clone();
    netns::in_netns(&lab.rt.name, move || -> Result<Dataplane> {
        let mut dp = Dataplane::open(pins2)?;
        dp.attach_ingest(INGEST_IF, XdpMode::Native)?;
        for spec in &specs {
            dp.upsert_encoder(spec)?;
        }
        Ok(dp)
    })?
}

/// A thin stream (200 packets a second) from the source namespace to `channel`, counting the
/// encoders' answers that come back from it, until [`STOP`].
fn sender(src_ns: String, channel: SocketAddr, answered: Arc<AtomicU64>) -> JoinHandle<()> {
    thread::spawn(move || {
        let _ = netns::in_netns(&src_ns, move || {
            let Ok(sock) = UdpSocket::bind(SocketAddr::new(SRC4.parse().unwrap(), 40000)) else {
                return;
            };
            let _ = sock.set_nonblocking(true);
            let mut buf = [0u8; 64];
            let mut seq = 0u64;
            while !STOP.load(Ordering::Relaxed) {
                let _ = sock.send_to(&seq.to_be_bytes(), channel);
                seq += 1;
                while let Ok((_, from)) = sock.recv_from(&mut buf) {
                    if from == channel {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                thread::sleep(Duration::from_millis(5));
            }
        });
    })
}

fn demo(lab: &Lab, pins: &Pins, seconds: u64) -> Result<()> {
    let channel: SocketAddr = format!("{INGEST4}:5000").parse()?;
    let names = ["enc-a", "enc-b"];
    let mut dp = demo_dataplane(lab, pins, names)?;
    dp.set_channel(channel, PORT, names[0], &names, false)?;
    println!(
        "channel cam1: {channel} -> enc-a ({}:{PORT}), backup enc-b",
        lab.encoders[0].addr4
    );

    let counts: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut threads = Vec::new();
    for (i, count) in counts.iter().enumerate() {
        let bind = SocketAddr::new(lab.encoders[i].addr4.parse()?, PORT);
        threads.push(receiver(&lab.encoders[i].ns, bind, count.clone())?);
    }
    let replies = Arc::new(AtomicU64::new(0));
    threads.push(sender(lab.src.name.clone(), channel, replies.clone()));

    println!("streaming for {seconds} s; enc-a's and enc-b's answers come back from {channel}");
    println!(
        "{:>4}  {:<6} {:>9} {:>9} {:>9} {:>12} {:>9}",
        "t", "active", "input", "enc-a rx", "enc-b rx", "answers@src", "xdp pass"
    );
    let start = Instant::now();
    let mut remapped = false;
    for t in 1..=seconds {
        while start.elapsed() < Duration::from_secs(t) {
            if STOP.load(Ordering::Relaxed) {
                println!("interrupted");
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        if !remapped && t > seconds / 2 {
            let t0 = Instant::now();
            dp.activate(channel, "enc-b")?;
            println!(
                "-- remap cam1 to enc-b: one map write, {} µs",
                t0.elapsed().as_micros()
            );
            remapped = true;
        }
        let active = &dp.channels()?[0].encoder;
        let passed: u64 = dp
            .xdp_stats()?
            .iter()
            .filter(|(n, _)| n.starts_with("pass"))
            .map(|(_, v)| v)
            .sum();
        println!(
            "{:>3}s  {:<6} {:>9} {:>9} {:>9} {:>12} {:>9}",
            t,
            active,
            dp.channel_stats(channel)?.packets,
            dp.encoder_stats("enc-a")?.rx.packets,
            dp.encoder_stats("enc-b")?.rx.packets,
            replies.load(Ordering::Relaxed),
            passed,
        );
    }
    STOP.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let (a, b) = (
        counts[0].load(Ordering::Relaxed),
        counts[1].load(Ordering::Relaxed),
    );
    println!("received by the encoders' sockets: enc-a {a}, enc-b {b}");
    Ok(())
}
