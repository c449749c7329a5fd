//! TC on each local encoder's host-side veth (clsact ingress: traffic leaving the encoder's
//! namespace). Replies to a channel's contribution source get the channel's ingest address as
//! their source and leave straight out of the ingest NIC.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_REDIRECT},
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
    Endpoint, REPLY_SRT, ReplyTarget, SOURCE_REFRESH_NS, SourceKey, SrtPeer, srt, tc_reason as r,
};

use crate::maps::{ENCODER_STATS, REPLIES, SOURCES, SRT_PEERS, TC_STATS, add_flow, count};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const IPV4_CHECK_OFF: usize = EthHdr::LEN + 10;
const IPV4_SRC_OFF: usize = EthHdr::LEN + 12;
const IPV6_SRC_OFF: usize = EthHdr::LEN + 8;
const UDP_CHECK_OFF: usize = 6;

/// Rewrites replies from an encoder to a channel's source and redirects them to the ingest NIC.
///
/// Fail-open for now: everything else, and anything it cannot parse, gets `TC_ACT_OK` and is
/// counted by reason in `TC_STATS`.
#[classifier]
pub fn nsfail_egress(ctx: TcContext) -> i32 {
    let reason = match try_egress(&ctx) {
        Ok(action) => return action,
        Err(reason) => reason,
    };
    count(&TC_STATS, reason);
    TC_ACT_OK
}

/// What a reply needs: its source and destination, where its source address and UDP header
/// are, and the channel it belongs to.
struct Reply {
    src: Endpoint,
    dst: Endpoint,
    l4: usize,
    ip_len: u64,
}

#[inline(always)]
fn try_egress(ctx: &TcContext) -> Result<i32, u32> {
    let ether_type = u16::from_be(ctx.load::<u16>(12).map_err(|_| r::PASS_MALFORMED)?);
    let (reply, v4) = match ether_type {
        ETH_P_IPV4 => (parse_v4(ctx)?, true),
        ETH_P_IPV6 => (parse_v6(ctx)?, false),
        _ => return Err(r::PASS_OTHER),
    };
    // SAFETY: a HASH lookup, copied out at once.
    let target: ReplyTarget = *unsafe { REPLIES.get(reply.src) }.ok_or(r::PASS_NO_CHANNEL)?;
    let source = SourceKey {
        peer: reply.dst,
        channel_id: target.channel_id,
    };
    if SOURCES.get_ptr(source).is_none() {
        return Err(r::PASS_UNKNOWN_PEER);
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if target.flags & REPLY_SRT != 0 {
        learn_srt_peer(ctx, &reply, &source, now);
    }
    if v4 {
        rewrite_v4(ctx, &reply, &target).map_err(|_| r::ERROR)?;
    } else {
        rewrite_v6(ctx, &reply, &target).map_err(|_| r::ERROR)?;
    }
    // SAFETY: no neighbour parameters: the helper looks the next hop up itself.
    let action = unsafe { bpf_redirect_neigh(target.ifindex, core::ptr::null_mut(), 0, 0) };
    if action != TC_ACT_REDIRECT as i64 {
        // The packet is already rewritten; sending it on unredirected would leak it with the
        // ingest address through the host's stack, so it is dropped here and counted.
        count(&TC_STATS, r::ERROR);
        return Ok(aya_ebpf::bindings::TC_ACT_SHOT);
    }
    count(&TC_STATS, r::REPLY_REDIRECTED);
    if let Some(s) = ENCODER_STATS.get_ptr_mut(target.encoder_id) {
        // SAFETY: the stats slot is per CPU.
        unsafe { add_flow(&mut (*s).tx, reply.ip_len, now) };
    }
    Ok(TC_ACT_REDIRECT)
}

/// Remembers the caller's SRT socket ID (the Destination Socket ID of what the listener sends
/// it), so that userspace can tell the caller to reconnect when the channel is repointed.
/// Written when the ID changes or at most once a second.
#[inline(always)]
fn learn_srt_peer(ctx: &TcContext, reply: &Reply, key: &SourceKey, now: u64) {
    let Ok(id) = ctx.load::<[u8; 4]>(reply.l4 + UdpHdr::LEN + srt::DEST_SOCKET_ID_OFFSET) else {
        return;
    };
    let socket_id = u32::from_be_bytes(id);
    let fresh = match SRT_PEERS.get_ptr(key) {
        // SAFETY: a map value pointer, read once.
        Some(p) => unsafe {
            (*p).socket_id == socket_id && now.saturating_sub((*p).last_seen_ns) < SOURCE_REFRESH_NS
        },
        None => false,
    };
    if !fresh {
        let peer = SrtPeer {
            socket_id,
            _pad: 0,
            last_seen_ns: now,
        };
        let _ = SRT_PEERS.insert(key, peer, 0);
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext) -> Result<Reply, u32> {
    let ip: Ipv4Hdr = ctx.load(EthHdr::LEN).map_err(|_| r::PASS_MALFORMED)?;
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(r::PASS_MALFORMED);
    }
    if ip.proto != IPPROTO_UDP {
        return Err(r::PASS_OTHER);
    }
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(r::PASS_MALFORMED);
    }
    let l4 = EthHdr::LEN + ihl;
    let udp: UdpHdr = ctx.load(l4).map_err(|_| r::PASS_MALFORMED)?;
    Ok(Reply {
        src: Endpoint::v4(ip.src_addr, u16::from_be_bytes(udp.src)),
        dst: Endpoint::v4(ip.dst_addr, u16::from_be_bytes(udp.dst)),
        l4,
        ip_len: u16::from_be_bytes(ip.tot_len) as u64,
    })
}

#[inline(always)]
fn parse_v6(ctx: &TcContext) -> Result<Reply, u32> {
    let ip: Ipv6Hdr = ctx.load(EthHdr::LEN).map_err(|_| r::PASS_MALFORMED)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(r::PASS_MALFORMED);
    }
    if ip.next_hdr != IPPROTO_UDP {
        return Err(r::PASS_OTHER);
    }
    let l4 = EthHdr::LEN + Ipv6Hdr::LEN;
    let udp: UdpHdr = ctx.load(l4).map_err(|_| r::PASS_MALFORMED)?;
    Ok(Reply {
        src: Endpoint::v6(ip.src_addr, u16::from_be_bytes(udp.src)),
        dst: Endpoint::v6(ip.dst_addr, u16::from_be_bytes(udp.dst)),
        l4,
        ip_len: (Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize) as u64,
    })
}

/// Source address and port to the ingest endpoint. The kernel's csum helpers keep the checksums
/// right whether the UDP checksum is complete or still partial (TX offload in the encoder).
#[inline(always)]
fn rewrite_v4(ctx: &TcContext, reply: &Reply, target: &ReplyTarget) -> Result<(), i64> {
    let old_addr: u32 = ctx.load(IPV4_SRC_OFF)?;
    let new = target.ingest.addr;
    let new_addr = u32::from_ne_bytes([new[0], new[1], new[2], new[3]]);
    let udp_check = reply.l4 + UDP_CHECK_OFF;
    // A zero UDP checksum means "none" in IPv4 and stays zero (BPF_F_MARK_MANGLED_0).
    let l4_flags = (BPF_F_MARK_MANGLED_0 | BPF_F_PSEUDO_HDR) as u64;
    ctx.l4_csum_replace(udp_check, old_addr as u64, new_addr as u64, l4_flags | 4)?;
    ctx.l3_csum_replace(IPV4_CHECK_OFF, old_addr as u64, new_addr as u64, 4)?;
    ctx.store(IPV4_SRC_OFF, &new_addr, 0)?;
    rewrite_port(ctx, reply, target, BPF_F_MARK_MANGLED_0 as u64)
}

#[inline(always)]
fn rewrite_v6(ctx: &TcContext, reply: &Reply, target: &ReplyTarget) -> Result<(), i64> {
    let udp_check = reply.l4 + UDP_CHECK_OFF;
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
    rewrite_port(ctx, reply, target, 0)
}

#[inline(always)]
fn rewrite_port(
    ctx: &TcContext,
    reply: &Reply,
    target: &ReplyTarget,
    flags: u64,
) -> Result<(), i64> {
    let old_port = reply.src.port.to_be();
    let new_port = target.ingest.port.to_be();
    ctx.l4_csum_replace(
        reply.l4 + UDP_CHECK_OFF,
        old_port as u64,
        new_port as u64,
        flags | 2,
    )?;
    ctx.store(reply.l4, &new_port, 0)
}
