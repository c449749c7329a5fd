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

/// The Destination Socket ID of an SRT packet (`None` if too short to be one).
pub fn dest_socket_id(payload: &[u8]) -> Option<u32> {
    let b = payload.get(DEST_SOCKET_ID_OFFSET..HEADER_LEN)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}
