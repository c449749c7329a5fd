//! Interfaces and network namespaces: looking up an interface's index and MAC, in this
//! namespace or in a named one, and running a closure inside a named namespace.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    thread,
};

use nix::sched::{CloneFlags, setns};
use rtnetlink::Handle;

use crate::paths;

/// An interface's index and hardware address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// Looks `ifname` up in the calling thread's network namespace.
pub fn link(ifname: &str) -> io::Result<Link> {
    let ifindex = nix::net::if_::if_nametoindex(ifname).map_err(|e| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("interface {ifname}: {}", e.desc()),
        )
    })?;
    Ok(Link {
        ifindex,
        mac: hwaddr(ifname)?,
    })
}

/// Looks `ifname` up inside the named namespace `ns`, or in this one when `ns` is `None`.
pub fn link_in(ns: Option<&str>, ifname: &str) -> io::Result<Link> {
    match ns {
        None => link(ifname),
        Some(ns) => {
            let ifname = ifname.to_owned();
            in_netns(ns, move || link(&ifname))?
        }
    }
}

/// Runs `f` on a new thread that has joined the named namespace `ns` (the caller's own thread
/// never changes namespace).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let handle = File::open(paths::netns(ns))
        .map_err(|e| io::Error::new(e.kind(), format!("network namespace {ns}: {e}")))?;
    in_netns_at(handle, f)
}

/// As [`in_netns`], inside the namespace `handle` is a handle of (a named one's
/// `/run/netns/NAME`, or a process's `/proc/PID/ns/net` for a namespace with no name).
pub fn in_netns_at<T: Send + 'static>(
    handle: File,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    thread::spawn(move || -> io::Result<T> {
        setns(handle.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))?
}

/// The link named `name` as rtnetlink shows it, or `None` when there is no such interface.
pub async fn link_message(
    handle: &Handle,
    name: &str,
) -> io::Result<Option<netlink_packet_route::link::LinkMessage>> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match futures_util::TryStreamExt::try_next(&mut links).await {
        Ok(msg) => Ok(msg),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

/// Runs `f` with a netlink handle inside namespace `ns` (or this one), on a thread of its own
/// with its own small runtime, so it works from any context, async or not.
pub fn netlink<T: Send + 'static>(
    ns: Option<&str>,
    f: impl FnOnce(Handle) -> std::pin::Pin<Box<dyn Future<Output = io::Result<T>> + Send>>
    + Send
    + 'static,
) -> io::Result<T> {
    let target = ns.map(|n| File::open(paths::netns(n))).transpose()?;
    netlink_at(target, f)
}

/// As [`netlink`], inside the namespace `target` is a handle of (or this one when `None`):
/// a namespace without a name is reached through a process's `/proc/PID/ns/net`.
pub fn netlink_at<T: Send + 'static>(
    target: Option<File>,
    f: impl FnOnce(Handle) -> std::pin::Pin<Box<dyn Future<Output = io::Result<T>> + Send>>
    + Send
    + 'static,
) -> io::Result<T> {
    std::thread::spawn(move || -> io::Result<T> {
        if let Some(t) = target {
            setns(t.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            let task = tokio::spawn(conn);
            let out = f(handle).await;
            task.abort();
            out
        })
    })
    .join()
    .map_err(|_| io::Error::other("netlink thread panicked"))?
}

/// Turns generic receive offload on or off (the ETHTOOL_SGRO ioctl).
pub fn set_gro(ifname: &str, on: bool) -> io::Result<()> {
    const ETHTOOL_SGRO: u32 = 0x0000_002c;
    ethtool_value(ifname, ETHTOOL_SGRO, u32::from(on)).map(drop)
}

/// Turns transmit checksum offload on or off (the ETHTOOL_STXCSUM ioctl; features that need
/// it, such as segmentation offload, follow it off).
pub fn set_tx_checksum(ifname: &str, on: bool) -> io::Result<()> {
    const ETHTOOL_STXCSUM: u32 = 0x0000_0017;
    ethtool_value(ifname, ETHTOOL_STXCSUM, u32::from(on)).map(drop)
}

/// One `struct ethtool_value` command (`cmd`, `data`) on `ifname`; returns `data` as the
/// kernel left it.
fn ethtool_value(ifname: &str, cmd: u32, data: u32) -> io::Result<u32> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue { cmd, data };
    // SAFETY: a plain socket for the ioctl; owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nothing else.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if ifname.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name too long: {ifname}"),
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(ifname.as_bytes()) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: SIOCETHTOOL reads the command from the buffer ifru_data points to, which lives
    // until the call returns.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data)
}

/// Whether generic receive offload is on (the ETHTOOL_GGRO ioctl).
pub fn gro(ifname: &str) -> io::Result<bool> {
    const ETHTOOL_GGRO: u32 = 0x0000_002b;
    ethtool_value(ifname, ETHTOOL_GGRO, 0).map(|v| v != 0)
}

/// Per-destination ICMP error rate limit in an encoder namespace, in ms: one error per 10 ms
/// to each destination, where the kernel default is one a second after a burst of six.
const ICMP_ERROR_INTERVAL_MS: &str = "10";

/// Lets the encoder namespace `ns` answer every health probe of a port where nothing listens
/// any more (probes come at most every 10 ms): the prober then fails it at once instead of
/// after its timeout, probe after probe. The limit stays per destination, so the errors a
/// dead encoder's own stream provokes (for its source, dropped by the egress policy) cannot
/// use up the namespace's global ICMP budget that the prober's answers need. The encoder's
/// egress policy lets only port unreachables for its own health port out.
pub fn quicken_icmp_errors(ns: &str) -> io::Result<()> {
    in_netns(ns, || {
        std::fs::write("/proc/sys/net/ipv4/icmp_ratelimit", ICMP_ERROR_INTERVAL_MS)?;
        // Absent when the host booted with IPv6 disabled.
        write_if_present("/proc/sys/net/ipv6/icmp/ratelimit", ICMP_ERROR_INTERVAL_MS)
    })?
}

/// The per-destination ICMP error interval (`net.ipv4.icmp_ratelimit`, ms) in namespace `ns`.
pub fn icmp_ratelimit_ms(ns: &str) -> io::Result<u64> {
    in_netns(ns, || {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/icmp_ratelimit")?;
        text.trim()
            .parse::<u64>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    })?
}

/// Writes a sysctl file that may not exist (an IPv6 one on a host without IPv6).
pub fn write_if_present(path: &str, value: &str) -> io::Result<()> {
    match std::fs::write(path, value) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn hwaddr(ifname: &str) -> io::Result<[u8; 6]> {
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = ifname.as_bytes();
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name too long: {ifname}"),
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads ifr_name and writes ifr_hwaddr of a valid ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("interface {ifname}: {e}")));
    }
    // SAFETY: the ioctl filled the hwaddr member of the union.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(mac)
}

/// The interface that carries `addr`, looked up inside the named namespace `ns` (how a local
/// encoder's MAC is found: its namespace and address are in the config, its interface name
/// is not).
pub fn link_with_addr(ns: &str, addr: std::net::IpAddr) -> io::Result<Link> {
    let name = ns.to_owned();
    in_netns(ns, move || -> io::Result<Link> {
        let ifname = nix::ifaddrs::getifaddrs()
            .map_err(io::Error::from)?
            .find(|ifa| {
                ifa.address.as_ref().is_some_and(|a| {
                    a.as_sockaddr_in().map(|s| std::net::IpAddr::V4(s.ip())) == Some(addr)
                        || a.as_sockaddr_in6().map(|s| std::net::IpAddr::V6(s.ip())) == Some(addr)
                })
            })
            .map(|ifa| ifa.interface_name)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no interface with address {addr} in namespace {name}"),
                )
            })?;
        link(&ifname)
    })?
}

/// The name of interface `ifindex` in the calling thread's namespace.
pub fn ifname_of(ifindex: u32) -> io::Result<String> {
    nix::net::if_::if_indextoname(ifindex)
        .map(|n| n.to_string_lossy().into_owned())
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("interface {ifindex}: {}", e.desc()),
            )
        })
}
