//! The batch prober's socket calls that std and tokio lack: `sendmmsg` and `recvmmsg` of
//! many datagrams at once, raw socket addresses, and the error queue (`IP_RECVERR`) where a
//! port unreachable names the probe it answers. Owned by `batch`; knows nothing of probes.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, RawFd},
};

use tokio::{io::Interest, net::UdpSocket};

pub(super) fn open(family: u8) -> io::Result<UdpSocket> {
    let any: SocketAddr = if family == 4 {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = std::net::UdpSocket::bind(any)?;
    sock.set_nonblocking(true)?;
    let (level, opt) = if family == 4 {
        (libc::IPPROTO_IP, libc::IP_RECVERR)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
    };
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a valid descriptor and an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    UdpSocket::from_std(sock)
}

/// A socket address as the kernel takes it.
pub(super) fn raw_addr(at: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match at {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// The socket address in a `sockaddr_storage` the kernel filled in.
pub(super) fn from_raw(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                0,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// One `sendmmsg` of every datagram; how many the kernel took.
pub(super) fn send_batch(fd: RawFd, batch: &[(SocketAddr, Vec<u8>)]) -> usize {
    let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
        batch.iter().map(|(at, _)| raw_addr(*at)).collect();
    let mut iovs: Vec<libc::iovec> = batch
        .iter()
        .map(|(_, p)| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..batch.len())
        .map(|i| {
            // SAFETY: msghdr is plain data; all-zero is valid, the fields set below point into
            // `addrs` and `iovs`, which outlive the call.
            let mut h: libc::msghdr = unsafe { zeroed() };
            h.msg_name = (&mut addrs[i].0 as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = addrs[i].1;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            }
        })
        .collect();
    let mut sent = 0;
    while sent < msgs.len() {
        let rest = &mut msgs[sent..];
        // SAFETY: `rest` is a valid array of mmsghdr whose pointers are valid (above).
        let n = unsafe {
            libc::sendmmsg(
                fd,
                rest.as_mut_ptr(),
                rest.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            break;
        }
        sent += n as usize;
    }
    sent
}

/// Datagrams read at once (one `recvmmsg`).
pub(super) const INBOX: usize = 64;

/// Buffers for one `recvmmsg` of up to [`INBOX`] datagrams of up to 2 KiB each.
pub(super) struct Inbox {
    data: Vec<[u8; 2048]>,
    names: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
}

impl Inbox {
    pub(super) fn new() -> Self {
        Self {
            data: vec![[0u8; 2048]; INBOX],
            // SAFETY: plain data; all-zero is valid.
            names: vec![unsafe { zeroed() }; INBOX],
            lens: vec![0; INBOX],
        }
    }

    /// One `recvmmsg` (non-blocking): how many datagrams it read; `WouldBlock` when none.
    pub(super) fn read(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut iovs: Vec<libc::iovec> = self
            .data
            .iter_mut()
            .map(|d| libc::iovec {
                iov_base: d.as_mut_ptr().cast(),
                iov_len: d.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(self.names.iter_mut())
            .map(|(iov, name)| {
                // SAFETY: plain data; all-zero is valid.
                let mut m: libc::mmsghdr = unsafe { zeroed() };
                m.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
                m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: every header points at buffers of this Inbox and at `iovs`, all of which
        // outlive the call; the count is the headers'.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (len, m) in self.lens.iter_mut().zip(&msgs).take(n) {
            *len = m.msg_len as usize;
        }
        Ok(n)
    }

    /// Datagram `k` of the last read: its source and contents.
    pub(super) fn datagram(&self, k: usize) -> Option<(SocketAddr, &[u8])> {
        let from = from_raw(&self.names[k])?;
        Some((from, &self.data[k][..self.lens[k].min(2048)]))
    }
}

pub(super) fn unmapped(at: SocketAddr) -> SocketAddr {
    match at {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), a.port()),
            None => SocketAddr::V6(SocketAddrV6::new(*a.ip(), a.port(), 0, 0)),
        },
        other => other,
    }
}

/// The destination of the next queued port unreachable, if any (other queued errors are
/// read and dropped).
pub(super) fn refusal(sock: &UdpSocket) -> Option<SocketAddr> {
    loop {
        let got = sock.try_io(Interest::ERROR, || read_error(sock.as_raw_fd()));
        match got {
            Ok(Some(dest)) => return Some(dest),
            Ok(None) => continue,
            Err(_) => return None,
        }
    }
}

/// One message of the error queue: `Some(destination)` for a port unreachable, `None` for
/// another error; `WouldBlock` when the queue is empty.
pub(super) fn read_error(fd: RawFd) -> io::Result<Option<SocketAddr>> {
    let mut data = [0u8; 64];
    let mut control = [0u64; 64];
    // SAFETY: plain data; all-zero is valid.
    let mut name: libc::sockaddr_storage = unsafe { zeroed() };
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: plain data; the pointers set below stay valid for the call.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 64]>();
    // SAFETY: recvmsg with a valid descriptor and a msghdr whose buffers are valid.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut refused = false;
    // SAFETY: the CMSG macros walk the control buffer the kernel filled in, within
    // msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let (level, kind) = ((*c).cmsg_level, (*c).cmsg_type);
            if (level == libc::IPPROTO_IP && kind == libc::IP_RECVERR)
                || (level == libc::IPPROTO_IPV6 && kind == libc::IPV6_RECVERR)
            {
                let e =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::sock_extended_err>());
                refused |= (e.ee_origin == libc::SO_EE_ORIGIN_ICMP
                    && (e.ee_type, e.ee_code) == (3, 3))
                    || (e.ee_origin == libc::SO_EE_ORIGIN_ICMP6
                        && (e.ee_type, e.ee_code) == (1, 4));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(if refused { from_raw(&name) } else { None })
}
