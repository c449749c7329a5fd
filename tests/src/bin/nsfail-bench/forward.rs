//! `forward`: packets per second delivered into an encoder namespace through a veth lab where
//! one core (the router core) does all the forwarding work, and that core's CPU time per
//! delivered packet, for nsfail and the alternatives.
//!
//! Each variant has a lab of its own, built once and kept for the whole run, so variants can
//! be interleaved without reconfiguring anything:
//!
//! ```text
//!  src ns: g0 ──veth── g1 (rt ns: the router) ── ve ──veth── e0 (dst ns: sink, counts + drops)
//! ```
//!
//! The generator (live frames, `XDP_TX` out of g0; a packet socket on g0 where the kernel
//! refuses live frames, see `object::Source`) runs on CPU0; g1's NAPI runs in a kernel
//! thread pinned to CPU1 (threaded NAPI), and so does everything it triggers (the redirect or
//! the stack, then the sink on e0 in softirq); the userspace relay is pinned to CPU1 too.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nsfail::{Dataplane, EncoderLink, EncoderSpec, XdpMode, lab::Netns};
use nsfail_common::xdp_reason;
use nsfail_tests::{Entered, PinDir, frames::Frame};

use crate::{
    object::{self, BenchObject, GenerateRun, Generated, Source},
    report::{Figure, Goal, Limit, Ratio, Report, summarize},
    sys::{self, CpuTime},
};

const NSFAIL: &str = "nsfail";
/// nsfail with the redirect tracepoints detached: what counting refused redirects costs.
const UNCOUNTED: &str = "nsfail, refusals uncounted";
const BARE: &str = "bare redirect";
const MAC: &str = "redirect + MAC rewrite";
/// Parse, one lookup, the full rewrite with incremental checksums, redirect: nsfail's job and
/// nothing else, the ceiling for its hit path.
const MIN: &str = "minimal rewrite";
const NFT: &str = "nftables DNAT";
const RELAY: &str = "userspace relay";
const KERNEL: &str = "kernel forwarding";
const VARIANTS: [&str; 8] = [NSFAIL, UNCOUNTED, MIN, BARE, MAC, NFT, RELAY, KERNEL];

/// Frame sizes: the minimum, and a contribution stream's usual 1316-byte payload.
const SIZES: [(&str, usize); 2] = [("64 B", 22), ("1316 B payload", 1316)];

const SOURCE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 80, 0, 2), 40_000);
const INGEST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 80, 0, 1), 5_000);
const ENCODER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 80, 1, 2), 7_000);

/// One generator run per sample: at most this long, in test runs of `CHUNK` frames.
const RUN_TIME: Duration = Duration::from_millis(1_000);
const CHUNK: u32 = 250_000;
const RUN_FRAMES: u64 = 40_000_000;
/// Time for frames in flight to land after the generator stops.
const SETTLE: Duration = Duration::from_millis(50);

/// One variant's lab. Fields drop in order: the relay, programs and links go before the
/// namespaces they live in.
struct Lab {
    variant: &'static str,
    /// g1's NAPI kernel threads.
    napi: Vec<i32>,
    g0_ifindex: u32,
    g1_mac: [u8; 6],
    relay: Option<Relay>,
    /// The bare redirect program (bare variant).
    redirect: Option<BenchObject>,
    /// nsfail's data plane (nsfail variant).
    dp: Option<(Dataplane, PinDir)>,
    sink: BenchObject,
    src: Netns,
    rt: Netns,
    _dst: Netns,
}

impl Lab {
    fn new(variant: &'static str) -> Result<Self> {
        let src = sys::namespace("nfs")?;
        let rt = sys::namespace("nfr")?;
        let dst = sys::namespace("nfd")?;
        sys::veth(&rt, "g1", "g0", Some(&src))?;
        sys::veth(&rt, "ve", "e0", Some(&dst))?;
        src.ip(&["addr", "add", "10.80.0.2/24", "dev", "g0"])?;
        rt.ip(&["addr", "add", "10.80.0.1/24", "dev", "g1"])?;
        rt.ip(&["addr", "add", "10.80.1.1/24", "dev", "ve"])?;
        dst.ip(&["addr", "add", "10.80.1.2/24", "dev", "e0"])?;
        let e0 = sys::link(&dst, "e0")?;
        let g1 = sys::link(&rt, "g1")?;
        let ve = sys::link(&rt, "ve")?;
        // The sink drops ARP too: the router must never need it.
        sys::static_neighbour(&rt, *ENCODER.ip(), e0.mac, "ve")?;
        let mut sink = BenchObject::load()?;
        {
            let _in = Entered::new(&dst);
            sink.attach(object::SINK, e0.ifindex)?;
        }
        let mut lab = Self {
            variant,
            napi: Vec::new(),
            g0_ifindex: sys::link(&src, "g0")?.ifindex,
            g1_mac: g1.mac,
            src,
            rt,
            _dst: dst,
            sink,
            dp: None,
            redirect: None,
            relay: None,
        };
        match variant {
            NSFAIL | UNCOUNTED => {
                let _in = Entered::new(&lab.rt);
                let pins = PinDir::new();
                let mut dp = Dataplane::open(pins.pins.clone())?;
                dp.attach_ingest("g1", XdpMode::Native)?;
                dp.upsert_encoder(&EncoderSpec {
                    name: "enc".into(),
                    addr: (*ENCODER.ip()).into(),
                    mac: e0.mac,
                    link: EncoderLink::Local {
                        ifname: "ve".into(),
                    },
                })?;
                dp.set_channel(
                    SocketAddr::V4(INGEST),
                    ENCODER.port(),
                    "enc",
                    &["enc"],
                    false,
                )?;
                lab.dp = Some((dp, pins));
            }
            BARE | MAC | MIN => {
                let _in = Entered::new(&lab.rt);
                let mut redirect = BenchObject::load()?;
                let prog = match variant {
                    BARE => object::REDIRECT,
                    MAC => object::MAC_REDIRECT,
                    _ => object::MINIMAL,
                };
                redirect.attach(prog, g1.ifindex)?;
                redirect.set_redirect_port(ve.ifindex)?;
                redirect.set_redirect_mac(e0.mac)?;
                redirect.set_minimal(&[(INGEST, ENCODER)], e0.mac, ve.mac)?;
                lab.redirect = Some(redirect);
            }
            _ => {
                // The stack variants: g1 needs NAPI (GRO) to receive XDP_TX-ed frames.
                lab.rt.exec("ethtool", &["-K", "g1", "gro", "on"])?;
                if variant != RELAY {
                    lab.rt.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
                }
                if variant == NFT {
                    nft_dnat(&lab.rt)?;
                }
                if variant == RELAY {
                    lab.relay = Some(Relay::start(&lab.rt)?);
                }
            }
        }
        lab.napi = sys::threaded_napi(&lab.rt, "g1", sys::ROUTER_CPU)?;
        Ok(lab)
    }

    /// What the generator sends: to the ingest address, or straight to the encoder when the
    /// router is a plain router.
    fn frame(&self, payload: usize) -> Vec<u8> {
        let dst = if self.variant == KERNEL {
            ENCODER
        } else {
            INGEST
        };
        let mut f = Frame::udp(
            SocketAddr::V4(SOURCE),
            SocketAddr::V4(dst),
            &vec![0x5a; payload],
        );
        f.dmac = self.g1_mac;
        f.bytes()
    }

    /// The threads that do this variant's forwarding work on the router core: g1's NAPI
    /// threads (which also run the sink's softirq), the CPU's ksoftirqd, and the relay.
    fn router_threads(&self) -> Result<Vec<i32>> {
        let mut tids = self.napi.clone();
        tids.push(sys::ksoftirqd(sys::ROUTER_CPU)?);
        if let Some(relay) = &self.relay {
            tids.push(relay.tid);
        }
        Ok(tids)
    }

    fn router_runtime_ns(&self) -> Result<u64> {
        self.router_threads()?
            .into_iter()
            .map(sys::thread_runtime_ns)
            .sum()
    }

    fn redirected(&self) -> Result<u64> {
        let Some((dp, _)) = &self.dp else {
            return Ok(0);
        };
        Ok(dp.xdp_count(xdp_reason::REDIRECTED)?)
    }
}

fn nft_dnat(rt: &Netns) -> Result<()> {
    if which_nft().is_none() {
        bail!("nft is not installed (`cargo xtask setup` installs the nftables package)");
    }
    let rule = format!(
        "ip daddr {} udp dport {} dnat to {}",
        INGEST.ip(),
        INGEST.port(),
        ENCODER
    );
    for cmd in [
        "add table ip nsfbench".to_owned(),
        "add chain ip nsfbench pre { type nat hook prerouting priority -100 ; }".to_owned(),
        format!("add rule ip nsfbench pre {rule}"),
    ] {
        let args: Vec<&str> = cmd.split_whitespace().collect();
        rt.exec("nft", &args)?;
    }
    Ok(())
}

fn which_nft() -> Option<()> {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .iter()
        .any(|p| std::path::Path::new(p).exists())
        .then_some(())
}

/// One measured run of one variant.
struct Sample {
    generated: Generated,
    delivered: u64,
    /// From the sink reading before the run to the one after it: the time `delivered` was
    /// counted over.
    counted: Duration,
    redirected: u64,
    /// CPU1 as a whole (/proc/stat): includes whatever else ran there.
    cpu: CpuTime,
    /// The router threads' own run time.
    router_ns: u64,
}

fn sample(lab: &mut Lab, generator: &mut BenchObject, payload: usize) -> Result<Sample> {
    let frame = lab.frame(payload);
    generator.set_templates(&[object::template(&frame)])?;
    let counting = Instant::now();
    let sink_before = lab.sink.sink_count()?.0;
    let redirected_before = lab.redirected()?;
    let cpu_before = CpuTime::read(sys::ROUTER_CPU)?;
    let router_before = lab.router_runtime_ns()?;
    let generated = GenerateRun {
        ns: &lab.src.name,
        ifindex: lab.g0_ifindex,
        frame,
        chunk: CHUNK,
        frames: RUN_FRAMES,
        limit: RUN_TIME,
    }
    .run(generator)?;
    thread::sleep(SETTLE);
    let cpu = CpuTime::read(sys::ROUTER_CPU)?.since(cpu_before);
    let router_ns = lab.router_runtime_ns()? - router_before;
    let delivered = lab.sink.sink_count()?.0 - sink_before;
    let counted = counting.elapsed();
    Ok(Sample {
        generated,
        delivered,
        counted,
        redirected: lab.redirected()? - redirected_before,
        cpu,
        router_ns,
    })
}

pub fn run(reps: usize) -> Result<Report> {
    let mut labs = Vec::new();
    for variant in VARIANTS {
        eprintln!("  forward: building the {variant} lab");
        labs.push(Lab::new(variant).with_context(|| format!("the {variant} lab"))?);
    }
    // The generator stays attached to a spare veth (test runs of an attached program skip a
    // synchronize_rcu); its frames leave through each lab's g0 in turn.
    let mut generator = BenchObject::load()?;
    {
        let spare_ns = &labs[0].src;
        sys::veth(spare_ns, "gs", "gsp", None)?;
        let spare = sys::link(spare_ns, "gs")?;
        let _in = Entered::new(spare_ns);
        generator.attach(object::GENERATOR, spare.ifindex)?;
    }

    let mut report = Report::new(
        "forward",
        "delivered rate and router-core CPU per packet through a veth lab",
        reps,
    );
    report.method = vec![
        format!(
            "each sample: the generator (CPU0) runs {} ms; delivered = \
             packets counted by the XDP sink in the encoder namespace over the run and {} ms \
             after, divided by that whole window (sink reading to sink reading); offered = the \
             generator's own rate over its run",
            RUN_TIME.as_millis(),
            SETTLE.as_millis()
        ),
        "router CPU = run time (schedstat, ns) of the threads doing the forwarding on CPU1: \
         g1's NAPI thread (and the softirqs it runs: the sink's too), ksoftirqd/1, the relay \
         thread; CPU1 busy = /proc/stat busy ticks of CPU1, which also counts anything else \
         running there (this machine is shared)"
            .into(),
        "g1 (router side) in threaded NAPI pinned to CPU1; the relay thread pinned to CPU1; \
         variants interleaved within each repetition, order rotated; each variant has its own \
         namespaces"
            .into(),
        "nftables: one prerouting DNAT rule (conntrack); relay: recvmmsg/sendmmsg batches of \
         64 on a connected socket; kernel forwarding: frames addressed to the encoder itself; \
         redirect + MAC rewrite: the bare redirect plus writes to both ends of the headers; \
         minimal rewrite: parse, one (daddr, dport) hash lookup, MACs, address, port, TTL, \
         incremental checksums, DEVMAP redirect and nothing else (nsfail's ceiling)"
            .into(),
        "nsfail's redirect tracepoints (the redirect_failed count) are attached only while \
         the nsfail variant runs; `nsfail, refusals uncounted` is the same data plane without \
         them, so their ratio is what counting refused redirects costs"
            .into(),
    ];
    let groups = [
        ("delivered", "Mpps"),
        ("router CPU per packet", "ns/packet"),
        ("CPU1 busy per packet", "ns/packet"),
        ("offered", "Mpps"),
    ];
    for (size, _) in SIZES {
        for (group, unit) in groups {
            for v in VARIANTS {
                report
                    .figures
                    .push(Figure::new(&format!("{group}, {size}"), v, unit));
            }
        }
    }
    let mut unaccounted = 0u64;
    let mut redirected_total = 0u64;
    let mut sources = Vec::new();
    for rep in 0..reps {
        for (size, payload) in SIZES {
            let count = labs.len();
            for k in 0..count {
                let variant = labs[(k + rep) % count].variant;
                // The tracepoints fire for every XDP user's redirects on the host: they are
                // attached only while nsfail's own (counted) variant is measured.
                for other in labs.iter() {
                    if let Some((dp, _)) = &other.dp {
                        if variant == NSFAIL && other.variant == NSFAIL {
                            dp.attach_tracepoints()?;
                        } else {
                            dp.detach_tracepoints()?;
                        }
                    }
                }
                let lab = &mut labs[(k + rep) % count];
                let s = sample(lab, &mut generator, payload)?;
                if !sources.contains(&s.generated.source) {
                    sources.push(s.generated.source);
                }
                let delivered = s.delivered.max(1) as f64;
                let values = [
                    s.delivered as f64 / s.counted.as_secs_f64() / 1e6,
                    s.router_ns as f64 / delivered,
                    s.cpu.busy_ns as f64 / delivered,
                    s.generated.mpps(),
                ];
                for ((group, _), value) in groups.iter().zip(values) {
                    let group = format!("{group}, {size}");
                    report
                        .figures
                        .iter_mut()
                        .find(|f| f.group == group && f.variant == variant)
                        .expect("figure")
                        .samples
                        .push(value);
                }
                if variant == NSFAIL {
                    unaccounted += s.redirected.abs_diff(s.delivered);
                    redirected_total += s.redirected;
                }
            }
        }
    }
    for source in &sources {
        report
            .method
            .push(format!("generator: {}", source.describe()));
    }
    // With a packet socket, several hundred ns per packet of skb work on the router core are
    // shared by every variant, and the generator and the router core (nearly saturated) limit
    // each other: a ratio then stays near 1 whatever the paths cost, so a goal on it could not
    // fail. The ratios are reported without goals, and the note says why.
    let coarse = sources.contains(&Source::PacketSocket);
    let mut ratios = Vec::new();
    let mut notes = Vec::new();
    if coarse {
        notes.push(
            "no goal is judged: with the packet-socket generator every variant carries the \
             same skb work on the router core, which narrows every ratio towards 1; compare the \
             router CPU per packet in ns (nsfail's extra over the minimal rewrite below), and \
             use `prog` for the hit path's cost"
                .into(),
        );
    }
    for (size, _) in SIZES {
        let fig = |group: &str, v: &str| {
            report
                .figure(&format!("{group}, {size}"), v)
                .expect("figure")
                .clone()
        };
        for (other, goal) in [
            (MIN, 0.95),
            (UNCOUNTED, 0.0),
            (BARE, 0.0),
            (NFT, 4.5),
            (RELAY, 20.0),
            (KERNEL, 0.0),
        ] {
            let goal = (goal > 0.0 && !coarse).then_some(Goal::AtLeast(goal));
            ratios.push(Ratio::of(
                &format!("nsfail / {other}, delivered, {size}"),
                &fig("delivered", NSFAIL),
                &fig("delivered", other),
                goal,
            ));
            // Router-core capacity: the other path's CPU per packet over nsfail's.
            ratios.push(Ratio::of(
                &format!("nsfail / {other}, by router CPU, {size}"),
                &fig("router CPU per packet", other),
                &fig("router CPU per packet", NSFAIL),
                goal,
            ));
        }
        let router = |v: &str| summarize(&fig("router CPU per packet", v).samples).median;
        notes.push(format!(
            "{size}: router CPU per packet, medians: nsfail {:.1} ns, minimal rewrite {:.1} ns, \
             bare redirect {:.1} ns; nsfail's extra over the minimal rewrite {:+.1} ns",
            router(NSFAIL),
            router(MIN),
            router(BARE),
            router(NSFAIL) - router(MIN)
        ));
        ratios.push(Ratio::of(
            &format!("minimal rewrite / bare redirect, delivered, {size}"),
            &fig("delivered", MIN),
            &fig("delivered", BARE),
            None,
        ));
        for v in VARIANTS {
            let offered = summarize(&fig("offered", v).samples).median;
            let delivered = summarize(&fig("delivered", v).samples).median;
            if delivered >= 0.95 * offered {
                notes.push(format!(
                    "{v}, {size}: delivered {delivered:.2} of {offered:.2} Mpps offered: the \
                     generator, not the path, set the rate (compare router CPU per packet)"
                ));
            }
        }
    }
    report.ratios.extend(ratios);
    report.notes.extend(notes);
    report.limits.push(Limit {
        name: format!("nsfail: sum of |redirected - delivered| (of {redirected_total})"),
        value: unaccounted as f64,
        unit: "packets".into(),
        goal: Goal::AtMost(0.0),
    });
    drop(generator);
    drop(labs);
    Ok(report)
}

/// A UDP relay written for the bench: receives on the ingest address in batches (recvmmsg)
/// and sends each batch on to the encoder (sendmmsg on a connected socket), on the router
/// core. Stops and joins on drop.
struct Relay {
    /// The relay thread's id, for its CPU time.
    tid: i32,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<io::Result<()>>>,
}

const BATCH: usize = 64;
const BUF_LEN: usize = 2048;

impl Relay {
    fn start(rt: &Netns) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let netns = std::fs::File::open(nsfail::paths::netns(&rt.name))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = {
            let stop = stop.clone();
            thread::spawn(move || -> io::Result<()> {
                let setup = || -> io::Result<(UdpSocket, UdpSocket)> {
                    nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                    sys::pin_self(sys::ROUTER_CPU).map_err(io::Error::other)?;
                    let rx = UdpSocket::bind(INGEST)?;
                    rx.set_read_timeout(Some(Duration::from_millis(50)))?;
                    sys::setsockopt_int(&rx, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20)?;
                    let tx = UdpSocket::bind("10.80.1.1:0")?;
                    tx.connect(ENCODER)?;
                    Ok((rx, tx))
                };
                match setup() {
                    Ok((rx, tx)) => {
                        let _ = ready_tx.send(Ok(sys::gettid()));
                        relay_loop(&rx, &tx, &stop)
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        Err(e)
                    }
                }
            })
        };
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(tid)) => Ok(Self {
                tid,
                stop,
                handle: Some(handle),
            }),
            Ok(Err(e)) => bail!("relay: {e}"),
            Err(_) => bail!("relay did not start"),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Bounded in time: at most an hour, normally stopped with the bench.
fn relay_loop(rx: &UdpSocket, tx: &UdpSocket, stop: &AtomicBool) -> io::Result<()> {
    let mut bufs = vec![[0u8; BUF_LEN]; BATCH];
    let iov = |b: &mut [u8; BUF_LEN]| libc::iovec {
        iov_base: b.as_mut_ptr().cast(),
        iov_len: BUF_LEN,
    };
    // Receive and send headers over the same buffers; a send iovec's length is set to what
    // arrived in its buffer.
    let mut rx_iovs: Vec<libc::iovec> = bufs.iter_mut().map(iov).collect();
    let mut tx_iovs: Vec<libc::iovec> = bufs.iter_mut().map(iov).collect();
    let mut rx_msgs = sys::mmsg_headers(&mut rx_iovs);
    let mut tx_msgs = sys::mmsg_headers(&mut tx_iovs);
    let deadline = Instant::now() + Duration::from_secs(3600);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // SAFETY: rx_msgs holds BATCH headers, each pointing at its own live iovec and buffer.
        let n = unsafe {
            libc::recvmmsg(
                rx.as_raw_fd(),
                rx_msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue;
        }
        let n = n as usize;
        for (tx_msg, rx_msg) in tx_msgs.iter().zip(&rx_msgs).take(n) {
            // SAFETY: the header's own iovec, in `tx_iovs`, which is alive and unmoved.
            unsafe { (*tx_msg.msg_hdr.msg_iov).iov_len = rx_msg.msg_len as usize };
        }
        // SAFETY: tx_msgs' first n headers point at live iovecs over the received buffers.
        unsafe { libc::sendmmsg(tx.as_raw_fd(), tx_msgs.as_mut_ptr(), n as u32, 0) };
    }
    Ok(())
}
