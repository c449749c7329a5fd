//! One loaded instance of the reference-program object (`nsfail::lab::bench_object`): each role
//! (generator, sink, redirects, `XDP_PASS`) gets its own instance, so its maps count or
//! configure that role alone. Programs stay attached for as long as the instance lives.

use std::{
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
}

impl BenchObject {
    pub fn load() -> Result<Self> {
        let ebpf = Ebpf::load(nsfail::lab::bench_object::OBJECT).context("loading nsfail-bench")?;
        Ok(Self { ebpf })
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

/// Frames a generator run produced, and how long it took.
#[derive(Clone, Copy, Debug, Default)]
pub struct Generated {
    pub frames: u64,
    pub elapsed: Duration,
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
    pub fn run(&self, generator: &Xdp) -> Result<Generated> {
        let stop = AtomicBool::new(false);
        thread::scope(|s| {
            s.spawn(|| self.run_on_this_thread(generator, &stop))
                .join()
                .map_err(|_| anyhow!("generator thread panicked"))?
        })
    }

    /// The body of [`GenerateRun::run`], for a thread the caller spawned for it: it moves the
    /// calling thread into the namespace and onto the generator core for good.
    pub fn run_on_this_thread(&self, generator: &Xdp, stop: &AtomicBool) -> Result<Generated> {
        let handle = std::fs::File::open(nsfail::paths::netns(self.ns))?;
        nix::sched::setns(handle, nix::sched::CloneFlags::CLONE_NEWNET)?;
        sys::pin_self(sys::GENERATOR_CPU)?;
        let ctx = xdp_md(self.ifindex, self.frame.len());
        let start = Instant::now();
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
            generator.test_run(opts).context("live-frames test run")?;
            sent += u64::from(repeat);
        }
        Ok(Generated {
            frames: sent,
            elapsed: start.elapsed(),
        })
    }
}

/// A `struct xdp_md` for a live-frames run received on `ifindex`, queue 0.
fn xdp_md(ifindex: u32, len: usize) -> Vec<u8> {
    // data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    [0u32, len as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect()
}
