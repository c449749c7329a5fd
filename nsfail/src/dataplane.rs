//! The one type that owns the kernel half of nsfail: every map, program and link.
//!
//! Lifecycle: [`Dataplane::open`] loads the eBPF object and pins it, or adopts what an earlier
//! process pinned (no reload, so forwarding never stops); [`Dataplane::attach_ingest`] puts
//! the XDP program on the ingest NIC; encoders and channels are then added, repointed and
//! removed; [`Dataplane::teardown`] detaches and unpins everything. Dropping a `Dataplane`
//! leaves the pinned data plane running.
//!
//! Failover is one atomic map write: `CHANNELS` is a HASH map whose whole value (the rewrite
//! target: encoder address, MACs, port, counter slots) is replaced by one `bpf_map_update_elem`;
//! the XDP program sees either the old or the new value, never a mix. An encoder's egress
//! policy is likewise one `POLICIES` value, replaced whole by [`Dataplane::set_policy`] while
//! the TC program stays attached.

use std::{
    collections::{BTreeMap, HashSet},
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMap, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{
        ProgramError, RawTracePoint, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError},
    },
    util::nr_cpus,
};
use aya_obj::programs::XdpAttachType;
use log::{info, warn};
use nsfail_common::{
    ABI_VERSION, ACTION_REDIRECT, ACTION_TX, ChannelStats, ChannelTarget, ENCODER_LOCAL,
    ENCODER_REMOTE, EncoderInfo, EncoderPolicy, EncoderStats, Endpoint, FAMILY_V4, FAMILY_V6,
    FlowStats, MAX_ALLOW_RULES, MAX_CHANNELS, MAX_ENCODERS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP, PolicyRule, REPLY_SRT, ReplyTarget, SourceInfo, SourceKey, SrtPeer, TraceConfig,
    drop_reason, tc_reason, xdp_reason,
};

use crate::{
    config::{AllowProto, AllowRule},
    netns,
    paths::Pins,
};

/// The eBPF object built by build.rs from nsfail-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nsfail"));

const PROG_INGRESS: &str = "nsfail_ingress";
const PROG_EGRESS: &str = "nsfail_egress";
/// The redirect tracepoints: (program, kernel tracepoint).
const TRACEPOINTS: [(&str, &str); 2] = [
    ("nsfail_devmap_xmit", "xdp_devmap_xmit"),
    ("nsfail_redirect_err", "xdp_redirect_err"),
];

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
    #[error("XDP attach to {ifname} in {mode:?} mode failed: {source}")]
    Attach {
        ifname: String,
        mode: XdpModeSetting,
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

/// How the XDP program attaches to the ingest NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpModeSetting {
    /// In the driver: fast, and required for redirecting into veths at full speed.
    Native,
    /// In the generic (skb) path: works on any device, slower.
    Generic,
    /// Native if the driver supports it, otherwise generic (logged).
    Auto,
}

/// How an encoder is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EncoderLink {
    /// Through a veth whose host side is `ifname` (in the namespace of the data plane): XDP
    /// redirects into it, and the TC return path is attached to it.
    Local { ifname: String },
    /// A host on the ingest NIC's segment: XDP sends the packet back out (XDP_TX).
    Remote,
}

/// What the data plane needs to know about an encoder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncoderSpec {
    pub name: String,
    /// Where the encoder receives.
    pub addr: IpAddr,
    /// The encoder's MAC (the inner veth peer's, or the remote host's).
    pub mac: [u8; 6],
    pub link: EncoderLink,
}

/// An encoder as the data plane has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncoderEntry {
    pub id: u32,
    pub name: String,
    pub addr: IpAddr,
    pub mac: [u8; 6],
    pub ifindex: u32,
    pub local: bool,
}

/// What an encoder may send out of its namespace besides ARP, neighbour discovery and replies
/// to its channels' sources (built from its config by the controller). Everything else is
/// dropped and counted by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Destinations it may reach; at most `MAX_ALLOW_RULES` (16), each of the encoder's
    /// address family.
    pub allow: Vec<AllowRule>,
    /// Its network health check: answers from this port pass, to any destination (the
    /// daemon probes from the ingest host).
    pub health: Option<HealthAnswers>,
}

/// The protocol and port an encoder answers health probes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthAnswers {
    /// `Udp` or `Tcp` (an HTTP check is TCP).
    pub proto: AllowProto,
    pub port: u16,
}

/// A channel as the data plane has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelEntry {
    pub id: u32,
    pub listen: SocketAddr,
    /// The active encoder's name.
    pub encoder: String,
    /// Encoder-side UDP port.
    pub port: u16,
}

/// A contribution source seen sending to a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceEntry {
    pub channel: SocketAddr,
    pub peer: SocketAddr,
    /// CLOCK_MONOTONIC nanoseconds, refreshed at most once a second.
    pub last_seen_ns: u64,
}

/// An SRT caller of a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrtPeerEntry {
    pub channel: SocketAddr,
    pub peer: SocketAddr,
    pub socket_id: u32,
    /// CLOCK_MONOTONIC nanoseconds.
    pub last_seen_ns: u64,
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
    channels: HashMap<MapData, Endpoint, ChannelTarget>,
    replies: HashMap<MapData, Endpoint, ReplyTarget>,
    sources: HashMap<MapData, SourceKey, SourceInfo>,
    srt_peers: HashMap<MapData, SourceKey, SrtPeer>,
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
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.maps())
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
        Ok(Self {
            by_name,
            adopted: true,
            ingest: None,
            xdp,
            tc,
            channels: typed!("CHANNELS"),
            replies: typed!("REPLIES"),
            sources: typed!("SOURCES"),
            srt_peers: typed!("SRT_PEERS"),
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
    pub fn attach_ingest(&mut self, ifname: &str, mode: XdpModeSetting) -> Result<bool> {
        let link = netns::link(ifname).map_err(|source| DataplaneError::Interface {
            name: ifname.to_owned(),
            source,
        })?;
        let pin = self.pins.xdp_link(ifname);
        let attached = if live_link(&pin, link.ifindex)? {
            info!("XDP already attached to {ifname} (pinned link kept)");
            false
        } else {
            let try_mode = |xdp: &mut Xdp, m: XdpMode| xdp.attach_to_if_index(link.ifindex, m);
            let id = match mode {
                XdpModeSetting::Native => try_mode(&mut self.xdp, XdpMode::Driver),
                XdpModeSetting::Generic => try_mode(&mut self.xdp, XdpMode::Skb),
                XdpModeSetting::Auto => try_mode(&mut self.xdp, XdpMode::Driver).or_else(|e| {
                    warn!("native XDP on {ifname} failed ({e}); falling back to generic mode");
                    try_mode(&mut self.xdp, XdpMode::Skb)
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
    /// name now (false when the interface is gone, or was re-created).
    pub fn ingest_attached(&self, ifname: &str) -> Result<bool> {
        match netns::link(ifname) {
            Ok(link) => live_link(&self.pins.xdp_link(ifname), link.ifindex),
            Err(_) => Ok(false),
        }
    }

    /// Whether encoder `name`'s TC link is attached to the interface `ifname` names now.
    pub fn egress_attached(&self, ifname: &str) -> Result<bool> {
        match netns::link(ifname) {
            Ok(link) => live_link(&self.pins.tc_link(ifname), link.ifindex),
            Err(_) => Ok(false),
        }
    }

    /// Adds an encoder, or replaces its address, MAC or link. Channels pointing at it are
    /// repointed to the new values (one map write each). Returns its id.
    pub fn upsert_encoder(&mut self, spec: &EncoderSpec) -> Result<u32> {
        let name_bytes = encode_name(&spec.name)?;
        let ingest = self.ingest.clone();
        let (ifindex, smac, kind) = match &spec.link {
            EncoderLink::Local { ifname } => {
                let l = netns::link(ifname).map_err(|source| DataplaneError::Interface {
                    name: ifname.clone(),
                    source,
                })?;
                (l.ifindex, l.mac, ENCODER_LOCAL)
            }
            EncoderLink::Remote => {
                let ingest = ingest.ok_or(DataplaneError::NoIngest)?;
                (ingest.ifindex, ingest.mac, ENCODER_REMOTE)
            }
        };
        let (family, addr) = ip_bytes(spec.addr);
        let info = EncoderInfo {
            name: name_bytes,
            addr,
            mac: spec.mac,
            smac,
            ifindex,
            family,
            kind,
            _pad: [0; 2],
        };
        let existing = self.encoder_id(&spec.name)?;
        let mut old_info = None;
        if let Some(id) = existing {
            let old = self.encoders.get(&id, 0).map_err(map_err("ENCODERS"))?;
            old_info = Some(old);
            if old.family != family {
                // Channels are bound to an address family: refuse rather than break them.
                if let Some(ch) = self.channels_using(id)?.first() {
                    return Err(DataplaneError::EncoderInUse {
                        encoder: spec.name.clone(),
                        channel: *ch,
                    });
                }
            }
        }
        let id = match existing {
            Some(id) => id,
            None => {
                let used: HashSet<u32> = self.encoder_list()?.iter().map(|e| e.id).collect();
                let id = (0..MAX_ENCODERS)
                    .find(|i| !used.contains(i))
                    .ok_or(DataplaneError::Full("encoder"))?;
                zero_slot(&mut self.encoder_stats, id, "ENCODER_STATS")?;
                id
            }
        };
        if let EncoderLink::Local { ifname } = &spec.link {
            self.attach_egress(ifname)?;
            self.tx_ports
                .set(id, ifindex, None, 0)
                .map_err(|e| DataplaneError::Invalid {
                    what: "TX_PORTS".into(),
                    why: e.to_string(),
                })?;
        } else {
            // A remote encoder is reached by XDP_TX: no DEVMAP entry.
            let _ = self.tx_ports.set(id, 0, None, 0);
        }
        self.encoders
            .insert(id, info, 0)
            .map_err(map_err("ENCODERS"))?;
        self.by_name.insert(spec.name.clone(), (id, info));
        self.index_encoder(id, old_info.as_ref(), &info)?;
        // Repoint channels whose target is this encoder (its MAC or address may have changed).
        for (key, target) in self.channel_targets()? {
            if target.encoder_id == id {
                let t = target_for(&info, id, target.channel_id, target.port);
                self.channels
                    .insert(key, t, 0)
                    .map_err(map_err("CHANNELS"))?;
            }
        }
        Ok(id)
    }

    /// Removes an encoder. Refused while a channel is forwarded to it or lists it as a backup
    /// (its replies are still expected).
    pub fn remove_encoder(&mut self, name: &str) -> Result<()> {
        let id = self
            .encoder_id(name)?
            .ok_or_else(|| DataplaneError::UnknownEncoder(name.to_owned()))?;
        if let Some(ch) = self.channels_using(id)?.first() {
            return Err(DataplaneError::EncoderInUse {
                encoder: name.to_owned(),
                channel: *ch,
            });
        }
        let info = self.encoders.get(&id, 0).map_err(map_err("ENCODERS"))?;
        self.encoders.remove(&id).map_err(map_err("ENCODERS"))?;
        self.by_name.remove(name);
        let _ = self.tx_ports.set(id, 0, None, 0);
        if info.kind == ENCODER_LOCAL {
            if let Some(ifname) = ifname_of(info.ifindex) {
                self.detach_egress(&ifname)?;
            }
            // The veth may be gone already; remove any pinned TC link that names it.
            self.remove_stale_tc_links()?;
            self.unindex_ifindex(info.ifindex, id)?;
        }
        remove_missing_ok(&mut self.policies, &id, "POLICIES")
    }

    /// Replaces an encoder's egress policy: one HASH map update, so the TC program sees the
    /// old policy or the new one, never a mix, and stays attached. The encoder's own address
    /// (the only source it may use) is its registered address. Refused, leaving the old
    /// policy in place, when the allow-list has more than `MAX_ALLOW_RULES` rules or a rule
    /// of the other address family, or the health protocol is not UDP or TCP.
    pub fn set_policy(&mut self, encoder: &str, policy: &EgressPolicy) -> Result<()> {
        let id = self
            .encoder_id(encoder)?
            .ok_or_else(|| DataplaneError::UnknownEncoder(encoder.to_owned()))?;
        let info = self.encoders.get(&id, 0).map_err(map_err("ENCODERS"))?;
        let value = policy_value(encoder, &info, policy)?;
        self.policies
            .insert(id, value, 0)
            .map_err(map_err("POLICIES"))
    }

    /// An encoder's egress-policy drops by reason (`drop_reason::NAMES`), summed over CPUs.
    pub fn encoder_drops(&self, name: &str) -> Result<Vec<(&'static str, u64)>> {
        let stats = self.encoder_stats(name)?;
        Ok(drop_reason::NAMES.into_iter().zip(stats.drops).collect())
    }

    /// Keeps `ENCODER_IFINDEX` and the encoder's policy in line with its registration: the TC
    /// program finds a local encoder by its veth, and judges sources by its address.
    fn index_encoder(
        &mut self,
        id: u32,
        old: Option<&EncoderInfo>,
        info: &EncoderInfo,
    ) -> Result<()> {
        if let Some(old) = old
            && old.kind == ENCODER_LOCAL
            && (info.kind != ENCODER_LOCAL || old.ifindex != info.ifindex)
        {
            self.unindex_ifindex(old.ifindex, id)?;
        }
        if info.kind == ENCODER_LOCAL {
            self.encoder_ifindex
                .insert(info.ifindex, id, 0)
                .map_err(map_err("ENCODER_IFINDEX"))?;
        }
        if let Ok(mut policy) = self.policies.get(&id, 0)
            && (policy.addr != info.addr || policy.family != info.family)
        {
            policy.addr = info.addr;
            policy.family = info.family;
            self.policies
                .insert(id, policy, 0)
                .map_err(map_err("POLICIES"))?;
        }
        Ok(())
    }

    /// Removes the `ENCODER_IFINDEX` entry of `ifindex` if it still names encoder `id`.
    fn unindex_ifindex(&mut self, ifindex: u32, id: u32) -> Result<()> {
        if self.encoder_ifindex.get(&ifindex, 0).ok() == Some(id) {
            remove_missing_ok(&mut self.encoder_ifindex, &ifindex, "ENCODER_IFINDEX")?;
        }
        Ok(())
    }

    /// Adds or replaces a channel: packets to `listen` go to `active` on `port`, and replies
    /// from any of `members` (the active encoder and its backups) on `port` are returned from
    /// `listen`. For an `srt` channel the return path also learns each caller's SRT socket ID
    /// ([`Dataplane::srt_peers`]). The CHANNELS write comes last, so the channel forwards only
    /// once its return path is in place.
    pub fn set_channel(
        &mut self,
        listen: SocketAddr,
        port: u16,
        active: &str,
        members: &[&str],
        srt: bool,
    ) -> Result<u32> {
        let ingest = self.ingest.clone().ok_or(DataplaneError::NoIngest)?;
        validate_endpoint(listen)?;
        if port == 0 {
            return Err(DataplaneError::Invalid {
                what: format!("channel {listen}"),
                why: "encoder-side port 0".into(),
            });
        }
        let key = endpoint(listen);
        let mut ids = Vec::new();
        for name in members.iter().chain(std::iter::once(&active)) {
            let (id, info) = self.encoder_checked(name, listen)?;
            ids.push((name.to_string(), id, info));
        }
        let (active_id, active_info) = {
            let (_, id, info) = ids.last().expect("active is always present");
            (*id, *info)
        };
        // Check every reply key before writing any.
        for (name, _, info) in &ids {
            let rkey = reply_key(info, port);
            if let Ok(other) = self.replies.get(&rkey, 0)
                && other.ingest != key
            {
                return Err(DataplaneError::PortConflict {
                    encoder: name.clone(),
                    port,
                    other: socket_addr(&other.ingest),
                });
            }
        }
        let previous = self.channels.get(&key, 0).ok();
        let channel_id = match previous {
            Some(t) => t.channel_id,
            None => {
                let used: HashSet<u32> = self
                    .channel_targets()?
                    .iter()
                    .map(|(_, t)| t.channel_id)
                    .collect();
                let id = (0..MAX_CHANNELS)
                    .find(|i| !used.contains(i))
                    .ok_or(DataplaneError::Full("channel"))?;
                zero_slot(&mut self.channel_stats, id, "CHANNEL_STATS")?;
                id
            }
        };
        // Replies of encoders no longer listed (or on another port) stop being rewritten.
        let wanted: HashSet<Endpoint> = ids.iter().map(|(_, _, i)| reply_key(i, port)).collect();
        for (rkey, rt) in self.reply_entries()? {
            if rt.ingest == key && !wanted.contains(&rkey) {
                self.replies.remove(&rkey).map_err(map_err("REPLIES"))?;
            }
        }
        for (_, id, info) in &ids {
            let rt = ReplyTarget {
                ingest: key,
                channel_id,
                encoder_id: *id,
                ifindex: ingest.ifindex,
                flags: if srt { REPLY_SRT } else { 0 },
            };
            self.replies
                .insert(reply_key(info, port), rt, 0)
                .map_err(map_err("REPLIES"))?;
        }
        let target = target_for(&active_info, active_id, channel_id, port);
        self.channels
            .insert(key, target, 0)
            .map_err(map_err("CHANNELS"))?;
        Ok(channel_id)
    }

    /// Points an existing channel at another encoder: the failover. One HASH map update.
    pub fn activate(&mut self, listen: SocketAddr, encoder: &str) -> Result<()> {
        let key = endpoint(listen);
        let current = self
            .channels
            .get(&key, 0)
            .map_err(|_| DataplaneError::UnknownChannel(listen))?;
        let (id, info) = self.encoder_checked(encoder, listen)?;
        let target = target_for(&info, id, current.channel_id, current.port);
        self.channels
            .insert(key, target, 0)
            .map_err(map_err("CHANNELS"))
    }

    /// Removes a channel: forwarding stops first, then its return path.
    pub fn remove_channel(&mut self, listen: SocketAddr) -> Result<()> {
        let key = endpoint(listen);
        let current = self
            .channels
            .get(&key, 0)
            .map_err(|_| DataplaneError::UnknownChannel(listen))?;
        self.channels.remove(&key).map_err(map_err("CHANNELS"))?;
        for (rkey, rt) in self.reply_entries()? {
            if rt.ingest == key {
                self.replies.remove(&rkey).map_err(map_err("REPLIES"))?;
            }
        }
        let stale: Vec<SourceKey> = self
            .sources
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.channel_id == current.channel_id)
            .collect();
        for k in stale {
            let _ = self.sources.remove(&k);
            let _ = self.srt_peers.remove(&k);
        }
        Ok(())
    }

    /// Each channel's ingest address by channel id (the key of SOURCES and SRT_PEERS).
    fn listen_by_id(&self) -> Result<BTreeMap<u32, SocketAddr>> {
        Ok(self
            .channel_targets()?
            .into_iter()
            .map(|(k, t)| (t.channel_id, socket_addr(&k)))
            .collect())
    }

    /// SRT callers of SRT channels, with the socket ID their listener last addressed them by.
    pub fn srt_peers(&self) -> Result<Vec<SrtPeerEntry>> {
        let by_id = self.listen_by_id()?;
        let mut out = Vec::new();
        for item in self.srt_peers.iter() {
            let (k, v) = item.map_err(map_err("SRT_PEERS"))?;
            if let Some(channel) = by_id.get(&k.channel_id) {
                out.push(SrtPeerEntry {
                    channel: *channel,
                    peer: socket_addr(&k.peer),
                    socket_id: v.socket_id,
                    last_seen_ns: v.last_seen_ns,
                });
            }
        }
        out.sort_by_key(|p| (p.channel, p.peer));
        Ok(out)
    }

    pub fn encoders(&self) -> Result<Vec<EncoderEntry>> {
        self.encoder_list()
    }

    pub fn channels(&self) -> Result<Vec<ChannelEntry>> {
        let names: BTreeMap<u32, String> = self
            .encoder_list()?
            .into_iter()
            .map(|e| (e.id, e.name))
            .collect();
        let mut out: Vec<ChannelEntry> = self
            .channel_targets()?
            .into_iter()
            .map(|(k, t)| ChannelEntry {
                id: t.channel_id,
                listen: socket_addr(&k),
                encoder: names.get(&t.encoder_id).cloned().unwrap_or_default(),
                port: t.port,
            })
            .collect();
        out.sort_by_key(|c| c.listen);
        Ok(out)
    }

    /// Sources seen sending to channels.
    pub fn sources(&self) -> Result<Vec<SourceEntry>> {
        let by_id = self.listen_by_id()?;
        let mut out = Vec::new();
        for item in self.sources.iter() {
            let (k, v) = item.map_err(map_err("SOURCES"))?;
            if let Some(channel) = by_id.get(&k.channel_id) {
                out.push(SourceEntry {
                    channel: *channel,
                    peer: socket_addr(&k.peer),
                    last_seen_ns: v.last_seen_ns,
                });
            }
        }
        Ok(out)
    }

    /// A channel's input counters, summed over CPUs.
    pub fn channel_stats(&self, listen: SocketAddr) -> Result<FlowStats> {
        let t = self
            .channels
            .get(&endpoint(listen), 0)
            .map_err(|_| DataplaneError::UnknownChannel(listen))?;
        let per_cpu = self
            .channel_stats
            .get(&t.channel_id, 0)
            .map_err(map_err("CHANNEL_STATS"))?;
        let mut sum = FlowStats::default();
        per_cpu.iter().for_each(|s| sum.merge(&s.flow));
        Ok(sum)
    }

    /// An encoder's counters, summed over CPUs.
    pub fn encoder_stats(&self, name: &str) -> Result<EncoderStats> {
        let id = self
            .encoder_id(name)?
            .ok_or_else(|| DataplaneError::UnknownEncoder(name.to_owned()))?;
        let per_cpu = self
            .encoder_stats
            .get(&id, 0)
            .map_err(map_err("ENCODER_STATS"))?;
        let mut sum = EncoderStats::default();
        per_cpu.iter().for_each(|s| sum.merge(s));
        Ok(sum)
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

    /// Attaches the TC program to `ifname` unless the link pinned for it is attached to the
    /// interface of that name now; a link left by a deleted interface is replaced.
    fn attach_egress(&mut self, ifname: &str) -> Result<()> {
        let pin = self.pins.tc_link(ifname);
        let ifindex = netns::link(ifname)
            .map_err(|source| DataplaneError::Interface {
                name: ifname.to_owned(),
                source,
            })?
            .ifindex;
        if live_link(&pin, ifindex)? {
            return Ok(());
        }
        let id = self
            .tc
            .attach(ifname, TcAttachType::Ingress)
            .map_err(prog_err(PROG_EGRESS))?;
        let link = self.tc.take_link(id).map_err(prog_err(PROG_EGRESS))?;
        let fd_link: FdLink = link.try_into().map_err(|e| DataplaneError::Link {
            path: pin.display().to_string(),
            source: e,
        })?;
        pin_link(fd_link, &pin)
    }

    fn detach_egress(&mut self, ifname: &str) -> Result<()> {
        let pin = self.pins.tc_link(ifname);
        if !pin.exists() {
            return Ok(());
        }
        detach_pinned_link(&pin)
    }

    /// TC link pins whose veth no longer exists (removed with its namespace).
    fn remove_stale_tc_links(&mut self) -> Result<()> {
        for entry in read_dir(&self.pins.links())? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(ifname) = name.strip_prefix("tc_")
                && netns::link(ifname).is_err()
            {
                self.detach_egress(ifname)?;
            }
        }
        Ok(())
    }

    fn encoder_list(&self) -> Result<Vec<EncoderEntry>> {
        let mut out = Vec::new();
        for item in self.encoders.iter() {
            let (id, info) = item.map_err(map_err("ENCODERS"))?;
            out.push(EncoderEntry {
                id,
                name: decode_name(&info.name),
                addr: ip_addr(info.family, &info.addr),
                mac: info.mac,
                ifindex: info.ifindex,
                local: info.kind == ENCODER_LOCAL,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn encoder_id(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.by_name.get(name).map(|(id, _)| *id))
    }

    /// An encoder by name, checked to be of the channel's address family.
    fn encoder_checked(&self, name: &str, channel: SocketAddr) -> Result<(u32, EncoderInfo)> {
        let (id, info) = *self
            .by_name
            .get(name)
            .ok_or_else(|| DataplaneError::UnknownEncoder(name.to_owned()))?;
        let (family, _) = ip_bytes(channel.ip());
        if info.family != family {
            return Err(DataplaneError::FamilyMismatch {
                encoder: name.to_owned(),
                encoder_family: if info.family == FAMILY_V4 {
                    "IPv4"
                } else {
                    "IPv6"
                },
                channel,
            });
        }
        Ok((id, info))
    }

    fn channel_targets(&self) -> Result<Vec<(Endpoint, ChannelTarget)>> {
        self.channels
            .iter()
            .map(|r| r.map_err(map_err("CHANNELS")))
            .collect()
    }

    fn reply_entries(&self) -> Result<Vec<(Endpoint, ReplyTarget)>> {
        self.replies
            .iter()
            .map(|r| r.map_err(map_err("REPLIES")))
            .collect()
    }

    /// Channels forwarded to encoder `id` or expecting its replies.
    fn channels_using(&self, id: u32) -> Result<Vec<SocketAddr>> {
        let mut out: Vec<SocketAddr> = self
            .channel_targets()?
            .iter()
            .filter(|(_, t)| t.encoder_id == id)
            .map(|(k, _)| socket_addr(k))
            .collect();
        out.extend(
            self.reply_entries()?
                .iter()
                .filter(|(_, r)| r.encoder_id == id)
                .map(|(_, r)| socket_addr(&r.ingest)),
        );
        out.sort();
        out.dedup();
        Ok(out)
    }
}

fn target_for(info: &EncoderInfo, encoder_id: u32, channel_id: u32, port: u16) -> ChannelTarget {
    ChannelTarget {
        addr: info.addr,
        dmac: info.mac,
        smac: info.smac,
        port,
        action: if info.kind == ENCODER_LOCAL {
            ACTION_REDIRECT
        } else {
            ACTION_TX
        },
        _pad: 0,
        channel_id,
        encoder_id,
    }
}

/// The `POLICIES` value of an encoder: `policy` checked against the encoder's registration.
fn policy_value(name: &str, info: &EncoderInfo, policy: &EgressPolicy) -> Result<EncoderPolicy> {
    if policy.allow.len() > MAX_ALLOW_RULES {
        return Err(DataplaneError::TooManyRules {
            encoder: name.to_owned(),
            count: policy.allow.len(),
            max: MAX_ALLOW_RULES,
        });
    }
    let (health_proto, health_port) = match policy.health {
        None => (0, 0),
        Some(HealthAnswers { port: 0, .. }) => {
            return Err(DataplaneError::Invalid {
                what: format!("egress policy of encoder {name:?}"),
                why: "health-check port 0".into(),
            });
        }
        Some(HealthAnswers {
            proto: AllowProto::Udp,
            port,
        }) => (PROTO_UDP, port),
        Some(HealthAnswers {
            proto: AllowProto::Tcp,
            port,
        }) => (PROTO_TCP, port),
        Some(HealthAnswers {
            proto: AllowProto::Icmp,
            ..
        }) => {
            return Err(DataplaneError::Invalid {
                what: format!("egress policy of encoder {name:?}"),
                why: "health answers are UDP or TCP, not ICMP".into(),
            });
        }
    };
    let mut value = EncoderPolicy {
        addr: info.addr,
        family: info.family,
        health_proto,
        health_port,
        n_rules: policy.allow.len() as u32,
        ..Default::default()
    };
    for (slot, rule) in value.rules.iter_mut().zip(&policy.allow) {
        *slot = policy_rule(name, info.family, rule)?;
    }
    Ok(value)
}

fn policy_rule(name: &str, family: u8, rule: &AllowRule) -> Result<PolicyRule> {
    let (rule_family, net) = ip_bytes(rule.network);
    let invalid = |why: String| DataplaneError::Invalid {
        what: format!("allow rule {} of encoder {name:?}", describe_rule(rule)),
        why,
    };
    if rule_family != family {
        let fam = |f: u8| if f == FAMILY_V4 { "IPv4" } else { "IPv6" };
        return Err(invalid(format!(
            "an {} rule for an {} encoder can never match (its other traffic counts as forged)",
            fam(rule_family),
            fam(family)
        )));
    }
    let width = if family == FAMILY_V4 { 32 } else { 128 };
    if rule.prefix_len > width {
        return Err(invalid(format!("prefix longer than {width} bits")));
    }
    let mut mask = [0u8; 16];
    for (i, m) in mask.iter_mut().enumerate() {
        let bits = usize::from(rule.prefix_len).saturating_sub(i * 8).min(8);
        *m = (0xff00u16 >> bits) as u8;
    }
    let mut net_masked = net;
    for (n, m) in net_masked.iter_mut().zip(mask) {
        *n &= m;
    }
    let proto = match (rule.proto, family) {
        (AllowProto::Udp, _) => PROTO_UDP,
        (AllowProto::Tcp, _) => PROTO_TCP,
        (AllowProto::Icmp, FAMILY_V4) => PROTO_ICMP,
        (AllowProto::Icmp, _) => PROTO_ICMPV6,
    };
    let (port_min, port_max) = match &rule.ports {
        // ICMP has no ports: the program matches it as port 0.
        _ if rule.proto == AllowProto::Icmp => (0, u16::MAX),
        Some(range) if range.is_empty() => return Err(invalid("empty port range".into())),
        Some(range) => (*range.start(), *range.end()),
        None => (0, u16::MAX),
    };
    Ok(PolicyRule {
        net: net_masked,
        mask,
        port_min,
        port_max,
        proto,
        family,
        _pad: [0; 2],
    })
}

/// A rule as the config spells it, for messages.
fn describe_rule(rule: &AllowRule) -> String {
    let proto = match rule.proto {
        AllowProto::Udp => "udp",
        AllowProto::Tcp => "tcp",
        AllowProto::Icmp => "icmp",
    };
    let net = format!("{}/{}", rule.network, rule.prefix_len);
    match &rule.ports {
        None => format!("{net}/{proto}"),
        Some(p) if rule.network.is_ipv6() => {
            format!("[{net}]:{}-{}/{proto}", p.start(), p.end())
        }
        Some(p) => format!("{net}:{}-{}/{proto}", p.start(), p.end()),
    }
}

fn reply_key(info: &EncoderInfo, port: u16) -> Endpoint {
    Endpoint {
        addr: info.addr,
        port,
        family: info.family,
        _pad: 0,
    }
}

fn validate_endpoint(listen: SocketAddr) -> Result<()> {
    let why = if listen.port() == 0 {
        Some("port 0")
    } else if listen.ip().is_unspecified() {
        Some("unspecified address")
    } else if listen.ip().is_multicast() {
        Some("multicast address")
    } else {
        None
    };
    match why {
        Some(why) => Err(DataplaneError::Invalid {
            what: format!("ingest address {listen}"),
            why: why.into(),
        }),
        None => Ok(()),
    }
}

/// The key of a socket address.
pub fn endpoint(addr: SocketAddr) -> Endpoint {
    match addr.ip() {
        IpAddr::V4(a) => Endpoint::v4(a.octets(), addr.port()),
        IpAddr::V6(a) => Endpoint::v6(a.octets(), addr.port()),
    }
}

/// The socket address of a key.
pub fn socket_addr(e: &Endpoint) -> SocketAddr {
    SocketAddr::new(ip_addr(e.family, &e.addr), e.port)
}

fn ip_bytes(ip: IpAddr) -> (u8, [u8; 16]) {
    match ip {
        IpAddr::V4(a) => (FAMILY_V4, Endpoint::v4(a.octets(), 0).addr),
        IpAddr::V6(a) => (FAMILY_V6, a.octets()),
    }
}

fn ip_addr(family: u8, addr: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V6 {
        IpAddr::V6(Ipv6Addr::from(*addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    }
}

fn encode_name(name: &str) -> Result<[u8; 32]> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > 31 || bytes.contains(&0) {
        return Err(DataplaneError::Invalid {
            what: format!("encoder name {name:?}"),
            why: "must be 1 to 31 bytes, without NUL".into(),
        });
    }
    let mut out = [0u8; 32];
    out[..bytes.len()].copy_from_slice(bytes);
    Ok(out)
}

fn decode_name(raw: &[u8; 32]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn ifname_of(ifindex: u32) -> Option<String> {
    nix::net::if_::if_indextoname(ifindex)
        .ok()
        .map(|n| n.to_string_lossy().into_owned())
}

fn zero_slot<T: aya::Pod + Default>(
    map: &mut PerCpuArray<MapData, T>,
    index: u32,
    name: &str,
) -> Result<()> {
    let cpus = nr_cpus().map_err(|(_, e)| DataplaneError::Invalid {
        what: "possible CPUs".into(),
        why: e.to_string(),
    })?;
    let zeros =
        PerCpuValues::try_from(vec![T::default(); cpus]).map_err(|e| DataplaneError::Invalid {
            what: "per-CPU values".into(),
            why: e.to_string(),
        })?;
    map.set(index, zeros, 0).map_err(map_err(name))
}

fn sum_reasons(
    map: &PerCpuArray<MapData, u64>,
    names: &[&'static str],
    map_name: &str,
) -> Result<Vec<(&'static str, u64)>> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let v = map.get(&(i as u32), 0).map_err(map_err(map_name))?;
            Ok((*name, v.iter().sum()))
        })
        .collect()
}

/// Removes `key` from a HASH map; a key that is not there is not an error.
fn remove_missing_ok<V: aya::Pod>(
    map: &mut HashMap<MapData, u32, V>,
    key: &u32,
    name: &str,
) -> Result<()> {
    match map.remove(key) {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map_err(map_err(name)),
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| DataplaneError::Invalid {
        what: "eBPF object".into(),
        why: format!("no map {name}"),
    })?;
    T::try_from(map).map_err(map_err(name))
}

fn open_pinned_map(pins: &Pins, name: &str) -> Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

/// Detaches the link pinned at `path` now and removes the pin.
///
/// Closing the last descriptor is not enough: a process forked by any thread at that moment
/// holds a copy of every descriptor until it execs, which would keep the link attached and
/// make an attach that follows fail with EEXIST. `BPF_LINK_DETACH` detaches whoever holds it.
fn detach_pinned_link(path: &Path) -> Result<()> {
    let pin_err = |source: io::Error| DataplaneError::Pin {
        path: path.display().to_string(),
        source,
    };
    match bpf_obj_get(path) {
        // A link whose device went away with its namespace detaches again without error.
        Ok(fd) => match bpf_link_detach(&fd) {
            // Tracepoint links have no detach: unpinning ends them once nobody holds them.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(e) => warn!("{}: detach: {e}; unpinning it", path.display()),
            Ok(()) => {}
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => warn!("{}: {e}; removing the pin", path.display()),
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(pin_err(e)),
        _ => Ok(()),
    }
}

/// Whether the link pinned at `pin` is attached to interface `ifindex`. A pinned link that
/// is attached nowhere (its interface was deleted) or to another interface (one re-created
/// under the same name has a new index) is detached and unpinned, so that the caller attaches
/// afresh.
fn live_link(pin: &Path, ifindex: u32) -> Result<bool> {
    match link_ifindex(pin)? {
        None => Ok(false),
        Some(i) if i == ifindex => Ok(true),
        Some(i) => {
            warn!(
                "{}: attached to interface index {i}, not {ifindex} (the interface was \
                 re-created): replacing it",
                pin.display()
            );
            detach_pinned_link(pin)?;
            Ok(false)
        }
    }
}

/// The interface index an XDP or TCX link pinned at `pin` is attached to (0 once its
/// interface is gone), or `None` when nothing is pinned there.
fn link_ifindex(pin: &Path) -> Result<Option<u32>> {
    let fd = match bpf_obj_get(pin) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DataplaneError::Pin {
                path: pin.display().to_string(),
                source,
            });
        }
    };
    let info = bpf_link_info(&fd).map_err(|source| DataplaneError::Pin {
        path: pin.display().to_string(),
        source,
    })?;
    // `struct bpf_link_info`: type, id, prog_id, padding, then the per-type union, whose
    // `xdp.ifindex` and `tcx.ifindex` both come first.
    Ok(Some(u32::from_ne_bytes([
        info[16], info[17], info[18], info[19],
    ])))
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link: the first 32 bytes of its `struct bpf_link_info`.
fn bpf_link_info(link: &std::os::fd::OwnedFd) -> io::Result<[u8; 32]> {
    use std::os::fd::AsRawFd;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = [0u8; 32];
    let attr = InfoByFd {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` is the `info` member of `bpf_attr`; the kernel writes at most
    // `info_len` bytes to `info`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoByFd,
            size_of::<InfoByFd>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// What the redirect tracepoints need: this namespace's cookie, the DEVMAP's id, and the
/// struct offsets of the running kernel.
fn trace_config_for(devmap_id: u32) -> std::result::Result<TraceConfig, String> {
    let btf = crate::btf::Btf::kernel().map_err(|e| e.to_string())?;
    let offset = |s: &str, m: &str| btf.offset(s, m).map_err(|e| e.to_string());
    Ok(TraceConfig {
        netns_cookie: netns_cookie().map_err(|e| format!("network namespace cookie: {e}"))?,
        devmap_id,
        off_ifindex: offset("net_device", "ifindex")?,
        off_nd_net: offset("net_device", "nd_net.net")?,
        off_net_cookie: offset("net", "net_cookie")?,
    })
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14).
fn netns_cookie() -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Attaches each redirect tracepoint whose link is not pinned yet, and pins its link.
fn attach_tracepoints(pins: &Pins) -> Result<()> {
    for (prog, tracepoint) in TRACEPOINTS {
        let pin = pins.trace_link(tracepoint);
        if pin.exists() {
            continue;
        }
        let mut tp = RawTracePoint::from_pin(pins.prog(prog)).map_err(prog_err(prog))?;
        let id = tp.attach(tracepoint).map_err(prog_err(prog))?;
        let link: FdLink = tp.take_link(id).map_err(prog_err(prog))?.into();
        pin_link(link, &pin)?;
    }
    Ok(())
}

/// `BPF_OBJ_GET`: a descriptor for the object pinned at `path`.
fn bpf_obj_get(path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    const BPF_OBJ_GET: libc::c_long = 7;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let attr = ObjGet {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for BPF_OBJ_GET and outlives the call;
    // the kernel reads `size_of::<ObjGet>()` bytes and treats the rest as zero.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            size_of::<ObjGet>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// `BPF_LINK_DETACH` on a link descriptor.
fn bpf_link_detach(link: &std::os::fd::OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let link_fd = link.as_raw_fd() as u32;
    // SAFETY: `link_fd` is the `link_detach` member of `bpf_attr`; it outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &link_fd as *const u32,
            size_of::<u32>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn pin_link(link: FdLink, path: &Path) -> Result<()> {
    link.pin(path).map_err(|e| DataplaneError::Pin {
        path: path.display().to_string(),
        source: io::Error::other(e),
    })?;
    Ok(())
}

/// Mounts bpffs at /sys/fs/bpf when `dir` is not on one already.
fn ensure_bpffs(dir: &Path) -> Result<()> {
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
