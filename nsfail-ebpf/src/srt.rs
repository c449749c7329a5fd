//! SRT callers of SRT channels, learnt on the return path (TC egress): a caller is added to
//! its channel's `SRT_PEERS` slots only when the channel's listener accepts its conclusion
//! handshake, so handshakes from spoofed sources (which never see the listener's SYN cookie)
//! never take a slot; a channel holds at most its limit of callers.

use aya_ebpf::programs::TcContext;
use nsfail_common::{SourceKey, srt};

use crate::maps::SRT_PEERS;

/// Records a listener→caller packet whose UDP payload starts at `payload`, to the caller
/// `key.peer` of channel `key.channel_id` (see `SrtPeers::learn`). Channels without an
/// `SRT_PEERS` entry (not SRT) learn nothing.
#[inline(always)]
pub fn learn(ctx: &TcContext, payload: usize, key: &SourceKey, now: u64) {
    let Ok(head) = ctx.load::<[u8; srt::HEADER_LEN]>(payload) else {
        return;
    };
    let Some(peers) = SRT_PEERS.get_ptr_mut(key.channel_id) else {
        return;
    };
    let off = srt::DEST_SOCKET_ID_OFFSET;
    let socket_id = u32::from_be_bytes([head[off], head[off + 1], head[off + 2], head[off + 3]]);
    let conclusion = srt::is_handshake([head[0], head[1], head[2], head[3]])
        && ctx
            .load::<[u8; 4]>(payload + srt::HANDSHAKE_TYPE_OFFSET)
            .is_ok_and(|t| u32::from_be_bytes(t) == srt::HS_CONCLUSION);
    // SAFETY: a HASH value pointer, valid for this run (RCU). Concurrent writers (other CPUs
    // answering the same channel's callers) can at worst mix one slot's fields; the slot is
    // rewritten whole by the next conclusion, and is refreshed once a second.
    unsafe { (*peers).learn(&key.peer, socket_id, conclusion, now) };
}
