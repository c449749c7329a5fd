//! Map keys, values and limits shared by the kernel programs and the userspace [`Dataplane`].
//!
//! Layout rules: `#[repr(C)]`, explicit padding, no `bool`/`Option`/enums across the boundary,
//! and a size assertion for each type so that a change on one side cannot go unnoticed.
//!
//! [`Dataplane`]: ../nsfail/dataplane/struct.Dataplane.html

/// Version of the map layout below. Stored in `META[0]`; a controller adopts pinned maps only
/// when the version matches, and otherwise asks for a teardown.
pub const ABI_VERSION: u32 = 11;

/// Address family values used in keys (not the kernel's `AF_*`, which differ per platform).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// How many channels the maps hold. Also the size of the per-channel counter array.
pub const MAX_CHANNELS: u32 = 131_072;
/// How many encoders the maps hold; encoder ids are `0..MAX_ENCODERS` and index the DEVMAP.
pub const MAX_ENCODERS: u32 = 4096;
/// How many (channel, source) pairs the return path remembers (LRU): two per channel, so that
/// a full channel table does not evict on every packet.
pub const MAX_SOURCES: u32 = 2 * MAX_CHANNELS;
/// How many SRT callers one channel remembers at most ([`SrtPeers::slots`]); a channel's own
/// limit (`srt_peer_limit` in the config) is at most this.
pub const MAX_SRT_PEERS_PER_CHANNEL: usize = 16;
/// The per-channel SRT caller limit when the config does not give one.
pub const DEFAULT_SRT_PEER_LIMIT: u32 = 8;
/// How many source prefixes (`sources` of all channels together) the data plane holds.
pub const MAX_SOURCE_NETS: u32 = 65_536;

/// What the XDP program does with a matched packet after rewriting it.
pub const ACTION_REDIRECT: u8 = 1;
/// Send it back out of the ingest NIC (a remote encoder on the same segment).
pub const ACTION_TX: u8 = 2;
/// Send it back out of the ingest NIC (the uplink) to the next hop towards an encoder on
/// another host (`ENCODER_ROUTED`), whose MAC userspace resolved through the kernel's FIB and
/// neighbour table: cross-host forwarding in a cluster. Counted as `ROUTED`.
pub const ACTION_ROUTED: u8 = 3;

/// Encoder kinds in [`EncoderInfo::kind`].
pub const ENCODER_LOCAL: u8 = 1;
pub const ENCODER_REMOTE: u8 = 2;
/// An encoder on another host, reached through the ingest host's routing table.
pub const ENCODER_ROUTED: u8 = 3;

/// An IP address and UDP port. IPv4 addresses use the first 4 bytes of `addr`, the rest zero.
/// `port` is in host byte order. Aligned to 4 bytes, so that the XDP program compares and
/// copies it a word at a time (byte arrays alone are loaded byte by byte).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Endpoint>() == 20);

impl Endpoint {
    pub const fn v4(addr: [u8; 4], port: u16) -> Self {
        Self::v4_word(u32::from_ne_bytes(addr), port)
    }

    /// [`Endpoint::v4`] from the address as one word (its bytes in memory order): built and
    /// kept in one register, where four bytes would be four.
    #[inline(always)]
    pub const fn v4_word(addr: u32, port: u16) -> Self {
        let p = port.to_ne_bytes();
        let words = [
            addr,
            0,
            0,
            0,
            u32::from_ne_bytes([p[0], p[1], FAMILY_V4, 0]),
        ];
        // SAFETY: Endpoint is 20 bytes of plain data, 4-aligned like [u32; 5]: the address,
        // then the port, family and a zero pad byte in the last word.
        unsafe { core::mem::transmute::<[u32; 5], Endpoint>(words) }
    }

    /// The address as four words, each read with one load (a byte array is otherwise read
    /// byte by byte in a BPF program).
    #[inline(always)]
    pub fn words(&self) -> [u32; 4] {
        // SAFETY: `addr` is at offset 0 of a 4-aligned type, so it is 4-aligned; any bits
        // are a valid u32.
        unsafe { core::ptr::read(self.addr.as_ptr().cast::<[u32; 4]>()) }
    }

    /// All 20 bytes as five words: the address, then the port, family and pad byte, each read
    /// with one load. Two endpoints made by [`Endpoint::v4`], [`Endpoint::v4_word`] or
    /// [`Endpoint::v6`] (pad byte 0) are equal exactly when their words are.
    #[inline(always)]
    pub fn all_words(&self) -> [u32; 5] {
        // SAFETY: Endpoint is 20 bytes of plain data, 4-aligned like [u32; 5]; any bits are a
        // valid u32.
        unsafe { core::ptr::read((self as *const Self).cast::<[u32; 5]>()) }
    }

    pub const fn v6(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port,
            family: FAMILY_V6,
            _pad: 0,
        }
    }
}

/// Key of `CHANNELS_V4`: an IPv4 ingest address and UDP port as the packet carries them
/// (network byte order), 8 bytes. IPv4 channels, nearly all of them, are looked up by this
/// key rather than by a 20-byte [`Endpoint`]: the hot path hashes and compares 8 bytes, built
/// from two header fields without widening the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChannelKey4 {
    pub addr: [u8; 4],
    /// Network byte order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ChannelKey4>() == 8);

impl ChannelKey4 {
    /// The key of an IPv4 [`Endpoint`], `None` for IPv6.
    pub const fn of(e: &Endpoint) -> Option<Self> {
        if e.family != FAMILY_V4 {
            return None;
        }
        Some(Self {
            addr: [e.addr[0], e.addr[1], e.addr[2], e.addr[3]],
            port: e.port.to_be_bytes(),
            _pad: [0; 2],
        })
    }

    pub const fn endpoint(&self) -> Endpoint {
        Endpoint::v4(self.addr, u16::from_be_bytes(self.port))
    }
}

/// Value of `CHANNELS_V4` and `CHANNELS_V6` (key: the channel's ingest endpoint, a
/// [`ChannelKey4`] or an IPv6 [`Endpoint`]): everything the XDP program
/// needs to forward a packet of the channel. A failover replaces this value whole with one
/// HASH map update, so a reader sees the old or the new encoder, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelTarget {
    /// The encoder's address (same family as the key).
    pub addr: [u8; 16],
    /// Destination MAC: the encoder's interface (the inner veth peer, or the remote host).
    pub dmac: [u8; 6],
    /// Source MAC: the egress device's (host-side veth, or the ingest NIC for XDP_TX).
    pub smac: [u8; 6],
    /// Encoder-side UDP port, host byte order.
    pub port: u16,
    /// [`ACTION_REDIRECT`] or [`ACTION_TX`].
    pub action: u8,
    /// [`CHANNEL_SOURCES`], or 0.
    pub flags: u8,
    /// Index into `CHANNEL_STATS`.
    pub channel_id: u32,
    /// Index into `ENCODER_STATS` and `TX_PORTS` (the DEVMAP).
    pub encoder_id: u32,
    /// What the rewrite from the key (the ingest endpoint) to `addr`:`port` adds to the
    /// IPv4 header checksum, TTL decrement included (0 for IPv6): see
    /// [`crate::rewrite::Deltas`]. Set by [`ChannelTarget::sealed`] as the value is written.
    pub csum_ip: u16,
    /// The same for the UDP checksum (address and port).
    pub csum_udp: u16,
}
const _: () = assert!(core::mem::size_of::<ChannelTarget>() == 44);

impl ChannelTarget {
    /// The value as it is written under `key`: with the checksum deltas of the rewrite from
    /// `key` to this target, so that the XDP program adds two constants instead of working
    /// out each changed word per packet.
    pub fn sealed(self, key: &Endpoint) -> Self {
        let d = crate::rewrite::Deltas::of(key, &self.addr, self.port);
        Self {
            csum_ip: d.ip,
            csum_udp: d.udp,
            ..self
        }
    }

    /// The value without its deltas (as userspace compares and keeps it).
    pub fn unsealed(self) -> Self {
        Self {
            csum_ip: 0,
            csum_udp: 0,
            ..self
        }
    }
}

/// [`ChannelTarget::flags`]: the channel takes packets only from the prefixes of its
/// `sources`, held in `SOURCE_NETS`; others pass to the host untouched
/// (`xdp_reason::PASS_NOT_SOURCE`).
pub const CHANNEL_SOURCES: u8 = 1;

/// The data of a `SOURCE_NETS` (LPM trie) key: a channel id, big-endian so that it is the
/// first 32 bits of every prefix, then the source address as in [`Endpoint::addr`]. A
/// prefix of a channel's `sources` is the key with prefix length `32 + prefix`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceNet {
    pub channel: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SourceNet>() == 20);

impl SourceNet {
    pub const fn new(channel_id: u32, addr: [u8; 16]) -> Self {
        Self {
            channel: channel_id.to_be_bytes(),
            addr,
        }
    }

    /// The LPM prefix length of an address prefix of `bits` bits.
    pub const fn prefix_len(bits: u8) -> u32 {
        32 + bits as u32
    }
}

/// Value of `REPLIES` (key: an encoder's [`Endpoint`] for one channel: its address and the
/// channel's encoder-side port). Tells the return path which ingest address to restore.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyTarget {
    /// The channel's ingest address, written as the reply's source.
    pub ingest: Endpoint,
    pub channel_id: u32,
    pub encoder_id: u32,
    /// The ingest interface, where replies leave.
    pub ifindex: u32,
    /// `REPLY_SRT`: the channel carries SRT; learn the caller's socket ID from replies.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<ReplyTarget>() == 36);

/// [`ReplyTarget::flags`]: an SRT channel.
pub const REPLY_SRT: u32 = 1;

/// One SRT caller of a channel, in [`SrtPeers::slots`]: its endpoint and its SRT socket ID.
/// An empty slot has `last_seen_ns == 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SrtSlot {
    pub peer: Endpoint,
    pub socket_id: u32,
    /// `bpf_ktime_get_ns` when last refreshed (at most once a second unless the ID changes).
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<SrtSlot>() == 32);

/// Value of `SRT_PEERS` (key: channel id; SRT channels only): the channel's SRT callers, at
/// most `limit` of them. A caller is added only when the listener answers its conclusion
/// handshake (a caller that never completed a handshake, a spoofed one included, is never
/// added); when all `limit` slots are taken, the least recently seen caller gives way.
/// Userspace creates the entry with the channel and sends each caller a SHUTDOWN when it
/// repoints the channel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SrtPeers {
    /// Slots in use at most (`1..=MAX_SRT_PEERS_PER_CHANNEL`).
    pub limit: u32,
    pub _pad: u32,
    pub slots: [SrtSlot; MAX_SRT_PEERS_PER_CHANNEL],
}
const _: () = assert!(core::mem::size_of::<SrtPeers>() == 8 + 32 * MAX_SRT_PEERS_PER_CHANNEL);

impl SrtPeers {
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            _pad: 0,
            slots: [SrtSlot::default(); MAX_SRT_PEERS_PER_CHANNEL],
        }
    }
}

/// What [`SrtPeers::learn`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SrtLearn {
    /// Nothing to write (a known caller seen less than a second ago, or an unknown one that
    /// is not being answered a conclusion).
    None,
    /// Slot `i` was written.
    Wrote(usize),
}

impl SrtPeers {
    /// Records a listener→caller packet to `peer` addressed to `socket_id`, at `now`;
    /// `conclusion`: the packet is the listener's answer to the caller's conclusion handshake.
    /// A known caller (same endpoint) is refreshed once a second, or at once when a conclusion
    /// gives it a new socket ID; an unknown one is added only on a conclusion, into an empty
    /// slot or over the least recently seen one. Bounded: at most `MAX_SRT_PEERS_PER_CHANNEL`
    /// slots are looked at.
    #[inline(always)]
    pub fn learn(
        &mut self,
        peer: &Endpoint,
        socket_id: u32,
        conclusion: bool,
        now: u64,
    ) -> SrtLearn {
        // Three short passes rather than one that tracks the oldest slot's index: an index
        // that differs path by path would make the verifier walk every combination.
        let limit = self.limit as usize;
        let mut i = 0;
        while i < MAX_SRT_PEERS_PER_CHANNEL {
            if i >= limit {
                break;
            }
            let Some(slot) = self.slots.get_mut(i) else {
                break;
            };
            if slot.last_seen_ns != 0 && same_endpoint(&slot.peer, peer) {
                let stale = now.saturating_sub(slot.last_seen_ns) >= SOURCE_REFRESH_NS;
                if slot.socket_id == socket_id {
                    if stale {
                        slot.last_seen_ns = now;
                        return SrtLearn::Wrote(i);
                    }
                    return SrtLearn::None;
                }
                if conclusion {
                    slot.socket_id = socket_id;
                    slot.last_seen_ns = now;
                    return SrtLearn::Wrote(i);
                }
                return SrtLearn::None;
            }
            i += 1;
        }
        if !conclusion {
            return SrtLearn::None;
        }
        // The least recently seen time (0: an empty slot)...
        let mut oldest_ns = u64::MAX;
        i = 0;
        while i < MAX_SRT_PEERS_PER_CHANNEL {
            if i >= limit {
                break;
            }
            if let Some(slot) = self.slots.get(i) {
                oldest_ns = oldest_ns.min(slot.last_seen_ns);
            }
            i += 1;
        }
        // ... and the first slot that has it gives way.
        i = 0;
        while i < MAX_SRT_PEERS_PER_CHANNEL {
            if i >= limit {
                break;
            }
            // (No panicking index in a BPF program: `get_mut`.)
            if let Some(slot) = self.slots.get_mut(i)
                && slot.last_seen_ns == oldest_ns
            {
                *slot = SrtSlot {
                    peer: *peer,
                    socket_id,
                    last_seen_ns: now.max(1),
                };
                return SrtLearn::Wrote(i);
            }
            i += 1;
        }
        SrtLearn::None
    }
}

/// Bytes `i..i + 4` of an address as one word (any byte order will do, used on both sides).
#[inline(always)]
pub(crate) const fn word(a: &[u8; 16], i: usize) -> u32 {
    u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

/// Word by word, the port, family and pad byte in the last (no `memcmp` in a BPF program).
#[inline(always)]
pub fn same_endpoint(a: &Endpoint, b: &Endpoint) -> bool {
    let (x, y) = (a.all_words(), b.all_words());
    x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4]
}

/// Key of `SOURCES`: a contribution source seen sending to a channel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub peer: Endpoint,
    pub channel_id: u32,
}
const _: () = assert!(core::mem::size_of::<SourceKey>() == 24);

/// Value of `SOURCES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceInfo {
    /// CLOCK_MONOTONIC ns at tick resolution (the XDP program's jiffies clock) when last
    /// refreshed (refreshed at most once a second).
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<SourceInfo>() == 8);

/// How often the XDP program refreshes [`SourceInfo::last_seen_ns`].
pub const SOURCE_REFRESH_NS: u64 = 1_000_000_000;

/// Value of `ENCODERS` (key: encoder id): the userspace registry of encoders, read back when a
/// controller adopts a pinned data plane. The kernel programs do not read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncoderInfo {
    /// Encoder name, NUL padded.
    pub name: [u8; 32],
    pub addr: [u8; 16],
    /// The encoder's MAC.
    pub mac: [u8; 6],
    /// The MAC of the device frames leave by towards it.
    pub smac: [u8; 6],
    /// Host-side veth (local) or ingest NIC (remote).
    pub ifindex: u32,
    pub family: u8,
    /// [`ENCODER_LOCAL`] or [`ENCODER_REMOTE`].
    pub kind: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<EncoderInfo>() == 68);

/// Packets, bytes and the time of the last one (CLOCK_MONOTONIC ns: at tick resolution from
/// the XDP program's jiffies clock, exact from the TC program's `bpf_ktime_get_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub packets: u64,
    pub bytes: u64,
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<FlowStats>() == 24);

impl FlowStats {
    /// Sums per-CPU values: counts add up, the last-seen time is the latest.
    pub fn merge(&mut self, other: &FlowStats) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        if other.last_seen_ns > self.last_seen_ns {
            self.last_seen_ns = other.last_seen_ns;
        }
    }
}

/// Value of `CHANNEL_STATS` (per CPU, index: channel id): the channel's input counters, and
/// the last source this CPU saw for it, so that the hot path touches the shared `SOURCES` map
/// only when the source changes or once a second.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    pub flow: FlowStats,
    pub last_src: Endpoint,
    pub _pad: u32,
    pub last_src_ns: u64,
}
const _: () = assert!(core::mem::size_of::<ChannelStats>() == 56);

/// Drop reasons per encoder (`EncoderStats::drops`, indexed by [`drop_reason`]), written by
/// the egress policy, and by the redirect tracepoints for frames the encoder's device refused.
pub const DROP_REASONS: usize = 11;

/// Value of `ENCODER_STATS` (per CPU, index: encoder id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncoderStats {
    /// Channel packets XDP handed to the encoder's device (those the device then refused are
    /// in `drops[drop_reason::REDIRECT_FAILED]`; forwarded = `rx.packets` minus those).
    pub rx: FlowStats,
    /// Replies from the encoder rewritten to an ingest address by TC.
    pub tx: FlowStats,
    /// Packets dropped, by reason: leaving the encoder (egress policy), or on the way in
    /// (`REDIRECT_FAILED`).
    pub drops: [u64; DROP_REASONS],
}
const _: () = assert!(core::mem::size_of::<EncoderStats>() == 136);

impl EncoderStats {
    pub fn merge(&mut self, other: &EncoderStats) {
        self.rx.merge(&other.rx);
        self.tx.merge(&other.tx);
        for (d, o) in self.drops.iter_mut().zip(other.drops.iter()) {
            *d += o;
        }
    }
}

/// Why the egress policy dropped a packet leaving an encoder: indexes into
/// [`EncoderStats::drops`].
pub mod drop_reason {
    use super::DROP_REASONS;

    /// Not from the encoder's own address (IPv6 neighbour discovery excepted).
    pub const FORGED_SOURCE: usize = 0;
    /// To a destination (address, protocol, port) not on the encoder's allow-list.
    pub const DENIED: usize = 1;
    /// From a channel's encoder port to a peer that never sent to the channel (and not
    /// allowed otherwise): a reply with nowhere to go.
    pub const UNKNOWN_PEER: usize = 2;
    /// A later IPv4 or IPv6 fragment: it has no ports to judge it by.
    pub const FRAGMENT: usize = 3;
    /// An IP protocol other than UDP, TCP and ICMP (of the packet's family), or an IPv6
    /// extension header chain longer than the program follows.
    pub const PROTOCOL: usize = 4;
    /// Neither IPv4, IPv6 nor ARP (a VLAN tag, LLDP, ...).
    pub const NOT_IP: usize = 5;
    /// Truncated or inconsistent headers.
    pub const MALFORMED: usize = 6;
    /// A reply whose rewrite or redirect failed in a kernel helper.
    pub const ERROR: usize = 7;
    /// A channel packet XDP redirected to the encoder's device that the kernel refused (a veth
    /// whose peer can take no XDP frames, a device down or gone, a frame over its MTU).
    pub const REDIRECT_FAILED: usize = 8;
    /// An ICMP/ICMPv6 port unreachable quoting a channel packet: the encoder's kernel refusing
    /// the stream (its receiving process is gone). Dropped, and the controller told at once.
    pub const REFUSED: usize = 9;
    /// ICMPv6 link traffic an encoder must not send: a router advertisement or redirect, or
    /// neighbour discovery / MLD with a hop limit its RFC forbids (a forged off-link packet).
    pub const ROUTER: usize = 10;
    pub const NAMES: [&str; DROP_REASONS] = [
        "forged_source",
        "denied",
        "unknown_peer",
        "fragment",
        "protocol",
        "not_ip",
        "malformed",
        "error",
        "redirect_failed",
        "refused",
        "router",
    ];
}

/// Outcomes of the XDP ingest program: indexes into `XDP_STATS` (per CPU, u64 packets).
pub mod xdp_reason {
    pub const REDIRECTED: u32 = 0;
    pub const TX: u32 = 1;
    /// Not IPv4 or IPv6 (ARP, LLDP, ...), or more than one VLAN tag.
    pub const PASS_NOT_IP: u32 = 2;
    /// IP but not UDP, or IPv6 with an extension header.
    pub const PASS_NOT_UDP: u32 = 3;
    /// An IPv4 fragment (first or later).
    pub const PASS_FRAGMENT: u32 = 4;
    /// Truncated or inconsistent headers.
    pub const PASS_MALFORMED: u32 = 5;
    /// UDP, but not to a channel's ingest address.
    pub const PASS_NO_CHANNEL: u32 = 6;
    /// A channel packet whose TTL / hop limit would expire.
    pub const PASS_TTL: u32 = 7;
    /// A channel packet whose encoder has no DEVMAP entry (not attached yet, or removed).
    pub const PASS_NO_DEVICE: u32 = 8;
    /// Counted after the fact by the redirect tracepoints: redirected frames the target device
    /// refused (a subset of `REDIRECTED`, also counted per encoder).
    pub const REDIRECT_FAILED: u32 = 9;
    /// A packet to a channel with `sources` from an address outside them: passed to the host
    /// untouched, never forwarded.
    pub const PASS_NOT_SOURCE: u32 = 10;
    /// Rewritten towards an encoder on another host and sent back out of the uplink to the
    /// next hop (`XDP_TX`).
    pub const ROUTED: u32 = 11;
    pub const COUNT: u32 = 12;
    pub const NAMES: [&str; COUNT as usize] = [
        "redirected",
        "tx",
        "pass_not_ip",
        "pass_not_udp",
        "pass_fragment",
        "pass_malformed",
        "pass_no_channel",
        "pass_ttl",
        "pass_no_device",
        "redirect_failed",
        "pass_not_source",
        "routed",
    ];
}

/// Outcomes of the TC program on encoder veths: indexes into `TC_STATS` (per CPU, u64 packets).
/// `REPLY_REDIRECTED` counts replies on every veth; `PASS_OTHER` to `ERROR` are the outcomes
/// of a veth without an egress policy (fail-open); the last three are what a policy let
/// through (what it drops is counted per encoder, by [`drop_reason`]).
pub mod tc_reason {
    /// A reply to a known source, rewritten to the ingest address and sent out of the ingest NIC.
    pub const REPLY_REDIRECTED: u32 = 0;
    /// Not UDP over IPv4/IPv6: passed on.
    pub const PASS_OTHER: u32 = 1;
    /// UDP not from a channel's encoder endpoint: passed on.
    pub const PASS_NO_CHANNEL: u32 = 2;
    /// From a channel's encoder endpoint, but to a destination that never sent to the channel.
    pub const PASS_UNKNOWN_PEER: u32 = 3;
    /// Truncated or inconsistent headers, or a fragment.
    pub const PASS_MALFORMED: u32 = 4;
    /// A rewrite or redirect helper failed, on a veth without a policy (passed if the rewrite
    /// failed, dropped if only the redirect did, since the packet already carries the ingest
    /// address). Under a policy, both are drops (`drop_reason::ERROR`).
    pub const ERROR: u32 = 5;
    /// From an encoder with a policy: ARP or IPv6 neighbour discovery, passed.
    pub const PASS_NEIGHBOUR: u32 = 6;
    /// From an encoder with a policy: an answer to its health check, passed.
    pub const PASS_HEALTH: u32 = 7;
    /// From an encoder with a policy: to a destination on its allow-list, passed. (What the
    /// policy drops is counted per encoder, in `EncoderStats::drops`.)
    pub const PASS_ALLOWED: u32 = 8;
    pub const COUNT: u32 = 9;
    pub const NAMES: [&str; COUNT as usize] = [
        "reply_redirected",
        "pass_other",
        "pass_no_channel",
        "pass_unknown_peer",
        "pass_malformed",
        "error",
        "pass_neighbour",
        "pass_health",
        "pass_allowed",
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), contain only integers and byte arrays, and their
    // padding is explicit (asserted sizes above), so every bit pattern is valid.
    unsafe impl aya::Pod for Endpoint {}
    // SAFETY: repr(C), byte arrays only, no padding.
    unsafe impl aya::Pod for ChannelKey4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ChannelTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ReplyTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SrtPeers {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceNet {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EncoderInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ChannelStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EncoderStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TraceConfig {}
}

/// Value of `TRACE_CONFIG[0]`: what the redirect tracepoints need to tell this data plane's
/// refused redirects from every other XDP user's on the host. Written by userspace before
/// the tracepoints are attached (and again on adoption); read by the tracepoint programs.
/// Offsets come from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceConfig {
    /// The cookie of the network namespace the data plane runs in (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
    /// `TX_PORTS`'s map id: `xdp_redirect_err` reports it with the failing key.
    pub devmap_id: u32,
    /// Byte offset of `ifindex` in `struct net_device`.
    pub off_ifindex: u32,
    /// Byte offset of `nd_net.net` (the `struct net *`) in `struct net_device`.
    pub off_nd_net: u32,
    /// Byte offset of `net_cookie` in `struct net`.
    pub off_net_cookie: u32,
}
const _: () = assert!(core::mem::size_of::<TraceConfig>() == 24);

#[cfg(test)]
mod srt_peer_tests {
    use super::*;

    fn peer(i: u8) -> Endpoint {
        Endpoint::v4([198, 18, 0, i], 40_000)
    }

    #[test]
    fn peers_are_added_only_on_a_conclusion_and_capped() {
        let mut p = SrtPeers::new(3);
        let s = SOURCE_REFRESH_NS;
        assert_eq!(
            p.learn(&peer(1), 11, false, s),
            SrtLearn::None,
            "induction answer"
        );
        assert!(p.slots.iter().all(|x| x.last_seen_ns == 0));
        assert_eq!(p.learn(&peer(1), 11, true, s), SrtLearn::Wrote(0));
        assert_eq!(p.learn(&peer(1), 11, false, s + 1), SrtLearn::None, "fresh");
        assert_eq!(
            p.learn(&peer(1), 12, false, s + 1),
            SrtLearn::None,
            "not a conclusion"
        );
        assert_eq!(
            p.learn(&peer(1), 11, false, 2 * s),
            SrtLearn::Wrote(0),
            "refresh"
        );
        assert_eq!(p.learn(&peer(2), 21, true, 2 * s + 1), SrtLearn::Wrote(1));
        assert_eq!(p.learn(&peer(3), 31, true, 2 * s + 2), SrtLearn::Wrote(2));
        // Full: the least recently seen (peer 1, at 2 s) gives way.
        assert_eq!(p.learn(&peer(4), 41, true, 2 * s + 3), SrtLearn::Wrote(0));
        assert_eq!(p.slots[0].peer, peer(4));
        assert!(
            p.slots[3..].iter().all(|x| x.last_seen_ns == 0),
            "limit kept"
        );
        assert_eq!(
            p.learn(&peer(2), 22, true, 2 * s + 4),
            SrtLearn::Wrote(1),
            "new ID"
        );
        assert_eq!(p.slots[1].socket_id, 22);
        let mut none = SrtPeers::new(0);
        assert_eq!(none.learn(&peer(1), 1, true, s), SrtLearn::None);
        let mut over = SrtPeers::new(u32::MAX);
        for i in 0..40u8 {
            over.learn(&peer(i), u32::from(i), true, s + u64::from(i));
        }
        assert_eq!(
            over.slots[0].peer,
            peer(32),
            "at most MAX_SRT_PEERS_PER_CHANNEL slots"
        );
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn an_ipv4_key_is_the_header_fields_and_gives_its_endpoint_back() {
        let e = Endpoint::v4([203, 0, 113, 10], 5000);
        let k = ChannelKey4::of(&e).expect("IPv4");
        // As in the packet: address bytes as they are, port big-endian.
        assert_eq!(k.addr, [203, 0, 113, 10]);
        assert_eq!(k.port, [0x13, 0x88]);
        assert_eq!(k._pad, [0, 0]);
        assert_eq!(k.endpoint(), e);
        assert_eq!(ChannelKey4::of(&Endpoint::v6([0x20; 16], 5000)), None);
    }

    #[test]
    fn an_endpoint_from_a_word_is_the_endpoint_from_its_bytes() {
        for (addr, port) in [
            ([203, 0, 113, 10], 5000),
            ([0, 0, 0, 0], 0),
            ([255, 255, 255, 255], 65535),
            ([10, 0, 0, 1], 1),
        ] {
            let word = Endpoint::v4_word(u32::from_ne_bytes(addr), port);
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&addr);
            let fields = Endpoint {
                addr: bytes,
                port,
                family: FAMILY_V4,
                _pad: 0,
            };
            assert_eq!(word, fields);
            assert_eq!(Endpoint::v4(addr, port), fields);
            assert!(same_endpoint(&word, &fields));
        }
    }

    #[test]
    fn endpoints_are_the_same_exactly_when_every_field_is() {
        let base = Endpoint::v4([198, 18, 0, 1], 40_000);
        let v6 = Endpoint::v6([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], 40_000);
        let others = [
            Endpoint::v4([198, 18, 0, 2], 40_000),
            Endpoint::v4([198, 18, 0, 1], 40_001),
            // The same 16 address bytes and port, another family.
            Endpoint {
                family: FAMILY_V6,
                ..base
            },
            v6,
            Endpoint::default(),
        ];
        assert!(same_endpoint(&base, &base));
        assert!(same_endpoint(&v6, &v6));
        for o in others {
            assert_eq!(same_endpoint(&base, &o), base == o, "{o:?}");
            assert!(!same_endpoint(&base, &o), "{o:?}");
        }
        // Each byte of the address counts, the last 12 of an IPv6 one included.
        for i in 0..16 {
            let mut other = v6;
            other.addr[i] ^= 1;
            assert!(!same_endpoint(&v6, &other), "byte {i}");
        }
    }
}
