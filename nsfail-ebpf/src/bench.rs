//! Reference programs for `cargo xtask bench`, built as their own object (`nsfail-bench`) so
//! that the production object stays exactly what nsfail loads.
//!
//! - `bench_pass`: `XDP_PASS` and nothing else (what any XDP program costs at least).
//! - `bench_redirect`: a DEVMAP redirect to slot 0 without parsing (the floor for a redirector).
//! - `bench_mac_redirect`: the same, plus a MAC rewrite: it touches the headers as a rewriter does.
//! - `bench_minimal`: the job nsfail's hit path does and nothing else: parse Ethernet, IPv4
//!   and UDP, one hash lookup of (daddr, dport), rewrite both MACs, the destination address
//!   and port, the TTL, the IPv4 and UDP checksums incrementally, DEVMAP redirect. No
//!   counters, no learning, no VLAN, no IPv6: the practical ceiling for nsfail's hit path.
//! - `bench_generator`: a live-frames traffic generator (`BPF_F_TEST_XDP_LIVE_FRAMES`).
//! - `bench_sink`: counts and drops what arrives (the destination of forwarding benchmarks).
//!
//! Userspace loads one instance of this object per role, so each instance's maps belong to one
//! generator, sink or redirector.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_xdp_get_buff_len},
    },
    macros::{map, xdp},
    maps::{Array, DevMap, HashMap, PerCpuArray},
    programs::XdpContext,
};
use nsfail_common::rewrite;

/// Bytes of header the generator writes from its template: Ethernet, IPv4, UDP.
const TEMPLATE_LEN: usize = 42;
/// How many templates the generator rotates through (a power of two).
const MAX_TEMPLATES: u32 = 4096;

/// Slot 0: the ifindex `bench_redirect` and `bench_mac_redirect` send everything to. Writer:
/// userspace.
#[map]
static BENCH_PORTS: DevMap = DevMap::with_max_entries(1, 0);

/// Slot 0: the destination MAC `bench_mac_redirect` writes. Writer: userspace.
#[map]
static BENCH_MAC: Array<[u8; 6]> = Array::with_max_entries(1, 0);

/// Key of `MIN_CHANNELS`: an IPv4 destination address and UDP port (network byte order),
/// padded to 8 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MinKey {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// Value of `MIN_CHANNELS`: everything the rewrite needs, in 24 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MinTarget {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub addr: [u8; 4],
    /// Host byte order.
    pub port: u16,
    /// Counter slot of the budget programs (`minimal` with `B_COUNTERS` or `B_LEARN`).
    pub _pad: u16,
    /// `BENCH_PORTS` slot.
    pub slot: u32,
}

/// (daddr, dport) → rewrite target, for `bench_minimal`. Writer: userspace.
#[map]
static MIN_CHANNELS: HashMap<MinKey, MinTarget> = HashMap::with_max_entries(131_072, 0);

/// Index: template number. Value: the first `TEMPLATE_LEN` bytes of a generated frame, with
/// both checksums valid for the payload userspace gave the test run. Writer: userspace.
#[map]
static GEN_TEMPLATES: Array<[u8; TEMPLATE_LEN]> = Array::with_max_entries(MAX_TEMPLATES, 0);

/// Index 0: how many templates are in use (a power of two, at least 1). Writer: userspace.
#[map]
static GEN_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// Index 0 (per CPU): frames generated, which picks the next template. Writer: the generator.
#[map]
static GEN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Index 0 (per CPU): packets and bytes the sink dropped. Writer: the sink. Reader: userspace.
#[map]
static SINK_COUNT: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Index 0: `bpf_ktime_get_ns` of the first packet since userspace last zeroed it (the
/// arrival time of a failover's first packet). Writer: the sink; userspace zeroes it.
#[map]
static SINK_FIRST_NS: Array<u64> = Array::with_max_entries(1, 0);

/// Passes everything: the cost of running an XDP program at all.
#[xdp(frags)]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// Redirects everything to `BENCH_PORTS[0]` without looking at it: the cheapest redirector.
/// Passes when the slot is empty.
#[xdp(frags)]
pub fn bench_redirect(_ctx: XdpContext) -> u32 {
    BENCH_PORTS
        .redirect(0, XDP_PASS as u64)
        .unwrap_or_else(|action| action)
}

/// Writes a destination MAC, rewrites the last header byte in place, and redirects like
/// `bench_redirect`: the least a redirector that rewrites frames does. Unlike `bench_redirect`
/// it writes both ends of the headers (bytes 0 and 41: Ethernet to UDP of a plain IPv4 frame),
/// so it pays for bringing every header cache line in, as any rewriter does. Passes frames
/// shorter than that.
#[xdp(frags)]
pub fn bench_mac_redirect(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + TEMPLATE_LEN > ctx.data_end() {
        return XDP_PASS;
    }
    let Some(mac) = BENCH_MAC.get(0) else {
        return XDP_PASS;
    };
    let frame = start as *mut u8;
    // SAFETY: the frame holds TEMPLATE_LEN bytes (checked above); volatile, so that the
    // compiler keeps this same-value write.
    unsafe {
        let last = frame.add(TEMPLATE_LEN - 1);
        core::ptr::write_volatile(last, core::ptr::read_volatile(last));
    }
    for (i, byte) in mac.iter().enumerate() {
        // SAFETY: i < 6 < TEMPLATE_LEN.
        unsafe { *frame.add(i) = *byte };
    }
    BENCH_PORTS
        .redirect(0, XDP_PASS as u64)
        .unwrap_or_else(|action| action)
}

/// The minimal rewrite: see the module comment. Anything else passes untouched.
#[xdp(frags)]
pub fn bench_minimal(ctx: XdpContext) -> u32 {
    minimal::<0>(&ctx)
}

// The per-packet budget: the minimal rewrite with one of nsfail's extra parts added (or one of
// its own parts taken away), each its own program, so that `bench prog` measures each part's
// cost as a difference within one run.

/// Parse only (Ethernet, IPv4, UDP), then `XDP_PASS`: no lookup.
const B_PARSE_ONLY: u32 = 1;
/// No checksum updates (the packet goes out with wrong checksums: a measurement only).
const B_NO_CSUM: u32 = 2;
/// One `bpf_ktime_get_coarse_ns` per packet (nsfail's last-seen times).
const B_CLOCK: u32 = 4;
/// Per-CPU counters as nsfail keeps them: the channel's (packets, bytes, last seen), the
/// encoder's, and the outcome's, three per-CPU array slots.
const B_COUNTERS: u32 = 8;
/// The per-CPU last-source comparison (source learning's steady state: no map write).
const B_LEARN: u32 = 16;
/// A DEVMAP lookup before the rewrite (nsfail's device check before this change).
const B_DEVCHECK: u32 = 32;
/// `bpf_xdp_get_buff_len` per packet (nsfail's length check before this change).
const B_BUFLEN: u32 = 64;
/// `bpf_jiffies64` scaled to ns per packet (nsfail's clock since the coarse one).
const B_JIFFIES: u32 = 128;

/// The scale of `B_JIFFIES`, read as nsfail reads its own (set by nothing here: the cost is
/// the same whatever the values).
#[unsafe(no_mangle)]
static BENCH_TICK_NS: u64 = 0;
#[unsafe(no_mangle)]
static BENCH_JIFFY0_NS: u64 = 0;

/// Per-CPU slots of the budget programs' counters, laid out as nsfail's `ChannelStats`
/// (56 bytes) and `EncoderStats` (120 bytes).
#[map]
static BUDGET_CHANNEL: PerCpuArray<[u64; 7]> = PerCpuArray::with_max_entries(131_072, 0);
#[map]
static BUDGET_ENCODER: PerCpuArray<[u64; 15]> = PerCpuArray::with_max_entries(4096, 0);
#[map]
static BUDGET_REASON: PerCpuArray<u64> = PerCpuArray::with_max_entries(16, 0);

#[xdp(frags)]
pub fn bench_parse(ctx: XdpContext) -> u32 {
    minimal::<B_PARSE_ONLY>(&ctx)
}

#[xdp(frags)]
pub fn bench_min_no_csum(ctx: XdpContext) -> u32 {
    minimal::<B_NO_CSUM>(&ctx)
}

#[xdp(frags)]
pub fn bench_min_clock(ctx: XdpContext) -> u32 {
    minimal::<B_CLOCK>(&ctx)
}

#[xdp(frags)]
pub fn bench_min_jiffies(ctx: XdpContext) -> u32 {
    minimal::<B_JIFFIES>(&ctx)
}

#[xdp(frags)]
pub fn bench_min_counters(ctx: XdpContext) -> u32 {
    minimal::<{ B_CLOCK | B_COUNTERS }>(&ctx)
}

#[xdp(frags)]
pub fn bench_min_learn(ctx: XdpContext) -> u32 {
    minimal::<B_LEARN>(&ctx)
}

#[xdp(frags)]
pub fn bench_min_devcheck(ctx: XdpContext) -> u32 {
    minimal::<B_DEVCHECK>(&ctx)
}

#[xdp(frags)]
pub fn bench_min_buflen(ctx: XdpContext) -> u32 {
    minimal::<B_BUFLEN>(&ctx)
}

/// The minimal rewrite and its budget variants (`F` adds one part). One function because the
/// variants must differ from it by exactly their part: split, the compiler could lay them out
/// differently, and the budget would measure that.
#[inline(always)]
fn minimal<const F: u32>(ctx: &XdpContext) -> u32 {
    const ETH: usize = 14;
    const L4: usize = ETH + rewrite::IPV4_LEN;
    let start = ctx.data();
    if start + L4 + rewrite::UDP_LEN > ctx.data_end() {
        return XDP_PASS;
    }
    // SAFETY: the frame holds Ethernet, a 20-byte IPv4 header and UDP (checked above); all
    // are byte arrays.
    let (eth, ip, udp) = unsafe {
        (
            &mut *(start as *mut [u8; ETH]),
            &mut *((start + ETH) as *mut [u8; rewrite::IPV4_LEN]),
            &mut *((start + L4) as *mut [u8; rewrite::UDP_LEN]),
        )
    };
    // IPv4 without options, UDP, not a fragment, TTL above 1.
    if eth[12] != 0x08
        || eth[13] != 0x00
        || ip[0] != 0x45
        || ip[9] != 17
        || (ip[6] & 0x3f) != 0
        || ip[7] != 0
        || ip[8] <= 1
    {
        return XDP_PASS;
    }
    if F & B_BUFLEN != 0 {
        let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        // SAFETY: ctx is the live XDP context.
        if ETH + tot_len > unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as usize {
            return XDP_PASS;
        }
    }
    if F & B_PARSE_ONLY != 0 {
        return XDP_PASS;
    }
    let key = MinKey {
        addr: [ip[16], ip[17], ip[18], ip[19]],
        port: [udp[2], udp[3]],
        _pad: [0; 2],
    };
    // SAFETY: a HASH lookup, copied out at once.
    let Some(t) = (unsafe { MIN_CHANNELS.get(key) }).copied() else {
        return XDP_PASS;
    };
    if F & B_DEVCHECK != 0 && BENCH_PORTS.get(t.slot).is_none() {
        return XDP_PASS;
    }
    let now = if F & B_CLOCK != 0 {
        // SAFETY: a helper without arguments.
        unsafe { bpf_ktime_get_coarse_ns() }
    } else if F & B_JIFFIES != 0 {
        // SAFETY: a helper without arguments; plain reads of constants.
        unsafe {
            bpf_jiffies64()
                .wrapping_mul(core::ptr::read_volatile(&BENCH_TICK_NS))
                .wrapping_add(core::ptr::read_volatile(&BENCH_JIFFY0_NS))
        }
    } else {
        0
    };
    if F & B_COUNTERS == 0 && F & (B_CLOCK | B_JIFFIES) != 0 {
        // Keep the time, as a counter would, without a counter.
        let mut kept = 0u64;
        // SAFETY: a write to a local.
        unsafe { core::ptr::write_volatile(&mut kept, now) };
    }
    let ip_len = u16::from_be_bytes([ip[2], ip[3]]) as u64;
    if F & B_COUNTERS != 0 {
        let id = u32::from(t._pad);
        if let Some(c) = BUDGET_CHANNEL.get_ptr_mut(id) {
            // SAFETY: a per-CPU slot, written only from this CPU.
            unsafe {
                (*c)[0] += 1;
                (*c)[1] += ip_len;
                (*c)[2] = now;
            }
        }
        if let Some(e) = BUDGET_ENCODER.get_ptr_mut(t.slot) {
            // SAFETY: as above.
            unsafe {
                (*e)[0] += 1;
                (*e)[1] += ip_len;
                (*e)[2] = now;
            }
        }
        if let Some(r) = BUDGET_REASON.get_ptr_mut(0) {
            // SAFETY: as above.
            unsafe { *r += 1 };
        }
    }
    if F & B_LEARN != 0
        && let Some(c) = BUDGET_CHANNEL.get_ptr_mut(u32::from(t._pad))
    {
        let src = u64::from_ne_bytes([ip[12], ip[13], ip[14], ip[15], udp[0], udp[1], 0, 0]);
        // SAFETY: as above.
        unsafe {
            if (*c)[3] != src {
                (*c)[3] = src;
            }
        }
    }
    if F & B_NO_CSUM != 0 {
        ip[16..20].copy_from_slice(&t.addr);
        ip[8] -= 1;
        udp[2..4].copy_from_slice(&t.port.to_be_bytes());
    } else {
        rewrite::ipv4(ip, udp, t.addr, t.port);
    }
    eth[..6].copy_from_slice(&t.dmac);
    eth[6..12].copy_from_slice(&t.smac);
    BENCH_PORTS
        .redirect(t.slot, XDP_PASS as u64)
        .unwrap_or_else(|action| action)
}

/// Writes the next template over the frame's headers and sends it out (`XDP_TX`). Live-frame
/// pages are recycled without being re-initialised, and the path under test rewrites headers,
/// so every run rewrites all of them. Frames shorter than a template pass untouched.
#[xdp]
pub fn bench_generator(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + TEMPLATE_LEN > ctx.data_end() {
        return XDP_PASS;
    }
    let count = GEN_CONFIG.get(0).copied().unwrap_or(1).max(1);
    let seq = match GEN_SEQ.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot, written only from this CPU with preemption off.
        Some(p) => unsafe {
            *p += 1;
            *p
        },
        None => 0,
    };
    let index = (seq as u32) & (count - 1) & (MAX_TEMPLATES - 1);
    let Some(template) = GEN_TEMPLATES.get(index) else {
        return XDP_PASS;
    };
    let dst = start as *mut u8;
    for (i, byte) in template.iter().enumerate() {
        // SAFETY: i < TEMPLATE_LEN, and the frame holds TEMPLATE_LEN bytes (checked above).
        unsafe { *dst.add(i) = *byte };
    }
    XDP_TX
}

/// Counts and drops everything; records the arrival time of the first packet after userspace
/// zeroed `SINK_FIRST_NS`.
#[xdp(frags)]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    if let Some(p) = SINK_COUNT.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot, written only from this CPU with preemption off.
        unsafe {
            (*p)[0] += 1;
            (*p)[1] += (ctx.data_end() - ctx.data()) as u64;
        }
    }
    if let Some(first) = SINK_FIRST_NS.get_ptr_mut(0) {
        // SAFETY: an 8-byte array slot: a racing CPU writes an equally valid time.
        unsafe {
            if *first == 0 {
                *first = bpf_ktime_get_ns();
            }
        }
    }
    XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
