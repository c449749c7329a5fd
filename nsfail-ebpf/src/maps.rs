//! Every map of the data plane. All are pinned by name under the pin directory the loader gives
//! (`/sys/fs/bpf/nsfail/` in production), so that forwarding survives a controller restart.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMap, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use nsfail_common::{
    ChannelKey4, ChannelStats, ChannelTarget, EncoderInfo, EncoderPolicy, EncoderStats, Endpoint,
    FlowStats, MAX_CHANNELS, MAX_ENCODERS, MAX_SOURCE_NETS, MAX_SOURCES, REFUSAL_RING_BYTES,
    ReplyTarget, SourceInfo, SourceKey, SourceNet, SrtPeers, TraceConfig, tc_reason, xdp_reason,
};

/// `BPF_F_NO_PREALLOC`: entries are allocated when userspace creates them, so that only SRT
/// channels cost `SRT_PEERS` memory. (An LPM trie always has it.)
const NO_PREALLOC: u32 = 1;

/// Key: an IPv4 channel's ingest address and port (8 bytes). Value: where its packets go now.
/// Writer: userspace (one update per failover). Reader: XDP ingress. Twice as many buckets as
/// channels, entries allocated as they are written: at 100,000 channels a key rarely shares
/// its bucket (a preallocated map of `MAX_CHANNELS` had a load factor of 0.76 there, and the
/// lookup walked the others' entries).
#[map]
pub static CHANNELS_V4: HashMap<ChannelKey4, ChannelTarget> =
    HashMap::pinned(2 * MAX_CHANNELS, NO_PREALLOC);

/// Key: an IPv6 channel's ingest endpoint. Value: as in `CHANNELS_V4`. Entries are allocated
/// as channels are added (an IPv4-only host does not pay for 131,072 of them).
#[map]
pub static CHANNELS_V6: HashMap<Endpoint, ChannelTarget> =
    HashMap::pinned(MAX_CHANNELS, NO_PREALLOC);

/// Key: an encoder's endpoint for a channel (encoder address, encoder-side port). Value: the
/// channel's ingest endpoint to restore on replies. Writer: userspace. Reader: TC egress.
#[map]
pub static REPLIES: HashMap<Endpoint, ReplyTarget> = HashMap::pinned(2 * MAX_CHANNELS, 0);

/// Key: (channel, source endpoint). Value: last seen. Writer: XDP ingress (learns sources).
/// Readers: TC egress (replies go only to known sources), userspace (status).
#[map]
pub static SOURCES: LruHashMap<SourceKey, SourceInfo> = LruHashMap::pinned(MAX_SOURCES, 0);

/// Key: channel id (SRT channels only). Value: the channel's SRT callers, at most its limit,
/// each added when its listener accepts the caller's conclusion handshake. Writers: userspace
/// creates and removes the entry with the channel; TC egress fills its slots in place.
/// Reader: userspace, which sends each caller a SHUTDOWN when it repoints the channel.
#[map]
pub static SRT_PEERS: HashMap<u32, SrtPeers> = HashMap::pinned(MAX_CHANNELS, NO_PREALLOC);

/// Key: (channel id, source prefix), LPM. Value: unused (1). The `sources` of channels whose
/// target has `CHANNEL_SOURCES`. Writer: userspace. Reader: XDP ingress.
#[map]
pub static SOURCE_NETS: LpmTrie<SourceNet, u8> = LpmTrie::pinned(MAX_SOURCE_NETS, 0);

/// Key: encoder id. Value: the encoder's registration. Writer and reader: userspace only (it is
/// how a restarted controller learns the ids of a pinned data plane).
#[map]
pub static ENCODERS: HashMap<u32, EncoderInfo> = HashMap::pinned(MAX_ENCODERS, 0);

/// Key: encoder id. Value: ifindex of a local encoder's host-side veth. Writer: userspace.
/// Reader: XDP ingress (`bpf_redirect_map`).
#[map]
pub static TX_PORTS: DevMap = DevMap::pinned(MAX_ENCODERS, 0);

/// Key: ifindex of a local encoder's host-side veth. Value: the encoder's id. Writer:
/// userspace (with the encoder's registration). Reader: TC egress, which finds the encoder a
/// packet leaves by the device it arrived on, never by its (forgeable) source address.
#[map]
pub static ENCODER_IFINDEX: HashMap<u32, u32> = HashMap::pinned(MAX_ENCODERS, 0);

/// Key: encoder id. Value: the encoder's egress policy, replaced whole by one update (a
/// policy change is atomic and needs no re-attach). Writer: userspace. Reader: TC egress;
/// an encoder without an entry is not policed (fail-open).
#[map]
pub static POLICIES: HashMap<u32, EncoderPolicy> = HashMap::pinned(MAX_ENCODERS, 0);

/// Index: channel id. Value (per CPU): packets, bytes and last-seen of the channel's input.
/// Writer: XDP ingress. Reader: userspace.
#[map]
pub static CHANNEL_STATS: PerCpuArray<ChannelStats> = PerCpuArray::pinned(MAX_CHANNELS, 0);

/// Index: encoder id. Value (per CPU): handed to its device, replies from it, drops by
/// `drop_reason`. Writers: XDP ingress (rx), TC egress (tx, egress drops), the redirect
/// tracepoints (`REDIRECT_FAILED`). Reader: userspace.
#[map]
pub static ENCODER_STATS: PerCpuArray<EncoderStats> = PerCpuArray::pinned(MAX_ENCODERS, 0);

/// Index: `xdp_reason::*`. Value (per CPU): packets. Writer: XDP ingress. Reader: userspace.
#[map]
pub static XDP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(xdp_reason::COUNT, 0);

/// Index: `tc_reason::*`. Value (per CPU): packets. Writer: TC egress. Reader: userspace.
#[map]
pub static TC_STATS: PerCpuArray<u64> = PerCpuArray::pinned(tc_reason::COUNT, 0);

/// Index 0: how the redirect tracepoints recognise this data plane's devices and DEVMAP.
/// Writer: userspace, before the tracepoints attach. Reader: the tracepoint programs.
#[map]
pub static TRACE_CONFIG: Array<TraceConfig> = Array::pinned(1, 0);

/// `RefusalEvent`s: an encoder's kernel answered a channel packet with a port unreachable.
/// Writer: TC egress (each refusal, which it also counts and drops). Reader: the daemon, woken
/// by the ring buffer, which fails the encoder after a few in a row.
#[map]
pub static REFUSALS: RingBuf = RingBuf::pinned(REFUSAL_RING_BYTES, 0);

/// Index 0: `ABI_VERSION` of the maps' layout. Writer: userspace on first load. Reader:
/// userspace before adopting pinned maps.
#[map]
pub static META: Array<u32> = Array::pinned(1, 0);

#[inline(always)]
pub fn count(map: &PerCpuArray<u64>, index: u32) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, written only from this CPU with preemption off.
        unsafe { *p += 1 }
    }
}

#[inline(always)]
pub fn add_flow(stats: &mut FlowStats, bytes: u64, now: u64) {
    stats.packets += 1;
    stats.bytes += bytes;
    stats.last_seen_ns = now;
}

/// Counts one packet dropped by encoder `id`'s egress policy for `reason` (a `drop_reason`).
#[inline(always)]
pub fn count_drop(id: u32, reason: usize) {
    count_drops(id, reason, 1);
}

/// Counts `n` packets of encoder `id` dropped for `reason` (a `drop_reason`).
#[inline(always)]
pub fn count_drops(id: u32, reason: usize, n: u64) {
    if let Some(s) = ENCODER_STATS.get_ptr_mut(id) {
        // SAFETY: a per-CPU slot, written only from this CPU with preemption off.
        if let Some(d) = unsafe { (*s).drops.get_mut(reason) } {
            *d += n;
        }
    }
}

/// Adds `n` packets to one `XDP_STATS` reason.
#[inline(always)]
pub fn count_n(map: &PerCpuArray<u64>, index: u32, n: u64) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: as in `count`.
        unsafe { *p += n }
    }
}
