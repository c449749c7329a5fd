//! The lab: namespaces, veths and addresses for the demo and the end-to-end tests (the same
//! machinery for both). It shells out to `ip` and `ethtool`, which is acceptable for the lab
//! only; the product's own interface handling lives in `net`. Nothing in the product's paths
//! (daemon, control, dataplane) uses this module.
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
    process::{Command, Output},
};

use crate::net::netns;

pub mod bench_object;
pub mod ctl;
pub mod demo;

pub const INGEST_IF: &str = "ing";
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
        cmd("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
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
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(std::process::Stdio::null())
            .status();
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
        // Veths are created inside rt, then one end moves to the other namespace.
        rt.ip(&[
            "link", "add", INGEST_IF, "type", "veth", "peer", "name", "s0",
        ])?;
        rt.ip(&["link", "set", "s0", "netns", &src.name])?;
        setup_end(&rt, INGEST_IF, "10.77.0.1/24", "fd77::1/64")?;
        setup_end(&src, "s0", "10.77.0.2/24", "fd77::2/64")?;
        // A sender on a veth leaves UDP checksums to offload; a real wire delivers them done.
        src.exec("ethtool", &["-K", "s0", "tx", "off"])?;

        let mut encoders = Vec::new();
        for i in 0..n.min(8) {
            let letter = (b'a' + i as u8) as char;
            let ns = Netns::new(&format!("{prefix}e{letter}"))?;
            netns::quicken_icmp_errors(&ns.name).map_err(|e| LabError {
                cmd: format!("ICMP error rate limit in {}", ns.name),
                detail: e.to_string(),
            })?;
            let host_if = format!("ve{letter}");
            let inner_if = format!("e{letter}0");
            let net = i + 1;
            rt.ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", &inner_if,
            ])?;
            rt.ip(&["link", "set", &inner_if, "netns", &ns.name])?;
            setup_end(
                &rt,
                &host_if,
                &format!("10.77.{net}.1/24"),
                &format!("fd77:{net}::1/64"),
            )?;
            setup_end(
                &ns,
                &inner_if,
                &format!("10.77.{net}.2/24"),
                &format!("fd77:{net}::2/64"),
            )?;
            ns.ip(&["route", "add", "default", "via", &format!("10.77.{net}.1")])?;
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd77:{net}::1"),
            ])?;
            // XDP_REDIRECT into a veth delivers only when the receiving peer has GRO on.
            ns.exec("ethtool", &["-K", &inner_if, "gro", "on"])?;
            encoders.push(EncoderNs {
                ns,
                host_if,
                inner_if,
                addr4: format!("10.77.{net}.2"),
                addr6: format!("fd77:{net}::2"),
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

fn setup_end(ns: &Netns, ifname: &str, v4: &str, v6: &str) -> Result<()> {
    ns.ip(&["addr", "add", v4, "dev", ifname])?;
    ns.ip(&["addr", "add", v6, "dev", ifname, "nodad"])?;
    ns.ip(&["link", "set", ifname, "up"])
}
