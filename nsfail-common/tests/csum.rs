//! Host tests of the pure packet logic in `nsfail-common`: the XDP program's rewrite itself
//! (`nsfail_common::rewrite`, which `nsfail-ebpf/src/ingress.rs` calls), the checksum
//! arithmetic behind it, and the map key and counter helpers.
//!
//! Random cases derive from a fixed base seed; `NSFAIL_SEED=<n>` replaces it. Each case has its
//! own seed, printed by every assertion, and running with that seed as `NSFAIL_SEED` replays the
//! failing case first.
//!
//! The checks do not trust `csum` to judge itself: besides comparing incremental updates with
//! `csum`'s from-scratch functions, every packet is verified as a receiver would, with the
//! independent reference sum [`ones_sum`].

use nsfail_common::{EncoderStats, Endpoint, FAMILY_V4, FAMILY_V6, FlowStats, csum, rewrite};
use rand::{Rng, SeedableRng, rngs::StdRng};

const BASE_SEED: u64 = 0x6e73_6661_696c_0001;

/// Ethernet header length: every test frame is untagged, so the IP header starts here.
const L3: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const UDP_LEN: usize = 8;
const IPPROTO_UDP: u8 = 17;

/// Runs `case` `n` times, each with a fresh RNG from its own seed.
fn cases(n: u64, mut case: impl FnMut(&mut StdRng, u64)) {
    let base = std::env::var("NSFAIL_SEED")
        .map(|s| s.parse().expect("NSFAIL_SEED must be a u64"))
        .unwrap_or(BASE_SEED);
    for i in 0..n {
        let seed = base.wrapping_add(i);
        case(&mut StdRng::seed_from_u64(seed), seed);
    }
}

/// Reference one's-complement sum of the concatenated `parts` (big-endian words, an odd total
/// padded with a zero byte), accumulated in 64 bits and folded at the end. Shares no code with
/// `csum`. A correct checksum makes the sum over the covered data, checksum included, 0xffff.
fn ones_sum(parts: &[&[u8]]) -> u16 {
    let bytes = parts.concat();
    let mut sum: u64 = bytes
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Random bytes, but now and then all zeros or all ones: the words where one's-complement
/// arithmetic has its two zeros.
fn random_bytes<const N: usize>(rng: &mut impl Rng) -> [u8; N] {
    match rng.random_range(0..8) {
        0 => [0; N],
        1 => [0xff; N],
        _ => rng.random(),
    }
}

/// A port that is never 0; 1 and 0xffff come up often.
fn random_port(rng: &mut impl Rng) -> u16 {
    match rng.random_range(0..8) {
        0 => 1,
        1 => 0xffff,
        _ => rng.random_range(1..=u16::MAX),
    }
}

fn random_payload(rng: &mut impl Rng, len: core::ops::Range<usize>) -> Vec<u8> {
    let mut p = vec![0u8; rng.random_range(len)];
    match rng.random_range(0..8) {
        0 => {}
        1 => p.fill(0xff),
        _ => rng.fill(&mut p[..]),
    }
    p
}

/// IPv4 options: none in half the cases, otherwise 0..=40 bytes in steps of 4, filled by one
/// experimental option (type 30, RFC 4727) so the header stays well formed.
fn random_options_len(rng: &mut impl Rng) -> usize {
    if rng.random_bool(0.5) {
        0
    } else {
        4 * rng.random_range(0..=10)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ip {
    V4,
    V6,
}

/// An Ethernet frame holding exactly one IPv4 or IPv6 UDP packet.
#[derive(Clone, Debug)]
struct Frame(Vec<u8>);

impl Frame {
    fn ip(&self) -> Ip {
        if self.0[L3] >> 4 == 6 { Ip::V6 } else { Ip::V4 }
    }

    fn l4(&self) -> usize {
        match self.ip() {
            Ip::V4 => L3 + usize::from(self.0[L3] & 0x0f) * 4,
            Ip::V6 => L3 + IPV6_LEN,
        }
    }

    fn addr_len(&self) -> usize {
        match self.ip() {
            Ip::V4 => 4,
            Ip::V6 => 16,
        }
    }

    fn src(&self) -> &[u8] {
        let at = match self.ip() {
            Ip::V4 => L3 + 12,
            Ip::V6 => L3 + 8,
        };
        &self.0[at..at + self.addr_len()]
    }

    fn dst_at(&self) -> usize {
        match self.ip() {
            Ip::V4 => L3 + 16,
            Ip::V6 => L3 + 24,
        }
    }

    fn dst(&self) -> &[u8] {
        &self.0[self.dst_at()..self.dst_at() + self.addr_len()]
    }

    /// TTL or hop limit offset.
    fn ttl_at(&self) -> usize {
        match self.ip() {
            Ip::V4 => L3 + 8,
            Ip::V6 => L3 + 7,
        }
    }

    fn ipv4_header(&self) -> &[u8] {
        assert_eq!(self.ip(), Ip::V4);
        &self.0[L3..self.l4()]
    }

    fn udp(&self) -> &[u8] {
        &self.0[self.l4()..]
    }

    fn dport(&self) -> u16 {
        be16(&self.0, self.l4() + 2)
    }

    fn udp_check(&self) -> u16 {
        be16(&self.0, self.l4() + 6)
    }

    fn set_udp_check(&mut self, check: u16) {
        let at = self.l4() + 6;
        put16(&mut self.0, at, check);
    }

    /// Sets the first payload word (the payload must hold at least 2 bytes).
    fn set_payload_word(&mut self, word: u16) {
        let at = self.l4() + UDP_LEN;
        put16(&mut self.0, at, word);
    }

    /// The pseudo-header of RFC 768 (IPv4) or RFC 8200 section 8.1 (IPv6), built here rather
    /// than by `csum`.
    fn pseudo_header(&self) -> Vec<u8> {
        let len = self.udp().len();
        let mut p = [self.src(), self.dst()].concat();
        match self.ip() {
            Ip::V4 => {
                p.extend_from_slice(&[0, IPPROTO_UDP]);
                p.extend_from_slice(&(len as u16).to_be_bytes());
            }
            Ip::V6 => {
                p.extend_from_slice(&(len as u32).to_be_bytes());
                p.extend_from_slice(&[0, 0, 0, IPPROTO_UDP]);
            }
        }
        p
    }

    /// The UDP checksum a sender would compute for the packet as it stands.
    fn udp_checksum_from_scratch(&self) -> u16 {
        let mut udp = self.udp().to_vec();
        udp[6..8].fill(0);
        csum::udp_checksum(self.src(), self.dst(), &udp)
    }
}

/// A frame with random addresses, ports, TTL (2..=255), identification, DSCP and flow label, and
/// `payload`. The IPv4 header checksum is computed with `csum::checksum`; the UDP checksum with
/// `csum::udp_checksum`, or left 0 ("none", IPv4 only) unless `udp_check`.
fn build(rng: &mut impl Rng, ip: Ip, options_len: usize, payload: &[u8], udp_check: bool) -> Frame {
    let udp_len = UDP_LEN + payload.len();
    let mut f = vec![0u8; L3];
    rng.fill(&mut f[..12]);
    match ip {
        Ip::V4 => {
            put16(&mut f, 12, 0x0800);
            let ihl = IPV4_LEN + options_len;
            let mut h = vec![0u8; ihl];
            h[0] = 0x40 | (ihl / 4) as u8;
            h[1] = rng.random();
            put16(&mut h, 2, (ihl + udp_len) as u16);
            put16(&mut h, 4, rng.random());
            // DF or nothing: never a fragment, which the XDP program passes untouched.
            put16(&mut h, 6, if rng.random_bool(0.5) { 0x4000 } else { 0 });
            h[8] = rng.random_range(2..=255);
            h[9] = IPPROTO_UDP;
            h[12..16].copy_from_slice(&random_bytes::<4>(rng));
            h[16..20].copy_from_slice(&random_bytes::<4>(rng));
            if options_len > 0 {
                h[20] = 0x9e;
                h[21] = options_len as u8;
                rng.fill(&mut h[22..]);
            }
            let check = csum::checksum(&h);
            put16(&mut h, 10, check);
            f.extend_from_slice(&h);
        }
        Ip::V6 => {
            put16(&mut f, 12, 0x86dd);
            let mut h = [0u8; IPV6_LEN];
            rng.fill(&mut h[..4]);
            h[0] = 0x60 | (h[0] & 0x0f);
            put16(&mut h, 4, udp_len as u16);
            h[6] = IPPROTO_UDP;
            h[7] = rng.random_range(2..=255);
            h[8..24].copy_from_slice(&random_bytes::<16>(rng));
            h[24..40].copy_from_slice(&random_bytes::<16>(rng));
            f.extend_from_slice(&h);
        }
    }
    // The source port may be 0 ("unused", RFC 768); a channel's port never is.
    let sport = if rng.random_ratio(1, 16) {
        0
    } else {
        random_port(rng)
    };
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&random_port(rng).to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    let mut frame = Frame(f);
    if udp_check {
        let check = frame.udp_checksum_from_scratch();
        frame.set_udp_check(check);
    }
    frame
}

/// The fields of a `ChannelTarget` that the rewrite uses.
#[derive(Debug)]
struct Target {
    /// IPv4 uses the first 4 bytes.
    addr: [u8; 16],
    port: u16,
}

/// A random target; in one case out of eight the address, and independently the port, equal
/// the packet's own (a channel whose encoder listens on the same port, say).
fn random_target(rng: &mut impl Rng, f: &Frame) -> Target {
    let mut addr = [0u8; 16];
    if rng.random_ratio(1, 8) {
        addr[..f.addr_len()].copy_from_slice(f.dst());
    } else {
        let a: [u8; 16] = random_bytes(rng);
        addr[..f.addr_len()].copy_from_slice(&a[..f.addr_len()]);
    }
    let port = if rng.random_ratio(1, 8) {
        f.dport()
    } else {
        random_port(rng)
    };
    Target { addr, port }
}

/// The rewrite the XDP program does (`nsfail_common::rewrite`, called by
/// `nsfail-ebpf/src/ingress.rs`), applied to the frame's own header bytes: the sealed one,
/// with the checksum deltas worked out from the key the channel was found by (the frame's
/// destination) as userspace seals them into the target. It must write exactly what the
/// word-by-word update writes, which is checked on a copy of every frame. Returns the UDP
/// checksum as the incremental update left it before `udp_nonzero`, or `None` for an IPv4
/// packet without one.
fn rewrite(f: &mut Frame, t: &Target) -> Option<u16> {
    assert!(
        f.0[f.ttl_at()] > 1,
        "ingress passes an expiring TTL unchanged"
    );
    let key = match f.ip() {
        Ip::V4 => Endpoint::v4(f.dst().try_into().unwrap(), f.dport()),
        Ip::V6 => Endpoint::v6(f.dst().try_into().unwrap(), f.dport()),
    };
    let d = rewrite::Deltas::of(&key, &t.addr, t.port);
    let mut stepwise = f.clone();
    let by_words = rewrite_with(&mut stepwise, t, None);
    let sealed = rewrite_with(f, t, Some(d));
    assert_eq!(sealed, by_words, "sealed and word-by-word updates differ");
    assert_eq!(f.0, stepwise.0, "sealed and word-by-word rewrites differ");
    sealed
}

/// The sealed rewrite with `deltas`, or else the word-by-word one.
fn rewrite_with(f: &mut Frame, t: &Target, deltas: Option<rewrite::Deltas>) -> Option<u16> {
    let l4 = f.l4();
    let ip_version = f.ip();
    let (l3, l4_on) = f.0.split_at_mut(l4);
    let udp: &mut [u8; rewrite::UDP_LEN] = (&mut l4_on[..UDP_LEN]).try_into().unwrap();
    match ip_version {
        Ip::V4 => {
            let ip: &mut [u8; rewrite::IPV4_LEN] = (&mut l3[L3..L3 + IPV4_LEN]).try_into().unwrap();
            let dst = [t.addr[0], t.addr[1], t.addr[2], t.addr[3]];
            match deltas {
                Some(d) => rewrite::ipv4_sealed(ip, udp, dst, t.port, d),
                None => rewrite::ipv4(ip, udp, dst, t.port),
            }
        }
        Ip::V6 => {
            let ip: &mut [u8; rewrite::IPV6_LEN] = (&mut l3[L3..L3 + IPV6_LEN]).try_into().unwrap();
            Some(match deltas {
                Some(d) => rewrite::ipv6_sealed(ip, udp, &t.addr, t.port, d),
                None => rewrite::ipv6(ip, udp, &t.addr, t.port),
            })
        }
    }
}

/// The rewrite changed the destination, TTL and port as asked, and no byte outside them and
/// the two checksum fields. Guards the helper above, so that the checksum assertions test the
/// rewrite the XDP program does and not some other one.
fn assert_rewritten(before: &Frame, after: &Frame, t: &Target, seed: u64) {
    let (l4, dst_at, n) = (before.l4(), before.dst_at(), before.addr_len());
    assert_eq!(after.dst(), &t.addr[..n], "destination, seed {seed}");
    assert_eq!(after.dport(), t.port, "port, seed {seed}");
    assert_eq!(
        after.0[after.ttl_at()],
        before.0[before.ttl_at()] - 1,
        "TTL, seed {seed}"
    );
    let mut changed = vec![before.ttl_at(), l4 + 2, l4 + 3, l4 + 6, l4 + 7];
    changed.extend(dst_at..dst_at + n);
    if before.ip() == Ip::V4 {
        changed.extend([L3 + 10, L3 + 11]);
    }
    assert_eq!(before.0.len(), after.0.len(), "length, seed {seed}");
    for (i, (b, a)) in before.0.iter().zip(&after.0).enumerate() {
        assert!(
            b == a || changed.contains(&i),
            "byte {i} changed, seed {seed}"
        );
    }
}

/// The IPv4 header checksum is what a sender computes from scratch, and a receiver's sum over
/// the header folds to all ones.
fn assert_ipv4_header_valid(f: &Frame, seed: u64, what: &str) {
    let h = f.ipv4_header();
    let mut zeroed = h.to_vec();
    zeroed[10..12].fill(0);
    assert_eq!(
        be16(h, 10),
        csum::checksum(&zeroed),
        "{what}: IPv4 header checksum differs from a fresh one, seed {seed}"
    );
    assert_eq!(
        ones_sum(&[h]),
        0xffff,
        "{what}: IPv4 header fails the receiver's check, seed {seed}"
    );
}

/// The UDP checksum is nonzero, equals the one computed from scratch, and a receiver's sum over
/// pseudo-header and datagram (checksum included) folds to all ones.
fn assert_udp_valid(f: &Frame, seed: u64, what: &str) {
    let check = f.udp_check();
    assert_ne!(check, 0, "{what}: UDP checksum is 0, seed {seed}");
    assert_eq!(
        check,
        f.udp_checksum_from_scratch(),
        "{what}: UDP checksum differs from a fresh one, seed {seed}"
    );
    assert_eq!(
        ones_sum(&[&f.pseudo_header(), f.udp()]),
        0xffff,
        "{what}: UDP checksum fails the receiver's check, seed {seed}"
    );
}

fn rewrite_case(rng: &mut StdRng, seed: u64, ip: Ip) {
    let options_len = if ip == Ip::V4 {
        random_options_len(rng)
    } else {
        0
    };
    let payload = random_payload(rng, 0..1500);
    let before = build(rng, ip, options_len, &payload, true);
    if ip == Ip::V4 {
        assert_ipv4_header_valid(&before, seed, "built");
    }
    assert_udp_valid(&before, seed, "built");
    let t = random_target(rng, &before);
    let mut after = before.clone();
    rewrite(&mut after, &t);
    assert_rewritten(&before, &after, &t, seed);
    if ip == Ip::V4 {
        assert_ipv4_header_valid(&after, seed, "rewritten");
    }
    assert_udp_valid(&after, seed, "rewritten");
}

#[test]
fn ipv4_rewrite_keeps_header_and_udp_checksums_valid() {
    cases(5000, |rng, seed| rewrite_case(rng, seed, Ip::V4));
}

#[test]
fn ipv6_rewrite_keeps_udp_checksum_valid() {
    cases(5000, |rng, seed| rewrite_case(rng, seed, Ip::V6));
}

#[test]
fn ipv4_zero_udp_checksum_stays_zero() {
    cases(2000, |rng, seed| {
        let options_len = random_options_len(rng);
        let payload = random_payload(rng, 0..1500);
        let before = build(rng, Ip::V4, options_len, &payload, false);
        let t = random_target(rng, &before);
        let mut after = before.clone();
        assert_eq!(rewrite(&mut after, &t), None, "seed {seed}");
        assert_rewritten(&before, &after, &t, seed);
        assert_eq!(after.udp_check(), 0, "seed {seed}");
        assert_ipv4_header_valid(&after, seed, "rewritten");
    });
}

/// Sets the first payload word so that the sum over pseudo-header and datagram, with the
/// checksum field zeroed, is all ones: the checksum then computes to 0 and is sent as 0xffff.
fn make_checksum_compute_to_zero(f: &mut Frame) {
    f.set_payload_word(0);
    f.set_udp_check(0);
    let rest = ones_sum(&[&f.pseudo_header(), f.udp()]);
    f.set_payload_word(!rest);
}

fn rewrite_to_zero_case(rng: &mut StdRng, seed: u64, ip: Ip) {
    let options_len = if ip == Ip::V4 {
        random_options_len(rng)
    } else {
        0
    };
    let payload = random_payload(rng, 2..1500);
    let mut before = build(rng, ip, options_len, &payload, true);
    let t = random_target(rng, &before);
    // The rewrite leaves the payload alone: pick the word on a rewritten copy, put it into the
    // original, and give the original its correct checksum.
    let mut probe = before.clone();
    rewrite(&mut probe, &t);
    make_checksum_compute_to_zero(&mut probe);
    let word = be16(&probe.0, probe.l4() + UDP_LEN);
    before.set_payload_word(word);
    let check = before.udp_checksum_from_scratch();
    before.set_udp_check(check);
    assert_udp_valid(&before, seed, "built");

    let mut after = before.clone();
    let raw = rewrite(&mut after, &t);
    assert_eq!(
        raw,
        Some(0),
        "the incremental update should compute 0 here, seed {seed}"
    );
    assert_eq!(after.udp_check(), 0xffff, "seed {seed}");
    assert_udp_valid(&after, seed, "rewritten");
    if ip == Ip::V4 {
        assert_ipv4_header_valid(&after, seed, "rewritten");
    }
}

#[test]
fn ipv4_rewrite_computing_to_zero_writes_all_ones() {
    cases(2000, |rng, seed| rewrite_to_zero_case(rng, seed, Ip::V4));
}

#[test]
fn ipv6_rewrite_computing_to_zero_writes_all_ones() {
    cases(2000, |rng, seed| rewrite_to_zero_case(rng, seed, Ip::V6));
}

/// A packet that arrives with 0xffff (a checksum that computed to 0) starts the incremental
/// update from the other representation of zero.
fn rewrite_from_all_ones_case(rng: &mut StdRng, seed: u64, ip: Ip) {
    let options_len = if ip == Ip::V4 {
        random_options_len(rng)
    } else {
        0
    };
    let payload = random_payload(rng, 2..1500);
    let mut before = build(rng, ip, options_len, &payload, true);
    make_checksum_compute_to_zero(&mut before);
    let check = before.udp_checksum_from_scratch();
    assert_eq!(check, 0xffff, "seed {seed}");
    before.set_udp_check(check);
    assert_udp_valid(&before, seed, "built");

    let t = random_target(rng, &before);
    let mut after = before.clone();
    rewrite(&mut after, &t);
    assert_rewritten(&before, &after, &t, seed);
    assert_udp_valid(&after, seed, "rewritten");
    if ip == Ip::V4 {
        assert_ipv4_header_valid(&after, seed, "rewritten");
    }
}

#[test]
fn ipv4_rewrite_of_all_ones_udp_checksum_stays_valid() {
    cases(2000, |rng, seed| {
        rewrite_from_all_ones_case(rng, seed, Ip::V4)
    });
}

#[test]
fn ipv6_rewrite_of_all_ones_udp_checksum_stays_valid() {
    cases(2000, |rng, seed| {
        rewrite_from_all_ones_case(rng, seed, Ip::V6)
    });
}

/// Every checksum value, each with a random word and with the words 0 and 0xffff.
#[test]
fn replace_with_unchanged_field_keeps_checksum() {
    cases(1, |rng, seed| {
        for check in 0..=u16::MAX {
            for word in [rng.random(), 0, 0xffff] {
                let a4: [u8; 4] = rng.random();
                let a16: [u8; 16] = rng.random();
                let results = [
                    csum::replace16(check, word, word),
                    csum::replace32(check, a4, a4),
                    csum::replace128(check, &a16, &a16),
                ];
                for r in results {
                    if check == 0xffff {
                        // Both are zero in one's complement; as a UDP checksum both mean 0xffff.
                        assert!(r == 0 || r == 0xffff, "{check:#x} -> {r:#x}, seed {seed}");
                        assert_eq!(csum::udp_nonzero(r), 0xffff, "seed {seed}");
                    } else {
                        assert_eq!(r, check, "word {word:#x}, seed {seed}");
                    }
                }
            }
        }
    });
}

/// Any sequence of field changes in any word-aligned position, applied one after the other,
/// ends where a fresh checksum does: incremental updates do not drift.
#[test]
fn chained_replacements_match_recomputation() {
    cases(5000, |rng, seed| {
        let mut data = vec![0u8; 2 * rng.random_range(10..100)];
        rng.fill(&mut data[..]);
        // A fixed nonzero word (like an IPv4 version or the UDP protocol number) keeps the
        // covered data from ever summing to zero, where only equivalence could be asked.
        put16(&mut data, 0, 0x4500);
        let mut check = csum::checksum(&data);
        for step in 0..rng.random_range(1..=6) {
            match rng.random_range(0..3) {
                0 => {
                    let at = 2 * rng.random_range(1..data.len() / 2);
                    let new = u16::from_be_bytes(random_bytes(rng));
                    check = csum::replace16(check, be16(&data, at), new);
                    put16(&mut data, at, new);
                }
                1 => {
                    let at = 2 * rng.random_range(1..(data.len() - 4) / 2 + 1);
                    let old: [u8; 4] = data[at..at + 4].try_into().unwrap();
                    let new: [u8; 4] = random_bytes(rng);
                    check = csum::replace32(check, old, new);
                    data[at..at + 4].copy_from_slice(&new);
                }
                _ => {
                    let at = 2 * rng.random_range(1..(data.len() - 16) / 2 + 1);
                    let old: [u8; 16] = data[at..at + 16].try_into().unwrap();
                    let new: [u8; 16] = random_bytes(rng);
                    check = csum::replace128(check, &old, &new);
                    data[at..at + 16].copy_from_slice(&new);
                }
            }
            assert_eq!(check, csum::checksum(&data), "step {step}, seed {seed}");
            assert_eq!(
                ones_sum(&[&data, &check.to_be_bytes()]),
                0xffff,
                "step {step}, seed {seed}"
            );
        }
    });
}

/// `fold` of any 32-bit accumulator is the one's-complement value congruent to it modulo
/// 0xffff, in 1..=0xffff (0 only for 0).
#[test]
fn fold_reduces_any_accumulator() {
    fn reference(x: u32) -> u16 {
        if x == 0 {
            0
        } else {
            ((x - 1) % 0xffff + 1) as u16
        }
    }
    let fixed = [
        0,
        1,
        0xffff,
        0x1_0000,
        0x1_fffe,
        0x1_ffff,
        0xfffe_0001,
        0xffff_0000,
        0xffff_fffe,
        u32::MAX,
    ];
    for x in fixed {
        assert_eq!(csum::fold(x), reference(x), "fold({x:#x})");
    }
    assert_eq!(csum::fold(u32::MAX), 0xffff);
    assert_eq!(csum::fold(0x1_0000), 1);
    cases(1, |rng, seed| {
        for _ in 0..200_000 {
            let x: u32 = rng.random();
            assert_eq!(csum::fold(x), reference(x), "fold({x:#x}), seed {seed}");
        }
    });
}

/// Up to 0x10001 words summed without folding (the most a u32 holds), then folded once, agree
/// with `sum_bytes` and the reference.
#[test]
fn fold_of_unfolded_word_sums_matches_sum_bytes() {
    cases(100, |rng, seed| {
        let words = if rng.random_ratio(1, 4) {
            0x1_0001
        } else {
            rng.random_range(1..=0x1_0001)
        };
        let all_ones = rng.random_ratio(1, 4);
        let mut bytes = vec![0xffu8; 2 * words];
        if !all_ones {
            rng.fill(&mut bytes[..]);
        }
        let acc: u32 = bytes
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        if all_ones && words == 0x1_0001 {
            assert_eq!(acc, u32::MAX, "seed {seed}");
        }
        let folded = csum::fold(acc);
        assert_eq!(folded, ones_sum(&[&bytes]), "seed {seed}");
        assert_eq!(u32::from(folded), csum::sum_bytes(0, &bytes), "seed {seed}");
    });
}

/// The from-scratch functions the other tests lean on agree with the reference, odd lengths
/// and both address sizes included.
#[test]
fn checksum_and_udp_checksum_match_reference() {
    cases(3000, |rng, seed| {
        let data = random_payload(rng, 0..2000);
        assert_eq!(csum::checksum(&data), !ones_sum(&[&data]), "seed {seed}");

        let n = if rng.random_bool(0.5) { 4 } else { 16 };
        let src: [u8; 16] = random_bytes(rng);
        let dst: [u8; 16] = random_bytes(rng);
        let (src, dst) = (&src[..n], &dst[..n]);
        let mut udp = random_payload(rng, UDP_LEN..2000);
        udp[6..8].fill(0);
        let len = udp.len();
        let pseudo = if n == 4 {
            [src, dst, &[0, IPPROTO_UDP], &(len as u16).to_be_bytes()].concat()
        } else {
            [
                src,
                dst,
                &(len as u32).to_be_bytes(),
                &[0, 0, 0, IPPROTO_UDP],
            ]
            .concat()
        };
        let expected = match !ones_sum(&[&pseudo, &udp]) {
            0 => 0xffff,
            c => c,
        };
        assert_eq!(csum::udp_checksum(src, dst, &udp), expected, "seed {seed}");
    });
}

#[test]
fn udp_nonzero_maps_only_zero() {
    assert_eq!(csum::udp_nonzero(0), 0xffff);
    for c in 1..=u16::MAX {
        assert_eq!(csum::udp_nonzero(c), c);
    }
}

#[test]
fn endpoint_v4_puts_address_first_and_zeroes_the_rest() {
    cases(1000, |rng, seed| {
        let addr: [u8; 4] = random_bytes(rng);
        let port = rng.random();
        let e = Endpoint::v4(addr, port);
        assert_eq!(e.addr[..4], addr, "seed {seed}");
        assert_eq!(e.addr[4..], [0; 12], "seed {seed}");
        assert_eq!(e.port, port, "seed {seed}");
        assert_eq!(e.family, FAMILY_V4, "seed {seed}");
        assert_eq!(e._pad, 0, "seed {seed}");
        // The same bytes as an IPv6 address make another key.
        let mut as_v6 = [0u8; 16];
        as_v6[..4].copy_from_slice(&addr);
        assert_ne!(e, Endpoint::v6(as_v6, port), "seed {seed}");
    });
}

#[test]
fn endpoint_v6_keeps_address_and_sets_family() {
    cases(1000, |rng, seed| {
        let addr: [u8; 16] = random_bytes(rng);
        let port = rng.random();
        let e = Endpoint::v6(addr, port);
        assert_eq!(e.addr, addr, "seed {seed}");
        assert_eq!(e.port, port, "seed {seed}");
        assert_eq!(e.family, FAMILY_V6, "seed {seed}");
        assert_eq!(e._pad, 0, "seed {seed}");
    });
}

fn random_flow(rng: &mut impl Rng) -> FlowStats {
    // Below 2^48 so that sums of a few never overflow; last_seen_ns sometimes 0 (never seen).
    FlowStats {
        packets: rng.random_range(0..1 << 48),
        bytes: rng.random_range(0..1 << 48),
        last_seen_ns: if rng.random_ratio(1, 8) {
            0
        } else {
            rng.random_range(0..1 << 48)
        },
    }
}

/// Per-CPU values merged into a zero value, in either order: counts add up, the last-seen
/// time is the latest of them.
#[test]
fn flow_stats_merge_sums_counts_and_keeps_latest() {
    cases(2000, |rng, seed| {
        let cpus: Vec<FlowStats> = (0..rng.random_range(1..=16))
            .map(|_| random_flow(rng))
            .collect();
        let expected = FlowStats {
            packets: cpus.iter().map(|s| s.packets).sum(),
            bytes: cpus.iter().map(|s| s.bytes).sum(),
            last_seen_ns: cpus.iter().map(|s| s.last_seen_ns).max().unwrap(),
        };
        let mut forward = FlowStats::default();
        cpus.iter().for_each(|s| forward.merge(s));
        let mut backward = FlowStats::default();
        cpus.iter().rev().for_each(|s| backward.merge(s));
        assert_eq!(forward, expected, "seed {seed}");
        assert_eq!(backward, expected, "seed {seed}");
    });
}

#[test]
fn encoder_stats_merge_sums_every_counter() {
    cases(2000, |rng, seed| {
        let cpus: Vec<EncoderStats> = (0..rng.random_range(1..=16))
            .map(|_| EncoderStats {
                rx: random_flow(rng),
                tx: random_flow(rng),
                drops: std::array::from_fn(|_| rng.random_range(0..1 << 48)),
            })
            .collect();
        let flow = |pick: fn(&EncoderStats) -> &FlowStats| FlowStats {
            packets: cpus.iter().map(|s| pick(s).packets).sum(),
            bytes: cpus.iter().map(|s| pick(s).bytes).sum(),
            last_seen_ns: cpus.iter().map(|s| pick(s).last_seen_ns).max().unwrap(),
        };
        let expected = EncoderStats {
            rx: flow(|s| &s.rx),
            tx: flow(|s| &s.tx),
            drops: std::array::from_fn(|i| cpus.iter().map(|s| s.drops[i]).sum()),
        };
        let mut merged = EncoderStats::default();
        cpus.iter().for_each(|s| merged.merge(s));
        assert_eq!(merged, expected, "seed {seed}");
    });
}

#[test]
fn srt_shutdown_matches_the_documented_layout() {
    use nsfail_common::srt;
    let p = srt::shutdown(0x1234_abcd);
    let words: Vec<u32> = p
        .chunks(4)
        .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
        .collect();
    // word 0: control bit + type 5; words 1-2: 0; word 3: the caller's socket ID; 4 zero bytes.
    assert_eq!(words, vec![0x8005_0000, 0, 0, 0x1234_abcd, 0]);
    assert_eq!(srt::dest_socket_id(&p), Some(0x1234_abcd));
    assert_eq!(srt::dest_socket_id(&p[..15]), None);
    assert_ne!(srt::shutdown(1), srt::shutdown(2));
}
