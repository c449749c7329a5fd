//! The lab: namespaces, veths and addresses for the demo and the end-to-end tests (the same
//! machinery for both). It is built with the product's own netlink plumbing (`net::plumb`,
//! as managed encoders are), from one address plan ([`v4`], [`v6`]). [`Netns::ip`] and
//! [`Netns::exec`] remain for tests that poke at a namespace the way an operator would. Nothing
//! in the product's paths (daemon, control, dataplane) uses this module.
//!
//! ```text
//!  {p}src: s0 10.77.0.2/24 fd77::2/64 ──veth── ing 10.77.0.1/24 fd77::1/64 ({p}rt, XDP here)
//!  {p}ea:  ea0 10.77.1.2/24 fd77:1::2/64 ──veth── vea 10.77.1.1/24 fd77:1::1/64 ({p}rt, TC)
//!  {p}eb:  eb0 10.77.2.2/24 fd77:2::2/64 ──veth── veb 10.77.2.1/24 fd77:2::1/64 ({p}rt, TC)
//! ```
//!
//! The rt namespace plays the ingest host; IP forwarding stays off there. Every namespace is
//! removed when the [`Lab`] is dropped, unless [`Lab::keep`] hands them over first (the
//! persistent lab of `nsfail lab up`, see `labctl`).

use std::{
    io,
    mem::{self, ManuallyDrop},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::{Command, Output},
};

use crate::net::{netns, plumb, provision};

pub mod bench_object;
pub mod bird;
pub mod cluster;
pub mod ctl;
pub mod demo;
pub mod etcd;

/// The lab's address plan, named here once. Link 0 joins the sender to the ingest host, link
/// `i + 1` joins encoder `i` to it; on every link the ingest host's side is host 1 and the far
/// side host 2: `10.77.LINK.HOST/24` and `fd77:LINK::HOST/64`.
pub const fn v4(link: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, link, host)
}

/// The IPv6 half of the plan (see [`v4`]).
pub const fn v6(link: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, link as u16, 0, 0, 0, 0, 0, host as u16)
}

const PREFIX4: u8 = 24;
const PREFIX6: u8 = 64;
/// On every link, the ingest host's side and the far side.
const NEAR: u8 = 1;
const FAR: u8 = 2;

/// Both addresses of one side of link `link`, with their prefixes.
fn side(link: u8, host: u8) -> [(IpAddr, u8); 2] {
    [
        (IpAddr::V4(v4(link, host)), PREFIX4),
        (IpAddr::V6(v6(link, host)), PREFIX6),
    ]
}

pub const INGEST_IF: &str = "ing";
// The plan's sender link as strings, for tests that format and parse them (checked against
// the plan by a unit test below).
pub const INGEST4: &str = "10.77.0.1";
pub const INGEST6: &str = "fd77::1";
pub const SRC4: &str = "10.77.0.2";
pub const SRC6: &str = "fd77::2";

#[derive(Debug, thiserror::Error)]
#[error("{cmd}: {detail}")]
pub struct LabError {
    cmd: String,
    detail: String,
}

type Result<T> = std::result::Result<T, LabError>;

/// Runs a command to completion; its output on failure becomes the error.
pub fn cmd(program: &str, args: &[&str]) -> Result<Output> {
    let line = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| LabError {
            cmd: line.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(LabError {
            cmd: line,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// A named network namespace, deleted on drop with every interface inside it.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        if crate::paths::netns(name).exists() {
            return Err(LabError {
                cmd: format!("create namespace {name}"),
                detail: "it exists already".to_owned(),
            });
        }
        provision::create_netns(name).map_err(step(format!("create namespace {name}")))?;
        let ns = Self {
            name: name.to_owned(),
        };
        plumb::up(Some(name), "lo").map_err(step(format!("lo up in {name}")))?;
        Ok(ns)
    }

    /// Runs `ip` inside this namespace.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        cmd("ip", &full).map(drop)
    }

    /// Runs a command inside this namespace to completion.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        cmd("ip", &full)
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        netns::in_netns(&self.name, f)
    }

    /// Disarms the drop guard: the namespace outlives this value. Returns its name, which is
    /// now the caller's to remove.
    pub fn keep(self) -> String {
        let mut kept = ManuallyDrop::new(self);
        mem::take(&mut kept.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = provision::delete_netns(&self.name);
    }
}

/// Turns an I/O error of one build step into a [`LabError`] naming the step.
fn step(what: String) -> impl FnOnce(io::Error) -> LabError {
    move |e| LabError {
        cmd: what,
        detail: e.to_string(),
    }
}

/// One encoder namespace and its veth.
#[derive(Debug)]
pub struct EncoderNs {
    pub ns: Netns,
    /// Host-side veth (in rt).
    pub host_if: String,
    /// Inner veth (in the encoder's namespace).
    pub inner_if: String,
    pub addr4: String,
    pub addr6: String,
}

#[derive(Debug)]
pub struct Lab {
    pub rt: Netns,
    pub src: Netns,
    pub encoders: Vec<EncoderNs>,
}

impl Lab {
    /// Builds the lab with `n` (at most 8) encoder namespaces (a, b, ...); every namespace
    /// name starts with `prefix`.
    pub fn new(prefix: &str, n: usize) -> Result<Self> {
        let rt = Netns::new(&format!("{prefix}rt"))?;
        // A new namespace copies the host's IPv4 forwarding switch; the ingest host needs
        // none, whatever the host runs (a Docker host has it on).
        rt.run(|| {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "0")?;
            netns::write_if_present("/proc/sys/net/ipv6/conf/all/forwarding", "0")
        })
        .and_then(|r| r)
        .map_err(|e| LabError {
            cmd: format!("forwarding off in {}", rt.name),
            detail: e.to_string(),
        })?;
        let src = Netns::new(&format!("{prefix}src"))?;
        link(&rt, INGEST_IF, &src, "s0", 0)?;
        // A sender on a veth leaves UDP checksums to offload; a real wire delivers them done.
        plumb::tx_checksum_off(&src.name, "s0")
            .map_err(step(format!("tx offload off in {}", src.name)))?;

        let mut encoders = Vec::new();
        for i in 0..n.min(8) {
            let letter = (b'a' + i as u8) as char;
            let ns = Netns::new(&format!("{prefix}e{letter}"))?;
            netns::quicken_icmp_errors(&ns.name)
                .map_err(step(format!("ICMP error rate limit in {}", ns.name)))?;
            let host_if = format!("ve{letter}");
            let inner_if = format!("e{letter}0");
            let net = i as u8 + 1;
            link(&rt, &host_if, &ns, &inner_if, net)?;
            for gateway in [IpAddr::V4(v4(net, NEAR)), IpAddr::V6(v6(net, NEAR))] {
                plumb::default_route(Some(&ns.name), &inner_if, gateway)
                    .map_err(step(format!("default route via {gateway} in {}", ns.name)))?;
            }
            // XDP_REDIRECT into a veth delivers only when the receiving peer has GRO on.
            plumb::gro_on(&ns.name, &inner_if).map_err(step(format!("GRO on in {}", ns.name)))?;
            encoders.push(EncoderNs {
                ns,
                host_if,
                inner_if,
                addr4: v4(net, FAR).to_string(),
                addr6: v6(net, FAR).to_string(),
            });
        }
        Ok(Self { rt, src, encoders })
    }

    /// Disarms every drop guard, so the namespaces (and the veths in them) outlive this value.
    /// Returns their names, now the caller's to remove: rt, src, then the encoders in order.
    pub fn keep(self) -> Vec<String> {
        let Self { rt, src, encoders } = self;
        let mut names = vec![rt.keep(), src.keep()];
        names.extend(encoders.into_iter().map(|e| e.ns.keep()));
        names
    }

    /// The inner veth's MAC of encoder `i` (what XDP writes as destination MAC).
    pub fn encoder_mac(&self, i: usize) -> io::Result<[u8; 6]> {
        let e = &self.encoders[i];
        Ok(netns::link_in(Some(&e.ns.name), &e.inner_if)?.mac)
    }
}

/// Link `net` of the plan: a veth `near_if` in `near` (the ingest host) to `far_if` in `far`,
/// both addressed and up.
fn link(near: &Netns, near_if: &str, far: &Netns, far_if: &str, net: u8) -> Result<()> {
    wire(
        &near.name,
        near_if,
        &side(net, NEAR),
        &far.name,
        far_if,
        &side(net, FAR),
    )
}

/// A veth `a_if` in namespace `a` to `b_if` in namespace `b`, each side with its addresses
/// (and prefix lengths), both up.
pub fn wire(
    a: &str,
    a_if: &str,
    a_addrs: &[(IpAddr, u8)],
    b: &str,
    b_if: &str,
    b_addrs: &[(IpAddr, u8)],
) -> Result<()> {
    let what = format!("veth {a}/{a_if} <-> {b}/{b_if}");
    plumb::veth(Some(a), a_if, b, b_if).map_err(step(what.clone()))?;
    plumb::address_up(Some(a), a_if, a_addrs).map_err(step(what.clone()))?;
    plumb::address_up(Some(b), b_if, b_addrs).map_err(step(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_addresses_follow_the_plan() {
        assert_eq!(INGEST4, v4(0, NEAR).to_string());
        assert_eq!(SRC4, v4(0, FAR).to_string());
        assert_eq!(INGEST6, v6(0, NEAR).to_string());
        assert_eq!(SRC6, v6(0, FAR).to_string());
        assert_eq!(v6(2, FAR).to_string(), "fd77:2::2");
    }
}
