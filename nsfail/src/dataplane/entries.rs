//! What the data plane's callers hand it and get back: encoders, channels, sources and SRT
//! callers as plain values (no map layout, no kernel handles). Owned by [`super::Dataplane`];
//! nothing here touches a map.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use nsfail_common::DEFAULT_SRT_PEER_LIMIT;

/// How an encoder is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EncoderLink {
    /// Through a veth whose host side is `ifname` (in the namespace of the data plane): XDP
    /// redirects into it, and the TC return path is attached to it.
    Local { ifname: String },
    /// A host on the ingest NIC's segment: XDP sends the packet back out (XDP_TX).
    Remote,
    /// An encoder on another host of a cluster, reached through this host's routing table:
    /// XDP rewrites the packet towards it and sends it back out of the ingest NIC (the
    /// uplink) to the next hop, resolved in the kernel's FIB and neighbour table when the
    /// encoder is registered and again by [`Dataplane::refresh_routes`] (the spec's `mac` is
    /// not used); the encoder's host takes it in by its transit entry
    /// ([`Dataplane::set_transit`]). No IP forwarding on either host.
    Routed,
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

/// An address prefix of a channel's `sources` (host bits zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourcePrefix {
    pub addr: IpAddr,
    /// Prefix length in bits (at most 32 or 128 by family).
    pub len: u8,
}

impl SourcePrefix {
    /// The prefix of `addr` of `len` bits, host bits cleared; `None` when `len` is too long
    /// for the family.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let addr = match addr {
            IpAddr::V4(a) if len <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) if len <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
            _ => return None,
        };
        Some(Self { addr, len })
    }
}

impl std::str::FromStr for SourcePrefix {
    type Err = String;

    /// `ADDR` (a single host) or `ADDR/LEN`; the address must be the network's (host bits
    /// zero), so that a typo cannot silently widen or narrow the range.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: not an IP address or prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0 to {max}"))?,
            None => max,
        };
        let net = Self::new(addr, len).expect("length checked");
        if net.addr != addr {
            return Err(format!(
                "{s:?}: host bits set (the network is {}/{len})",
                net.addr
            ));
        }
        Ok(net)
    }
}

impl serde::Serialize for SourcePrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SourcePrefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for SourcePrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A channel's options beyond where it forwards ([`Dataplane::set_channel_with`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelOptions {
    /// The channel carries SRT: learn its callers (see [`Dataplane::srt_peers`]).
    pub srt: bool,
    /// Forward only packets from these prefixes (of the channel's family); empty: from
    /// anywhere. Others pass to the host untouched, counted as `pass_not_source`.
    pub sources: Vec<SourcePrefix>,
    /// How many SRT callers the channel remembers (1 to [`MAX_SRT_PEERS_PER_CHANNEL`]).
    pub srt_peer_limit: u32,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        Self {
            srt: false,
            sources: Vec::new(),
            srt_peer_limit: DEFAULT_SRT_PEER_LIMIT,
        }
    }
}
