//! Map keys, values and limits shared by the kernel programs and the userspace [`Dataplane`].
//!
//! Layout rules: `#[repr(C)]`, explicit padding, no `bool`/`Option`/enums across the boundary,
//! and a size assertion for each type so that a change on one side cannot go unnoticed.
//!
//! [`Dataplane`]: ../nsfail/dataplane/struct.Dataplane.html

/// Version of the map layout below. Stored in `META[0]`; a controller adopts pinned maps only
/// when the version matches, and otherwise asks for a teardown.
pub const ABI_VERSION: u32 = 2;

/// Address family values used in keys (not the kernel's `AF_*`, which differ per platform).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// How many channels the maps hold. Also the size of the per-channel counter array.
pub const MAX_CHANNELS: u32 = 131_072;
/// How many encoders the maps hold; encoder ids are `0..MAX_ENCODERS` and index the DEVMAP.
pub const MAX_ENCODERS: u32 = 4096;
/// How many (channel, source) pairs the return path remembers (LRU).
pub const MAX_SOURCES: u32 = 65_536;

/// What the XDP program does with a matched packet after rewriting it.
pub const ACTION_REDIRECT: u8 = 1;
/// Send it back out of the ingest NIC (a remote encoder on the same segment).
pub const ACTION_TX: u8 = 2;

/// Encoder kinds in [`EncoderInfo::kind`].
pub const ENCODER_LOCAL: u8 = 1;
pub const ENCODER_REMOTE: u8 = 2;

/// An IP address and UDP port. IPv4 addresses use the first 4 bytes of `addr`, the rest zero.
/// `port` is in host byte order.
#[repr(C)]
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
        let mut a = [0u8; 16];
        a[0] = addr[0];
        a[1] = addr[1];
        a[2] = addr[2];
        a[3] = addr[3];
        Self {
            addr: a,
            port,
            family: FAMILY_V4,
            _pad: 0,
        }
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

/// Value of `CHANNELS` (key: the channel's ingest [`Endpoint`]): everything the XDP program
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
    pub _pad: u8,
    /// Index into `CHANNEL_STATS`.
    pub channel_id: u32,
    /// Index into `ENCODER_STATS` and `TX_PORTS` (the DEVMAP).
    pub encoder_id: u32,
}
const _: () = assert!(core::mem::size_of::<ChannelTarget>() == 40);

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

/// Value of `SRT_PEERS` (key: [`SourceKey`], the caller and the channel): the caller's SRT
/// socket ID, learnt from the Destination Socket ID of listener→caller packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SrtPeer {
    pub socket_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` when last refreshed (at most once a second unless the ID changes).
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<SrtPeer>() == 16);

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
    /// `bpf_ktime_get_ns` when last refreshed (refreshed at most once a second).
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

/// Packets, bytes and the time of the last one (`bpf_ktime_get_ns`, CLOCK_MONOTONIC).
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

/// Drop reasons per encoder (`EncoderStats::drops`), written by the egress policy.
pub const DROP_REASONS: usize = 8;

/// Value of `ENCODER_STATS` (per CPU, index: encoder id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncoderStats {
    /// Channel packets forwarded to the encoder by XDP.
    pub rx: FlowStats,
    /// Replies from the encoder rewritten to an ingest address by TC.
    pub tx: FlowStats,
    /// Packets leaving the encoder that were dropped, by reason.
    pub drops: [u64; DROP_REASONS],
}
const _: () = assert!(core::mem::size_of::<EncoderStats>() == 112);

impl EncoderStats {
    pub fn merge(&mut self, other: &EncoderStats) {
        self.rx.merge(&other.rx);
        self.tx.merge(&other.tx);
        for (d, o) in self.drops.iter_mut().zip(other.drops.iter()) {
            *d += o;
        }
    }
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
    pub const COUNT: u32 = 9;
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
    ];
}

/// Outcomes of the TC program on encoder veths: indexes into `TC_STATS` (per CPU, u64 packets).
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
    /// A rewrite or redirect helper failed (passed if the rewrite failed, dropped if only the
    /// redirect did, since the packet already carries the ingest address).
    pub const ERROR: u32 = 5;
    pub const COUNT: u32 = 6;
    pub const NAMES: [&str; COUNT as usize] = [
        "reply_redirected",
        "pass_other",
        "pass_no_channel",
        "pass_unknown_peer",
        "pass_malformed",
        "error",
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), contain only integers and byte arrays, and their
    // padding is explicit (asserted sizes above), so every bit pattern is valid.
    unsafe impl aya::Pod for Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ChannelTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ReplyTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SrtPeer {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EncoderInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EncoderStats {}
}
