//! Anycast announcements (issue 17): one route per ingest address, `proto static` out of the
//! ingest interface, in the cluster's `announce_table`, for a routing daemon (BIRD, FRR) to
//! export to the upstream router. nsfail owns the table's static routes on the ingest
//! interface and nothing else in it.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures_util::TryStreamExt as _;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::{netns, plumb::nl};

/// What [`sync`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Announced {
    pub added: Vec<IpAddr>,
    pub withdrawn: Vec<IpAddr>,
}

/// Makes the static host routes out of `ifindex` in `table` (of the calling thread's
/// namespace) exactly `addrs`: adds the missing, deletes the others.
pub fn sync(table: u32, ifindex: u32, addrs: &BTreeSet<IpAddr>) -> io::Result<Announced> {
    let wanted = addrs.clone();
    netns::netlink(None, move |h| {
        Box::pin(async move {
            let mut present = Vec::new();
            present.extend(ours(&h, table, ifindex, v4_dump(table)).await?);
            present.extend(ours(&h, table, ifindex, v6_dump(table)).await?);
            let mut out = Announced::default();
            for (addr, msg) in present {
                if !wanted.contains(&addr) {
                    h.route().del(msg).execute().await.map_err(nl)?;
                    out.withdrawn.push(addr);
                }
            }
            let have: BTreeSet<IpAddr> = out_of(&h, table, ifindex).await?;
            for addr in wanted.iter().filter(|a| !have.contains(a)) {
                let msg = match addr {
                    IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(*a, 32)
                        .output_interface(ifindex)
                        .table_id(table)
                        .protocol(RouteProtocol::Static)
                        .build(),
                    IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                        .destination_prefix(*a, 128)
                        .output_interface(ifindex)
                        .table_id(table)
                        .protocol(RouteProtocol::Static)
                        .build(),
                };
                match h.route().add(msg).execute().await {
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                    other => other.map_err(nl)?,
                }
                out.added.push(*addr);
            }
            Ok(out)
        })
    })
}

fn v4_dump(table: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .table_id(table)
        .build()
}

fn v6_dump(table: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv6Addr>::new()
        .table_id(table)
        .build()
}

async fn out_of(h: &Handle, table: u32, ifindex: u32) -> io::Result<BTreeSet<IpAddr>> {
    let mut all = ours(h, table, ifindex, v4_dump(table)).await?;
    all.extend(ours(h, table, ifindex, v6_dump(table)).await?);
    Ok(all.into_iter().map(|(a, _)| a).collect())
}

/// The static host routes out of `ifindex` in `table`, with their messages (to delete them).
async fn ours(
    h: &Handle,
    table: u32,
    ifindex: u32,
    dump: RouteMessage,
) -> io::Result<Vec<(IpAddr, RouteMessage)>> {
    let mut routes = h.route().get(dump).execute();
    let mut out = Vec::new();
    while let Some(msg) = routes.try_next().await.map_err(nl)? {
        let in_table = msg.attributes.contains(&RouteAttribute::Table(table))
            || (table < 256 && u32::from(msg.header.table) == table);
        let host_len = match msg.header.address_family {
            netlink_packet_route::AddressFamily::Inet => 32,
            _ => 128,
        };
        if !in_table
            || msg.header.protocol != RouteProtocol::Static
            || msg.header.kind != RouteType::Unicast
            || msg.header.destination_prefix_length != host_len
            || !msg.attributes.contains(&RouteAttribute::Oif(ifindex))
        {
            continue;
        }
        let dst = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
            _ => None,
        });
        if let Some(dst) = dst {
            out.push((dst, msg));
        }
    }
    Ok(out)
}
