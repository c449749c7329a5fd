//! The `Dataplane` API on a real lab: bad updates are refused with a clear error and leave
//! the maps as they were; teardown leaves nothing attached.

use std::{net::SocketAddr, time::Duration};

use nsfail::{
    Dataplane, DataplaneError, EncoderLink, EncoderSpec, XdpMode,
    lab::{INGEST_IF, INGEST4, Lab, SRC4},
};
use nsfail_tests::{
    Entered, PinDir, lab,
    traffic::{Receiver, send_burst},
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn spec(lab: &Lab, i: usize, name: &str) -> EncoderSpec {
    EncoderSpec {
        name: name.into(),
        addr: lab.encoders[i].addr4.parse().unwrap(),
        mac: lab.encoder_mac(i).unwrap(),
        link: EncoderLink::Local {
            ifname: lab.encoders[i].host_if.clone(),
        },
    }
}

fn setup(lab: &Lab, pins: &PinDir) -> Dataplane {
    let mut dp = pins.open();
    dp.attach_ingest(INGEST_IF, XdpMode::Native).unwrap();
    dp.upsert_encoder(&spec(lab, 0, "ea")).unwrap();
    dp.upsert_encoder(&spec(lab, 1, "eb")).unwrap();
    dp.set_channel(sa("10.77.0.1:5000"), 7000, "ea", &["ea", "eb"], false)
        .unwrap();
    dp
}

#[test]
fn bad_updates_are_refused_and_change_nothing() {
    let lab = lab(2);
    let _e = Entered::new(&lab.rt);
    let pins = PinDir::new();
    let mut dp = setup(&lab, &pins);
    let ch = sa("10.77.0.1:5000");
    let before = (dp.channels().unwrap(), dp.encoders().unwrap());

    let err = dp
        .set_channel(sa("10.77.0.1:5001"), 7001, "nope", &["nope"], false)
        .unwrap_err();
    assert!(
        matches!(err, DataplaneError::UnknownEncoder(ref n) if n == "nope"),
        "{err}"
    );
    assert_eq!(err.to_string(), "unknown encoder \"nope\"");
    let err = dp
        .set_channel(sa("10.77.0.1:5001"), 7001, "ea", &["ea", "nope"], false)
        .unwrap_err();
    assert!(matches!(err, DataplaneError::UnknownEncoder(_)), "{err}");
    let err = dp.activate(ch, "nope").unwrap_err();
    assert!(matches!(err, DataplaneError::UnknownEncoder(_)), "{err}");
    let err = dp.activate(sa("10.77.0.1:5999"), "eb").unwrap_err();
    assert!(matches!(err, DataplaneError::UnknownChannel(_)), "{err}");
    let err = dp
        .set_channel(sa("[fd77::1]:5000"), 7000, "ea", &["ea"], false)
        .unwrap_err();
    assert!(
        matches!(err, DataplaneError::FamilyMismatch { .. }),
        "{err}"
    );
    let err = dp.remove_encoder("eb").unwrap_err();
    assert!(
        matches!(err, DataplaneError::EncoderInUse { ref encoder, channel } if encoder == "eb" && channel == ch),
        "a backup's replies are still expected: {err}"
    );
    let err = dp
        .set_channel(sa("10.77.0.1:6000"), 7000, "eb", &["eb"], false)
        .unwrap_err();
    assert!(
        matches!(err, DataplaneError::PortConflict { port: 7000, .. }),
        "{err}"
    );
    let err = dp
        .set_channel(sa("10.77.0.1:0"), 7000, "ea", &["ea"], false)
        .unwrap_err();
    assert!(matches!(err, DataplaneError::Invalid { .. }), "{err}");
    let err = dp
        .set_channel(sa("10.77.0.1:6001"), 0, "ea", &["ea"], false)
        .unwrap_err();
    assert!(matches!(err, DataplaneError::Invalid { .. }), "{err}");
    let mut long = spec(&lab, 0, "x");
    long.name = "n".repeat(40);
    let err = dp.upsert_encoder(&long).unwrap_err();
    assert!(matches!(err, DataplaneError::Invalid { .. }), "{err}");
    let mut gone = spec(&lab, 0, "ec");
    gone.link = EncoderLink::Local {
        ifname: "nosuchif".into(),
    };
    let err = dp.upsert_encoder(&gone).unwrap_err();
    assert!(matches!(err, DataplaneError::Interface { .. }), "{err}");

    assert_eq!((dp.channels().unwrap(), dp.encoders().unwrap()), before);

    // The allowed order works: remove the channel, then its encoders.
    dp.remove_channel(ch).unwrap();
    dp.remove_encoder("eb").unwrap();
    dp.remove_encoder("ea").unwrap();
    assert!(dp.channels().unwrap().is_empty());
    assert!(dp.encoders().unwrap().is_empty());
    let err = dp.remove_channel(ch).unwrap_err();
    assert!(matches!(err, DataplaneError::UnknownChannel(_)), "{err}");
}

#[test]
fn teardown_detaches_and_unpins_everything() {
    let lab = lab(2);
    let e = Entered::new(&lab.rt);
    let pins = PinDir::new();
    let dp = setup(&lab, &pins);
    let ea = &lab.encoders[0];
    let rx = Receiver::start(&ea.ns, sa(&format!("{}:7000", ea.addr4)));
    let ch = sa(&format!("{INGEST4}:5000"));
    let src = sa(&format!("{SRC4}:40000"));
    let gap = Duration::from_millis(1);
    let linger = Duration::from_secs(2);
    send_burst(&lab.src, src, ch, 0..50, gap, linger);
    assert_eq!(rx.settled().len(), 50, "forwarding before teardown");

    Dataplane::teardown(&pins.pins).unwrap();
    assert!(!pins.pins.root().exists(), "pin directory removed");
    drop(dp);
    drop(e);
    let link = lab.rt.exec("ip", &["link", "show", INGEST_IF]).unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(!link.contains("xdp"), "XDP still attached: {link}");
    send_burst(&lab.src, src, ch, 50..100, gap, linger);
    assert_eq!(rx.settled().len(), 50, "nothing forwarded after teardown");
    // A second teardown of nothing is fine.
    Dataplane::teardown(&pins.pins).unwrap();
}
