//! The cluster lab's network: links, addresses, routes and switches of the address plan, and
//! the router's XDP programs.

use super::*;

/// Links, addresses, routes and switches: the router forwards (ECMP by the L4 hash, no
/// reverse-path filter: replies leave the hosts from the anycast address), no host does.
pub(super) fn network(rt: &str, etcd_ns: &str, cl: &str, hosts: &[ClusterLabHost]) -> Result<()> {
    sysctls(
        rt,
        &[
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
            ("net/ipv4/fib_multipath_hash_policy", "1"),
        ],
    )?;
    for (ns, ifname, net) in [(cl, "c0", CALLER_NET), (etcd_ns, "et0", ETCD_NET)] {
        let near = addr(net, NEAR);
        wire(
            rt,
            &format!("r-{}", &ifname[..ifname.len() - 1]),
            &v4(near),
            ns,
            ifname,
            &v4(addr(net, FAR)),
        )?;
        default_route(ns, ifname, near)?;
    }
    // The caller's checksums complete, as from a wire.
    plumb::tx_checksum_off(cl, "c0").map_err(ctl::io_err(format!("tx offload off in {cl}")))?;
    for (h, i) in hosts.iter().zip(1..) {
        sysctls(&h.netns, &[("net/ipv4/ip_forward", "0")])?;
        let router_if = format!("r-{}", h.name);
        let near = addr(uplink_net(i), NEAR);
        wire(rt, &router_if, &v4(near), &h.netns, UPLINK, &v4(h.uplink))?;
        default_route(&h.netns, UPLINK, near)?;
        // What a host's XDP sends back out of its uplink, and its encoders' replies redirected
        // there, reach the router only with GRO on (and an XDP program, see `pass_xdp`).
        plumb::gro_on(rt, &router_if).map_err(ctl::io_err(format!("GRO on in {rt}")))?;
        for (j, letter) in [(0, 'a'), (1, 'b')] {
            let net = encoder_net(i, j);
            let enc_ns = format!("{}{letter}", h.netns);
            wire(
                &h.netns,
                &format!("v{letter}"),
                &v4(addr(net, NEAR)),
                &enc_ns,
                "e0",
                &v4(addr(net, FAR)),
            )?;
            default_route(&enc_ns, "e0", addr(net, NEAR))?;
            // XDP_REDIRECT into a veth delivers only when the receiving peer has GRO on.
            plumb::gro_on(&enc_ns, "e0").map_err(ctl::io_err(format!("GRO on in {enc_ns}")))?;
            netns::quicken_icmp_errors(&enc_ns)
                .map_err(ctl::io_err(format!("ICMP error rate limit in {enc_ns}")))?;
            let subnet = format!("{}/24", addr(net, 0));
            ip(&[
                "-n",
                rt,
                "route",
                "add",
                &subnet,
                "via",
                &h.uplink.to_string(),
            ])?;
        }
    }
    Ok(())
}

fn sysctls(ns: &str, values: &[(&str, &str)]) -> Result<()> {
    let values: Vec<(String, String)> = values
        .iter()
        .map(|(k, v)| (format!("/proc/sys/{k}"), (*v).to_owned()))
        .collect();
    netns::in_netns(ns, move || {
        values.iter().try_for_each(|(k, v)| fs::write(k, v))
    })
    .and_then(|r| r)
    .map_err(ctl::io_err(format!("sysctls in {ns}")))
}

fn default_route(ns: &str, ifname: &str, gateway: Ipv4Addr) -> Result<()> {
    plumb::default_route(Some(ns), ifname, IpAddr::V4(gateway))
        .map_err(ctl::io_err(format!("default route via {gateway} in {ns}")))
}

fn ip(args: &[&str]) -> Result<()> {
    crate::lab::cmd("ip", args)
        .map(drop)
        .map_err(LabCtlError::from)
}

/// An XDP_PASS program on the router's side of every uplink, pinned in `pins` (links, as a
/// data plane's are). veth wakes the receiver of a host's `XDP_TX` only when the receiver has
/// an XDP program (a physical uplink has no such condition), and a host refuses to route to
/// another host's encoder through a veth uplink whose peer has none.
pub(super) fn pass_xdp(rt: &str, hosts: &[ClusterLabHost], pins: PathBuf) -> Result<()> {
    let ifaces: Vec<String> = hosts.iter().map(|h| format!("r-{}", h.name)).collect();
    let what = format!("XDP pass programs on the router's uplinks in {rt}");
    let attach = move || -> std::result::Result<(), String> {
        let pins = Pins::new(pins);
        crate::dataplane::ensure_bpffs(pins.root()).map_err(|e| e.to_string())?;
        fs::create_dir_all(pins.links()).map_err(|e| e.to_string())?;
        let mut obj = aya::Ebpf::load(bench_object::OBJECT).map_err(|e| e.to_string())?;
        let prog: &mut aya::programs::Xdp = obj
            .program_mut("bench_pass")
            .ok_or("no bench_pass program")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        prog.load().map_err(|e| e.to_string())?;
        for ifname in &ifaces {
            let id = prog
                .attach(ifname, aya::programs::XdpMode::Driver)
                .map_err(|e| format!("{ifname}: {e}"))?;
            let link: aya::programs::links::FdLink = prog
                .take_link(id)
                .map_err(|e| e.to_string())?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| e.to_string())?;
            link.pin(pins.xdp_link(ifname))
                .map_err(|e| format!("pin {}: {e}", pins.xdp_link(ifname).display()))?;
        }
        Ok(())
    };
    netns::in_netns(rt, attach)
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|detail| LabCtlError::Start { name: what, detail })
}
