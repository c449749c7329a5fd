//! Can a local encoder receive what XDP redirects to it? And making it so.
//!
//! XDP_REDIRECT hands frames to the target device's XDP transmit. A veth takes them only when
//! its peer has GRO on or an XDP program of its own (and is up); otherwise the kernel drops
//! them, and nothing but a tracepoint says so. The kernel publishes its own verdict: the
//! host-side device's `xdp-features` (generic netlink family `netdev`) carry
//! `NETDEV_XDP_ACT_NDO_XMIT` exactly when it will take redirected frames. nsfail reads that
//! verdict in its own namespace, whatever made the encoder's; when a veth says no, it finds
//! the peer's namespace by the link's netnsid (a named one, or one held only by a process:
//! a container's), turns GRO on there, and asks again.
//!
//! Must not: change anything but the peer's GRO setting; bring interfaces up or down.

use std::{
    collections::HashSet,
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
    sync::OnceLock,
};

use futures_util::StreamExt;
use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
    Nla, NlasIterator, Parseable, ParseableParametrized,
};
use netlink_packet_generic::{
    GenlFamily, GenlHeader, GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkXdp},
    nsid::{NsidAttribute, NsidMessage},
};

use crate::{net::netns, paths};

/// `NETDEV_XDP_ACT_NDO_XMIT`: the device takes XDP-redirected frames.
const XDP_ACT_NDO_XMIT: u64 = 1 << 2;

/// What was found, and done, for one encoder's interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub can_receive: bool,
    /// Why not, or what it is when it can ("veth, peer GRO on").
    pub reason: String,
    /// What nsfail changed to make it so, if anything.
    pub repaired: Option<String>,
}

impl Verdict {
    fn no(reason: impl Into<String>) -> Self {
        Self {
            can_receive: false,
            reason: reason.into(),
            repaired: None,
        }
    }
}

/// A host-side interface as rtnetlink shows it.
#[derive(Clone, Debug)]
struct HostLink {
    ifindex: u32,
    kind: Option<String>,
    /// The peer's ifindex (veth), in the peer's namespace.
    peer: Option<u32>,
    /// The peer's namespace, as this namespace numbers it.
    link_netnsid: Option<i32>,
    up: bool,
    carrier: bool,
}

/// Checks that `ifname` (in this namespace) takes XDP-redirected frames and, for a veth whose
/// peer cannot, turns GRO on at the peer. `hint` is the encoder's configured namespace, tried
/// first when looking for the peer.
pub fn ensure(ifname: &str, hint: Option<&str>) -> Verdict {
    match check_and_repair(ifname, hint, true) {
        Ok(v) => v,
        Err(e) => Verdict::no(format!("{ifname}: {e}")),
    }
}

/// As [`ensure`], changing nothing (`nsfail doctor`): a veth whose peer cannot receive is
/// reported with the peer's name and namespace.
pub fn check(ifname: &str, hint: Option<&str>) -> Verdict {
    match check_and_repair(ifname, hint, false) {
        Ok(v) => v,
        Err(e) => Verdict::no(format!("{ifname}: {e}")),
    }
}

/// Whether `ifname` (in this namespace) runs XDP programs in its driver (native mode):
/// `NETDEV_XDP_ACT_BASIC` in its `xdp-features`.
pub fn native_xdp(ifname: &str) -> io::Result<bool> {
    const XDP_ACT_BASIC: u64 = 1 << 0;
    let link = host_link(ifname)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("interface {ifname} does not exist"),
        )
    })?;
    Ok(xdp_features(link.ifindex)? & XDP_ACT_BASIC != 0)
}

fn check_and_repair(ifname: &str, hint: Option<&str>, repair: bool) -> io::Result<Verdict> {
    let Some(link) = host_link(ifname)? else {
        return Ok(Verdict::no(format!("interface {ifname} does not exist")));
    };
    let veth = link.kind.as_deref() == Some("veth");
    let what = link
        .kind
        .as_deref()
        .unwrap_or("device without a link kind (a NIC)");
    if !link.up {
        return Ok(Verdict::no(format!("{ifname} is down")));
    }
    let mut repaired = None;
    if xdp_features(link.ifindex)? & XDP_ACT_NDO_XMIT == 0 {
        if !veth {
            return Ok(Verdict::no(format!(
                "{ifname} ({what}) takes no XDP-redirected frames: its driver has no XDP transmit"
            )));
        }
        let peer = Peer::find(&link, hint)?;
        if !repair {
            let index = peer.ifindex;
            let name = peer.run(move || netns::ifname_of(index))??;
            return Ok(Verdict::no(format!(
                "{ifname}'s peer {name} in {} takes no XDP-redirected frames (GRO off and no \
                 XDP program)",
                peer.desc
            )));
        }
        let name = peer.set_gro()?;
        repaired = Some(format!(
            "turned GRO on at {ifname}'s peer {name} in {}",
            peer.desc
        ));
        if xdp_features(link.ifindex)? & XDP_ACT_NDO_XMIT == 0 {
            return Ok(Verdict {
                can_receive: false,
                reason: format!(
                    "{ifname}'s peer {name} in {} has GRO on and still takes no redirected \
                     frames (more transmit queues than {ifname} has receive queues?)",
                    peer.desc
                ),
                repaired,
            });
        }
    }
    if !link.carrier {
        return Ok(Verdict {
            can_receive: false,
            reason: if veth {
                format!("{ifname}'s peer is down (no carrier)")
            } else {
                format!("{ifname} has no carrier")
            },
            repaired,
        });
    }
    Ok(Verdict {
        can_receive: true,
        reason: if veth {
            format!("veth {ifname}: its peer takes XDP frames")
        } else {
            format!("{ifname} ({what}): its driver takes XDP frames")
        },
        repaired,
    })
}

/// For encoders reached by frames XDP sends back out of `ifname` (`XDP_TX`: remote and routed
/// encoders), why those frames would not arrive, if they would not. A veth hands such a frame
/// to its peer's ring but schedules the peer only when the peer has a native XDP program of
/// its own; GRO is not enough, unlike for redirected frames: without one the frames wait
/// there, counted as sent (verified here). Any other device: `None`.
pub fn xdp_tx_problem(ifname: &str) -> io::Result<Option<String>> {
    let Some(link) = host_link(ifname)? else {
        return Ok(Some(format!("interface {ifname} does not exist")));
    };
    if link.kind.as_deref() != Some("veth") {
        return Ok(None);
    }
    let peer = Peer::find(&link, None)?;
    let index = peer.ifindex;
    let (name, native) = peer.run(move || -> io::Result<(String, bool)> {
        Ok((netns::ifname_of(index)?, native_program(index)?))
    })??;
    Ok((!native).then(|| {
        format!(
            "{ifname} is a veth whose peer {name} in {} has no native XDP program: a veth \
             delivers the frames XDP sends back out of it (XDP_TX) only to a peer with one, so \
             they would be lost; attach one there (XDP_PASS will do)",
            peer.desc
        )
    }))
}

/// Whether interface `ifindex` (in this namespace) has an XDP program in driver mode.
fn native_program(ifindex: u32) -> io::Result<bool> {
    netns::netlink(None, move |h| {
        Box::pin(async move {
            let mut links = h.link().get().match_index(ifindex).execute();
            let Some(msg) = links
                .next()
                .await
                .transpose()
                .map_err(|e| io::Error::other(e.to_string()))?
            else {
                return Ok(false);
            };
            Ok(msg.attributes.iter().any(|a| match a {
                LinkAttribute::Xdp(xdp) => {
                    xdp.iter()
                        .any(|x| matches!(x, LinkXdp::DrvProgId(id) if *id != 0))
                        || (xdp
                            .iter()
                            .any(|x| matches!(x, LinkXdp::ProgId(id) if *id != 0))
                            && !xdp.iter().any(|x| matches!(x, LinkXdp::SkbProgId(_))))
                }
                _ => false,
            }))
        })
    })
}

/// The name of `ifname`'s veth peer and the path of a handle of its namespace (for
/// messages that tell an operator what to fix).
pub fn peer_name(ifname: &str, hint: Option<&str>) -> io::Result<(String, String)> {
    let link = host_link(ifname)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("interface {ifname} does not exist"),
        )
    })?;
    let peer = Peer::find(&link, hint)?;
    let index = peer.ifindex;
    let name = peer.run(move || netns::ifname_of(index))??;
    Ok((name, peer.desc))
}

/// The MAC address of `ifname`'s veth peer, read inside the peer's namespace (how a local
/// encoder's MAC is found when its namespace has no name).
pub fn peer_mac(ifname: &str, hint: Option<&str>) -> io::Result<[u8; 6]> {
    let link = host_link(ifname)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("interface {ifname} does not exist"),
        )
    })?;
    let peer = Peer::find(&link, hint)?;
    let index = peer.ifindex;
    peer.run(move || {
        let name = netns::ifname_of(index)?;
        netns::link(&name).map(|l| l.mac)
    })?
}

/// The other end of a veth: its index and a handle of its namespace.
struct Peer {
    ifindex: u32,
    ns: File,
    /// The namespace, for messages: "namespace enc-a" or "the namespace of pid 1234".
    desc: String,
}

impl Peer {
    /// Finds the namespace whose netnsid (as this namespace numbers it) is the link's: the
    /// configured one first, then every named one, then every process's.
    fn find(link: &HostLink, hint: Option<&str>) -> io::Result<Self> {
        let not_veth = || io::Error::other("not a veth with a peer in another namespace");
        let ifindex = link.peer.ok_or_else(not_veth)?;
        let Some(nsid) = link.link_netnsid else {
            // The peer is in this very namespace.
            return Ok(Self {
                ifindex,
                ns: File::open(paths::proc_netns(std::process::id()))?,
                desc: "this namespace".into(),
            });
        };
        let hint = hint.map(str::to_owned);
        let found = netns::netlink(None, move |h| {
            Box::pin(async move {
                for (path, desc) in candidates(hint.as_deref()) {
                    let Ok(file) = File::open(&path) else {
                        continue;
                    };
                    if nsid_of(&h, &file).await == Some(nsid) {
                        return Ok(Some((file, desc)));
                    }
                }
                Ok(None)
            })
        })?;
        let (ns, desc) = found.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "found no namespace with netnsid {nsid} (the peer's) among /run/netns and \
                     the processes'"
                ),
            )
        })?;
        Ok(Self { ifindex, ns, desc })
    }

    /// Runs `f` on a thread inside the peer's namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        netns::in_netns_at(self.ns.try_clone()?, f)
    }

    /// Turns GRO on at the peer; returns the peer's name.
    fn set_gro(&self) -> io::Result<String> {
        let index = self.ifindex;
        self.run(move || -> io::Result<String> {
            let name = netns::ifname_of(index)?;
            netns::set_gro(&name, true)?;
            if !netns::gro(&name)? {
                return Err(io::Error::other(format!("GRO on {name} does not stay on")));
            }
            Ok(name)
        })?
    }
}

/// Namespace handles to try, each once (by device and inode): the hint, the named ones,
/// then each process's.
fn candidates(hint: Option<&str>) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    if let Some(h) = hint {
        out.push((paths::netns(h), format!("namespace {h}")));
    }
    if let Ok(dir) = fs::read_dir(paths::NETNS_DIR) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            out.push((e.path(), format!("namespace {name}")));
        }
    }
    if let Ok(dir) = fs::read_dir(paths::PROC) {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                out.push((
                    paths::proc_netns(pid),
                    format!("the namespace of pid {pid}"),
                ));
            }
        }
    }
    let mut seen = HashSet::new();
    out.retain(|(p, _)| {
        fs::metadata(p)
            .map(|m| seen.insert((m.dev(), m.ino())))
            .unwrap_or(false)
    });
    out
}

/// The id this namespace gives the namespace `file` is a handle of (RTM_GETNSID).
async fn nsid_of(h: &rtnetlink::Handle, file: &File) -> Option<i32> {
    let mut msg = NsidMessage::default();
    msg.attributes = vec![NsidAttribute::Fd(file.as_raw_fd() as u32)];
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut answers = h.clone().request(req).ok()?;
    while let Some(answer) = answers.next().await {
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) = answer.payload {
            return m.attributes.iter().find_map(|a| match a {
                NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                _ => None,
            });
        }
    }
    None
}

/// `ifname` in this namespace, or `None` when there is no such interface.
fn host_link(ifname: &str) -> io::Result<Option<HostLink>> {
    let name = ifname.to_owned();
    netns::netlink(None, move |h| {
        Box::pin(async move {
            let Some(msg) = netns::link_message(&h, &name).await? else {
                return Ok(None);
            };
            let mut link = HostLink {
                ifindex: msg.header.index,
                kind: None,
                peer: None,
                link_netnsid: None,
                up: msg.header.flags.contains(LinkFlags::Up),
                carrier: msg.header.flags.contains(LinkFlags::LowerUp),
            };
            for attr in msg.attributes {
                match attr {
                    LinkAttribute::LinkInfo(infos) => {
                        for info in infos {
                            if let LinkInfo::Kind(kind) = info {
                                link.kind = Some(kind_name(&kind));
                            }
                        }
                    }
                    LinkAttribute::Link(peer) => link.peer = Some(peer),
                    LinkAttribute::LinkNetNsId(id) => link.link_netnsid = Some(id),
                    _ => {}
                }
            }
            Ok(Some(link))
        })
    })
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Veth => "veth".into(),
        InfoKind::Other(s) => s.clone(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The generic netlink family `netdev`: one `dev-get` request and its answer.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NetdevDev {
    cmd: u8,
    attrs: Vec<DefaultNla>,
}

const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;

impl GenlFamily for NetdevDev {
    fn family_name() -> &'static str {
        "netdev"
    }

    fn command(&self) -> u8 {
        self.cmd
    }

    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for NetdevDev {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NetdevDev {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attrs = NlasIterator::new(buf)
            .map(|nla| nla.and_then(|nla| DefaultNla::parse(&nla)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            cmd: header.cmd,
            attrs,
        })
    }
}

/// One generic netlink request and its single answer, on a socket of its own.
fn genl_request<F>(payload: F, family_id: Option<u16>) -> io::Result<F>
where
    F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
{
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};
    let mut genl = GenlMessage::from_payload(payload);
    if let Some(id) = family_id {
        genl.set_resolved_family_id(id);
    }
    genl.finalize();
    let mut msg = NetlinkMessage::from(genl);
    msg.header.flags = NLM_F_REQUEST;
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    let mut socket = Socket::new(NETLINK_GENERIC)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&buf, 0)?;
    let mut answer = vec![0u8; 16384];
    let n = socket.recv(&mut &mut answer[..], 0)?;
    let parsed = NetlinkMessage::<GenlMessage<F>>::deserialize(&answer[..n])
        .map_err(|e| io::Error::other(format!("generic netlink answer: {e}")))?;
    match parsed.payload {
        NetlinkPayload::InnerMessage(m) => Ok(m.payload),
        NetlinkPayload::Error(e) => Err(e.to_io()),
        other => Err(io::Error::other(format!(
            "generic netlink answer: {other:?}"
        ))),
    }
}

/// The `netdev` family's id (assigned at boot; asked once).
fn netdev_family() -> io::Result<u16> {
    static ID: OnceLock<u16> = OnceLock::new();
    if let Some(id) = ID.get() {
        return Ok(*id);
    }
    let answer = genl_request(
        GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName("netdev".into())],
        },
        None,
    )?;
    let id = answer
        .nlas
        .iter()
        .find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })
        .ok_or_else(|| io::Error::other("no generic netlink family netdev (kernel < 6.3?)"))?;
    Ok(*ID.get_or_init(|| id))
}

/// The XDP features (`NETDEV_XDP_ACT_*`) of device `ifindex` in this namespace.
fn xdp_features(ifindex: u32) -> io::Result<u64> {
    let family = netdev_family()?;
    let answer = genl_request(
        NetdevDev {
            cmd: NETDEV_CMD_DEV_GET,
            attrs: vec![DefaultNla::new(
                NETDEV_A_DEV_IFINDEX,
                ifindex.to_ne_bytes().to_vec(),
            )],
        },
        Some(family),
    )?;
    answer
        .attrs
        .iter()
        .find(|a| a.kind() == NETDEV_A_DEV_XDP_FEATURES)
        .and_then(|a| {
            let mut v = vec![0u8; a.value_len()];
            a.emit_value(&mut v);
            v.try_into().ok().map(u64::from_ne_bytes)
        })
        .ok_or_else(|| io::Error::other(format!("device {ifindex}: no xdp-features in the answer")))
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::NlaBuffer;

    use super::*;

    #[test]
    fn the_netdev_request_carries_the_ifindex() {
        let msg = NetdevDev {
            cmd: NETDEV_CMD_DEV_GET,
            attrs: vec![DefaultNla::new(
                NETDEV_A_DEV_IFINDEX,
                7u32.to_ne_bytes().to_vec(),
            )],
        };
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        let back = NetdevDev::parse_with_param(
            &buf,
            GenlHeader {
                cmd: NETDEV_CMD_DEV_GET,
                version: 1,
            },
        )
        .unwrap();
        assert_eq!(back, msg);
        let nla = NlaBuffer::new(&buf[..]);
        assert_eq!(nla.kind(), NETDEV_A_DEV_IFINDEX);
        assert_eq!(nla.value(), 7u32.to_ne_bytes());
    }

    /// Loopback has no XDP transmit: the kernel's answer says so.
    #[test]
    fn loopback_takes_no_redirected_frames() {
        let features = xdp_features(1).unwrap();
        assert_eq!(features & XDP_ACT_NDO_XMIT, 0);
        let v = ensure("lo", None);
        assert!(!v.can_receive, "{v:?}");
        assert!(v.reason.contains("no XDP transmit"), "{v:?}");
    }

    #[test]
    fn a_missing_interface_cannot_receive() {
        let v = ensure("nsf-no-such-if", None);
        assert!(!v.can_receive);
        assert!(v.reason.contains("does not exist"), "{}", v.reason);
    }
}
