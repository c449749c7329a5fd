//! A chain of channels for `BPF_PROG_TEST_RUN` with a large repeat count.
//!
//! The kernel runs the program `repeat` times over the same buffer and does not restore it
//! between runs, so a frame that nsfail rewrites would be a different packet on the second run.
//! In a chain every channel forwards to an encoder whose address and port are the next
//! channel's ingest endpoint: channel `i` listens on `listen(i)` and is forwarded to
//! `listen((i + 1) % n)`. One frame sent with TTL 255 and `repeat <= MAX_WALK` is a real,
//! complete hit on every run (full rewrite, checksums, counters, redirect), and walks through
//! `repeat` different channels spread over the map. With `n = 1` the channel forwards to its
//! own endpoint.
//!
//! Only the first `active` channels form the chain; the others (idle: configured, never sent
//! to) forward to their own endpoints. Data planes of different sizes built with the same
//! `active` therefore carry the same traffic to the same keys, and differ only in map size.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, MapData};
use nsfail::{Dataplane, EncoderLink, EncoderSpec, dataplane::endpoint, paths::Pins};
use nsfail_common::{ChannelKey4, ChannelTarget, Endpoint, ReplyTarget};
use nsfail_tests::frames::Frame;

/// Encoders (addresses) the chain's ingest endpoints are spread over.
pub const ENCODERS: usize = 16;
const PORT_BASE: u16 = 10_000;
/// Added to an idle channel's own port for its target (listen ports stay below 17,000).
const IDLE_PORT_OFFSET: u16 = 20_000;
/// Runs one frame can stay a hit for: each run decrements the TTL, which must stay above 1.
pub const MAX_WALK: u32 = 250;
/// The source of every chain frame.
pub const SOURCE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 91, 0, 1), 40_000);

fn encoder_addr(e: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 90, 0, e as u8 + 1)
}

fn encoder_name(e: usize) -> String {
    format!("chain{e}")
}

/// The ingest endpoint of channel `i`.
pub fn listen(i: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        encoder_addr(i % ENCODERS),
        PORT_BASE + (i / ENCODERS) as u16,
    ))
}

/// A frame to channel `i` with `payload` bytes of UDP payload, TTL 255, valid checksums.
pub fn frame(i: usize, payload: usize) -> Vec<u8> {
    let mut f = Frame::udp(SocketAddr::V4(SOURCE), listen(i), &vec![0x5a; payload]);
    f.ttl = 255;
    f.bytes()
}

/// A frame to an endpoint of the chain's addresses that is no channel (a miss).
pub fn miss_frame(payload: usize) -> Vec<u8> {
    let dst = SocketAddr::V4(SocketAddrV4::new(encoder_addr(0), 9));
    Frame::udp(SocketAddr::V4(SOURCE), dst, &vec![0x5a; payload]).bytes()
}

/// Registers the chain's encoders (all behind the host-side veth `enc_if`, whose peer has
/// MAC `enc_mac`) and `n` channels, the first `active` of them chained. Channel 0 goes through `Dataplane::set_channel`;
/// the others are written straight into CHANNELS_V4 and REPLIES with the values `set_channel`
/// writes but for the target address, which is the next channel's ingest address (the chain),
/// not an encoder's; the data plane then re-reads them (`Dataplane::reload_channels`).
pub fn build(
    dp: &mut Dataplane,
    pins: &Pins,
    enc_if: &str,
    enc_mac: [u8; 6],
    n: usize,
    active: usize,
) -> Result<()> {
    if n == 0 || n > nsfail_common::MAX_CHANNELS as usize - 8 || active == 0 || active > n {
        bail!("chain of {active} of {n} channels");
    }
    for e in 0..ENCODERS {
        dp.upsert_encoder(&EncoderSpec {
            name: encoder_name(e),
            addr: encoder_addr(e).into(),
            mac: enc_mac,
            link: EncoderLink::Local {
                ifname: enc_if.to_owned(),
            },
        })
        .with_context(|| format!("encoder {}", encoder_name(e)))?;
    }
    let ids: BTreeMap<String, u32> = dp.encoders()?.into_iter().map(|e| (e.name, e.id)).collect();
    let next = |i: usize| if i < active { (i + 1) % active } else { i };
    let first_next = next(0);
    let first_enc = encoder_name(first_next % ENCODERS);
    dp.set_channel(
        listen(0),
        listen(first_next).port(),
        &first_enc,
        &[first_enc.as_str()],
        false,
    )
    .context("channel 0")?;

    let mut channels: HashMap<MapData, ChannelKey4, ChannelTarget> = pinned(pins, "CHANNELS_V4")?;
    let mut replies: HashMap<MapData, Endpoint, ReplyTarget> = pinned(pins, "REPLIES")?;
    let t0 = channels.get(&key4(listen(0)), 0)?;
    let r0 = replies.get(&endpoint(listen(first_next)), 0)?;
    if t0.channel_id != 0 {
        bail!(
            "channel 0 got id {}, expected a fresh data plane",
            t0.channel_id
        );
    }
    for i in 1..n {
        // An idle channel points past the listen ports (never at itself: an entry that
        // forwards to its own key is a transit entry to the data plane).
        let to = if i < active {
            listen(next(i))
        } else {
            let own = listen(i);
            SocketAddr::new(own.ip(), own.port() + IDLE_PORT_OFFSET)
        };
        let key = endpoint(to);
        let encoder_id = ids[&encoder_name(next(i) % ENCODERS)];
        let target = ChannelTarget {
            addr: key.addr,
            port: to.port(),
            channel_id: i as u32,
            encoder_id,
            ..t0
        };
        channels.insert(key4(listen(i)), target.sealed(&endpoint(listen(i))), 0)?;
        let reply = ReplyTarget {
            ingest: endpoint(listen(i)),
            channel_id: i as u32,
            encoder_id,
            ifindex: r0.ifindex,
            flags: 0,
        };
        replies.insert(key, reply, 0)?;
    }
    dp.reload_channels()?;
    let count = dp.channels()?.len();
    if count != n {
        bail!("the data plane has {count} channels, the chain {n}");
    }
    Ok(())
}

/// The CHANNELS_V4 key of an (IPv4) ingest address.
pub fn key4(listen: SocketAddr) -> ChannelKey4 {
    ChannelKey4::of(&endpoint(listen)).expect("the chain is IPv4")
}

pub fn pinned<V>(pins: &Pins, name: &str) -> Result<V>
where
    V: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let data = MapData::from_pin(pins.map(name)).with_context(|| format!("pinned map {name}"))?;
    let map = aya::maps::Map::from_map_data(data)?;
    Ok(V::try_from(map)?)
}
