//! Internet checksum arithmetic (RFC 1071) and incremental update (RFC 1624, eqn. 3).
//!
//! All 16-bit words are the big-endian values as they stand in the packet, converted to host
//! integers (`u16::from_be_bytes`). The one's-complement sum does not depend on byte order, but
//! mixing orders would, so every caller reads and writes words the same way.

/// Folds a 32-bit accumulator of 16-bit words into a 16-bit one's-complement sum.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word of the covered data changes from
/// `old` to `new`: `HC' = ~(~HC + ~m + m')`.
#[inline(always)]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u32 + (!old) as u32 + new as u32)
}

/// [`replace16`] for a 32-bit field (an IPv4 address), given as its big-endian bytes.
#[inline(always)]
pub const fn replace32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let c = replace16(
        check,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    replace16(
        c,
        u16::from_be_bytes([old[2], old[3]]),
        u16::from_be_bytes([new[2], new[3]]),
    )
}

/// [`replace16`] for a 128-bit field (an IPv6 address), given as its big-endian bytes.
#[inline(always)]
pub fn replace128(check: u16, old: &[u8; 16], new: &[u8; 16]) -> u16 {
    let mut sum = (!check) as u32;
    let mut i = 0;
    while i < 16 {
        sum += (!u16::from_be_bytes([old[i], old[i + 1]])) as u32;
        sum += u16::from_be_bytes([new[i], new[i + 1]]) as u32;
        i += 2;
    }
    !fold(sum)
}

/// A UDP checksum that computes to zero is sent as all ones (RFC 768): zero on the wire means
/// "no checksum" in IPv4 and is invalid in IPv6.
#[inline(always)]
pub const fn udp_nonzero(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}

/// One's-complement sum of `data` (odd length padded with a zero byte), added to `sum`.
pub fn sum_bytes(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = fold(sum + u16::from_be_bytes([c[0], c[1]]) as u32) as u32;
    }
    if let [last] = chunks.remainder() {
        sum = fold(sum + u16::from_be_bytes([*last, 0]) as u32) as u32;
    }
    sum
}

/// The checksum of `data` computed from scratch (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_bytes(0, data))
}

/// The UDP checksum computed from scratch over the pseudo-header and `udp` (header with its
/// checksum field zeroed, and payload). `src` and `dst` are 4 or 16 address bytes.
pub fn udp_checksum(src: &[u8], dst: &[u8], udp: &[u8]) -> u16 {
    let mut sum = sum_bytes(0, src);
    sum = sum_bytes(sum, dst);
    sum += 17; // protocol
    sum += udp.len() as u32 & 0xffff;
    sum += (udp.len() as u32) >> 16;
    sum = sum_bytes(sum, udp);
    udp_nonzero(!fold(sum))
}
