//! Plumbing: veth pairs across namespaces, addresses, routes and offloads, all through netlink
//! and ethtool ioctls (never `ip` or `ethtool` commands). Managed encoders (`provision`) and
//! the lab are both built from these. Each step keeps what exists already, so a step can be
//! repeated (a restarted daemon finds its encoders' plumbing in place).

use std::{fs::File, io, net::IpAddr, os::fd::AsRawFd};

use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::{
    net::netns::{in_netns, link_message, netlink},
    paths,
};

pub(crate) fn nl(e: rtnetlink::Error) -> io::Error {
    io::Error::other(e.to_string())
}

pub(crate) async fn index_of(handle: &Handle, name: &str) -> io::Result<Option<u32>> {
    Ok(link_message(handle, name)
        .await?
        .map(|msg| msg.header.index))
}

async fn must_index(handle: &Handle, name: &str) -> io::Result<u32> {
    index_of(handle, name)
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no interface {name}")))
}

/// Makes a veth pair: `name` in namespace `ns` (this one when `None`), its peer `peer` in the
/// named namespace `peer_ns`. The pair is created in `ns` under the peer's final name, then the
/// peer moves. Nothing happens when `name` exists already.
pub fn veth(ns: Option<&str>, name: &str, peer_ns: &str, peer: &str) -> io::Result<()> {
    let (name, peer) = (name.to_owned(), peer.to_owned());
    let target = File::open(paths::netns(peer_ns))
        .map_err(|e| io::Error::new(e.kind(), format!("network namespace {peer_ns}: {e}")))?;
    netlink(ns, move |h| {
        Box::pin(async move {
            if index_of(&h, &name).await?.is_some() {
                return Ok(());
            }
            h.link()
                .add(LinkVeth::new(&name, &peer).build())
                .execute()
                .await
                .map_err(nl)?;
            let peer_index = must_index(&h, &peer).await?;
            h.link()
                .set(
                    LinkUnspec::new_with_index(peer_index)
                        .setns_by_fd(target.as_raw_fd())
                        .build(),
                )
                .execute()
                .await
                .map_err(nl)
        })
    })
}

/// Renames interface `from` to `to` inside `ns`, when `from` exists.
pub fn rename(ns: Option<&str>, from: &str, to: &str) -> io::Result<()> {
    let (from, to) = (from.to_owned(), to.to_owned());
    netlink(ns, move |h| {
        Box::pin(async move {
            if let Some(i) = index_of(&h, &from).await? {
                h.link()
                    .set(LinkUnspec::new_with_index(i).name(to).build())
                    .execute()
                    .await
                    .map_err(nl)?;
            }
            Ok(())
        })
    })
}

/// Adds `addr/prefix` to `ifname` inside `ns` (an address there already is kept) and brings
/// the interface up. IPv6 addresses skip duplicate address detection: they are usable at once.
pub fn address_up(ns: Option<&str>, ifname: &str, addrs: &[(IpAddr, u8)]) -> io::Result<()> {
    let (ifname, addrs) = (ifname.to_owned(), addrs.to_vec());
    netlink(ns, move |h| {
        Box::pin(async move {
            let index = must_index(&h, &ifname).await?;
            for (addr, prefix) in addrs {
                let mut req = h.address().add(index, addr, prefix);
                if addr.is_ipv6() {
                    req.message_mut()
                        .attributes
                        .push(AddressAttribute::Flags(AddressFlags::Nodad));
                }
                match req.execute().await {
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                    other => other.map_err(nl)?,
                }
            }
            h.link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(nl)
        })
    })
}

/// Brings `ifname` up inside `ns`.
pub fn up(ns: Option<&str>, ifname: &str) -> io::Result<()> {
    address_up(ns, ifname, &[])
}

/// A default route via `gateway` out of `ifname` inside `ns` (one there already is kept).
pub fn default_route(ns: Option<&str>, ifname: &str, gateway: IpAddr) -> io::Result<()> {
    let ifname = ifname.to_owned();
    netlink(ns, move |h| {
        Box::pin(async move {
            let index = must_index(&h, &ifname).await?;
            let route = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(unspecified(gateway), 0)
                .and_then(|r| r.gateway(gateway))
                .map_err(io::Error::other)?
                .output_interface(index)
                .build();
            match h.route().add(route).execute().await {
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
                other => other.map_err(nl),
            }
        })
    })
}

/// Deletes `ifname` inside `ns` (a veth takes its peer with it); a missing one is no error.
pub fn delete_link(ns: Option<&str>, ifname: &str) -> io::Result<()> {
    let ifname = ifname.to_owned();
    netlink(ns, move |h| {
        Box::pin(async move {
            if let Some(i) = index_of(&h, &ifname).await? {
                h.link().del(i).execute().await.map_err(nl)?;
            }
            Ok(())
        })
    })
}

/// Turns GRO on for `ifname` inside the named namespace `ns`: a veth delivers XDP-redirected
/// frames only when its receiving peer has it.
pub fn gro_on(ns: &str, ifname: &str) -> io::Result<()> {
    let ifname = ifname.to_owned();
    in_netns(ns, move || crate::net::netns::set_gro(&ifname, true))?
}

/// Turns transmit checksum offload off for `ifname` inside the named namespace `ns`, so what
/// it sends carries finished checksums, as frames from a real wire do.
pub fn tx_checksum_off(ns: &str, ifname: &str) -> io::Result<()> {
    let ifname = ifname.to_owned();
    in_netns(ns, move || {
        crate::net::netns::set_tx_checksum(&ifname, false)
    })?
}

fn unspecified(addr: IpAddr) -> IpAddr {
    if addr.is_ipv4() {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    }
}
