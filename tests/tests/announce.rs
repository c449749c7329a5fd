//! The anycast announcements of a cluster host (issue 17): host routes for the ingest
//! addresses in the announce table, owned by nsfail (`proto 247`), beside routes others made.

use std::{collections::BTreeSet, net::IpAddr, process::Command};

use nsfail::net::{announce, netns};
use nsfail_tests::{Entered, Netns, ip_in};

const TABLE: u32 = 2345;

fn table(ns: &Netns, family: &str) -> String {
    let out = Command::new("ip")
        .args([
            family,
            "-n",
            &ns.name,
            "route",
            "show",
            "table",
            &TABLE.to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn set(addrs: &[&str]) -> BTreeSet<IpAddr> {
    addrs.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn the_announce_table_holds_exactly_the_ingest_addresses_and_nothing_of_others_is_touched() {
    let ns = Netns::new("ann");
    ip_in(
        &ns.name,
        &["link", "add", "ing", "type", "veth", "peer", "name", "ingp"],
    );
    ip_in(&ns.name, &["link", "set", "ing", "up"]);
    ip_in(&ns.name, &["link", "set", "ingp", "up"]);
    // Someone else's route in the same table, and the host's own main table.
    ip_in(
        &ns.name,
        &[
            "route",
            "add",
            "198.51.100.1/32",
            "dev",
            "ing",
            "table",
            &TABLE.to_string(),
        ],
    );
    let main_before = Command::new("ip")
        .args(["-n", &ns.name, "route"])
        .output()
        .unwrap();
    let _in = Entered::new(&ns);
    let ing = netns::link("ing").unwrap().ifindex;

    let want = set(&["203.0.113.10", "203.0.113.11", "2001:db8::10"]);
    let done = announce::sync(TABLE, ing, &want).unwrap();
    assert_eq!(done.added.len(), 3, "{done:?}");
    assert!(done.removed.is_empty());
    assert_eq!(announce::announced(TABLE).unwrap(), want);
    let v4 = table(&ns, "-4");
    assert!(
        v4.contains("203.0.113.10 dev ing proto 247 scope link"),
        "{v4}"
    );
    assert!(v4.contains("203.0.113.11 dev ing proto 247"), "{v4}");
    assert!(
        v4.contains("198.51.100.1 dev ing"),
        "the other route stays: {v4}"
    );
    assert!(table(&ns, "-6").contains("2001:db8::10 dev ing proto 247"));

    // Again: nothing to do.
    assert_eq!(
        announce::sync(TABLE, ing, &want).unwrap(),
        Default::default()
    );

    // A channel gone: its address is withdrawn, the rest stays.
    let fewer = set(&["203.0.113.10"]);
    let done = announce::sync(TABLE, ing, &fewer).unwrap();
    assert!(done.added.is_empty());
    assert_eq!(
        done.removed.iter().copied().collect::<BTreeSet<_>>(),
        set(&["203.0.113.11", "2001:db8::10"])
    );
    assert_eq!(announce::announced(TABLE).unwrap(), fewer);

    // Drained: everything of nsfail's goes, the other route stays; the main table never
    // changed.
    assert_eq!(
        announce::withdraw(TABLE).unwrap(),
        vec!["203.0.113.10".parse::<IpAddr>().unwrap()]
    );
    assert!(announce::announced(TABLE).unwrap().is_empty());
    let v4 = table(&ns, "-4");
    assert!(!v4.contains("proto 247"), "{v4}");
    assert!(v4.contains("198.51.100.1 dev ing"), "{v4}");
    let main_after = Command::new("ip")
        .args(["-n", &ns.name, "route"])
        .output()
        .unwrap();
    assert_eq!(main_before.stdout, main_after.stdout);

    // The tables the host routes by are refused, with nothing written.
    for t in [254, 255, 253, 0] {
        let err = announce::sync(t, ing, &want).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{t}: {err}");
    }
}
