//! A small lab in namespaces for end-to-end tests:
//!
//! ```text
//!  src ns: s0 10.77.0.2/24 fd77::2/64 ──veth── ing 10.77.0.1/24 fd77::1/64 (rt ns, XDP here)
//!  ea ns:  ea0 10.77.1.2/24 fd77:1::2/64 ──veth── vea 10.77.1.1/24 fd77:1::1/64 (rt ns, TC)
//!  eb ns:  eb0 10.77.2.2/24 fd77:2::2/64 ──veth── veb 10.77.2.1/24 fd77:2::1/64 (rt ns, TC)
//! ```
//!
//! The rt ns plays the ingest host: IP forwarding stays off there. Every namespace is unique
//! to the test and removed on drop.

use crate::{Netns, ip_in, run};

pub const INGEST4: &str = "10.77.0.1";
pub const INGEST6: &str = "fd77::1";
pub const SRC4: &str = "10.77.0.2";
pub const SRC6: &str = "fd77::2";

/// One encoder namespace and its veth.
pub struct EncoderNs {
    pub ns: Netns,
    /// Host-side veth (in rt).
    pub host_if: String,
    /// Inner veth (in the encoder's namespace).
    pub inner_if: String,
    pub addr4: String,
    pub addr6: String,
}

pub struct Lab {
    pub rt: Netns,
    pub src: Netns,
    pub encoders: Vec<EncoderNs>,
}

impl Lab {
    /// Builds the lab with `n` encoder namespaces (named a, b, ...).
    pub fn new(n: usize) -> Self {
        let rt = Netns::new("rt");
        let src = Netns::new("src");
        // Veths are created inside rt, then one end moves to the other namespace.
        ip_in(
            &rt.name,
            &["link", "add", "ing", "type", "veth", "peer", "name", "s0"],
        );
        ip_in(&rt.name, &["link", "set", "s0", "netns", &src.name]);
        setup_end(&rt.name, "ing", "10.77.0.1/24", "fd77::1/64");
        setup_end(&src.name, "s0", "10.77.0.2/24", "fd77::2/64");
        // A sender on a veth leaves UDP checksums to offload; a real wire delivers them done.
        run(
            "ip",
            &[
                "netns", "exec", &src.name, "ethtool", "-K", "s0", "tx", "off",
            ],
        );

        let mut encoders = Vec::new();
        for i in 0..n {
            let letter = (b'a' + i as u8) as char;
            let ns = Netns::new(&format!("e{letter}"));
            let host_if = format!("ve{letter}");
            let inner_if = format!("e{letter}0");
            let net = i + 1;
            ip_in(
                &rt.name,
                &[
                    "link", "add", &host_if, "type", "veth", "peer", "name", &inner_if,
                ],
            );
            ip_in(&rt.name, &["link", "set", &inner_if, "netns", &ns.name]);
            setup_end(
                &rt.name,
                &host_if,
                &format!("10.77.{net}.1/24"),
                &format!("fd77:{net}::1/64"),
            );
            setup_end(
                &ns.name,
                &inner_if,
                &format!("10.77.{net}.2/24"),
                &format!("fd77:{net}::2/64"),
            );
            ip_in(
                &ns.name,
                &["route", "add", "default", "via", &format!("10.77.{net}.1")],
            );
            ip_in(
                &ns.name,
                &[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("fd77:{net}::1"),
                ],
            );
            // XDP_REDIRECT into a veth delivers only when the receiving peer has GRO on.
            run(
                "ip",
                &[
                    "netns", "exec", &ns.name, "ethtool", "-K", &inner_if, "gro", "on",
                ],
            );
            encoders.push(EncoderNs {
                ns,
                host_if,
                inner_if,
                addr4: format!("10.77.{net}.2"),
                addr6: format!("fd77:{net}::2"),
            });
        }
        Self { rt, src, encoders }
    }

    /// The inner veth's MAC of encoder `i` (what XDP writes as destination MAC).
    pub fn encoder_mac(&self, i: usize) -> [u8; 6] {
        let e = &self.encoders[i];
        nsfail::netns::link_in(Some(&e.ns.name), &e.inner_if)
            .expect("encoder link")
            .mac
    }
}

fn setup_end(ns: &str, ifname: &str, v4: &str, v6: &str) {
    ip_in(ns, &["addr", "add", v4, "dev", ifname]);
    ip_in(ns, &["addr", "add", v6, "dev", ifname, "nodad"]);
    ip_in(ns, &["link", "set", ifname, "up"]);
}
