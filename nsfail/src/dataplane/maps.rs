//! Keys and values of the maps as userspace builds and reads them, and the map plumbing
//! shared by the rest of the module.

use super::*;

pub(super) fn target_for(
    info: &EncoderInfo,
    encoder_id: u32,
    channel_id: u32,
    port: u16,
) -> ChannelTarget {
    ChannelTarget {
        addr: info.addr,
        dmac: info.mac,
        smac: info.smac,
        port,
        action: match info.kind {
            ENCODER_LOCAL => ACTION_REDIRECT,
            ENCODER_ROUTED => ACTION_ROUTED,
            _ => ACTION_TX,
        },
        flags: 0,
        channel_id,
        encoder_id,
        csum_ip: 0,
        csum_udp: 0,
    }
}

/// The CHANNELS value of a channel (`current`) pointed at another encoder: its counters,
/// port and flags stay.
pub(super) fn retarget(
    info: &EncoderInfo,
    encoder_id: u32,
    current: &ChannelTarget,
) -> ChannelTarget {
    ChannelTarget {
        flags: current.flags,
        ..target_for(info, encoder_id, current.channel_id, current.port)
    }
}

/// The `SOURCE_NETS` key of one prefix of a channel's `sources`.
pub(super) fn source_net_key(channel_id: u32, net: &SourcePrefix) -> Key<SourceNet> {
    let (_, addr) = ip_bytes(net.addr);
    Key::new(
        SourceNet::prefix_len(net.len),
        SourceNet::new(channel_id, addr),
    )
}

pub(super) fn reply_key(info: &EncoderInfo, port: u16) -> Endpoint {
    Endpoint {
        addr: info.addr,
        port,
        family: info.family,
        _pad: 0,
    }
}

pub(super) fn validate_endpoint(listen: SocketAddr) -> Result<()> {
    let why = if listen.port() == 0 {
        Some("port 0")
    } else if listen.ip().is_unspecified() {
        Some("unspecified address")
    } else if listen.ip().is_multicast() {
        Some("multicast address")
    } else {
        None
    };
    match why {
        Some(why) => Err(DataplaneError::Invalid {
            what: format!("ingest address {listen}"),
            why: why.into(),
        }),
        None => Ok(()),
    }
}

/// The key of a socket address.
pub fn endpoint(addr: SocketAddr) -> Endpoint {
    match addr.ip() {
        IpAddr::V4(a) => Endpoint::v4(a.octets(), addr.port()),
        IpAddr::V6(a) => Endpoint::v6(a.octets(), addr.port()),
    }
}

/// The socket address of a key.
pub fn socket_addr(e: &Endpoint) -> SocketAddr {
    SocketAddr::new(ip_addr(e.family, &e.addr), e.port)
}

pub(super) fn ip_bytes(ip: IpAddr) -> (u8, [u8; 16]) {
    match ip {
        IpAddr::V4(a) => (FAMILY_V4, Endpoint::v4(a.octets(), 0).addr),
        IpAddr::V6(a) => (FAMILY_V6, a.octets()),
    }
}

pub(super) fn ip_addr(family: u8, addr: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V6 {
        IpAddr::V6(Ipv6Addr::from(*addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    }
}

pub(super) fn encode_name(name: &str) -> Result<[u8; 32]> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > 31 || bytes.contains(&0) {
        return Err(DataplaneError::Invalid {
            what: format!("encoder name {name:?}"),
            why: "must be 1 to 31 bytes, without NUL".into(),
        });
    }
    let mut out = [0u8; 32];
    out[..bytes.len()].copy_from_slice(bytes);
    Ok(out)
}

pub(super) fn decode_name(raw: &[u8; 32]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

pub(super) fn ifname_of(ifindex: u32) -> Option<String> {
    nix::net::if_::if_indextoname(ifindex)
        .ok()
        .map(|n| n.to_string_lossy().into_owned())
}

pub(super) fn zero_slot<T: aya::Pod + Default>(
    map: &mut PerCpuArray<MapData, T>,
    index: u32,
    name: &str,
) -> Result<()> {
    let cpus = nr_cpus().map_err(|(_, e)| DataplaneError::Invalid {
        what: "possible CPUs".into(),
        why: e.to_string(),
    })?;
    let zeros =
        PerCpuValues::try_from(vec![T::default(); cpus]).map_err(|e| DataplaneError::Invalid {
            what: "per-CPU values".into(),
            why: e.to_string(),
        })?;
    map.set(index, zeros, 0).map_err(map_err(name))
}

pub(super) fn sum_reasons(
    map: &PerCpuArray<MapData, u64>,
    names: &[&'static str],
    map_name: &str,
) -> Result<Vec<(&'static str, u64)>> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let v = map.get(&(i as u32), 0).map_err(map_err(map_name))?;
            Ok((*name, v.iter().sum()))
        })
        .collect()
}

/// Removes `key` from a HASH map; a key that is not there is not an error.
pub(super) fn remove_missing_ok<V: aya::Pod>(
    map: &mut HashMap<MapData, u32, V>,
    key: &u32,
    name: &str,
) -> Result<()> {
    match map.remove(key) {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map_err(map_err(name)),
    }
}

pub(super) fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| DataplaneError::Invalid {
        what: "eBPF object".into(),
        why: format!("no map {name}"),
    })?;
    T::try_from(map).map_err(map_err(name))
}

pub(super) fn open_pinned_map(pins: &Pins, name: &str) -> Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}
