//! The routes by which a cluster host announces the ingest addresses it serves (issue 17):
//! one host route per address in a dedicated kernel routing table (`announce_table` in
//! `[cluster]`), which a routing daemon (BIRD 2 or FRR) exports to the upstream router over
//! BGP with BFD. The table is used by no routing rule, so these routes change nothing in the
//! host's own forwarding. nsfail owns only the routes it made: they carry the protocol
//! number [`PROTO`], and routes of any other protocol in the table are left alone. Routes
//! are kernel state: they stay when the daemon stops or crashes, as the data plane does.

use std::{collections::BTreeSet, io, net::IpAddr};

use futures_util::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
};
use rtnetlink::RouteMessageBuilder;

use super::netns;

/// The routing protocol number of nsfail's announcements (`proto 247` in `ip route`).
pub const PROTO: u8 = 247;

/// What [`sync`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Announced {
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
}

/// Makes `table` hold exactly one nsfail route per address of `addrs`, each a host route by
/// interface `ifindex` (the ingest NIC), in the calling thread's namespace: missing ones are
/// added, nsfail's routes for other addresses removed, others' routes left alone.
pub fn sync(table: u32, ifindex: u32, addrs: &BTreeSet<IpAddr>) -> io::Result<Announced> {
    check_table(table)?;
    let have = announced(table)?;
    let mut done = Announced::default();
    for addr in addrs.difference(&have) {
        let msg = host_route(table, *addr)?;
        netns::netlink(None, move |handle| {
            Box::pin(async move {
                let mut msg = msg;
                msg.attributes.push(RouteAttribute::Oif(ifindex));
                handle
                    .route()
                    .add(msg)
                    .replace()
                    .execute()
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))
            })
        })
        .map_err(|e| {
            io::Error::new(e.kind(), format!("announcing {addr} in table {table}: {e}"))
        })?;
        done.added.push(*addr);
    }
    for addr in have.difference(addrs) {
        delete(table, *addr)?;
        done.removed.push(*addr);
    }
    Ok(done)
}

/// Removes every nsfail route from `table` (the host withdraws: drained, or its data plane
/// gone). Returns the addresses withdrawn.
pub fn withdraw(table: u32) -> io::Result<Vec<IpAddr>> {
    check_table(table)?;
    let have = announced(table)?;
    for addr in &have {
        delete(table, *addr)?;
    }
    Ok(have.into_iter().collect())
}

/// The addresses nsfail's routes in `table` announce.
pub fn announced(table: u32) -> io::Result<BTreeSet<IpAddr>> {
    let mut out = BTreeSet::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let routes = netns::netlink(None, move |handle| {
            Box::pin(async move {
                let mut msg = RouteMessage::default();
                msg.header.address_family = family;
                handle
                    .route()
                    .get(msg)
                    .execute()
                    .try_collect::<Vec<_>>()
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))
            })
        })?;
        for r in routes {
            if r.header.protocol != RouteProtocol::Other(PROTO) || route_table(&r) != table {
                continue;
            }
            for attr in &r.attributes {
                match attr {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                        out.insert(IpAddr::V4(*a));
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                        out.insert(IpAddr::V6(*a));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(out)
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// The main (254), local (255) and default (253) tables, and 0, are not an announce table:
/// routes there would change the host's forwarding.
fn check_table(table: u32) -> io::Result<()> {
    if table == 0 || (253..=255).contains(&table) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("table {table} is one the host routes by, not an announce table"),
        ));
    }
    Ok(())
}

fn host_route(table: u32, addr: IpAddr) -> io::Result<RouteMessage> {
    let len = if addr.is_ipv4() { 32 } else { 128 };
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(addr, len)
        .map_err(|e| io::Error::other(e.to_string()))?
        .table_id(table)
        .protocol(RouteProtocol::Other(PROTO))
        .scope(RouteScope::Link)
        .kind(RouteType::Unicast)
        .build())
}

fn delete(table: u32, addr: IpAddr) -> io::Result<()> {
    let msg = host_route(table, addr)?;
    netns::netlink(None, move |handle| {
        Box::pin(async move {
            handle
                .route()
                .del(msg)
                .execute()
                .await
                .map_err(|e| io::Error::other(e.to_string()))
        })
    })
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("withdrawing {addr} from table {table}: {e}"),
        )
    })
}
