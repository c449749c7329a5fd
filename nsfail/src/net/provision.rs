//! Managed encoders' networking: nsfail makes the encoder's network namespace, its veth pair
//! (host side in nsfail's namespace, `eth0` inside), the addresses and routes, and turns GRO
//! on inside (needed to receive XDP-redirected frames). All of it through netlink (rtnetlink)
//! and ioctls, no `ip` commands. Everything made here is removed by [`deprovision`]. The
//! encoder's process is supervised by the daemon (`daemon::children`).

use std::{
    fs::{self, File},
    io,
    net::IpAddr,
    os::fd::AsRawFd,
    path::Path,
};

use log::{info, warn};
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, unshare},
};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::{
    net::netns::{netlink, set_gro},
    paths,
};

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

fn nl(e: rtnetlink::Error) -> io::Error {
    io::Error::other(e.to_string())
}

async fn index_of(handle: &Handle, name: &str) -> io::Result<Option<u32>> {
    Ok(crate::net::netns::link_message(handle, name)
        .await?
        .map(|msg| msg.header.index))
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
    let p = plan.clone();
    let peer = format!("{}p", plan.host_if);
    let ns_file =
        File::open(paths::netns(&plan.netns)).map_err(plan.err("opening its namespace"))?;
    netlink(None, move |h| {
        Box::pin(async move {
            if index_of(&h, &p.host_if).await?.is_none() {
                h.link()
                    .add(LinkVeth::new(&p.host_if, &peer).build())
                    .execute()
                    .await
                    .map_err(nl)?;
                let peer_index = index_of(&h, &peer)
                    .await?
                    .ok_or_else(|| io::Error::other("veth peer vanished"))?;
                h.link()
                    .set(
                        LinkUnspec::new_with_index(peer_index)
                            .setns_by_fd(ns_file.as_raw_fd())
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(nl)?;
            }
            let host = index_of(&h, &p.host_if)
                .await?
                .ok_or_else(|| io::Error::other("host side veth missing"))?;
            add_address(&h, host, p.gateway, p.prefix).await?;
            h.link()
                .set(LinkUnspec::new_with_index(host).up().build())
                .execute()
                .await
                .map_err(nl)
        })
    })
    .map_err(plan.err("making its veth"))?;

    let p = plan.clone();
    let peer = format!("{}p", plan.host_if);
    netlink(Some(&plan.netns), move |h| {
        Box::pin(async move {
            if let Some(lo) = index_of(&h, "lo").await? {
                h.link()
                    .set(LinkUnspec::new_with_index(lo).up().build())
                    .execute()
                    .await
                    .map_err(nl)?;
            }
            if let Some(i) = index_of(&h, &peer).await? {
                h.link()
                    .set(
                        LinkUnspec::new_with_index(i)
                            .name(INNER_IF.to_owned())
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(nl)?;
            }
            let inner = index_of(&h, INNER_IF)
                .await?
                .ok_or_else(|| io::Error::other("inner veth missing"))?;
            add_address(&h, inner, p.addr, p.prefix).await?;
            h.link()
                .set(LinkUnspec::new_with_index(inner).up().build())
                .execute()
                .await
                .map_err(nl)?;
            let route = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(unspecified(p.addr), 0)
                .and_then(|r| r.gateway(p.gateway))
                .map_err(io::Error::other)?
                .output_interface(inner)
                .build();
            match h.route().add(route).execute().await {
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
                other => other.map_err(nl),
            }
        })
    })
    .map_err(plan.err("addressing it inside its namespace"))?;

    let ns = plan.netns.clone();
    crate::net::netns::in_netns(&ns, || set_gro(INNER_IF, true))
        .and_then(|r| r)
        .map_err(plan.err("turning GRO on inside (needed for XDP redirect into a veth)"))?;
    info!(
        "managed encoder {}: namespace {}, veth {} <-> {INNER_IF} {}/{} via {}",
        plan.encoder, plan.netns, plan.host_if, plan.addr, plan.prefix, plan.gateway
    );
    Ok(())
}

fn unspecified(addr: IpAddr) -> IpAddr {
    if addr.is_ipv4() {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    }
}

async fn add_address(h: &Handle, index: u32, addr: IpAddr, prefix: u8) -> io::Result<()> {
    match h.address().add(index, addr, prefix).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        other => other.map_err(nl),
    }
}

/// Removes a managed encoder's veth and namespace.
pub fn deprovision(plan: &Plan) -> Result<(), ManagedError> {
    let host_if = plan.host_if.clone();
    netlink(None, move |h| {
        Box::pin(async move {
            if let Some(i) = index_of(&h, &host_if).await? {
                h.link().del(i).execute().await.map_err(nl)?;
            }
            Ok(())
        })
    })
    .map_err(plan.err("removing its veth"))?;
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
