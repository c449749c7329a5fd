//! The few SRT packet facts nsfail needs (SRT RFC draft, section 3): where a packet's
//! Destination Socket ID is, and the SHUTDOWN control packet that makes a caller drop a session
//! at once and reconnect, so that its new handshake reaches the encoder a channel now points to.

/// Byte offset of the Destination Socket ID in an SRT packet (UDP payload), big-endian.
pub const DEST_SOCKET_ID_OFFSET: usize = 12;
/// The SRT header is 16 bytes.
pub const HEADER_LEN: usize = 16;
/// A SHUTDOWN control packet: the 16-byte header and a 4-byte control information field.
pub const SHUTDOWN_LEN: usize = 20;

/// The SHUTDOWN control packet for the caller whose socket ID is `socket_id`: control bit set,
/// type 5, subtype 0, type-specific information 0, timestamp 0, then the caller's socket ID as
/// Destination Socket ID, then 4 zero bytes. Control packets are never encrypted.
pub const fn shutdown(socket_id: u32) -> [u8; SHUTDOWN_LEN] {
    let mut p = [0u8; SHUTDOWN_LEN];
    p[0] = 0x80;
    p[1] = 0x05;
    let id = socket_id.to_be_bytes();
    p[12] = id[0];
    p[13] = id[1];
    p[14] = id[2];
    p[15] = id[3];
    p
}

/// Byte offset of the Handshake Type in an SRT handshake (UDP payload): the 16-byte header,
/// then version, encryption and extension fields, initial sequence number, MTU and flow
/// window (20 bytes) come first.
pub const HANDSHAKE_TYPE_OFFSET: usize = HEADER_LEN + 20;
/// The bytes of a handshake up to and including its Handshake Type.
pub const HANDSHAKE_HEAD_LEN: usize = HANDSHAKE_TYPE_OFFSET + 4;
/// Handshake Type of a conclusion (-1); a listener's answer to a caller's conclusion that
/// accepts it carries it too (a rejection carries a rejection code instead).
pub const HS_CONCLUSION: u32 = 0xffff_ffff;

/// Whether the first 4 bytes of an SRT packet are those of a handshake control packet
/// (control bit set, control type 0, subtype 0).
#[inline(always)]
pub const fn is_handshake(first: [u8; 4]) -> bool {
    first[0] == 0x80 && first[1] == 0 && first[2] == 0 && first[3] == 0
}

/// Whether `head` (the first [`HANDSHAKE_HEAD_LEN`] bytes of a UDP payload) is a handshake of
/// type conclusion: sent by a listener to a caller, its acceptance of the caller's
/// conclusion, which only a caller that got the listener's induction answer (and its SYN
/// cookie) can have sent, so never a spoofed one.
#[inline(always)]
pub const fn is_conclusion(head: &[u8; HANDSHAKE_HEAD_LEN]) -> bool {
    let t = HANDSHAKE_TYPE_OFFSET;
    is_handshake([head[0], head[1], head[2], head[3]])
        && u32::from_be_bytes([head[t], head[t + 1], head[t + 2], head[t + 3]]) == HS_CONCLUSION
}

/// The Destination Socket ID of an SRT packet (`None` if too short to be one).
pub fn dest_socket_id(payload: &[u8]) -> Option<u32> {
    let b = payload.get(DEST_SOCKET_ID_OFFSET..HEADER_LEN)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(kind: u32) -> [u8; HANDSHAKE_HEAD_LEN] {
        let mut h = [0u8; HANDSHAKE_HEAD_LEN];
        h[0] = 0x80;
        h[12..16].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        h[16..20].copy_from_slice(&5u32.to_be_bytes());
        h[HANDSHAKE_TYPE_OFFSET..].copy_from_slice(&kind.to_be_bytes());
        h
    }

    #[test]
    fn only_a_conclusion_handshake_is_one() {
        assert!(is_conclusion(&handshake(HS_CONCLUSION)));
        assert!(!is_conclusion(&handshake(1)), "induction");
        assert!(!is_conclusion(&handshake(1003)), "a rejection");
        let mut data = handshake(HS_CONCLUSION);
        data[0] = 0;
        assert!(!is_conclusion(&data), "a data packet");
        let mut other = handshake(HS_CONCLUSION);
        other[1] = 2;
        assert!(!is_conclusion(&other), "an ACK");
        let shut = shutdown(7);
        assert!(!is_handshake([shut[0], shut[1], shut[2], shut[3]]));
    }
}
