//! The ingress rewrite of a channel packet towards its encoder: destination address and UDP
//! port replaced, TTL (hop limit) decremented, the IPv4 header checksum and the UDP checksum
//! updated incrementally (RFC 1624). The XDP program calls these on the packet's own bytes;
//! host tests call them on generated frames, so both exercise the same code.
//!
//! Headers are the fixed parts as byte arrays (IPv4 options, IPv6 extension headers and the
//! payload are never touched). Constant indices into arrays need no bounds checks, in the
//! kernel or out of it.

use crate::{Endpoint, FAMILY_V4, csum};

/// The fixed IPv4 header.
pub const IPV4_LEN: usize = 20;
/// The fixed IPv6 header.
pub const IPV6_LEN: usize = 40;
/// The UDP header.
pub const UDP_LEN: usize = 8;

const V4_TTL: usize = 8;
const V4_PROTO: usize = 9;
const V4_CHECK: usize = 10;
const V4_DST: usize = 16;
const V6_HOP_LIMIT: usize = 7;
const V6_DST: usize = 24;
const UDP_DST: usize = 2;
const UDP_CHECK: usize = 6;

#[inline(always)]
fn get16<const N: usize>(b: &[u8; N], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn put16<const N: usize>(b: &mut [u8; N], at: usize, v: u16) {
    let v = v.to_be_bytes();
    b[at] = v[0];
    b[at + 1] = v[1];
}

/// Rewrites an IPv4 UDP packet towards `dst`:`port`. The caller has checked that the TTL is
/// above 1. A UDP checksum of 0 ("none", in IPv4) stays 0; one that updates to 0 is written
/// as all ones (RFC 768). Returns the UDP checksum as the update computed it, before that
/// substitution, or `None` when the packet had none.
#[inline(always)]
pub fn ipv4(
    ip: &mut [u8; IPV4_LEN],
    udp: &mut [u8; UDP_LEN],
    dst: [u8; 4],
    port: u16,
) -> Option<u16> {
    let old_dst = [ip[V4_DST], ip[V4_DST + 1], ip[V4_DST + 2], ip[V4_DST + 3]];
    let (ttl, proto) = (ip[V4_TTL], ip[V4_PROTO]);
    let mut check = get16(ip, V4_CHECK);
    check = csum::replace32(check, old_dst, dst);
    check = csum::replace16(
        check,
        u16::from_be_bytes([ttl, proto]),
        u16::from_be_bytes([ttl - 1, proto]),
    );
    put16(ip, V4_CHECK, check);
    ip[V4_DST] = dst[0];
    ip[V4_DST + 1] = dst[1];
    ip[V4_DST + 2] = dst[2];
    ip[V4_DST + 3] = dst[3];
    ip[V4_TTL] = ttl - 1;

    let udp_check = get16(udp, UDP_CHECK);
    let computed = if udp_check == 0 {
        None
    } else {
        let c = csum::replace32(udp_check, old_dst, dst);
        let c = csum::replace16(c, get16(udp, UDP_DST), port);
        put16(udp, UDP_CHECK, csum::udp_nonzero(c));
        Some(c)
    };
    put16(udp, UDP_DST, port);
    computed
}

/// Rewrites an IPv6 UDP packet towards `dst`:`port`. The caller has checked that the hop
/// limit is above 1 and that the UDP checksum is not 0 (invalid in IPv6). One that updates to
/// 0 is written as all ones. Returns the UDP checksum as the update computed it, before that
/// substitution.
#[inline(always)]
pub fn ipv6(ip: &mut [u8; IPV6_LEN], udp: &mut [u8; UDP_LEN], dst: &[u8; 16], port: u16) -> u16 {
    let mut old_dst = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        old_dst[i] = ip[V6_DST + i];
        ip[V6_DST + i] = dst[i];
        i += 1;
    }
    let c = csum::replace128(get16(udp, UDP_CHECK), &old_dst, dst);
    let c = csum::replace16(c, get16(udp, UDP_DST), port);
    put16(udp, UDP_CHECK, csum::udp_nonzero(c));
    put16(udp, UDP_DST, port);
    ip[V6_HOP_LIMIT] -= 1;
    c
}

/// What a channel's rewrite adds to the packet's checksums, worked out once per channel
/// target instead of once per packet. The packet's destination is the channel's key (the
/// lookup matched it), so every word the rewrite changes has a known old and new value; their
/// one's-complement differences (RFC 1624 eqn. 3: `~m + m'` for each word) sum to a constant.
/// Adding it gives exactly the checksum of the word-by-word update ([`ipv4`], [`ipv6`]):
/// one's-complement addition is associative, and every fold keeps the sum's residue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deltas {
    /// The IPv4 header checksum's: destination address and TTL (0 for IPv6).
    pub ip: u16,
    /// The UDP checksum's: destination address and port.
    pub udp: u16,
}

impl Deltas {
    /// The deltas of the rewrite from `key` (the ingest endpoint, whose family is the
    /// packet's) to `addr`:`port` (addresses as in [`Endpoint::addr`]).
    pub fn of(key: &Endpoint, addr: &[u8; 16], port: u16) -> Self {
        let words = if key.family == FAMILY_V4 { 2 } else { 8 };
        let mut sum = 0u32;
        let mut i = 0;
        while i < words {
            let at = 2 * i;
            sum += (!u16::from_be_bytes([key.addr[at], key.addr[at + 1]])) as u32;
            sum += u16::from_be_bytes([addr[at], addr[at + 1]]) as u32;
            i += 1;
        }
        let addr_sum = sum;
        // The TTL is the high byte of the word (TTL, protocol) and goes down by one:
        // ~m + (m - 0x100) is 0xfeff for every m with TTL > 0.
        let ip = if key.family == FAMILY_V4 {
            csum::fold(addr_sum + 0xfeff)
        } else {
            0
        };
        let udp = csum::fold(addr_sum + (!key.port) as u32 + port as u32);
        Self { ip, udp }
    }
}

/// `check` with `delta` added: `~(~check + delta)`, folded.
#[inline(always)]
const fn add_delta(check: u16, delta: u16) -> u16 {
    !csum::fold((!check) as u32 + delta as u32)
}

/// [`ipv4`] with the checksum updates given as [`Deltas`] for this packet's destination (the
/// key the channel was found by): the same bytes written, in fewer instructions.
#[inline(always)]
pub fn ipv4_sealed(
    ip: &mut [u8; IPV4_LEN],
    udp: &mut [u8; UDP_LEN],
    dst: [u8; 4],
    port: u16,
    d: Deltas,
) -> Option<u16> {
    put16(ip, V4_CHECK, add_delta(get16(ip, V4_CHECK), d.ip));
    ip[V4_DST] = dst[0];
    ip[V4_DST + 1] = dst[1];
    ip[V4_DST + 2] = dst[2];
    ip[V4_DST + 3] = dst[3];
    ip[V4_TTL] -= 1;
    let udp_check = get16(udp, UDP_CHECK);
    let computed = if udp_check == 0 {
        None
    } else {
        let c = add_delta(udp_check, d.udp);
        put16(udp, UDP_CHECK, csum::udp_nonzero(c));
        Some(c)
    };
    put16(udp, UDP_DST, port);
    computed
}

/// [`ipv6`] with the UDP checksum update given as [`Deltas`]: see [`ipv4_sealed`].
#[inline(always)]
pub fn ipv6_sealed(
    ip: &mut [u8; IPV6_LEN],
    udp: &mut [u8; UDP_LEN],
    dst: &[u8; 16],
    port: u16,
    d: Deltas,
) -> u16 {
    let mut i = 0;
    while i < 16 {
        ip[V6_DST + i] = dst[i];
        i += 1;
    }
    let c = add_delta(get16(udp, UDP_CHECK), d.udp);
    put16(udp, UDP_CHECK, csum::udp_nonzero(c));
    put16(udp, UDP_DST, port);
    ip[V6_HOP_LIMIT] -= 1;
    c
}
