//! Raw tracepoints on the kernel's XDP redirect error paths: they count the channel packets
//! that XDP redirected but the encoder's device refused, so that "forwarded" means "handed to
//! the encoder's device" and a refusal is a counted drop (`drop_reason::REDIRECT_FAILED`)
//! rather than a silent loss.
//!
//! A redirect into a DEVMAP fails in one of two places: when it is queued (`xdp_redirect_err`:
//! the device is down, the frame is over its MTU, the device has no XDP transmit) or when the
//! per-CPU queue is flushed to the driver (`xdp_devmap_xmit` with drops: a veth whose peer has
//! neither GRO nor an XDP program, a peer that is down). Both fire on the CPU that ran the XDP
//! program, for every XDP user of the host: each program first checks that the event is
//! this data plane's (its DEVMAP's id; its network namespace and an encoder's veth), and
//! returns at once on the success path (`drops == 0`), so forwarding pays one comparison per
//! flushed batch of up to 16 frames.
//!
//! Fail-open: these programs only count; their return value is ignored by the kernel.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel, macros::raw_tracepoint, programs::RawTracePointContext,
};
use nsfail_common::{TraceConfig, drop_reason, xdp_reason};

use crate::maps::{ENCODER_IFINDEX, TRACE_CONFIG, XDP_STATS, count_drops, count_n};

/// `xdp_devmap_xmit(from_dev, to_dev, sent, drops, err)`: a flush of one device's queue.
#[raw_tracepoint(tracepoint = "xdp_devmap_xmit")]
pub fn nsfail_devmap_xmit(ctx: RawTracePointContext) -> i32 {
    let drops: u64 = ctx.arg(3);
    // `drops` is a C int passed as u64: only its low 32 bits are the count.
    let drops = drops as u32 as i32;
    if drops <= 0 {
        return 0;
    }
    let Some(cfg) = TRACE_CONFIG.get(0) else {
        return 0;
    };
    let to_dev: u64 = ctx.arg(1);
    if let Some(id) = our_encoder(cfg, to_dev) {
        count_drops(id, drop_reason::REDIRECT_FAILED, drops as u64);
        count_n(&XDP_STATS, xdp_reason::REDIRECT_FAILED, drops as u64);
    }
    0
}

/// `xdp_redirect_err(dev, xdp, tgt, err, map_type, map_id, index)`: a redirect refused when
/// it was queued; `index` is the DEVMAP key, our encoder id.
#[raw_tracepoint(tracepoint = "xdp_redirect_err")]
pub fn nsfail_redirect_err(ctx: RawTracePointContext) -> i32 {
    let Some(cfg) = TRACE_CONFIG.get(0) else {
        return 0;
    };
    let map_id: u64 = ctx.arg(5);
    if cfg.devmap_id == 0 || map_id as u32 != cfg.devmap_id {
        return 0;
    }
    let index: u64 = ctx.arg(6);
    count_drops(index as u32, drop_reason::REDIRECT_FAILED, 1);
    count_n(&XDP_STATS, xdp_reason::REDIRECT_FAILED, 1);
    0
}

/// The encoder whose host-side veth `dev` (a `struct net_device *`) is, if `dev` lives in
/// this data plane's network namespace.
#[inline(always)]
fn our_encoder(cfg: &TraceConfig, dev: u64) -> Option<u32> {
    if cfg.off_ifindex == 0 || dev == 0 {
        return None;
    }
    // SAFETY: probe reads of kernel memory at offsets taken from the kernel's BTF; a bad
    // address makes the helper fail, never fault.
    let net: u64 =
        unsafe { bpf_probe_read_kernel((dev + cfg.off_nd_net as u64) as *const u64) }.ok()?;
    // SAFETY: as above.
    let cookie: u64 =
        unsafe { bpf_probe_read_kernel((net + cfg.off_net_cookie as u64) as *const u64) }.ok()?;
    if cookie != cfg.netns_cookie {
        return None;
    }
    // SAFETY: as above.
    let ifindex: i32 =
        unsafe { bpf_probe_read_kernel((dev + cfg.off_ifindex as u64) as *const i32) }.ok()?;
    // SAFETY: a HASH lookup, copied out at once.
    unsafe { ENCODER_IFINDEX.get(ifindex as u32) }.copied()
}
