//! Managed encoders' networking: nsfail makes the encoder's network namespace, its veth pair
//! (host side in nsfail's namespace, `eth0` inside), the addresses and routes, and turns GRO
//! on inside (needed to receive XDP-redirected frames). All of it through netlink (rtnetlink)
//! and ioctls, no `ip` commands. Everything made here is removed by [`deprovision`]. The
//! encoder's process is supervised by the daemon (`daemon::children`).

use std::{
    fs::{self, File},
    io,
    net::IpAddr,
    path::Path,
};

use log::{info, warn};
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, unshare},
};

use crate::{net::plumb, paths};

/// Inside its namespace a managed encoder's interface is always this.
pub const INNER_IF: &str = "eth0";

#[derive(Debug, thiserror::Error)]
#[error("managed encoder {encoder:?}: {what}: {source}")]
pub struct ManagedError {
    encoder: String,
    what: String,
    source: io::Error,
}

/// What a managed encoder's plumbing is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub encoder: String,
    pub netns: String,
    pub host_if: String,
    pub addr: IpAddr,
    pub prefix: u8,
    /// The host side's address: the encoder's gateway.
    pub gateway: IpAddr,
}

impl Plan {
    fn err(&self, what: impl Into<String>) -> impl FnOnce(io::Error) -> ManagedError + '_ {
        let what = what.into();
        move |source| ManagedError {
            encoder: self.encoder.clone(),
            what,
            source,
        }
    }
}

/// Creates the named namespace `ns` (as `ip netns add` does: a bind mount of a new network
/// namespace on /run/netns/NAME) unless it exists.
pub fn create_netns(ns: &str) -> io::Result<()> {
    let path = paths::netns(ns);
    if path.exists() {
        return Ok(());
    }
    fs::create_dir_all(paths::NETNS_DIR)?;
    File::create(&path)?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> io::Result<()> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        mount(
            Some(Path::new("/proc/thread-self/ns/net")),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(io::Error::from)
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))?;
    if made.is_err() {
        let _ = fs::remove_file(&path);
    }
    made
}

/// Removes the named namespace `ns` (its interfaces go with it once nothing runs inside).
pub fn delete_netns(ns: &str) -> io::Result<()> {
    let path = paths::netns(ns);
    if !path.exists() {
        return Ok(());
    }
    let _ = umount2(&path, MntFlags::MNT_DETACH);
    fs::remove_file(&path)
}

/// Makes everything a managed encoder needs; what exists already is kept (a restarted daemon
/// finds its encoders' namespaces in place).
pub fn provision(plan: &Plan) -> Result<(), ManagedError> {
    create_netns(&plan.netns).map_err(plan.err("creating its namespace"))?;
    crate::net::netns::quicken_icmp_errors(&plan.netns)
        .map_err(plan.err("quickening its ICMP errors"))?;
    let inner = |what: &'static str| plan.err(what);
    let peer = format!("{}p", plan.host_if);
    let ns = Some(plan.netns.as_str());
    plumb::veth(None, &plan.host_if, &plan.netns, &peer).map_err(inner("making its veth"))?;
    plumb::address_up(None, &plan.host_if, &[(plan.gateway, plan.prefix)])
        .map_err(inner("addressing its host side"))?;
    plumb::up(ns, "lo").map_err(inner("bringing its loopback up"))?;
    plumb::rename(ns, &peer, INNER_IF).map_err(inner("naming its inner veth"))?;
    plumb::address_up(ns, INNER_IF, &[(plan.addr, plan.prefix)])
        .map_err(inner("addressing it inside its namespace"))?;
    plumb::default_route(ns, INNER_IF, plan.gateway)
        .map_err(inner("routing it inside its namespace"))?;
    plumb::gro_on(&plan.netns, INNER_IF).map_err(inner(
        "turning GRO on inside (needed for XDP redirect into a veth)",
    ))?;
    info!(
        "managed encoder {}: namespace {}, veth {} <-> {INNER_IF} {}/{} via {}",
        plan.encoder, plan.netns, plan.host_if, plan.addr, plan.prefix, plan.gateway
    );
    Ok(())
}

/// Removes a managed encoder's veth and namespace.
pub fn deprovision(plan: &Plan) -> Result<(), ManagedError> {
    plumb::delete_link(None, &plan.host_if).map_err(plan.err("removing its veth"))?;
    delete_netns(&plan.netns).map_err(plan.err("removing its namespace"))?;
    info!(
        "managed encoder {}: namespace and veth removed",
        plan.encoder
    );
    Ok(())
}

/// Logs a failed deprovision: the operator may have to remove the namespace by hand.
pub fn deprovision_or_warn(plan: &Plan) {
    if let Err(err) = deprovision(plan) {
        warn!("{err} (remove it with `ip netns del {}`)", plan.netns);
    }
}

/// For a managed encoder: its host part within the link, and the host side's address (the
/// link's first address).
pub fn managed_link(addr: IpAddr, prefix: u8) -> (u128, IpAddr) {
    match addr {
        IpAddr::V4(a) => {
            let v = u32::from(a);
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            let gw = std::net::Ipv4Addr::from((v & mask) + 1);
            (u128::from(v & !mask), IpAddr::V4(gw))
        }
        IpAddr::V6(a) => {
            let v = u128::from(a);
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            let gw = std::net::Ipv6Addr::from((v & mask) + 1);
            (v & !mask, IpAddr::V6(gw))
        }
    }
}
