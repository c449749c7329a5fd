//! Cross-host forwarding (issue 17): a channel whose active encoder lives on another host.
//!
//! Two ingest hosts (`ha`, `hb`), each its own namespace and its own data plane with its own
//! pin directory, behind a router namespace (`rt`, the only one that forwards IP); a caller
//! (`cl`) sends to the ingest address, which the router sends to host A. Host A's channel
//! lists `eb`, an encoder on host B reached through A's routing table
//! ([`EncoderLink::Routed`]), and `ea`, its own. B serves the same channel with `eb` as a
//! local encoder and takes in what A routes to it by a transit entry. Neither host enables
//! IP forwarding.
//!
//! ```text
//!  cl 10.71.1.2 --- rt --- 10.71.2.2 ha [XDP on ua] --- va/ea 10.71.5.2
//!                   |
//!                   +----- 10.71.3.2 hb [XDP on ub] --- vb/eb 10.71.4.2
//! ```

use std::{net::SocketAddr, time::Duration};

use nsfail::XdpMode;
use nsfail_tests::{
    Entered, PinDir,
    hosts::{CALLER, EA, EB, INGEST, local, routed, router_xdp, world},
    ip_in,
    traffic::{Receiver, send_burst},
};

const ENC_PORT: u16 = 7000;
const GAP: Duration = Duration::from_millis(1);
const LINGER: Duration = Duration::from_secs(2);

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn count(stats: &[(&str, u64)], name: &str) -> u64 {
    stats
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(0, |(_, c)| *c)
}

#[test]
fn a_channel_reaches_its_encoder_on_another_host_and_its_replies_come_back() {
    let w = world(true);
    let channel = sa(INGEST, 5000);
    let caller = sa(CALLER, 40000);
    let (pins_a, pins_b) = (PinDir::new(), PinDir::new());

    // A's next hop towards B is the router, whose neighbour entry A's BGP session keeps
    // fresh (A cannot probe eb itself: B does not forward IP); registering eb resolves it.
    let mut a = {
        let _in = Entered::new(&w.ha);
        let mut dp = pins_a.open();
        dp.attach_ingest("ua", XdpMode::Native).unwrap();
        dp.upsert_encoder(&routed("eb", EB)).unwrap();
        dp.upsert_encoder(&local("ea", EA, &w.ea, "a0", "va"))
            .unwrap();
        dp.set_channel(channel, ENC_PORT, "eb", &["eb", "ea"], false)
            .unwrap();
        dp
    };
    let mut b = {
        let _in = Entered::new(&w.hb);
        let mut dp = pins_b.open();
        dp.attach_ingest("ub", XdpMode::Native).unwrap();
        dp.upsert_encoder(&local("eb", EB, &w.eb, "b0", "vb"))
            .unwrap();
        dp.set_channel(channel, ENC_PORT, "eb", &["eb"], false)
            .unwrap();
        dp
    };
    let rx_a = Receiver::start(&w.ea, sa(EA, ENC_PORT));
    let rx_b = Receiver::start(&w.eb, sa(EB, ENC_PORT));

    // 1. Without a transit entry on B, what A routes there is not B's to take: B's XDP
    //    passes it, B does not forward IP, nothing arrives.
    let r = send_burst(
        &w.cl,
        caller,
        channel,
        0..20,
        GAP,
        Duration::from_millis(300),
    );
    assert!(
        rx_b.settled().is_empty(),
        "nothing reached eb without transit"
    );
    assert!(r.seqs().is_empty());
    let sa_ = a.xdp_stats().unwrap();
    assert_eq!(count(&sa_, "routed"), 20, "A routed all: {sa_:?}");
    assert_eq!(
        count(&b.xdp_stats().unwrap(), "pass_no_channel"),
        20,
        "B passed them"
    );

    // 2. With it, the stream crosses: A rewrites towards eb and sends it to its next hop, B
    //    redirects it into eb's veth and learns the caller, eb's answers leave B from the
    //    ingest address.
    {
        let _in = Entered::new(&w.hb);
        b.set_transit(channel, "eb").unwrap();
        assert_eq!(
            b.transits(),
            vec![(sa(EB, ENC_PORT), channel, b.encoders().unwrap()[0].id)]
        );
    }
    let r = send_burst(&w.cl, caller, channel, 100..300, GAP, LINGER);
    assert_eq!(rx_b.settled(), (100..300).collect(), "eb got the stream");
    assert_eq!(r.seqs(), (100..300).collect(), "every packet answered");
    assert!(
        r.from_only(channel),
        "answers come from the ingest address: {:?}",
        &r.acks[..3]
    );
    assert!(rx_a.settled().is_empty(), "ea got nothing");
    assert_eq!(count(&a.xdp_stats().unwrap(), "routed"), 220);
    assert_eq!(a.encoder_stats("eb").unwrap().rx.packets, 220);
    assert_eq!(count(&b.xdp_stats().unwrap(), "redirected"), 200);
    assert_eq!(b.encoder_stats("eb").unwrap().rx.packets, 200);
    assert_eq!(b.channel_stats(channel).unwrap().packets, 200);
    assert!(
        b.sources()
            .unwrap()
            .iter()
            .any(|s| s.channel == channel && s.peer == caller),
        "B learned the caller as the channel's source"
    );
    assert_eq!(rx_b.corrupt(), 0, "checksums right after two rewrites");

    // 3. A failover between hosts is one map write on the ingest host, both ways.
    a.activate(channel, "ea").unwrap();
    let r = send_burst(&w.cl, caller, channel, 300..400, GAP, LINGER);
    assert_eq!(rx_a.settled(), (300..400).collect(), "ea got the rest");
    assert_eq!(r.seqs(), (300..400).collect());
    a.activate(channel, "eb").unwrap();
    let r = send_burst(&w.cl, caller, channel, 400..500, GAP, LINGER);
    assert_eq!(
        rx_b.settled(),
        (100..300).chain(400..500).collect(),
        "back at eb"
    );
    assert_eq!(r.seqs(), (400..500).collect());
    assert!(r.from_only(channel));

    // 4. The next hop is resolved again on request: with no route to B, the encoder keeps
    //    its last next hop (forwarding goes on) and the failure is returned, naming it.
    ip_in(&w.ha.name, &["route", "del", "default"]);
    let failed = {
        let _in = Entered::new(&w.ha);
        a.refresh_routes()
    };
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "eb");
    assert!(
        failed[0].1.to_string().contains("no route to 10.71.4.2"),
        "{}",
        failed[0].1
    );
    // A gateway that does not answer (no neighbour entry): the kernel is asked and the
    //    refresh says so without waiting for it; the last next hop stays.
    ip_in(
        &w.ha.name,
        &["route", "add", "default", "via", "10.71.2.99"],
    );
    let failed = {
        let _in = Entered::new(&w.ha);
        a.refresh_routes()
    };
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0]
            .1
            .to_string()
            .contains("no neighbour entry for 10.71.2.99 (the next hop towards 10.71.4.2) yet"),
        "{}",
        failed[0].1
    );
    let r = send_burst(&w.cl, caller, channel, 600..650, GAP, LINGER);
    assert_eq!(
        r.seqs(),
        (600..650).collect(),
        "still through B's last next hop"
    );
    ip_in(
        &w.ha.name,
        &["route", "replace", "default", "via", "10.71.2.1"],
    );
    let failed = {
        let _in = Entered::new(&w.ha);
        a.refresh_routes()
    };
    assert!(failed.is_empty(), "{failed:?}");
    let r = send_burst(&w.cl, caller, channel, 500..600, GAP, LINGER);
    assert_eq!(r.seqs(), (500..600).collect(), "still through B");

    // 5. The channel goes from B: its transit entry goes with it.
    {
        let _in = Entered::new(&w.hb);
        b.remove_channel(channel).unwrap();
        assert!(b.transits().is_empty());
    }
    drop(w);
}

#[test]
fn a_transit_entry_needs_a_local_encoder_of_the_channel() {
    let w = world(true);
    let pins = PinDir::new();
    let channel = sa(INGEST, 5000);
    let _in = Entered::new(&w.hb);
    let mut dp = pins.open();
    dp.attach_ingest("ub", XdpMode::Native).unwrap();
    dp.upsert_encoder(&local("eb", EB, &w.eb, "b0", "vb"))
        .unwrap();
    let far = routed("far", "10.71.9.2");
    // B's uplink is a veth whose peer (the router's side) has no XDP program: frames sent
    // back out of it would never arrive, so a routed encoder is refused, saying why.
    let err = dp.upsert_encoder(&far).unwrap_err().to_string();
    assert!(
        err.contains("ub is a veth whose peer rb") && err.contains("no native XDP program"),
        "{err}"
    );
    assert!(dp.encoders().unwrap().iter().all(|e| e.name != "far"));
    let _rb_xdp = router_xdp(&w.rt, "rb");
    dp.upsert_encoder(&far).unwrap();
    dp.upsert_encoder(&local("other", "10.71.4.3", &w.eb, "b0", "vb"))
        .unwrap();
    assert!(dp.set_transit(channel, "eb").is_err(), "no such channel");
    // A channel forwarding to its own address and port is refused: a loop, and it would read
    // back as a transit entry.
    dp.upsert_encoder(&local("itself", INGEST, &w.eb, "b0", "vb"))
        .unwrap();
    let err = dp
        .set_channel(channel, 5000, "itself", &["itself"], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("own address and port"), "{err}");
    dp.remove_encoder("itself").unwrap();
    dp.set_channel(channel, ENC_PORT, "eb", &["eb", "far"], false)
        .unwrap();
    let err = dp.set_transit(channel, "far").unwrap_err().to_string();
    assert!(err.contains("not local"), "{err}");
    let err = dp.set_transit(channel, "other").unwrap_err().to_string();
    assert!(err.contains("not one of the channel's"), "{err}");
    dp.set_transit(channel, "eb").unwrap();
    dp.set_transit(channel, "eb").unwrap();
    assert_eq!(dp.transits().len(), 1, "idempotent");
    // The channel drops eb from its encoders: the transit entry goes.
    dp.set_channel(channel, ENC_PORT, "far", &["far"], false)
        .unwrap();
    assert!(dp.transits().is_empty());
    // A transit entry survives a restart of the controller (adoption) and is still told
    // from a channel.
    dp.set_channel(channel, ENC_PORT, "eb", &["eb", "far"], false)
        .unwrap();
    dp.set_transit(channel, "eb").unwrap();
    drop(dp);
    let dp = pins.open();
    assert!(dp.adopted());
    assert_eq!(dp.transits().len(), 1);
    assert_eq!(dp.channels().unwrap().len(), 1, "{:?}", dp.channels());
}

/// A host that does not hold the ingest address still tells SRT callers to reconnect from
/// it, for both families: the SHUTDOWN leaves host A (which has neither 10.99.0.7 nor
/// fd99::7) and reaches the caller's namespace from the ingest address and port, with the
/// caller's socket ID. (In the cluster, the leader sends the SHUTDOWNs of callers that
/// another host learned; its ingest address may be on no interface of its own.)
#[test]
fn srt_shutdowns_leave_from_an_ingest_address_this_host_does_not_hold() {
    use std::net::UdpSocket;

    let (a, b) = (
        nsfail_tests::Netns::new("sha"),
        nsfail_tests::Netns::new("shb"),
    );
    let (va, vb) = (nsfail_tests::unique("sva"), nsfail_tests::unique("svb"));
    nsfail_tests::run(
        "ip",
        &[
            "link", "add", &va, "netns", &a.0.name, "type", "veth", "peer", "name", &vb, "netns",
            &b.0.name,
        ],
    );
    for (ns, dev, v4, v6) in [
        (&a, &va, "10.98.0.1/24", "fd98::1/64"),
        (&b, &vb, "10.98.0.2/24", "fd98::2/64"),
    ] {
        // No duplicate address detection: the addresses are usable at once.
        nsfail_tests::run(
            "ip",
            &[
                "netns",
                "exec",
                &ns.0.name,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{dev}.accept_dad=0"),
            ],
        );
        ip_in(&ns.0.name, &["addr", "add", v4, "dev", dev]);
        ip_in(&ns.0.name, &["addr", "add", v6, "dev", dev, "nodad"]);
        ip_in(&ns.0.name, &["link", "set", dev, "up"]);
    }
    // The caller's side routes answers to the ingest addresses back through A.
    ip_in(
        &b.0.name,
        &["route", "add", "10.99.0.0/24", "via", "10.98.0.1"],
    );
    ip_in(
        &b.0.name,
        &["-6", "route", "add", "fd99::/64", "via", "fd98::1"],
    );
    let callers = {
        let _in = Entered::new(&b.0);
        [
            UdpSocket::bind("10.98.0.2:9999").unwrap(),
            UdpSocket::bind("[fd98::2]:9999").unwrap(),
        ]
    };
    for (ingest, caller, id) in [
        (sa("10.99.0.7", 5000), sa("10.98.0.2", 9999), 0x1234_5678),
        (sa("fd99::7", 5002), sa("fd98::2", 9999), 0x0bad_cafe),
    ] {
        {
            let _in = Entered::new(&a.0);
            nsfail::control::send_srt_shutdowns(ingest, &[(caller, id)])
                .unwrap_or_else(|e| panic!("from {ingest}: {e}"));
        }
        let socket = &callers[usize::from(ingest.is_ipv6())];
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = socket
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no SHUTDOWN from {ingest}: {e}"));
        assert_eq!(
            from, ingest,
            "the SHUTDOWN carries the ingest address and port"
        );
        assert_eq!(&buf[..n], nsfail_common::srt::shutdown(id).as_slice());
    }
}
