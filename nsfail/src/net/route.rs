//! The next hop towards an address as this host's kernel would send to it: the route (a
//! netlink route lookup, as `ip route get` does) and the neighbour entry of its gateway (or of
//! the address itself on a connected network). The data plane sends a cluster channel's
//! packets to another host's encoder by that MAC: `bpf_fib_lookup` would do the same per
//! packet, but refuses (`BPF_FIB_LKUP_RET_FWD_DISABLED`) on a device without IP forwarding,
//! and no ingest host enables it.

use std::{
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use futures_util::TryStreamExt as _;
use netlink_packet_route::{
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteType},
};
use rtnetlink::RouteMessageBuilder;

use super::netns;

/// Where packets to an address leave and to whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    /// The gateway, or the address itself when it is on a connected network.
    pub via: IpAddr,
    pub mac: [u8; 6],
}

/// How long [`next_hop`] waits for a neighbour entry it had to ask for.
const RESOLVE_WITHIN: Duration = Duration::from_secs(1);

/// The next hop towards `dst` in the calling thread's namespace. A gateway without a
/// neighbour entry yet is resolved by the kernel, prompted by one empty UDP datagram to its
/// discard port (9), and waited for up to [`RESOLVE_WITHIN`]; an address with no route, or an
/// unreachable or blackhole route, is an error naming it.
pub fn next_hop(dst: IpAddr) -> io::Result<NextHop> {
    next_hop_within(dst, RESOLVE_WITHIN)
}

/// [`next_hop`], waiting at most `wait` for a neighbour entry it had to ask for. With no wait
/// the kernel is asked and the error returned at once, for a caller that tries again later
/// (the controller's periodic refresh, whose thread must not be held).
pub fn next_hop_within(dst: IpAddr, wait: Duration) -> io::Result<NextHop> {
    let (ifindex, via) = route(dst)?;
    if let Some(mac) = neighbour(ifindex, via)? {
        return Ok(NextHop { ifindex, via, mac });
    }
    let sock = UdpSocket::bind(match via {
        IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        IpAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    })?;
    // Resolution starts with the first packet; that this one is lost or refused is fine.
    let _ = sock.send_to(&[], SocketAddr::new(via, 9));
    if wait.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no neighbour entry for {via} (the next hop towards {dst}) yet: the kernel was \
                 asked to resolve it"
            ),
        ));
    }
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        if let Some(mac) = neighbour(ifindex, via)? {
            return Ok(NextHop { ifindex, via, mac });
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "no neighbour entry for {via} (the next hop towards {dst}) within {} ms",
            wait.as_millis()
        ),
    ))
}

/// The output interface and gateway (or `dst` itself) of the route to `dst`.
fn route(dst: IpAddr) -> io::Result<(u32, IpAddr)> {
    let msg = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst, if dst.is_ipv4() { 32 } else { 128 })
        .map_err(|e| io::Error::other(e.to_string()))?
        .build();
    let found = netns::netlink(None, move |handle| {
        Box::pin(async move {
            let mut routes = handle.route().get(msg).execute();
            routes
                .try_next()
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))
        })
    })
    .map_err(|e| io::Error::new(e.kind(), format!("no route to {dst}: {e}")))?;
    let Some(route) = found else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no route to {dst}"),
        ));
    };
    if route.header.kind != RouteType::Unicast {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("the route to {dst} is {:?}, not unicast", route.header.kind),
        ));
    }
    let mut oif = None;
    let mut via = dst;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => via = IpAddr::V4(*a),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => via = IpAddr::V6(*a),
            _ => {}
        }
    }
    let oif = oif.ok_or_else(|| io::Error::other(format!("the route to {dst} has no device")))?;
    Ok((oif, via))
}

/// The MAC of `addr` on interface `ifindex`, from a neighbour entry the kernel would use.
fn neighbour(ifindex: u32, addr: IpAddr) -> io::Result<Option<[u8; 6]>> {
    netns::netlink(None, move |handle| {
        Box::pin(async move {
            let mut entries = handle.neighbours().get().execute();
            while let Some(n) = entries
                .try_next()
                .await
                .map_err(|e| io::Error::other(e.to_string()))?
            {
                let usable = matches!(
                    n.header.state,
                    NeighbourState::Reachable
                        | NeighbourState::Stale
                        | NeighbourState::Delay
                        | NeighbourState::Probe
                        | NeighbourState::Permanent
                        | NeighbourState::Noarp
                );
                if n.header.ifindex != ifindex || !usable {
                    continue;
                }
                let mut dst = None;
                let mut mac = None;
                for attr in &n.attributes {
                    match attr {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                            dst = Some(IpAddr::V4(*a))
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                            dst = Some(IpAddr::V6(*a))
                        }
                        NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                            mac = Some([l[0], l[1], l[2], l[3], l[4], l[5]])
                        }
                        _ => {}
                    }
                }
                if dst == Some(addr) && mac.is_some() {
                    return Ok(mac);
                }
            }
            Ok(None)
        })
    })
}
