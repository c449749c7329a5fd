//! The egress-policy vocabulary: allow rules as operators write them (`10.200.9.1:443/tcp`),
//! what an encoder may send ([`EgressPolicy`]), and their compilation into the kernel's
//! `POLICIES` value. The config parses rules with this module; nothing here knows the config.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    str::FromStr,
};

use log::warn;
use nsfail_common::{
    EncoderInfo, EncoderPolicy, FAMILY_V4, MAX_ALLOW_RULES, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP, PolicyRule,
};

use super::{DataplaneError, Result, ip_addr, ip_bytes};

/// One entry of an encoder's allow-list: `NETWORK[/PREFIX][:PORT[-PORT]]/PROTO`.
///
/// Examples: `10.200.9.1:443/tcp`, `10.0.0.0/8:1000-2000/udp`, `10.1.1.1/icmp`,
/// `[fd00::/64]:53/udp`, `fd00::1/icmp`. IPv6 with ports needs brackets; `icmp` takes no ports
/// (and means ICMPv6 for an IPv6 network).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowRule {
    pub network: IpAddr,
    pub prefix_len: u8,
    /// First and last destination port; `None` is every port.
    pub ports: Option<RangeInclusive<u16>>,
    pub proto: AllowProto,
}

/// Protocol of an [`AllowRule`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllowProto {
    Udp,
    Tcp,
    Icmp,
}

/// Why an allow rule does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid allow rule {rule:?}: {why}")]
pub struct AllowRuleError {
    pub rule: String,
    pub why: String,
}

impl FromStr for AllowRule {
    type Err = AllowRuleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_allow(text).map_err(|why| AllowRuleError {
            rule: text.to_owned(),
            why,
        })
    }
}

fn parse_allow(text: &str) -> Result<AllowRule, String> {
    const SHAPE: &str = "expected NETWORK[/PREFIX][:PORT[-PORT]]/PROTO, e.g. \"10.0.0.1:443/tcp\"";
    let (target, proto) = text
        .rsplit_once('/')
        .ok_or_else(|| format!("no protocol; {SHAPE}"))?;
    let proto = match proto {
        "udp" => AllowProto::Udp,
        "tcp" => AllowProto::Tcp,
        "icmp" => AllowProto::Icmp,
        other => {
            return Err(format!(
                "unknown protocol {other:?} (udp, tcp or icmp); {SHAPE}"
            ));
        }
    };
    let (cidr, ports) = if let Some(rest) = target.strip_prefix('[') {
        let (cidr, after) = rest
            .split_once(']')
            .ok_or_else(|| "missing ']'".to_owned())?;
        match after {
            "" => (cidr, None),
            _ => {
                let ports = after
                    .strip_prefix(':')
                    .ok_or_else(|| format!("unexpected {after:?} after ']'"))?;
                (cidr, Some(ports))
            }
        }
    } else if target.matches(':').count() == 1 {
        let (cidr, ports) = target.split_once(':').expect("one colon");
        (cidr, Some(ports))
    } else {
        // No colon: IPv4 without ports. Several: IPv6 without ports (ports need brackets).
        (target, None)
    };
    let (network, prefix_len) = parse_cidr(cidr)?;
    let ports = ports.map(parse_ports).transpose()?;
    if proto == AllowProto::Icmp && ports.is_some() {
        return Err("icmp has no ports".into());
    }
    Ok(AllowRule {
        network,
        prefix_len,
        ports,
        proto,
    })
}

fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (text, None),
    };
    let network: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let max = if network.is_ipv4() { 32 } else { 128 };
    let prefix_len = match len {
        None => max,
        Some(len) => {
            let len: u8 = len
                .parse()
                .map_err(|_| format!("prefix length {len:?} is not a number"))?;
            if len > max {
                return Err(format!("prefix length {len} is longer than {max}"));
            }
            len
        }
    };
    let (bits, width) = match network {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32u32),
        IpAddr::V6(a) => (u128::from(a), 128u32),
    };
    let host_bits = width - u32::from(prefix_len);
    let host_mask = if host_bits == 0 {
        0
    } else {
        u128::MAX >> (128 - host_bits)
    };
    if bits & host_mask != 0 {
        let net = bits & !host_mask;
        let net = match network {
            IpAddr::V4(_) => IpAddr::from(Ipv4Addr::from(net as u32)),
            IpAddr::V6(_) => IpAddr::from(Ipv6Addr::from(net)),
        };
        return Err(format!(
            "{text} has bits set after the prefix (did you mean {net}/{prefix_len}?)"
        ));
    }
    Ok((network, prefix_len))
}

fn parse_ports(text: &str) -> Result<RangeInclusive<u16>, String> {
    let port = |p: &str| -> Result<u16, String> {
        match p.parse::<u16>() {
            Ok(0) => Err("port 0 is not a valid port".into()),
            Ok(p) => Ok(p),
            Err(_) => Err(format!("{p:?} is not a port (1-65535)")),
        }
    };
    let (first, last) = match text.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => (port(text)?, port(text)?),
    };
    if first > last {
        return Err(format!("port range {first}-{last} is reversed"));
    }
    Ok(first..=last)
}

/// What an encoder may send out of its namespace besides ARP, neighbour discovery and replies
/// to its channels' sources (built from its config by the controller). Everything else is
/// dropped and counted by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Destinations it may reach; at most `MAX_ALLOW_RULES` (16), each of the encoder's
    /// address family.
    pub allow: Vec<AllowRule>,
    /// Its network health check: answers from this port pass to the prober only.
    pub health: Option<HealthAnswers>,
}

/// The protocol and port an encoder answers health probes on, and whom to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthAnswers {
    /// `Udp` or `Tcp` (an HTTP check is TCP).
    pub proto: AllowProto,
    pub port: u16,
    /// The address the probes come from; `None`: the address this host sends from to reach
    /// the encoder (looked up when the policy is written; the daemon probes from here).
    pub prober: Option<IpAddr>,
}

/// The source address this host's routing picks to reach `addr` (no packet is sent).
pub fn source_towards(addr: IpAddr) -> Option<IpAddr> {
    let any: SocketAddr = match addr {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect((addr, 9)).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// The `POLICIES` value of an encoder: `policy` checked against the encoder's registration.
pub(super) fn policy_value(
    name: &str,
    info: &EncoderInfo,
    policy: &EgressPolicy,
) -> Result<EncoderPolicy> {
    if policy.allow.len() > MAX_ALLOW_RULES {
        return Err(DataplaneError::TooManyRules {
            encoder: name.to_owned(),
            count: policy.allow.len(),
            max: MAX_ALLOW_RULES,
        });
    }
    let prober = policy.health.and_then(|h| {
        let found = h
            .prober
            .or_else(|| source_towards(ip_addr(info.family, &info.addr)));
        if found.is_none() {
            warn!("encoder {name}: no route to it, so its health answers pass nowhere");
        }
        found
    });
    let (health_proto, health_port) = match policy.health {
        None => (0, 0),
        Some(HealthAnswers { port: 0, .. }) => {
            return Err(DataplaneError::Invalid {
                what: format!("egress policy of encoder {name:?}"),
                why: "health-check port 0".into(),
            });
        }
        Some(HealthAnswers {
            proto: AllowProto::Udp,
            port,
            ..
        }) => (PROTO_UDP, port),
        Some(HealthAnswers {
            proto: AllowProto::Tcp,
            port,
            ..
        }) => (PROTO_TCP, port),
        Some(HealthAnswers {
            proto: AllowProto::Icmp,
            ..
        }) => {
            return Err(DataplaneError::Invalid {
                what: format!("egress policy of encoder {name:?}"),
                why: "health answers are UDP or TCP, not ICMP".into(),
            });
        }
    };
    let mut value = EncoderPolicy {
        addr: info.addr,
        family: info.family,
        health_proto,
        health_port,
        n_rules: policy.allow.len() as u32,
        prober: prober.map_or([0; 16], |p| ip_bytes(p).1),
        ..Default::default()
    };
    for (slot, rule) in value.rules.iter_mut().zip(&policy.allow) {
        *slot = policy_rule(name, info.family, rule)?;
    }
    Ok(value)
}

fn policy_rule(name: &str, family: u8, rule: &AllowRule) -> Result<PolicyRule> {
    let (rule_family, net) = ip_bytes(rule.network);
    let invalid = |why: String| DataplaneError::Invalid {
        what: format!("allow rule {} of encoder {name:?}", describe_rule(rule)),
        why,
    };
    if rule_family != family {
        let fam = |f: u8| if f == FAMILY_V4 { "IPv4" } else { "IPv6" };
        return Err(invalid(format!(
            "an {} rule for an {} encoder can never match (its other traffic counts as forged)",
            fam(rule_family),
            fam(family)
        )));
    }
    let width = if family == FAMILY_V4 { 32 } else { 128 };
    if rule.prefix_len > width {
        return Err(invalid(format!("prefix longer than {width} bits")));
    }
    let mut mask = [0u8; 16];
    for (i, m) in mask.iter_mut().enumerate() {
        let bits = usize::from(rule.prefix_len).saturating_sub(i * 8).min(8);
        *m = (0xff00u16 >> bits) as u8;
    }
    let mut net_masked = net;
    for (n, m) in net_masked.iter_mut().zip(mask) {
        *n &= m;
    }
    let proto = match (rule.proto, family) {
        (AllowProto::Udp, _) => PROTO_UDP,
        (AllowProto::Tcp, _) => PROTO_TCP,
        (AllowProto::Icmp, FAMILY_V4) => PROTO_ICMP,
        (AllowProto::Icmp, _) => PROTO_ICMPV6,
    };
    let (port_min, port_max) = match &rule.ports {
        // ICMP has no ports: the program matches it as port 0.
        _ if rule.proto == AllowProto::Icmp => (0, u16::MAX),
        Some(range) if range.is_empty() => return Err(invalid("empty port range".into())),
        Some(range) => (*range.start(), *range.end()),
        None => (0, u16::MAX),
    };
    Ok(PolicyRule {
        net: net_masked,
        mask,
        port_min,
        port_max,
        proto,
        family,
        _pad: [0; 2],
    })
}

/// A rule as the config spells it, for messages.
fn describe_rule(rule: &AllowRule) -> String {
    let proto = match rule.proto {
        AllowProto::Udp => "udp",
        AllowProto::Tcp => "tcp",
        AllowProto::Icmp => "icmp",
    };
    let net = format!("{}/{}", rule.network, rule.prefix_len);
    match &rule.ports {
        None => format!("{net}/{proto}"),
        Some(p) if rule.network.is_ipv6() => {
            format!("[{net}]:{}-{}/{proto}", p.start(), p.end())
        }
        Some(p) => format!("{net}:{}-{}/{proto}", p.start(), p.end()),
    }
}
