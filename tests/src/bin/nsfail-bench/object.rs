//! One loaded instance of the reference-program object (`nsfail::lab::bench_object`): each role
//! (generator, sink, redirects, `XDP_PASS`) gets its own instance, so its maps count or
//! configure that role alone. Programs stay attached for as long as the instance lives.

use std::{
    io,
    mem::{size_of, zeroed},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{Array, DevMap, HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};

use crate::sys;

pub const PASS: &str = "bench_pass";
pub const REDIRECT: &str = "bench_redirect";
pub const MAC_REDIRECT: &str = "bench_mac_redirect";
pub const MINIMAL: &str = "bench_minimal";
/// The per-packet budget programs: the minimal rewrite with one part added or removed.
pub const PARSE: &str = "bench_parse";
pub const MIN_NO_CSUM: &str = "bench_min_no_csum";
pub const MIN_CLOCK: &str = "bench_min_clock";
pub const MIN_JIFFIES: &str = "bench_min_jiffies";
pub const MIN_COUNTERS: &str = "bench_min_counters";
pub const MIN_LEARN: &str = "bench_min_learn";
pub const MIN_DEVCHECK: &str = "bench_min_devcheck";
pub const MIN_BUFLEN: &str = "bench_min_buflen";
pub const GENERATOR: &str = "bench_generator";
pub const SINK: &str = "bench_sink";

/// Header bytes the generator copies from a template (Ethernet + IPv4 + UDP).
pub const TEMPLATE_LEN: usize = 42;
/// Templates the generator can rotate through (`MAX_TEMPLATES` in the object).
pub const MAX_TEMPLATES: usize = 4096;

pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;

pub struct BenchObject {
    ebpf: Ebpf,
    /// The templates in use (as `GEN_TEMPLATES` holds them), for the packet-socket generator.
    templates: Vec<[u8; TEMPLATE_LEN]>,
}

impl BenchObject {
    pub fn load() -> Result<Self> {
        let ebpf = Ebpf::load(nsfail::lab::bench_object::OBJECT).context("loading nsfail-bench")?;
        Ok(Self {
            ebpf,
            templates: Vec::new(),
        })
    }

    /// Loads program `name` (once) and attaches it in native mode to `ifindex` (an interface
    /// of the calling thread's namespace). Attached programs run their test runs without the
    /// `synchronize_rcu` an unattached one pays on every call.
    pub fn attach(&mut self, name: &str, ifindex: u32) -> Result<()> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load().with_context(|| format!("loading {name}"))?;
        }
        prog.attach_to_if_index(ifindex, XdpMode::Driver)
            .with_context(|| format!("attaching {name} to ifindex {ifindex}"))?;
        Ok(())
    }

    pub fn program(&self, name: &str) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?)
    }

    /// Where `bench_redirect` sends everything.
    pub fn set_redirect_port(&mut self, ifindex: u32) -> Result<()> {
        let mut ports: DevMap<&mut MapData> = self.map_mut("BENCH_PORTS")?;
        ports.set(0, ifindex, None, 0)?;
        Ok(())
    }

    /// The destination MAC `bench_mac_redirect` writes.
    pub fn set_redirect_mac(&mut self, mac: [u8; 6]) -> Result<()> {
        let mut map: Array<&mut MapData, [u8; 6]> = self.map_mut("BENCH_MAC")?;
        map.set(0, mac, 0)?;
        Ok(())
    }

    /// `bench_minimal`'s table: packets to `listen` are rewritten towards `to` with these
    /// MACs and redirected to the `set_redirect_port` device.
    pub fn set_minimal(
        &mut self,
        entries: &[(std::net::SocketAddrV4, std::net::SocketAddrV4)],
        dmac: [u8; 6],
        smac: [u8; 6],
    ) -> Result<()> {
        let mut map: HashMap<&mut MapData, MinKey, MinTarget> = self.map_mut("MIN_CHANNELS")?;
        for (i, (listen, to)) in entries.iter().enumerate() {
            let key = MinKey {
                addr: listen.ip().octets(),
                port: listen.port().to_be_bytes(),
                _pad: [0; 2],
            };
            let target = MinTarget {
                dmac,
                smac,
                addr: to.ip().octets(),
                port: to.port(),
                _pad: i as u16,
                slot: 0,
            };
            map.insert(key, target, 0)?;
        }
        Ok(())
    }

    /// The generator's templates (their number is rounded down to a power of two).
    pub fn set_templates(&mut self, templates: &[[u8; TEMPLATE_LEN]]) -> Result<()> {
        if templates.is_empty() || templates.len() > MAX_TEMPLATES {
            bail!("1 to {MAX_TEMPLATES} templates, not {}", templates.len());
        }
        let count = 1u32 << templates.len().ilog2();
        {
            let mut map: Array<&mut MapData, [u8; TEMPLATE_LEN]> = self.map_mut("GEN_TEMPLATES")?;
            for (i, t) in templates.iter().take(count as usize).enumerate() {
                map.set(i as u32, t, 0)?;
            }
        }
        let mut config: Array<&mut MapData, u32> = self.map_mut("GEN_CONFIG")?;
        config.set(0, count, 0)?;
        self.templates = templates[..count as usize].to_vec();
        Ok(())
    }

    /// Packets and bytes the sink has dropped, summed over CPUs.
    pub fn sink_count(&self) -> Result<(u64, u64)> {
        let map: PerCpuArray<&MapData, [u64; 2]> = self.map("SINK_COUNT")?;
        let per_cpu = map.get(&0, 0)?;
        Ok(per_cpu
            .iter()
            .fold((0, 0), |(p, b), v| (p + v[0], b + v[1])))
    }

    /// Arrival time (CLOCK_MONOTONIC ns) of the first packet since the last `zero_first`.
    pub fn first_ns(&self) -> Result<u64> {
        let map: Array<&MapData, u64> = self.map("SINK_FIRST_NS")?;
        Ok(map.get(&0, 0)?)
    }

    pub fn zero_first(&mut self) -> Result<()> {
        let mut map: Array<&mut MapData, u64> = self.map_mut("SINK_FIRST_NS")?;
        map.set(0, 0, 0)?;
        Ok(())
    }

    fn map<'a, T>(&'a self, name: &str) -> Result<T>
    where
        T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("no map {name}"))?;
        T::try_from(map).map_err(|e| anyhow!("map {name}: {e}"))
    }

    fn map_mut<'a, T>(&'a mut self, name: &str) -> Result<T>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("no map {name}"))?;
        T::try_from(map).map_err(|e| anyhow!("map {name}: {e}"))
    }
}

/// `MinKey` of the bench object.
#[repr(C)]
#[derive(Clone, Copy)]
struct MinKey {
    addr: [u8; 4],
    port: [u8; 2],
    _pad: [u8; 2],
}

/// `MinTarget` of the bench object.
#[repr(C)]
#[derive(Clone, Copy)]
struct MinTarget {
    dmac: [u8; 6],
    smac: [u8; 6],
    addr: [u8; 4],
    port: u16,
    _pad: u16,
    slot: u32,
}

// SAFETY: repr(C), integers and byte arrays only, no implicit padding (8 and 24 bytes).
unsafe impl aya::Pod for MinKey {}
// SAFETY: as above.
unsafe impl aya::Pod for MinTarget {}
const _: () = assert!(std::mem::size_of::<MinKey>() == 8 && std::mem::size_of::<MinTarget>() == 24);

/// A template: the first `TEMPLATE_LEN` bytes of `frame`.
pub fn template(frame: &[u8]) -> [u8; TEMPLATE_LEN] {
    frame[..TEMPLATE_LEN]
        .try_into()
        .expect("a frame holds its headers")
}

/// Set once a live-frames test run has been refused with EPERM: later runs go straight to the
/// packet socket (a refused run and its fallback's setup would otherwise fall inside every
/// sample's counting window).
static LIVE_REFUSED: AtomicBool = AtomicBool::new(false);

/// How a generator run made its frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Source {
    /// `BPF_PROG_TEST_RUN` live frames, sent by the generator program's `XDP_TX`.
    #[default]
    LiveFrames,
    /// A packet socket (`AF_PACKET`, qdisc bypassed, `sendmmsg`), where the kernel refuses live
    /// frames with EPERM. Each frame is an skb, which the receiving veth copies into a page
    /// before its XDP program runs: router-core work every variant carries.
    PacketSocket,
}

impl Source {
    /// How benchmark notes name it.
    pub fn describe(self) -> &'static str {
        match self {
            Source::LiveFrames => "live frames (BPF_PROG_TEST_RUN, XDP_TX)",
            Source::PacketSocket => {
                "a packet socket (AF_PACKET, qdisc bypassed): this kernel refuses live frames \
                 (EPERM); every frame reaches the router core as an skb the veth copies into a \
                 page, work every variant carries, so ratios sit nearer 1 than with live frames \
                 and the extra nanoseconds per packet say more"
            }
        }
    }
}

/// Frames a generator run produced, how long it took, and how they were made.
#[derive(Clone, Copy, Debug, Default)]
pub struct Generated {
    pub frames: u64,
    pub elapsed: Duration,
    pub source: Source,
}

impl Generated {
    pub fn mpps(&self) -> f64 {
        self.frames as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e6
    }
}

/// Live-frame generation from `ifindex` in namespace `ns`: `frame` is the initial content of
/// every page (templates overwrite its headers), each test run sends `chunk` frames out of the
/// interface (`XDP_TX`), on `sys::GENERATOR_CPU`. Runs until `frames` are sent, `limit` has
/// passed, or `stop` is set, whichever comes first.
pub struct GenerateRun<'a> {
    pub ns: &'a str,
    pub ifindex: u32,
    pub frame: Vec<u8>,
    pub chunk: u32,
    pub frames: u64,
    pub limit: Duration,
}

impl GenerateRun<'_> {
    /// Runs on a thread of its own (inside the namespace, pinned to the generator core); the
    /// caller's thread is untouched.
    pub fn run(&self, generator: &BenchObject) -> Result<Generated> {
        let stop = AtomicBool::new(false);
        thread::scope(|s| {
            s.spawn(|| self.run_on_this_thread(generator, &stop))
                .join()
                .map_err(|_| anyhow!("generator thread panicked"))?
        })
    }

    /// The body of [`GenerateRun::run`], for a thread the caller spawned for it: it moves the
    /// calling thread into the namespace and onto the generator core for good. Where the
    /// kernel refuses live frames (EPERM on the first test run), the same frames go out of the
    /// same interface through a packet socket instead, and the result says so.
    pub fn run_on_this_thread(
        &self,
        generator: &BenchObject,
        stop: &AtomicBool,
    ) -> Result<Generated> {
        let program = generator.program(GENERATOR)?;
        let handle = std::fs::File::open(nsfail::paths::netns(self.ns))?;
        nix::sched::setns(handle, nix::sched::CloneFlags::CLONE_NEWNET)?;
        sys::pin_self(sys::GENERATOR_CPU)?;
        let ctx = xdp_md(self.ifindex, self.frame.len());
        let start = Instant::now();
        if LIVE_REFUSED.load(Ordering::Relaxed) {
            let frames = self.frames_from(&generator.templates);
            return self.packet_socket(&frames, stop, start);
        }
        let mut sent = 0u64;
        // Bounded in count (frames) and in time (limit).
        while sent < self.frames && start.elapsed() < self.limit && !stop.load(Ordering::Relaxed) {
            let repeat = u64::from(self.chunk).min(self.frames - sent) as u32;
            let opts = TestRunOptions {
                data_in: Some(&self.frame),
                ctx_in: Some(&ctx),
                repeat,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..Default::default()
            };
            match program.test_run(opts) {
                Ok(_) => sent += u64::from(repeat),
                Err(e) => {
                    let e = anyhow::Error::from(e);
                    if sent == 0 && os_error(&e) == Some(libc::EPERM) {
                        LIVE_REFUSED.store(true, Ordering::Relaxed);
                        let frames = self.frames_from(&generator.templates);
                        return self.packet_socket(&frames, stop, start);
                    }
                    return Err(e.context("live-frames test run"));
                }
            }
        }
        Ok(Generated {
            frames: sent,
            elapsed: start.elapsed(),
            source: Source::LiveFrames,
        })
    }

    /// The frames the generator program would send: `frame` with each template's headers.
    /// A frame too short for the headers goes as it is (the generator program passes such a
    /// frame untouched).
    fn frames_from(&self, templates: &[[u8; TEMPLATE_LEN]]) -> Vec<Vec<u8>> {
        if templates.is_empty() || self.frame.len() < TEMPLATE_LEN {
            return vec![self.frame.clone()];
        }
        templates
            .iter()
            .map(|t| {
                let mut f = self.frame.clone();
                f[..TEMPLATE_LEN].copy_from_slice(t);
                f
            })
            .collect()
    }

    /// `frames` in turn out of `ifindex` through a packet socket, in `sendmmsg` batches, on the
    /// calling thread (already in the namespace and on the generator core); bounded as
    /// live frames are, and timed from `start`, so that the setup counts in the run's time.
    /// The interface's TSO is turned off first: a veth hands a packet from a TSO-capable peer
    /// to its receive NAPI (where XDP and the router core are) only without it.
    fn packet_socket(
        &self,
        frames: &[Vec<u8>],
        stop: &AtomicBool,
        start: Instant,
    ) -> Result<Generated> {
        const BATCH: usize = 64;
        let ifname = nix::net::if_::if_indextoname(self.ifindex)
            .with_context(|| format!("ifindex {} in {}", self.ifindex, self.ns))?;
        let ifname = ifname.to_string_lossy().into_owned();
        let status = std::process::Command::new("ethtool")
            .args(["-K", &ifname, "tso", "off"])
            .status()
            .context("running ethtool")?;
        if !status.success() {
            bail!("ethtool -K {ifname} tso off: {status}");
        }
        let sock = packet_socket(self.ifindex)?;
        let mut iovs: Vec<libc::iovec> = (0..BATCH)
            .map(|i| {
                let f = &frames[i % frames.len()];
                libc::iovec {
                    iov_base: f.as_ptr() as *mut libc::c_void,
                    iov_len: f.len(),
                }
            })
            .collect();
        let mut msgs = sys::mmsg_headers(&mut iovs);
        let mut sent = 0u64;
        let mut next = 0usize;
        // Bounded in count (frames) and in time (limit).
        while sent < self.frames && start.elapsed() < self.limit && !stop.load(Ordering::Relaxed) {
            if frames.len() > 1 {
                for (k, m) in msgs.iter().enumerate() {
                    let f = &frames[(next + k) % frames.len()];
                    // SAFETY: the header's own iovec, in `iovs`, which is alive and unmoved.
                    unsafe { (*m.msg_hdr.msg_iov).iov_base = f.as_ptr() as *mut libc::c_void };
                }
            }
            let want = (self.frames - sent).min(BATCH as u64) as u32;
            // SAFETY: `msgs` holds `want` valid headers whose iovecs point into `frames`,
            // which outlive the call.
            let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), want, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                // A full device queue (the receiver is behind), or a signal: try again.
                if e.raw_os_error() == Some(libc::ENOBUFS)
                    || e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted
                {
                    continue;
                }
                return Err(e).context("sendmmsg on the packet socket");
            }
            sent += n as u64;
            next = (next + n as usize) % frames.len();
        }
        Ok(Generated {
            frames: sent,
            elapsed: start.elapsed(),
            source: Source::PacketSocket,
        })
    }
}

/// The OS error code at the root of `e`, if it has one.
fn os_error(e: &anyhow::Error) -> Option<i32> {
    e.chain()
        .filter_map(|c| c.downcast_ref::<io::Error>())
        .find_map(io::Error::raw_os_error)
}

/// A packet socket bound to `ifindex` that sends frames as they are, past the qdisc, and
/// receives nothing (protocol 0).
fn packet_socket(ifindex: u32) -> Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket(AF_PACKET)");
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    sys::setsockopt_int(&sock, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1)
        .context("PACKET_QDISC_BYPASS")?;
    // SAFETY: sockaddr_ll is plain data.
    let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: addr is a sockaddr_ll of the length given.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context("binding the packet socket");
    }
    Ok(sock)
}

/// A `struct xdp_md` for a live-frames run received on `ifindex`, queue 0.
fn xdp_md(ifindex: u32, len: usize) -> Vec<u8> {
    // data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    [0u32, len as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect()
}
