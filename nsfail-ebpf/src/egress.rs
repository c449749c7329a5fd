//! TC on each local encoder's host-side veth (clsact ingress: traffic leaving the encoder's
//! namespace). Replies to a channel's contribution source get the channel's ingest address as
//! their source and leave straight out of the ingest NIC. For an encoder with an egress policy,
//! everything else is judged by that policy, and what it does not let through is dropped and
//! counted by reason.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_ns, generated::bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};
use nsfail_common::{
    EncoderPolicy, Endpoint, FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    REPLY_SRT, RefusalEvent, ReplyTarget, SourceKey, drop_reason as d, tc_reason as r,
};

use crate::maps::{
    ENCODER_IFINDEX, ENCODER_STATS, POLICIES, REFUSALS, REPLIES, SOURCES, TC_STATS, add_flow,
    count, count_drop,
};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_CHECK_OFF: usize = EthHdr::LEN + 10;
const IPV4_SRC_OFF: usize = EthHdr::LEN + 12;
const IPV6_SRC_OFF: usize = EthHdr::LEN + 8;
const UDP_CHECK_OFF: usize = 6;
/// Minimal TCP header: the policy reads only the ports, but a shorter one is malformed.
const TCP_HDR_LEN: usize = 20;
/// Type, code and checksum: all an ICMP message is sure to have.
const ICMP_HDR_LEN: usize = 4;
/// Where an ICMP error quotes the packet that caused it.
const ICMP_QUOTE_OFF: usize = 8;
/// Port unreachable: ICMP destination unreachable (3) code 3, ICMPv6 (1) code 4.
const ICMP_PORT_UNREACH: (u8, u8) = (3, 3);
const ICMPV6_PORT_UNREACH: (u8, u8) = (1, 4);
/// IPv6 extension headers the parser steps over, and how many at most.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
const MAX_EXT_HEADERS: usize = 4;
/// ICMPv6 link traffic an encoder may send: router solicitation, neighbour solicitation and
/// advertisement (RFC 4861: hop limit 255), and multicast listener discovery (queries,
/// reports, done, MLDv2 reports; RFC 2710/3810: hop limit 1). A new IPv6 interface sends
/// these from `::` or its link-local address. Router advertisements (134) and redirects (137)
/// are a router's to send, never an encoder's: dropped (`router`).
const ND_ROUTER_SOLICIT: u8 = 133;
const ND_NEIGHBOUR_SOLICIT: u8 = 135;
const ND_NEIGHBOUR_ADVERT: u8 = 136;
const ND_ROUTER_ADVERT: u8 = 134;
const ND_REDIRECT: u8 = 137;
const ND_HOP_LIMIT: u8 = 255;
const MLD_FIRST: u8 = 130;
const MLD_LAST: u8 = 132;
const MLD2_REPORT: u8 = 143;
const MLD_HOP_LIMIT: u8 = 1;

/// What ICMPv6 link traffic is.
enum Link {
    /// Neighbour discovery or MLD as its RFC has it: passes.
    Pass,
    /// A router advertisement or redirect, or ND/MLD with the wrong hop limit: dropped.
    Forbidden,
    /// Not link traffic.
    No,
}

#[inline(always)]
fn icmpv6_link(pkt: &Packet) -> Link {
    if pkt.family != FAMILY_V6 || pkt.proto != PROTO_ICMPV6 || !pkt.has_l4 {
        return Link::No;
    }
    let t = pkt.icmp_type;
    let want = if t == ND_ROUTER_SOLICIT || t == ND_NEIGHBOUR_SOLICIT || t == ND_NEIGHBOUR_ADVERT {
        ND_HOP_LIMIT
    } else if (MLD_FIRST..=MLD_LAST).contains(&t) || t == MLD2_REPORT {
        MLD_HOP_LIMIT
    } else if t == ND_ROUTER_ADVERT || t == ND_REDIRECT {
        return Link::Forbidden;
    } else {
        return Link::No;
    };
    if pkt.hop_limit == want {
        Link::Pass
    } else {
        Link::Forbidden
    }
}

/// Finds the encoder a packet leaves by the veth it arrived on (the skb's ingress ifindex),
/// then:
/// - with a policy for that encoder: ARP and IPv6 neighbour discovery pass; a packet not from
///   the encoder's own address is dropped (`forged_source`); a reply to a known source of one
///   of its channels is rewritten and redirected; answers to its health check pass; packets
///   to destinations on its allow-list pass; everything else (later fragments, unknown
///   protocols, malformed frames included) is dropped and counted by reason in the
///   encoder's `ENCODER_STATS` slot. Dropping is this program's job, so it is not fail-open.
/// - without one (a veth nsfail has no policy for): fail-open, as before policies existed:
///   replies are rewritten, everything else, and anything it cannot parse, gets `TC_ACT_OK`
///   and is counted by reason in `TC_STATS`.
#[classifier]
pub fn nsfail_egress(ctx: TcContext) -> i32 {
    // SAFETY: a field of the context the kernel handed to this program.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let policed = ENCODER_IFINDEX.get_ptr(ifindex).and_then(|id| {
        // SAFETY: a HASH value pointer, read once.
        let id = unsafe { *id };
        POLICIES.get_ptr(id).map(|p| (id, p))
    });
    match policed {
        // SAFETY: the policy stays valid for this run (RCU); it is read through the pointer,
        // never copied (it is larger than the stack).
        Some((id, policy)) => enforce(&ctx, id, unsafe { &*policy }),
        None => fail_open(&ctx),
    }
}

/// The policy path: a verdict for every packet, drops counted per encoder.
#[inline(always)]
fn enforce(ctx: &TcContext, id: u32, policy: &EncoderPolicy) -> i32 {
    let mut pkt = Packet::default();
    match parse(ctx, &mut pkt) {
        Ok(()) => {}
        Err(Unparsed::Arp) => return pass(r::PASS_NEIGHBOUR),
        Err(Unparsed::NotIp) => return shot(id, d::NOT_IP),
        Err(Unparsed::Malformed) => return shot(id, d::MALFORMED),
    }
    match icmpv6_link(&pkt) {
        Link::Pass => return pass(r::PASS_NEIGHBOUR),
        Link::Forbidden => return shot(id, d::ROUTER),
        Link::No => {}
    }
    if !policy.own_source(pkt.family, &pkt.src) {
        return shot(id, d::FORGED_SOURCE);
    }
    if pkt.later_fragment {
        return shot(id, d::FRAGMENT);
    }
    if !pkt.has_l4 {
        return shot(id, d::PROTOCOL);
    }
    let mut denied = d::DENIED;
    if pkt.proto == PROTO_UDP && !pkt.fragment {
        match reply(ctx, &pkt, Some(id)) {
            Reply::Sent => return TC_ACT_REDIRECT,
            Reply::UnknownPeer => denied = d::UNKNOWN_PEER,
            Reply::NoChannel => {}
            Reply::Failed { .. } => return shot(id, d::ERROR),
        }
    }
    if policy.health_answer(pkt.proto, pkt.src_port, &pkt.dst)
        || refuses_health_probe(ctx, &pkt, policy)
    {
        return pass(r::PASS_HEALTH);
    }
    if let Some(refusal) = refused_channel_packet(ctx, &pkt)
        && refusal.encoder_id == id
    {
        report_refusal(&refusal);
        return shot(id, d::REFUSED);
    }
    if policy.allows(pkt.family, pkt.proto, &pkt.dst, pkt.dst_port) {
        return pass(r::PASS_ALLOWED);
    }
    shot(id, denied)
}

/// Whether the packet is a port unreachable that quotes a UDP datagram to the encoder's own
/// UDP health port, sent back to that datagram's sender: its kernel saying that nothing
/// listens there, which the prober takes as a failure at once instead of waiting out its
/// timeout. Nothing else of ICMP errors passes.
#[inline(always)]
fn refuses_health_probe(ctx: &TcContext, pkt: &Packet, policy: &EncoderPolicy) -> bool {
    let (icmp, unreach) = if pkt.family == FAMILY_V4 {
        (PROTO_ICMP, ICMP_PORT_UNREACH)
    } else {
        (PROTO_ICMPV6, ICMPV6_PORT_UNREACH)
    };
    if policy.health_proto != PROTO_UDP
        || pkt.proto != icmp
        || (pkt.icmp_type, pkt.icmp_code) != unreach
    {
        return false;
    }
    let Some((src, dst, proto, udp)) = quoted(ctx, pkt) else {
        return false;
    };
    let Ok(ports) = ctx.load::<[u8; 4]>(udp) else {
        return false;
    };
    proto == PROTO_UDP
        && src == pkt.dst
        && policy.own_source(pkt.family, &dst)
        && policy.health_answer(PROTO_UDP, u16::from_be_bytes([ports[2], ports[3]]), &src)
}

/// The quoted packet of an ICMP error: (source, destination, protocol, L4 offset).
#[inline(always)]
fn quoted(ctx: &TcContext, pkt: &Packet) -> Option<([u8; 16], [u8; 16], u8, usize)> {
    let quote = pkt.l4 + ICMP_QUOTE_OFF;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    if pkt.family == FAMILY_V4 {
        let ip = ctx.load::<Ipv4Hdr>(quote).ok()?;
        let ihl = ((ip.vihl & 0x0f) as usize) * 4;
        if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
            return None;
        }
        src[..4].copy_from_slice(&ip.src_addr);
        dst[..4].copy_from_slice(&ip.dst_addr);
        Some((src, dst, ip.proto, quote + ihl))
    } else {
        let ip = ctx.load::<Ipv6Hdr>(quote).ok()?;
        Some((ip.src_addr, ip.dst_addr, ip.next_hdr, quote + Ipv6Hdr::LEN))
    }
}

/// Whether the packet is a port unreachable quoting a UDP packet of a channel (to an
/// encoder's endpoint of a channel, from the address the error goes back to): the encoder's
/// kernel refusing the stream because nothing receives it any more. The encoder and channel.
#[inline(always)]
fn refused_channel_packet(ctx: &TcContext, pkt: &Packet) -> Option<RefusalEvent> {
    let (icmp, unreach) = if pkt.family == FAMILY_V4 {
        (PROTO_ICMP, ICMP_PORT_UNREACH)
    } else {
        (PROTO_ICMPV6, ICMPV6_PORT_UNREACH)
    };
    if pkt.proto != icmp || !pkt.has_l4 || (pkt.icmp_type, pkt.icmp_code) != unreach {
        return None;
    }
    let (src, dst, proto, udp) = quoted(ctx, pkt)?;
    if proto != PROTO_UDP || src != pkt.dst {
        return None;
    }
    let ports = ctx.load::<[u8; 4]>(udp).ok()?;
    let to = Endpoint {
        addr: dst,
        port: u16::from_be_bytes([ports[2], ports[3]]),
        family: pkt.family,
        _pad: 0,
    };
    let target = REPLIES.get_ptr(to)?;
    // SAFETY: a HASH value pointer, read once.
    let target = unsafe { &*target };
    Some(RefusalEvent {
        encoder_id: target.encoder_id,
        channel_id: target.channel_id,
    })
}

/// Tells the daemon (which the ring buffer wakes). A full ring loses the event, never the
/// count (`refused` in the encoder's drops).
#[inline(always)]
fn report_refusal(refusal: &RefusalEvent) {
    let _ = REFUSALS.output::<RefusalEvent>(refusal, 0);
}

/// The path of a veth without a policy: replies are rewritten, the rest passes.
#[inline(always)]
fn fail_open(ctx: &TcContext) -> i32 {
    let mut pkt = Packet::default();
    let reason = match parse(ctx, &mut pkt) {
        Err(Unparsed::Arp | Unparsed::NotIp) => r::PASS_OTHER,
        Err(Unparsed::Malformed) => r::PASS_MALFORMED,
        Ok(()) if pkt.proto != PROTO_UDP => match refused_channel_packet(ctx, &pkt) {
            Some(refusal) => {
                report_refusal(&refusal);
                count_drop(refusal.encoder_id, d::REFUSED);
                return TC_ACT_SHOT;
            }
            None => r::PASS_OTHER,
        },
        Ok(()) if pkt.fragment => r::PASS_MALFORMED,
        Ok(()) => match reply(ctx, &pkt, None) {
            Reply::Sent => return TC_ACT_REDIRECT,
            Reply::UnknownPeer => r::PASS_UNKNOWN_PEER,
            Reply::NoChannel => r::PASS_NO_CHANNEL,
            Reply::Failed { rewritten: false } => r::ERROR,
            Reply::Failed { rewritten: true } => {
                // The packet already carries the ingest address; sending it on unredirected
                // would leak it through the host's stack, so it is dropped.
                count(&TC_STATS, r::ERROR);
                return TC_ACT_SHOT;
            }
        },
    };
    count(&TC_STATS, reason);
    TC_ACT_OK
}

#[inline(always)]
fn pass(reason: u32) -> i32 {
    count(&TC_STATS, reason);
    TC_ACT_OK
}

#[inline(always)]
fn shot(id: u32, reason: usize) -> i32 {
    count_drop(id, reason);
    TC_ACT_SHOT
}

/// What the parser learnt of an IP packet leaving an encoder.
#[derive(Default)]
struct Packet {
    family: u8,
    /// The L4 protocol (after any IPv6 extension headers).
    proto: u8,
    /// As in [`Endpoint::addr`].
    src: [u8; 16],
    dst: [u8; 16],
    /// Whether `proto` is UDP, TCP or the family's ICMP and its header was read: then the
    /// ports (UDP, TCP) or `icmp_type` are set. Never for a later fragment.
    has_l4: bool,
    /// Offset of the L4 header.
    l4: usize,
    /// Host byte order; 0 for ICMP.
    src_port: u16,
    dst_port: u16,
    icmp_type: u8,
    icmp_code: u8,
    /// IPv6 hop limit (0 for IPv4).
    hop_limit: u8,
    /// Any fragment, first or later.
    fragment: bool,
    /// A fragment other than the first: no L4 header.
    later_fragment: bool,
    /// Length of the IP packet, headers included.
    ip_len: u64,
}

/// Frames that are not an IP packet the parser understood.
enum Unparsed {
    Arp,
    NotIp,
    /// Truncated or inconsistent headers.
    Malformed,
}

/// Parses Ethernet (untagged), IPv4 or IPv6 (stepping over up to [`MAX_EXT_HEADERS`]
/// extension headers), and the UDP, TCP or ICMP header. Every read is bounds-checked by
/// `bpf_skb_load_bytes`.
#[inline(always)]
fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<(), Unparsed> {
    let ether_type = u16::from_be(ctx.load::<u16>(12).map_err(|_| Unparsed::Malformed)?);
    match ether_type {
        ETH_P_IPV4 => parse_v4(ctx, pkt)?,
        ETH_P_IPV6 => parse_v6(ctx, pkt)?,
        ETH_P_ARP => return Err(Unparsed::Arp),
        _ => return Err(Unparsed::NotIp),
    }
    if pkt.later_fragment {
        return Ok(());
    }
    let icmp = if pkt.family == FAMILY_V4 {
        PROTO_ICMP
    } else {
        PROTO_ICMPV6
    };
    match pkt.proto {
        PROTO_UDP | PROTO_TCP => {
            let len = if pkt.proto == PROTO_UDP {
                UdpHdr::LEN
            } else {
                TCP_HDR_LEN
            };
            // The last byte of the minimal header first: all of it is there, or it is malformed.
            ctx.load::<u8>(pkt.l4 + len - 1)
                .map_err(|_| Unparsed::Malformed)?;
            let ports: [u8; 4] = ctx.load(pkt.l4).map_err(|_| Unparsed::Malformed)?;
            pkt.src_port = u16::from_be_bytes([ports[0], ports[1]]);
            pkt.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
            pkt.has_l4 = true;
        }
        p if p == icmp => {
            let hdr: [u8; ICMP_HDR_LEN] = ctx.load(pkt.l4).map_err(|_| Unparsed::Malformed)?;
            pkt.icmp_type = hdr[0];
            pkt.icmp_code = hdr[1];
            pkt.has_l4 = true;
        }
        _ => {}
    }
    Ok(())
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, pkt: &mut Packet) -> Result<(), Unparsed> {
    let ip: Ipv4Hdr = ctx.load(EthHdr::LEN).map_err(|_| Unparsed::Malformed)?;
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Unparsed::Malformed);
    }
    let frags = u16::from_be_bytes(ip.frags);
    let later = frags & 0x1fff != 0;
    pkt.family = FAMILY_V4;
    pkt.proto = ip.proto;
    pkt.src[..4].copy_from_slice(&ip.src_addr);
    pkt.dst[..4].copy_from_slice(&ip.dst_addr);
    pkt.l4 = EthHdr::LEN + ihl;
    pkt.fragment = later || frags & 0x2000 != 0;
    pkt.later_fragment = later;
    pkt.ip_len = u16::from_be_bytes(ip.tot_len) as u64;
    Ok(())
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, pkt: &mut Packet) -> Result<(), Unparsed> {
    let ip: Ipv6Hdr = ctx.load(EthHdr::LEN).map_err(|_| Unparsed::Malformed)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(Unparsed::Malformed);
    }
    let mut next = ip.next_hdr;
    let mut off = EthHdr::LEN + Ipv6Hdr::LEN;
    let mut fragment = false;
    let mut later = false;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let h: [u8; 2] = ctx.load(off).map_err(|_| Unparsed::Malformed)?;
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let h: [u8; 4] = ctx.load(off).map_err(|_| Unparsed::Malformed)?;
                next = h[0];
                fragment = true;
                later = u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0;
                off += 8;
            }
            _ => break,
        }
        i += 1;
    }
    // A chain longer than the walk leaves `next` on an extension header, which `parse` then
    // treats as an unknown protocol.
    pkt.family = FAMILY_V6;
    pkt.hop_limit = ip.hop_limit;
    pkt.proto = next;
    pkt.src = ip.src_addr;
    pkt.dst = ip.dst_addr;
    pkt.l4 = off;
    pkt.fragment = fragment;
    pkt.later_fragment = later;
    pkt.ip_len = (Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize) as u64;
    Ok(())
}

/// What became of a UDP packet offered to the return path.
enum Reply {
    /// Rewritten and redirected to the ingest NIC.
    Sent,
    /// Not from a channel's encoder endpoint (of this encoder, when it is known).
    NoChannel,
    /// From a channel's encoder endpoint, to a peer that never sent to the channel.
    UnknownPeer,
    /// A helper failed; `rewritten`: the packet already carries the ingest address.
    Failed { rewritten: bool },
}

/// Rewrites a reply from an encoder to a channel's source and redirects it to the ingest NIC.
/// `encoder`: the encoder the packet is known to leave (policy path); the reply must then be
/// for one of its channels.
#[inline(always)]
fn reply(ctx: &TcContext, pkt: &Packet, encoder: Option<u32>) -> Reply {
    let from = Endpoint {
        addr: pkt.src,
        port: pkt.src_port,
        family: pkt.family,
        _pad: 0,
    };
    let Some(target) = REPLIES.get_ptr(from) else {
        return Reply::NoChannel;
    };
    // SAFETY: a HASH value stays valid for this run (RCU); read through the pointer rather
    // than copied, to spare the stack.
    let target = unsafe { &*target };
    if encoder.is_some_and(|id| id != target.encoder_id) {
        return Reply::NoChannel;
    }
    let source = SourceKey {
        peer: Endpoint {
            addr: pkt.dst,
            port: pkt.dst_port,
            family: pkt.family,
            _pad: 0,
        },
        channel_id: target.channel_id,
    };
    if SOURCES.get_ptr(source).is_none() {
        return Reply::UnknownPeer;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if target.flags & REPLY_SRT != 0 {
        learn_srt_peer(ctx, pkt, &source, now);
    }
    let rewritten = if pkt.family == FAMILY_V4 {
        rewrite_v4(ctx, pkt, target)
    } else {
        rewrite_v6(ctx, pkt, target)
    };
    if rewritten.is_err() {
        return Reply::Failed { rewritten: false };
    }
    // SAFETY: no neighbour parameters: the helper looks the next hop up itself.
    let action = unsafe { bpf_redirect_neigh(target.ifindex, core::ptr::null_mut(), 0, 0) };
    if action != TC_ACT_REDIRECT as i64 {
        return Reply::Failed { rewritten: true };
    }
    count(&TC_STATS, r::REPLY_REDIRECTED);
    if let Some(s) = ENCODER_STATS.get_ptr_mut(target.encoder_id) {
        // SAFETY: the stats slot is per CPU.
        unsafe { add_flow(&mut (*s).tx, pkt.ip_len, now) };
    }
    Reply::Sent
}

/// Remembers the caller's SRT socket ID (the Destination Socket ID of what the listener sends
/// it), so that userspace can tell the caller to reconnect when the channel is repointed:
/// added only when the listener accepts the caller's conclusion handshake, at most the
/// channel's limit of callers (`crate::srt`).
#[inline(always)]
fn learn_srt_peer(ctx: &TcContext, pkt: &Packet, key: &SourceKey, now: u64) {
    crate::srt::learn(ctx, pkt.l4 + UdpHdr::LEN, key, now);
}

/// Source address and port to the ingest endpoint. The kernel's csum helpers keep the checksums
/// right whether the UDP checksum is complete or still partial (TX offload in the encoder).
#[inline(always)]
fn rewrite_v4(ctx: &TcContext, pkt: &Packet, target: &ReplyTarget) -> Result<(), i64> {
    let old_addr: u32 = ctx.load(IPV4_SRC_OFF)?;
    let new = target.ingest.addr;
    let new_addr = u32::from_ne_bytes([new[0], new[1], new[2], new[3]]);
    let udp_check = pkt.l4 + UDP_CHECK_OFF;
    // A zero UDP checksum means "none" in IPv4 and stays zero (BPF_F_MARK_MANGLED_0).
    let l4_flags = (BPF_F_MARK_MANGLED_0 | BPF_F_PSEUDO_HDR) as u64;
    ctx.l4_csum_replace(udp_check, old_addr as u64, new_addr as u64, l4_flags | 4)?;
    ctx.l3_csum_replace(IPV4_CHECK_OFF, old_addr as u64, new_addr as u64, 4)?;
    ctx.store(IPV4_SRC_OFF, &new_addr, 0)?;
    rewrite_port(ctx, pkt, target, BPF_F_MARK_MANGLED_0 as u64)
}

#[inline(always)]
fn rewrite_v6(ctx: &TcContext, pkt: &Packet, target: &ReplyTarget) -> Result<(), i64> {
    let udp_check = pkt.l4 + UDP_CHECK_OFF;
    let new = target.ingest.addr;
    let mut i = 0;
    while i < 4 {
        let off = IPV6_SRC_OFF + i * 4;
        let old_word: u32 = ctx.load(off)?;
        let new_word =
            u32::from_ne_bytes([new[i * 4], new[i * 4 + 1], new[i * 4 + 2], new[i * 4 + 3]]);
        ctx.l4_csum_replace(
            udp_check,
            old_word as u64,
            new_word as u64,
            BPF_F_PSEUDO_HDR as u64 | 4,
        )?;
        ctx.store(off, &new_word, 0)?;
        i += 1;
    }
    rewrite_port(ctx, pkt, target, 0)
}

#[inline(always)]
fn rewrite_port(
    ctx: &TcContext,
    pkt: &Packet,
    target: &ReplyTarget,
    flags: u64,
) -> Result<(), i64> {
    let old_port = pkt.src_port.to_be();
    let new_port = target.ingest.port.to_be();
    ctx.l4_csum_replace(
        pkt.l4 + UDP_CHECK_OFF,
        old_port as u64,
        new_port as u64,
        flags | 2,
    )?;
    ctx.store(pkt.l4, &new_port, 0)
}
