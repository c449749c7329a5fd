//! Building test frames byte by byte, with checksums computed from scratch, so that expected
//! outputs are written independently of the incremental arithmetic under test.

use std::net::{IpAddr, SocketAddr};

use nsfail_common::csum;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;

/// A UDP (or other) packet description, turned into bytes by [`Frame::bytes`].
#[derive(Clone, Debug)]
pub struct Frame {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// VLAN ids, outermost first (0, 1 or 2 tags).
    pub vlans: Vec<u16>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub ttl: u8,
    /// IP protocol (17 UDP, 6 TCP, 1 ICMP).
    pub proto: u8,
    pub payload: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes).
    pub options: Vec<u8>,
    /// IPv4 flags+fragment offset word.
    pub frag: u16,
    /// Send a zero UDP checksum (IPv4 "no checksum").
    pub zero_csum: bool,
    /// IPv6 hop-by-hop extension header before UDP.
    pub hop_by_hop: bool,
}

impl Frame {
    pub fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Self {
        Self {
            dmac: [0x02, 0, 0, 0, 0, 0xaa],
            smac: [0x02, 0, 0, 0, 0, 0xbb],
            vlans: Vec::new(),
            src,
            dst,
            ttl: 64,
            proto: 17,
            payload: payload.to_vec(),
            options: Vec::new(),
            frag: 0,
            zero_csum: false,
            hop_by_hop: false,
        }
    }

    fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        match self.proto {
            17 => {
                l4.extend_from_slice(&self.src.port().to_be_bytes());
                l4.extend_from_slice(&self.dst.port().to_be_bytes());
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
                l4.extend_from_slice(&self.payload);
                if !self.zero_csum {
                    let c =
                        csum::udp_checksum(&ip_bytes(self.src.ip()), &ip_bytes(self.dst.ip()), &l4);
                    l4[6..8].copy_from_slice(&c.to_be_bytes());
                }
            }
            6 => {
                // A minimal TCP SYN; its checksum does not matter to the programs.
                l4.extend_from_slice(&self.src.port().to_be_bytes());
                l4.extend_from_slice(&self.dst.port().to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
                l4.extend_from_slice(&self.payload);
            }
            _ => {
                // ICMP echo request.
                l4.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
                l4.extend_from_slice(&self.payload);
                let c = csum::checksum(&l4);
                l4[2..4].copy_from_slice(&c.to_be_bytes());
            }
        }
        l4
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&self.dmac);
        f.extend_from_slice(&self.smac);
        for v in &self.vlans {
            f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            f.extend_from_slice(&v.to_be_bytes());
        }
        let l4 = self.l4();
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
                let ihl = 20 + self.options.len();
                let mut ip = vec![0x40 | (ihl / 4) as u8, 0];
                ip.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
                ip.extend_from_slice(&[0x12, 0x34]);
                ip.extend_from_slice(&self.frag.to_be_bytes());
                ip.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                ip.extend_from_slice(&self.options);
                let c = csum::checksum(&ip);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let ext = if self.hop_by_hop { 8 } else { 0 };
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&((ext + l4.len()) as u16).to_be_bytes());
                f.push(if self.hop_by_hop { 0 } else { self.proto });
                f.push(self.ttl);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                if self.hop_by_hop {
                    // Next header, length 0, PadN option filling the 8 bytes.
                    f.extend_from_slice(&[self.proto, 0, 1, 4, 0, 0, 0, 0]);
                }
            }
            _ => panic!("mixed address families"),
        }
        f.extend_from_slice(&l4);
        f
    }
}

pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// An ARP request frame.
pub fn arp(smac: [u8; 6], sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&smac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&smac);
    f.extend_from_slice(&sender);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

/// Checks the IPv4 header checksum and the UDP checksum of an untagged IPv4 or IPv6 UDP frame
/// from scratch. Returns a description of the first problem found.
pub fn verify_udp(frame: &[u8]) -> Result<(), String> {
    let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
    let (src, dst, udp) = match ether_type {
        ETH_P_IPV4 => {
            let ihl = ((frame[14] & 0x0f) as usize) * 4;
            let ip = &frame[14..14 + ihl];
            if csum::checksum(ip) != 0 {
                return Err(format!("IPv4 header checksum wrong: {ip:02x?}"));
            }
            let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            (
                ip[12..16].to_vec(),
                ip[16..20].to_vec(),
                &frame[14 + ihl..14 + tot],
            )
        }
        ETH_P_IPV6 => {
            let plen = u16::from_be_bytes([frame[18], frame[19]]) as usize;
            (
                frame[22..38].to_vec(),
                frame[38..54].to_vec(),
                &frame[54..54 + plen],
            )
        }
        t => return Err(format!("not IP: ethertype {t:#06x}")),
    };
    let check = u16::from_be_bytes([udp[6], udp[7]]);
    if check == 0 && ether_type == ETH_P_IPV4 {
        return Ok(());
    }
    let mut zeroed = udp.to_vec();
    zeroed[6..8].copy_from_slice(&[0, 0]);
    let want = csum::udp_checksum(&src, &dst, &zeroed);
    if want != check {
        return Err(format!("UDP checksum {check:#06x}, computed {want:#06x}"));
    }
    Ok(())
}

/// Sends `frames` as they are (Ethernet header included) out of interface `ifname` of
/// namespace `ns` through an AF_PACKET socket: crafted traffic, spoofed sources included,
/// onto a veth. Returns how many the kernel took; bounded by `frames`.
pub fn inject(
    ns: &nsfail::lab::Netns,
    ifname: &str,
    frames: impl Iterator<Item = Vec<u8>>,
) -> std::io::Result<usize> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let ifname = ifname.to_owned();
    let (fd, ifindex) = nsfail::net::netns::in_netns(&ns.name, move || {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let ifindex = nsfail::net::netns::link(&ifname)?.ifindex;
        Ok((fd, ifindex))
    })??;
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    let mut sent = 0;
    for frame in frames {
        // Retried while the veth's queue is full (ENOBUFS): at most about 100 ms a frame.
        for _ in 0..10_000 {
            // SAFETY: frame and addr outlive the call; lengths are theirs.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                sent += 1;
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOBUFS) {
                return Err(e);
            }
            std::thread::sleep(std::time::Duration::from_micros(10));
        }
    }
    Ok(sent)
}
