//! The egress (TC) program's vocabulary: an encoder's policy (what may leave its namespace)
//! as the kernel reads it, and what the program reports on the `REFUSALS` ring. Compiled from
//! the config by `nsfail`'s `dataplane/policy.rs`; walked by `nsfail-ebpf/src/egress.rs`.

use crate::maps::word;

/// IP protocol numbers the egress policy knows.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// How many allow rules an encoder's policy holds (the egress program walks them in a
/// bounded loop).
pub const MAX_ALLOW_RULES: usize = 16;

/// One allow rule of an [`EncoderPolicy`]: packets of `family` and `proto` to an address in
/// `net`/`mask` with a destination port in `port_min..=port_max` pass. ICMP has no ports (the
/// program gives it port 0), so an ICMP rule holds `0..=u16::MAX`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyRule {
    /// Network address, host bits zero, network byte order (IPv4 in the first 4 bytes).
    pub net: [u8; 16],
    /// Prefix mask, network byte order (all zero past an IPv4 address).
    pub mask: [u8; 16],
    /// First and last destination port, host byte order (`port_min <= port_max`).
    pub port_min: u16,
    pub port_max: u16,
    /// [`PROTO_UDP`], [`PROTO_TCP`], or [`PROTO_ICMP`] / [`PROTO_ICMPV6`] by family.
    pub proto: u8,
    /// [`FAMILY_V4`](crate::FAMILY_V4) or [`FAMILY_V6`](crate::FAMILY_V6).
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PolicyRule>() == 40);

impl PolicyRule {
    /// Whether a packet of `family` and `proto` to `dst` (as in [`Endpoint::addr`](crate::Endpoint::addr)) and
    /// destination `port` (0 for ICMP) matches.
    #[inline(always)]
    pub fn matches(&self, family: u8, proto: u8, dst: &[u8; 16], port: u16) -> bool {
        // Differences are OR-ed together rather than tested one by one: one branch per rule
        // instead of six keeps the verifier's walk over 16 rules short.
        let mut diff = u32::from((self.family ^ family) | (self.proto ^ proto));
        let mut i = 0;
        while i < 16 {
            diff |= (word(dst, i) & word(&self.mask, i)) ^ word(&self.net, i);
            i += 4;
        }
        let in_range =
            port.wrapping_sub(self.port_min) <= self.port_max.wrapping_sub(self.port_min);
        diff == 0 && in_range
    }
}

/// What the egress program reports on the `REFUSALS` ring buffer: encoder `encoder_id`'s
/// kernel answered a packet of channel `channel_id` with a port unreachable.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusalEvent {
    pub encoder_id: u32,
    pub channel_id: u32,
}
const _: () = assert!(core::mem::size_of::<RefusalEvent>() == 8);

/// Size of the `REFUSALS` ring buffer in bytes (a power of two, a multiple of the page size):
/// room for thousands of events between two reads.
pub const REFUSAL_RING_BYTES: u32 = 64 * 1024;

/// Value of `POLICIES` (key: encoder id): what may leave the encoder's namespace besides
/// ARP, neighbour discovery and replies to its channels' sources. Replaced whole by one HASH
/// map update, so the program sees the old or the new policy, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncoderPolicy {
    /// The encoder's address (from its registration): anything else as a source is forged.
    pub addr: [u8; 16],
    /// [`FAMILY_V4`](crate::FAMILY_V4) or [`FAMILY_V6`](crate::FAMILY_V6).
    pub family: u8,
    /// Protocol of the health check ([`PROTO_UDP`] or [`PROTO_TCP`]), 0 for none: packets of
    /// this protocol from `health_port` to `prober` are probe answers and pass.
    pub health_proto: u8,
    /// Health-check port, host byte order.
    pub health_port: u16,
    /// How many of `rules` are in use.
    pub n_rules: u32,
    /// The address the daemon probes from (as in [`Endpoint::addr`](crate::Endpoint::addr)): health answers pass to
    /// it and nowhere else.
    pub prober: [u8; 16],
    pub rules: [PolicyRule; MAX_ALLOW_RULES],
}
const _: () = assert!(core::mem::size_of::<EncoderPolicy>() == 40 + 40 * MAX_ALLOW_RULES);

impl EncoderPolicy {
    /// Whether `src` is the encoder's own address.
    #[inline(always)]
    pub fn own_source(&self, family: u8, src: &[u8; 16]) -> bool {
        self.family == family && self.addr == *src
    }

    /// Whether a packet with this protocol and source port, to `dst` (as in
    /// [`Endpoint::addr`](crate::Endpoint::addr)), answers the encoder's health check: it goes to the prober.
    #[inline(always)]
    pub fn health_answer(&self, proto: u8, src_port: u16, dst: &[u8; 16]) -> bool {
        self.health_proto != 0
            && self.health_proto == proto
            && self.health_port == src_port
            && self.prober == *dst
    }

    /// Whether the allow-list lets a packet of `family` and `proto` to `dst`:`port` through.
    #[inline(always)]
    pub fn allows(&self, family: u8, proto: u8, dst: &[u8; 16], port: u16) -> bool {
        let n = self.n_rules as usize;
        let mut i = 0;
        while i < MAX_ALLOW_RULES {
            if i >= n {
                return false;
            }
            if self.rules[i].matches(family, proto, dst, port) {
                return true;
            }
            i += 1;
        }
        false
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), only integers and byte arrays, explicit padding (asserted sizes), so
    // every bit pattern is valid.
    unsafe impl aya::Pod for PolicyRule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EncoderPolicy {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RefusalEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{Endpoint, FAMILY_V4, FAMILY_V6};

    fn v4(a: [u8; 4]) -> [u8; 16] {
        Endpoint::v4(a, 0).addr
    }

    fn rule(family: u8, net: [u8; 16], prefix: usize, proto: u8, ports: (u16, u16)) -> PolicyRule {
        let mut mask = [0u8; 16];
        for (i, m) in mask.iter_mut().enumerate() {
            let bits = prefix.saturating_sub(i * 8).min(8);
            *m = (0xff00u16 >> bits) as u8;
        }
        PolicyRule {
            net,
            mask,
            port_min: ports.0,
            port_max: ports.1,
            proto,
            family,
            _pad: [0; 2],
        }
    }

    #[test]
    fn rules_match_prefix_protocol_and_ports() {
        let net = rule(FAMILY_V4, v4([10, 77, 9, 0]), 24, PROTO_UDP, (5000, 5010));
        assert!(net.matches(FAMILY_V4, PROTO_UDP, &v4([10, 77, 9, 200]), 5000));
        assert!(net.matches(FAMILY_V4, PROTO_UDP, &v4([10, 77, 9, 1]), 5010));
        assert!(!net.matches(FAMILY_V4, PROTO_UDP, &v4([10, 77, 9, 1]), 4999));
        assert!(!net.matches(FAMILY_V4, PROTO_UDP, &v4([10, 77, 9, 1]), 5011));
        assert!(!net.matches(FAMILY_V4, PROTO_UDP, &v4([10, 77, 8, 1]), 5000));
        assert!(!net.matches(FAMILY_V4, PROTO_TCP, &v4([10, 77, 9, 1]), 5000));
        assert!(!net.matches(FAMILY_V6, PROTO_UDP, &v4([10, 77, 9, 1]), 5000));

        let odd = rule(FAMILY_V4, v4([10, 77, 9, 64]), 26, PROTO_TCP, (0, u16::MAX));
        assert!(odd.matches(FAMILY_V4, PROTO_TCP, &v4([10, 77, 9, 127]), 1));
        assert!(!odd.matches(FAMILY_V4, PROTO_TCP, &v4([10, 77, 9, 128]), 1));

        let icmp = rule(FAMILY_V4, v4([10, 77, 9, 5]), 32, PROTO_ICMP, (0, u16::MAX));
        assert!(icmp.matches(FAMILY_V4, PROTO_ICMP, &v4([10, 77, 9, 5]), 0));
        assert!(!icmp.matches(FAMILY_V4, PROTO_ICMP, &v4([10, 77, 9, 6]), 0));

        let mut fd = [0u8; 16];
        fd[..4].copy_from_slice(&[0xfd, 0x77, 0, 9]);
        let v6 = rule(FAMILY_V6, fd, 64, PROTO_TCP, (443, 443));
        let mut host = fd;
        host[15] = 1;
        assert!(v6.matches(FAMILY_V6, PROTO_TCP, &host, 443));
        host[7] = 1;
        assert!(
            !v6.matches(FAMILY_V6, PROTO_TCP, &host, 443),
            "outside the /64"
        );

        let any = rule(FAMILY_V6, [0; 16], 0, PROTO_ICMPV6, (0, u16::MAX));
        assert!(any.matches(FAMILY_V6, PROTO_ICMPV6, &host, 0));
    }

    #[test]
    fn policy_walks_only_its_rules() {
        let mut p = EncoderPolicy {
            addr: v4([10, 77, 1, 2]),
            family: FAMILY_V4,
            health_proto: PROTO_UDP,
            health_port: 9000,
            prober: v4([10, 77, 0, 1]),
            ..Default::default()
        };
        let prober = v4([10, 77, 0, 1]);
        let dst = v4([10, 77, 9, 1]);
        p.rules[3] = rule(FAMILY_V4, dst, 32, PROTO_TCP, (443, 443));
        p.n_rules = 3;
        assert!(
            !p.allows(FAMILY_V4, PROTO_TCP, &dst, 443),
            "rule 3 is not in use"
        );
        p.n_rules = 4;
        assert!(p.allows(FAMILY_V4, PROTO_TCP, &dst, 443));
        p.n_rules = u32::MAX;
        assert!(
            p.allows(FAMILY_V4, PROTO_TCP, &dst, 443),
            "n_rules is capped"
        );
        assert!(!p.allows(FAMILY_V4, PROTO_TCP, &dst, 444));

        assert!(p.own_source(FAMILY_V4, &v4([10, 77, 1, 2])));
        assert!(!p.own_source(FAMILY_V4, &v4([10, 77, 1, 3])));
        assert!(!p.own_source(FAMILY_V6, &v4([10, 77, 1, 2])));
        assert!(p.health_answer(PROTO_UDP, 9000, &prober));
        assert!(
            !p.health_answer(PROTO_UDP, 9000, &dst),
            "answers go to the prober only"
        );
        assert!(!p.health_answer(PROTO_TCP, 9000, &prober));
        assert!(!p.health_answer(PROTO_UDP, 9001, &prober));
        p.health_proto = 0;
        p.health_port = 0;
        assert!(
            !p.health_answer(0, 0, &prober),
            "no health check, nothing passes as an answer"
        );
    }
}
