//! The one type that owns the kernel half of nsfail: every map, program and link. Nothing
//! else in nsfail opens a BPF object; this module knows nothing of the config or the
//! controller.
//!
//! Lifecycle: [`Dataplane::open`] loads the eBPF object and pins it, or adopts what an earlier
//! process pinned (no reload, so forwarding never stops); [`Dataplane::attach_ingest`] puts
//! the XDP program on the ingest NIC; encoders and channels are then added, repointed and
//! removed; [`Dataplane::teardown`] detaches and unpins everything. Dropping a `Dataplane`
//! leaves the pinned data plane running.
//!
//! Failover is one atomic map write: `CHANNELS_V4` (or `_V6`) is a HASH map whose whole value (the rewrite
//! target: encoder address, MACs, port, counter slots) is replaced by one `bpf_map_update_elem`;
//! the XDP program sees either the old or the new value, never a mix. An encoder's egress
//! policy is likewise one `POLICIES` value, replaced whole by [`Dataplane::set_policy`] while
//! the TC program stays attached.
//!
//! This type is the only writer of the CHANNELS maps and REPLIES and keeps a mirror of what it wrote
//! (reads need no map walk); [`Dataplane::audit_channel`] and [`Dataplane::remove_foreign`]
//! put back what another writer changed.

use std::{
    collections::{BTreeMap, HashSet},
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::OwnedFd,
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, DevMap, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode as AttachMode,
        links::{FdLink, LinkError},
    },
    util::nr_cpus,
};
use aya_obj::programs::XdpAttachType;
use log::{info, warn};
use nsfail_common::{
    ABI_VERSION, ACTION_REDIRECT, ACTION_ROUTED, ACTION_TX, CHANNEL_SOURCES, ChannelStats,
    ChannelTarget, ENCODER_LOCAL, ENCODER_REMOTE, ENCODER_ROUTED, EncoderInfo, EncoderPolicy,
    EncoderStats, Endpoint, FAMILY_V4, FAMILY_V6, FlowStats, MAX_CHANNELS, MAX_ENCODERS,
    MAX_SOURCE_NETS, MAX_SRT_PEERS_PER_CHANNEL, REPLY_SRT, ReplyTarget, SourceInfo, SourceKey,
    SourceNet, SrtPeers, TraceConfig, drop_reason, tc_reason, xdp_reason,
};

pub use self::{
    entries::{
        ChannelEntry, ChannelOptions, EncoderEntry, EncoderLink, EncoderSpec, SourceEntry,
        SourcePrefix, SrtPeerEntry,
    },
    policy::{AllowProto, AllowRule, EgressPolicy, HealthAnswers},
};
use self::{
    links::{
        TRACEPOINTS, attach_tracepoints, detach_pinned_link, live_link, pin_link, pinned_to,
        trace_config_for,
    },
    policy::policy_value,
};
use crate::{net::netns, paths::Pins};

mod audit;
pub mod btf;
mod channel_map;
mod channels;
mod clock;
mod encoders;
mod entries;
mod links;
mod maps;
mod mirror;
pub mod policy;
mod sys;
mod transit;

pub use nsfail_common::{
    DEFAULT_SRT_PEER_LIMIT as SRT_PEER_LIMIT_DEFAULT,
    MAX_SRT_PEERS_PER_CHANNEL as SRT_PEER_LIMIT_MAX,
};

pub use self::{
    audit::Repairs,
    maps::{endpoint, socket_addr},
};
use self::{channel_map::ChannelMaps, maps::*, mirror::Mirror};

/// The eBPF object built by build.rs from nsfail-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nsfail"));

const PROG_INGRESS: &str = "nsfail_ingress";
const PROG_EGRESS: &str = "nsfail_egress";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("bpffs at {path}: {source}")]
    Bpffs { path: String, source: io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: String, source: ProgramError },
    #[error("map {name}: {source}")]
    Map { name: String, source: MapError },
    #[error("pin {path}: {source}")]
    Pin { path: String, source: io::Error },
    #[error("link {path}: {source}")]
    Link { path: String, source: LinkError },
    #[error(
        "pinned data plane at {dir} has layout version {found}, this nsfail needs {expected}: \
         run `nsfail teardown` first"
    )]
    AbiMismatch {
        dir: String,
        found: u32,
        expected: u32,
    },
    #[error("interface {name}: {source}")]
    Interface { name: String, source: io::Error },
    #[error("XDP attach to {ifname} in {mode:?} mode failed: {}", attach_detail(.source))]
    Attach {
        ifname: String,
        mode: XdpMode,
        source: ProgramError,
    },
    #[error("no ingest interface: attach the XDP program first")]
    NoIngest,
    #[error("unknown encoder {0:?}")]
    UnknownEncoder(String),
    #[error("unknown channel {0}")]
    UnknownChannel(SocketAddr),
    #[error("encoder {encoder:?} is {encoder_family}, channel {channel} is not")]
    FamilyMismatch {
        encoder: String,
        encoder_family: &'static str,
        channel: SocketAddr,
    },
    #[error("encoder {encoder:?} is still used by channel {channel}")]
    EncoderInUse {
        encoder: String,
        channel: SocketAddr,
    },
    #[error(
        "encoder {encoder:?} already receives channel {other} on port {port}: \
         replies could not be told apart"
    )]
    PortConflict {
        encoder: String,
        port: u16,
        other: SocketAddr,
    },
    #[error("invalid {what}: {why}")]
    Invalid { what: String, why: String },
    #[error(
        "cannot scale the kernel's jiffies to CLOCK_MONOTONIC (the data plane's last-seen times): {0}"
    )]
    Clock(String),
    #[error("encoder {encoder:?} has {count} allow rules; the kernel policy holds at most {max}")]
    TooManyRules {
        encoder: String,
        count: usize,
        max: usize,
    },
    #[error("no free {0} slot (limit reached)")]
    Full(&'static str),
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

fn map_err(name: &str) -> impl FnOnce(MapError) -> DataplaneError + '_ {
    move |source| DataplaneError::Map {
        name: name.to_owned(),
        source,
    }
}

fn prog_err(name: &str) -> impl FnOnce(ProgramError) -> DataplaneError + '_ {
    move |source| DataplaneError::Program {
        name: name.to_owned(),
        source,
    }
}

/// How the XDP program attaches to the ingest NIC (`ingest.xdp_mode` in the config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver: fast, and required for redirecting into veths at full speed.
    #[default]
    Native,
    /// In the generic (skb) path: works on any device, slower.
    Generic,
    /// Native if the driver supports it, otherwise generic (logged).
    Auto,
}

impl XdpMode {
    /// The value as written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Auto => "auto",
        }
    }
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The ingest NIC as attached.
#[derive(Clone, Debug)]
struct Ingest {
    ifindex: u32,
    mac: [u8; 6],
}

pub struct Dataplane {
    pins: Pins,
    adopted: bool,
    ingest: Option<Ingest>,
    xdp: Xdp,
    tc: SchedClassifier,
    channels: ChannelMaps,
    replies: HashMap<MapData, Endpoint, ReplyTarget>,
    sources: HashMap<MapData, SourceKey, SourceInfo>,
    srt_peers: HashMap<MapData, u32, SrtPeers>,
    source_nets: LpmTrie<MapData, SourceNet, u8>,
    encoders: HashMap<MapData, u32, EncoderInfo>,
    encoder_ifindex: HashMap<MapData, u32, u32>,
    policies: HashMap<MapData, u32, EncoderPolicy>,
    tx_ports: DevMap<MapData>,
    channel_stats: PerCpuArray<MapData, ChannelStats>,
    encoder_stats: PerCpuArray<MapData, EncoderStats>,
    xdp_stats: PerCpuArray<MapData, u64>,
    tc_stats: PerCpuArray<MapData, u64>,
    /// ENCODERS by name, kept in step with the map by this type (the only writer): a failover
    /// (`activate`) is then one map read and one map write, whatever the number of encoders.
    by_name: BTreeMap<String, (u32, EncoderInfo)>,
    /// CHANNELS, REPLIES, SOURCE_NETS and the SRT caller limits as written, for reads and
    /// checks without a map walk.
    mirror: Mirror,
    /// CHANNEL_STATS, for batched reads (aya has no batch operations).
    channel_stats_fd: OwnedFd,
}

impl Dataplane {
    /// Loads the data plane and pins it under `pins`, or adopts the one already pinned there.
    /// Mounts bpffs first when it is not mounted.
    pub fn open(pins: Pins) -> Result<Self> {
        ensure_bpffs(pins.root())?;
        if pins.prog(PROG_INGRESS).exists() {
            Self::adopt(pins)
        } else {
            Self::load(pins)
        }
    }

    fn load(pins: Pins) -> Result<Self> {
        for dir in [
            pins.root().to_path_buf(),
            pins.maps(),
            pins.progs(),
            pins.links(),
        ] {
            create_dir(&dir)?;
        }
        let clock = clock::calibrate().map_err(DataplaneError::Clock)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.maps())
            .override_global("NSFAIL_TICK_NS", &clock.tick_ns, true)
            .override_global("NSFAIL_JIFFY0_NS", &clock.jiffy0_ns, true)
            .load(EBPF_OBJECT)?;
        let mut programs = vec![
            (PROG_INGRESS, pins.prog(PROG_INGRESS)),
            (PROG_EGRESS, pins.prog(PROG_EGRESS)),
        ];
        programs.extend(TRACEPOINTS.iter().map(|(p, _)| (*p, pins.prog(p))));
        for (name, path) in programs.iter().rev() {
            let prog = ebpf
                .program_mut(name)
                .ok_or_else(|| DataplaneError::Invalid {
                    what: "eBPF object".into(),
                    why: format!("no program {name}"),
                })?;
            match prog {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                aya::programs::Program::RawTracePoint(p) => p.load(),
                _ => unreachable!("nsfail-ebpf has only XDP, TC and raw tracepoint programs"),
            }
            .map_err(prog_err(name))?;
            // Pinned egress first, ingress last: the ingress pin is what `open` takes as "a
            // data plane is here".
            prog.pin(path).map_err(|e| DataplaneError::Pin {
                path: path.display().to_string(),
                source: io::Error::other(e),
            })?;
        }
        let mut meta: Array<MapData, u32> = take_map(&mut ebpf, "META")?;
        meta.set(0, ABI_VERSION, 0).map_err(map_err("META"))?;
        info!(
            "loaded the data plane and pinned it at {}",
            pins.root().display()
        );
        // Everything is pinned: reopen it the way a later controller will.
        drop(ebpf);
        let mut dp = Self::adopt(pins)?;
        dp.adopted = false;
        Ok(dp)
    }

    /// Opens everything an earlier process pinned. Long because it opens each pinned map and
    /// program in turn, each with its own error naming it.
    fn adopt(pins: Pins) -> Result<Self> {
        let meta_map = open_pinned_map(&pins, "META")?;
        let meta: Array<MapData, u32> = meta_map.try_into().map_err(map_err("META"))?;
        let found = meta.get(&0, 0).map_err(map_err("META"))?;
        if found != ABI_VERSION {
            return Err(DataplaneError::AbiMismatch {
                dir: pins.root().display().to_string(),
                found,
                expected: ABI_VERSION,
            });
        }
        let xdp = Xdp::from_pin(pins.prog(PROG_INGRESS), XdpAttachType::Interface)
            .map_err(prog_err(PROG_INGRESS))?;
        let tc =
            SchedClassifier::from_pin(pins.prog(PROG_EGRESS)).map_err(prog_err(PROG_EGRESS))?;
        let devmap_id = MapData::from_pin(pins.map("TX_PORTS"))
            .and_then(|m| m.info())
            .map(|i| i.id())
            .map_err(map_err("TX_PORTS"))?;
        let mut trace_config: Array<MapData, TraceConfig> = open_pinned_map(&pins, "TRACE_CONFIG")?
            .try_into()
            .map_err(map_err("TRACE_CONFIG"))?;
        match trace_config_for(devmap_id) {
            Ok(cfg) => trace_config
                .set(0, cfg, 0)
                .map_err(map_err("TRACE_CONFIG"))?,
            // Forwarding works without it; only the count of refused redirects is lost.
            Err(e) => warn!(
                "redirects the kernel refuses cannot be counted (redirect_failed stays 0): {e}"
            ),
        }
        attach_tracepoints(&pins)?;
        info!("adopted the pinned data plane at {}", pins.root().display());
        macro_rules! typed {
            ($name:literal) => {
                open_pinned_map(&pins, $name)?
                    .try_into()
                    .map_err(map_err($name))?
            };
        }
        let encoders: HashMap<MapData, u32, EncoderInfo> = typed!("ENCODERS");
        let mut by_name = BTreeMap::new();
        for item in encoders.iter() {
            let (id, info) = item.map_err(map_err("ENCODERS"))?;
            by_name.insert(decode_name(&info.name), (id, info));
        }
        let channels = ChannelMaps {
            v4: typed!("CHANNELS_V4"),
            v6: typed!("CHANNELS_V6"),
        };
        let replies = typed!("REPLIES");
        let srt_peers = typed!("SRT_PEERS");
        let source_nets = typed!("SOURCE_NETS");
        let mut mirror = Mirror::load(&channels, &replies)?;
        mirror.load_options(&source_nets, &srt_peers)?;
        let stats_pin = pins.map("CHANNEL_STATS");
        let channel_stats_fd =
            sys::bpf_obj_get(&stats_pin).map_err(|source| DataplaneError::Pin {
                path: stats_pin.display().to_string(),
                source,
            })?;
        Ok(Self {
            by_name,
            mirror,
            channel_stats_fd,
            adopted: true,
            ingest: None,
            xdp,
            tc,
            channels,
            replies,
            sources: typed!("SOURCES"),
            srt_peers,
            source_nets,
            encoders,
            encoder_ifindex: typed!("ENCODER_IFINDEX"),
            policies: typed!("POLICIES"),
            tx_ports: typed!("TX_PORTS"),
            channel_stats: typed!("CHANNEL_STATS"),
            encoder_stats: typed!("ENCODER_STATS"),
            xdp_stats: typed!("XDP_STATS"),
            tc_stats: typed!("TC_STATS"),
            pins,
        })
    }

    /// Whether [`Dataplane::open`] found a pinned data plane and adopted it.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// The XDP ingest program (for `BPF_PROG_TEST_RUN` in tests and benchmarks).
    pub fn ingress_program(&self) -> &Xdp {
        &self.xdp
    }

    /// The TC return-path program (for `BPF_PROG_TEST_RUN` in tests and benchmarks).
    pub fn egress_program(&self) -> &SchedClassifier {
        &self.tc
    }

    /// Attaches the XDP program to the ingest NIC and pins the link. A link already pinned
    /// for this interface (adoption) is kept as it is, no gap in forwarding, when it is still
    /// attached to the interface that has this name now; a link left behind by an interface
    /// that was deleted (and perhaps re-created) is replaced. Returns whether it attached.
    pub fn attach_ingest(&mut self, ifname: &str, mode: XdpMode) -> Result<bool> {
        let link = netns::link(ifname).map_err(|source| DataplaneError::Interface {
            name: ifname.to_owned(),
            source,
        })?;
        let pin = self.pins.xdp_link(ifname);
        let attached = if live_link(&pin, link.ifindex)? {
            info!("XDP already attached to {ifname} (pinned link kept)");
            false
        } else {
            let try_mode = |xdp: &mut Xdp, m: AttachMode| xdp.attach_to_if_index(link.ifindex, m);
            let id = match mode {
                XdpMode::Native => try_mode(&mut self.xdp, AttachMode::Driver),
                XdpMode::Generic => try_mode(&mut self.xdp, AttachMode::Skb),
                XdpMode::Auto => try_mode(&mut self.xdp, AttachMode::Driver).or_else(|e| {
                    warn!("native XDP on {ifname} failed ({e}); falling back to generic mode");
                    try_mode(&mut self.xdp, AttachMode::Skb)
                }),
            }
            .map_err(|source| DataplaneError::Attach {
                ifname: ifname.to_owned(),
                mode,
                source,
            })?;
            let xdp_link = self.xdp.take_link(id).map_err(prog_err(PROG_INGRESS))?;
            let fd_link: FdLink = xdp_link.try_into().map_err(|e| DataplaneError::Link {
                path: pin.display().to_string(),
                source: e,
            })?;
            pin_link(fd_link, &pin)?;
            info!("XDP attached to {ifname} ({mode:?})");
            true
        };
        self.ingest = Some(Ingest {
            ifindex: link.ifindex,
            mac: link.mac,
        });
        Ok(attached)
    }

    /// Attaches the redirect tracepoints (the count of refused redirects) if they are not.
    /// Attached by [`Dataplane::open`]; this and [`Dataplane::detach_tracepoints`] exist so
    /// that a benchmark can measure what counting costs.
    pub fn attach_tracepoints(&self) -> Result<()> {
        attach_tracepoints(&self.pins)
    }

    /// Detaches the redirect tracepoints: refused redirects are no longer counted.
    pub fn detach_tracepoints(&self) -> Result<()> {
        for (_, tracepoint) in TRACEPOINTS {
            detach_pinned_link(&self.pins.trace_link(tracepoint))?;
        }
        Ok(())
    }

    /// Whether the XDP link pinned for `ifname` is attached to the interface that has that
    /// name now (false when the interface is gone, or was re-created). Changes nothing.
    pub fn ingest_attached(&self, ifname: &str) -> Result<bool> {
        pinned_to(&self.pins.xdp_link(ifname), ifname)
    }

    /// XDP outcomes by reason (`xdp_reason::NAMES`), summed over CPUs.
    pub fn xdp_stats(&self) -> Result<Vec<(&'static str, u64)>> {
        sum_reasons(&self.xdp_stats, &xdp_reason::NAMES, "XDP_STATS")
    }

    /// Packets the XDP program counted under one reason (`xdp_reason::*`), summed over CPUs.
    pub fn xdp_count(&self, reason: u32) -> Result<u64> {
        let v = self
            .xdp_stats
            .get(&reason, 0)
            .map_err(map_err("XDP_STATS"))?;
        Ok(v.iter().sum())
    }

    /// TC outcomes by reason (`tc_reason::NAMES`), summed over CPUs.
    pub fn tc_stats(&self) -> Result<Vec<(&'static str, u64)>> {
        sum_reasons(&self.tc_stats, &tc_reason::NAMES, "TC_STATS")
    }

    /// Detaches and unpins everything under `pins`, whether or not a `Dataplane` is open on
    /// it. Programs and maps go away once the last process holding them lets go.
    pub fn teardown(pins: &Pins) -> Result<()> {
        if !pins.root().exists() {
            return Ok(());
        }
        if pins.links().exists() {
            for entry in read_dir(&pins.links())? {
                detach_pinned_link(&entry.path())?;
            }
        }
        for dir in [pins.progs(), pins.maps()] {
            if dir.exists() {
                for entry in read_dir(&dir)? {
                    remove_file(&entry.path())?;
                }
            }
        }
        for dir in [
            pins.links(),
            pins.progs(),
            pins.maps(),
            pins.root().to_path_buf(),
        ] {
            if dir.exists() {
                fs::remove_dir(&dir).map_err(|source| DataplaneError::Bpffs {
                    path: dir.display().to_string(),
                    source,
                })?;
            }
        }
        info!("data plane at {} torn down", pins.root().display());
        Ok(())
    }
}

/// Mounts bpffs at /sys/fs/bpf when `dir` is not on one already.
pub(crate) fn ensure_bpffs(dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let bpffs = Path::new(crate::paths::BPFFS);
    let statfs = |p: &Path| nix::sys::statfs::statfs(p).map(|s| s.filesystem_type().0);
    if statfs(bpffs).ok() != Some(BPF_FS_MAGIC) {
        info!("mounting bpffs at {}", bpffs.display());
        nix::mount::mount(
            Some("bpf"),
            bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| DataplaneError::Bpffs {
            path: bpffs.display().to_string(),
            source: e.into(),
        })?;
    }
    if !dir.starts_with(bpffs) {
        return Err(DataplaneError::Bpffs {
            path: dir.display().to_string(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "pin directory is not on bpffs"),
        });
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|source| DataplaneError::Bpffs {
        path: dir.display().to_string(),
        source,
    })
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    fs::read_dir(dir)
        .and_then(|it| it.collect::<io::Result<Vec<_>>>())
        .map_err(|source| DataplaneError::Bpffs {
            path: dir.display().to_string(),
            source,
        })
}

fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DataplaneError::Bpffs {
            path: path.display().to_string(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// An attach error with its causes (aya's says only which call failed; the OS error is its
/// source), and what a busy interface most likely means.
fn attach_detail(e: &ProgramError) -> String {
    let mut out = e.to_string();
    let mut busy = false;
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        if let Some(io) = c.downcast_ref::<io::Error>() {
            busy |= io.raw_os_error() == Some(nix::libc::EBUSY);
        }
        cause = c.source();
    }
    if busy {
        out.push_str(
            " (another XDP program is attached to the interface: `ip link show` names it)",
        );
    }
    out
}
