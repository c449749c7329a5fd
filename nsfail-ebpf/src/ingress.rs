//! XDP on the ingest NIC: forwards channel packets to the channel's active encoder.

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action::{XDP_PASS, XDP_REDIRECT, XDP_TX},
    helpers::{
        bpf_xdp_adjust_head,
        generated::{bpf_jiffies64, bpf_redirect_map, bpf_xdp_get_buff_len},
    },
    macros::xdp,
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};
use nsfail_common::{
    ACTION_REDIRECT, ACTION_ROUTED, CHANNEL_SOURCES, ChannelKey4, ChannelTarget, Endpoint,
    FAMILY_V4, SOURCE_REFRESH_NS, SourceInfo, SourceKey, SourceNet, rewrite, same_endpoint,
    xdp_reason as r,
};

use crate::maps::{
    CHANNEL_STATS, CHANNELS_V4, CHANNELS_V6, ENCODER_STATS, SOURCE_NETS, SOURCES, TX_PORTS,
    XDP_STATS, add_flow, count,
};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const VLAN_HLEN: usize = 4;
const IPPROTO_UDP: u8 = 17;

/// The length of a jiffy in ns, and the CLOCK_MONOTONIC time of jiffy 0 (wrapping), both set
/// by userspace when it loads the object (`JiffyClock` in the `dataplane` module). Read-only
/// data: the verifier knows their values.
#[unsafe(no_mangle)]
static NSFAIL_TICK_NS: u64 = 0;
#[unsafe(no_mangle)]
static NSFAIL_JIFFY0_NS: u64 = 0;

#[inline(always)]
fn clock_ns(jiffies: u64) -> u64 {
    // SAFETY: plain reads of constants; volatile so that the compiler does not fold in the
    // zeros they have before userspace sets them.
    let (tick, zero) = unsafe {
        (
            core::ptr::read_volatile(&NSFAIL_TICK_NS),
            core::ptr::read_volatile(&NSFAIL_JIFFY0_NS),
        )
    };
    jiffies.wrapping_mul(tick).wrapping_add(zero)
}

/// A pointer to a `T` at `offset` in the packet, after checking that all of it is inside.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, u32> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(r::PASS_MALFORMED);
    }
    Ok((start + offset) as *mut T)
}

/// Whether the frame holds `len` bytes: in its linear part (a bounds comparison), or else
/// with the fragments of a multi-buffer frame (a helper call, paid only by such frames).
#[inline(always)]
fn holds(ctx: &XdpContext, len: usize) -> bool {
    // SAFETY: ctx is the live XDP context.
    ctx.data() + len <= ctx.data_end() || len <= unsafe { bpf_xdp_get_buff_len(ctx.ctx) as usize }
}

/// Forwards packets addressed to a channel's ingest endpoint to its active encoder.
///
/// Fail-open: anything that is not a well-formed, unfragmented UDP packet to a known channel —
/// including frames it cannot parse, fragments, expiring TTLs and encoders without a device —
/// gets `XDP_PASS` unchanged, counted by reason in `XDP_STATS`. It never drops.
#[xdp(frags)]
pub fn nsfail_ingress(ctx: XdpContext) -> u32 {
    match try_ingress(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count(&XDP_STATS, reason);
            XDP_PASS
        }
    }
}

#[inline(always)]
fn try_ingress(ctx: &XdpContext) -> Result<u32, u32> {
    // The usual frame first: untagged IPv4 without options, its headers at fixed offsets, so
    // that the compiler works with constants (one bounds check, no variable UDP offset).
    // Everything else, and anything this check does not hold for, takes the general parse.
    // A frame shorter than that goes to the general parse too, which says what it is.
    if let Ok(plain) = ptr_at::<[u8; PLAIN_LEN]>(ctx, 0) {
        // SAFETY: bounds checked by ptr_at.
        let f = unsafe { &*plain };
        if f[12] == 0x08 && f[13] == 0x00 && f[EthHdr::LEN] == 0x45 {
            return ipv4::<true>(ctx, plain.cast(), EthHdr::LEN, false);
        }
    }
    general(ctx)
}

/// An untagged IPv4 frame without options: Ethernet, a 20-byte IPv4 header and UDP.
const PLAIN_LEN: usize = EthHdr::LEN + Ipv4Hdr::LEN + UdpHdr::LEN;

#[inline(always)]
fn general(ctx: &XdpContext) -> Result<u32, u32> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3 = EthHdr::LEN;
    let mut vlan = false;
    if ether_type == ETH_P_8021Q {
        let inner: *const [u8; 2] = ptr_at(ctx, EthHdr::LEN + 2)?;
        // SAFETY: bounds checked by ptr_at.
        ether_type = u16::from_be_bytes(unsafe { *inner });
        l3 += VLAN_HLEN;
        vlan = true;
    }
    match ether_type {
        ETH_P_IPV4 => ipv4::<false>(ctx, eth.cast(), l3, vlan),
        ETH_P_IPV6 => ipv6(ctx, eth.cast(), l3, vlan),
        _ => Err(r::PASS_NOT_IP),
    }
}

/// `PLAIN`: the caller found an untagged frame (`l3` 14) with a 20-byte IPv4 header and room
/// for UDP after it.
#[inline(always)]
fn ipv4<const PLAIN: bool>(
    ctx: &XdpContext,
    frame: *mut u8,
    l3: usize,
    vlan: bool,
) -> Result<u32, u32> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3)?;
    // SAFETY: bounds checked by ptr_at; every field is a byte array.
    let hdr = unsafe { &mut *ip };
    let ihl = if PLAIN {
        Ipv4Hdr::LEN
    } else {
        let ihl = ((hdr.vihl & 0x0f) as usize) * 4;
        if hdr.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
            return Err(r::PASS_MALFORMED);
        }
        ihl
    };
    if hdr.proto != IPPROTO_UDP {
        return Err(r::PASS_NOT_UDP);
    }
    // MF set, or a non-zero offset: first and later fragments both pass.
    if u16::from_be_bytes(hdr.frags) & 0x3fff != 0 {
        return Err(r::PASS_FRAGMENT);
    }
    let tot_len = u16::from_be_bytes(hdr.tot_len) as usize;
    let udp: *mut UdpHdr = ptr_at(ctx, l3 + ihl)?;
    // SAFETY: bounds checked by ptr_at.
    let udp_hdr = unsafe { &mut *udp };
    let udp_len = u16::from_be_bytes(udp_hdr.len) as usize;
    if tot_len < ihl + UdpHdr::LEN
        || udp_len < UdpHdr::LEN
        || udp_len > tot_len - ihl
        || !holds(ctx, l3 + tot_len)
    {
        return Err(r::PASS_MALFORMED);
    }
    let key = ChannelKey4 {
        addr: hdr.dst_addr,
        port: udp_hdr.dst,
        _pad: [0; 2],
    };
    let (target, decided) = channel(CHANNELS_V4.get_ptr(key))?;
    check_source(&decided, || Endpoint::v4(hdr.src_addr, 0))?;
    if hdr.ttl <= 1 {
        return Err(r::PASS_TTL);
    }
    check_device(&decided)?;

    const {
        assert!(
            size_of::<Ipv4Hdr>() == rewrite::IPV4_LEN && size_of::<UdpHdr>() == rewrite::UDP_LEN
        )
    };
    // Both headers were bounds checked by ptr_at; `hdr` and `udp_hdr` are not used again.
    let src = || {
        // SAFETY: see above; read only.
        let (ip, udp) = unsafe { (&*ip, &*udp) };
        Endpoint::v4_word(u32::from_ne_bytes(ip.src_addr), u16::from_be_bytes(udp.src))
    };
    let rewrite = || {
        // SAFETY: see above, and the headers consist of byte arrays only, so they are these
        // byte arrays; `src` has been called, no other reference is live. The target is a
        // map value, valid memory for the rest of the program (RCU).
        let (ip, udp, target) = unsafe {
            (
                &mut *ip.cast::<[u8; rewrite::IPV4_LEN]>(),
                &mut *udp.cast::<[u8; rewrite::UDP_LEN]>(),
                &*target,
            )
        };
        let dst = [
            target.addr[0],
            target.addr[1],
            target.addr[2],
            target.addr[3],
        ];
        rewrite::ipv4_sealed(ip, udp, dst, target.port, deltas(target));
    };
    forward(
        ctx,
        frame,
        target,
        &decided,
        vlan,
        tot_len as u64,
        src,
        rewrite,
    )
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, frame: *mut u8, l3: usize, vlan: bool) -> Result<u32, u32> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3)?;
    // SAFETY: bounds checked by ptr_at; every field is a byte array.
    let hdr = unsafe { &mut *ip };
    if hdr.vcf[0] >> 4 != 6 {
        return Err(r::PASS_MALFORMED);
    }
    // Extension headers (fragment header included) pass: the fixed header must lead to UDP.
    if hdr.next_hdr != IPPROTO_UDP {
        return Err(r::PASS_NOT_UDP);
    }
    let payload_len = u16::from_be_bytes(hdr.payload_len) as usize;
    let udp: *mut UdpHdr = ptr_at(ctx, l3 + Ipv6Hdr::LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let udp_hdr = unsafe { &mut *udp };
    let udp_len = u16::from_be_bytes(udp_hdr.len) as usize;
    // A zero UDP checksum is invalid in IPv6 (RFC 8200): not ours to repair.
    if udp_len < UdpHdr::LEN
        || udp_len > payload_len
        || udp_hdr.check == [0, 0]
        || !holds(ctx, l3 + Ipv6Hdr::LEN + payload_len)
    {
        return Err(r::PASS_MALFORMED);
    }
    let key = Endpoint::v6(hdr.dst_addr, u16::from_be_bytes(udp_hdr.dst));
    let (target, decided) = channel(CHANNELS_V6.get_ptr(key))?;
    check_source(&decided, || Endpoint::v6(hdr.src_addr, 0))?;
    if hdr.hop_limit <= 1 {
        return Err(r::PASS_TTL);
    }
    check_device(&decided)?;

    const {
        assert!(
            size_of::<Ipv6Hdr>() == rewrite::IPV6_LEN && size_of::<UdpHdr>() == rewrite::UDP_LEN
        )
    };
    let src = || {
        // SAFETY: as in ipv4().
        let (ip, udp) = unsafe { (&*ip, &*udp) };
        Endpoint::v6(ip.src_addr, u16::from_be_bytes(udp.src))
    };
    let rewrite = || {
        // SAFETY: as in ipv4().
        let (ip, udp, target) = unsafe {
            (
                &mut *ip.cast::<[u8; rewrite::IPV6_LEN]>(),
                &mut *udp.cast::<[u8; rewrite::UDP_LEN]>(),
                &*target,
            )
        };
        rewrite::ipv6_sealed(ip, udp, &target.addr, target.port, deltas(target));
    };
    forward(
        ctx,
        frame,
        target,
        &decided,
        vlan,
        (Ipv6Hdr::LEN + payload_len) as u64,
        src,
        rewrite,
    )
}

/// The checksum deltas userspace sealed into the target for its key, which is this packet's
/// destination.
#[inline(always)]
fn deltas(target: &ChannelTarget) -> rewrite::Deltas {
    rewrite::Deltas {
        ip: target.csum_ip,
        udp: target.csum_udp,
    }
}

/// What a packet's fate is decided by, read from the channel's target once: whether and
/// where it is redirected, which counters move, whether its source is checked. Every later
/// decision uses these values, never the map value again, so a packet that races an update
/// of its channel is redirected, counted and answered by one target.
struct Decided {
    action: u8,
    flags: u8,
    channel_id: u32,
    encoder_id: u32,
}

/// The target a channel lookup found, and its [`Decided`] fields. The rest of the target
/// (addresses, MACs, checksum deltas: what the rewrite writes) is read in place when the
/// rewrite runs rather than copied out first (a copy is a load and a stack store per field,
/// and is no single read either: a value userspace replaces while a packet reads it can
/// give the packet fields of both).
#[inline(always)]
fn channel(found: Option<*const ChannelTarget>) -> Result<(*const ChannelTarget, Decided), u32> {
    let Some(t) = found else {
        return Err(r::PASS_NO_CHANNEL);
    };
    // SAFETY: a map value, valid memory for the rest of the program (RCU); volatile, so that
    // each field is read here once and not again later from memory that may have changed.
    let decided = unsafe {
        Decided {
            action: core::ptr::read_volatile(&raw const (*t).action),
            flags: core::ptr::read_volatile(&raw const (*t).flags),
            channel_id: core::ptr::read_volatile(&raw const (*t).channel_id),
            encoder_id: core::ptr::read_volatile(&raw const (*t).encoder_id),
        }
    };
    Ok((t, decided))
}

/// A channel with `sources` takes packets only from addresses inside them: anything else
/// passes to the host untouched (one LPM lookup, only for such channels; `src` gives the
/// source address, read from the frame only then).
#[inline(always)]
fn check_source(decided: &Decided, src: impl FnOnce() -> Endpoint) -> Result<(), u32> {
    if decided.flags & CHANNEL_SOURCES != 0 {
        let key = Key::new(
            SourceNet::prefix_len(128),
            SourceNet::new(decided.channel_id, src().addr),
        );
        if SOURCE_NETS.get(&key).is_none() {
            return Err(r::PASS_NOT_SOURCE);
        }
    }
    Ok(())
}

/// A local encoder is reached through the DEVMAP: without an entry there the packet is not
/// rewritten at all (the encoder's veth is gone or not attached yet). The redirect is asked
/// for here, before the rewrite: `bpf_redirect_map` only records the target (the kernel
/// acts on it once the program returns `XDP_REDIRECT`) and says whether the slot is there,
/// so one helper call both checks the device and redirects, with no separate DEVMAP lookup.
#[inline(always)]
fn check_device(decided: &Decided) -> Result<(), u32> {
    if decided.action == ACTION_REDIRECT {
        // The helper itself rather than `DevMap::redirect`, whose folding of the return value
        // costs six instructions: it returns XDP_REDIRECT, or the flags' action (XDP_PASS).
        // SAFETY: `DevMap` is `repr(transparent)` over its map definition, so its address is
        // the map's, as the loader relocates it.
        let ret = unsafe {
            bpf_redirect_map(
                core::ptr::addr_of!(TX_PORTS).cast_mut().cast(),
                decided.encoder_id as u64,
                XDP_PASS as u64,
            )
        };
        if ret != XDP_REDIRECT as i64 {
            return Err(r::PASS_NO_DEVICE);
        }
    }
    Ok(())
}

/// Counts, learns the source, rewrites the packet (`rewrite`: the IP and UDP headers; then
/// the MACs, dropping a VLAN tag on the way into a veth), and hands it on. In this order so
/// that the counters' map lookups, calls as far as the compiler knows, come while little is
/// held in registers: the source (`src`) and everything the rewrite needs are read from the
/// frame and the target after them, not kept across them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward(
    ctx: &XdpContext,
    frame: *mut u8,
    target: *const ChannelTarget,
    decided: &Decided,
    vlan: bool,
    ip_len: u64,
    src: impl FnOnce() -> Endpoint,
    rewrite: impl FnOnce(),
) -> Result<u32, u32> {
    // CLOCK_MONOTONIC at tick resolution, as `bpf_ktime_get_coarse_ns` gives it, from
    // jiffies (one load: the verifier inlines `bpf_jiffies64`) scaled by constants set at
    // load; last-seen times are read against windows of tens of ms and more.
    // SAFETY: a helper without arguments.
    let now = clock_ns(unsafe { bpf_jiffies64() });
    match CHANNEL_STATS.get_ptr_mut(decided.channel_id) {
        Some(s) => {
            // SAFETY: a per-CPU slot, written only from this CPU.
            let s = unsafe { &mut *s };
            add_flow(&mut s.flow, ip_len, now);
            let src = src();
            if !same_source(&s.last_src, &src)
                || now.wrapping_sub(s.last_src_ns) >= SOURCE_REFRESH_NS
            {
                learn_source(&src, decided.channel_id, now);
                s.last_src = src;
                s.last_src_ns = now;
            }
        }
        None => learn_source(&src(), decided.channel_id, now),
    }
    if let Some(s) = ENCODER_STATS.get_ptr_mut(decided.encoder_id) {
        // SAFETY: as above.
        add_flow(unsafe { &mut (*s).rx }, ip_len, now);
    }
    rewrite();

    let redirect = decided.action == ACTION_REDIRECT;
    // SAFETY: a map value, valid memory for the rest of the program (RCU).
    let target = unsafe { &*target };
    // The encoder's veth carries untagged frames: write the new MACs 4 bytes further on, over
    // the tag, so that the inner EtherType follows them, then drop the first 4 bytes.
    let strip = redirect && vlan;
    let macs: *mut [u8; 12] = if strip {
        // The tagged frame's own bounds check (the general parse only).
        ptr_at(ctx, VLAN_HLEN)?
    } else {
        // The frame holds at least its Ethernet header, checked by the parse.
        frame.cast()
    };
    // SAFETY: 12 bytes inside the frame, either way.
    unsafe {
        let m = &mut *macs;
        m[..6].copy_from_slice(&target.dmac);
        m[6..].copy_from_slice(&target.smac);
    }
    if strip {
        // SAFETY: ctx is the live XDP context; no packet pointer is used after this call.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, VLAN_HLEN as i32) } != 0 {
            // Cannot happen for a frame we just parsed past the tag; keep the count honest.
            count(&XDP_STATS, r::PASS_MALFORMED);
            return Ok(XDP_PASS);
        }
    }
    if redirect {
        // The redirect was recorded by check_device.
        count(&XDP_STATS, r::REDIRECTED);
        Ok(XDP_REDIRECT)
    } else {
        // The same segment, or routed back out of the uplink to the next hop towards an
        // encoder on another host (its MAC resolved by userspace).
        count(
            &XDP_STATS,
            if decided.action == ACTION_ROUTED {
                r::ROUTED
            } else {
                r::TX
            },
        );
        Ok(XDP_TX)
    }
}

/// Whether `src` is the source this CPU last learned for the channel (`last`). For an IPv4
/// source two words decide: its address and its last word (port, family 4, pad 0). `last`
/// is only ever written here, from an endpoint made by `Endpoint::v4_word` or `Endpoint::v6`,
/// or zeroed by userspace with its channel id, so a `last` whose family is 4 has the zero
/// words 1 to 3 of an IPv4 endpoint. An IPv6 source is compared in all five words (the
/// compiler drops that branch from the IPv4 path: the family of `src` is a constant there).
#[inline(always)]
fn same_source(last: &Endpoint, src: &Endpoint) -> bool {
    if src.family == FAMILY_V4 {
        let (l, s) = (last.all_words(), src.all_words());
        l[0] == s[0] && l[4] == s[4]
    } else {
        same_endpoint(last, src)
    }
}

/// Remembers who sends to the channel, so that the return path only answers real sources.
/// Writes at most once a second per source, to keep the hot path read-mostly.
#[inline(always)]
fn learn_source(src: &Endpoint, channel_id: u32, now: u64) {
    let key = SourceKey {
        peer: *src,
        channel_id,
    };
    let fresh = match SOURCES.get_ptr(key) {
        // SAFETY: a map value pointer, read once.
        Some(v) => now.wrapping_sub(unsafe { (*v).last_seen_ns }) < SOURCE_REFRESH_NS,
        None => false,
    };
    if !fresh {
        let _ = SOURCES.insert(key, SourceInfo { last_seen_ns: now }, 0);
    }
}
