//! Reference programs for `cargo xtask bench`, built as their own object (`nsfail-bench`) so
//! that the production object stays exactly what nsfail loads.
//!
//! - `bench_pass`: `XDP_PASS` and nothing else (what any XDP program costs at least).
//! - `bench_redirect`: a DEVMAP redirect to slot 0 without parsing (the floor for a redirector).
//! - `bench_mac_redirect`: the same, plus a MAC rewrite: it touches the headers as a rewriter does.
//! - `bench_generator`: a live-frames traffic generator (`BPF_F_TEST_XDP_LIVE_FRAMES`).
//! - `bench_sink`: counts and drops what arrives (the destination of forwarding benchmarks).
//!
//! Userspace loads one instance of this object per role, so each instance's maps belong to one
//! generator, sink or redirector.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{Array, DevMap, PerCpuArray},
    programs::XdpContext,
};

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
