//! Config parsing: the example file, defaults, the TOML round trip, and one snippet per mistake
//! with the exact line (and where it matters, column) the error must name.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use nsfail::config::{
    AllowProto, AllowRule, Channel, Config, ConfigError, Encoder, Failback, Health, HealthKind,
    Location, Protocol, XdpMode,
};

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/nsfail.toml")
}

fn example() -> Config {
    Config::load(&example_path()).expect("the example config is valid")
}

/// The error `text` gets, as displayed.
fn error(text: &str) -> String {
    match Config::parse(text, "t.toml") {
        Ok(config) => panic!("accepted a bad config: {config:#?}\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts that `text` is refused at `at` ("t.toml:LINE:" or "t.toml:LINE:COL:") with a
/// message containing `needle`, on one line.
#[track_caller]
fn assert_refused(text: &str, at: &str, needle: &str) {
    let message = error(text);
    assert!(
        message.starts_with(at),
        "expected an error at {at}, got: {message}"
    );
    assert!(
        message.contains(needle),
        "expected {needle:?} in: {message}"
    );
    assert!(!message.contains('\n'), "not one line: {message:?}");
}

/// `[ingest]` plus two IPv4 encoders (lines 1-12); snippets append channels from line 13.
const BASE: &str = r#"[ingest]
interface = "eth0"

[[encoder]]
name = "enc-a"
address = "10.200.1.2"
health = { kind = "flow" }

[[encoder]]
name = "enc-b"
address = "10.200.2.2"
health = { kind = "flow" }
"#;

fn base_with(rest: &str) -> String {
    format!("{BASE}{rest}")
}

/// [`BASE`] plus a channel: `[[channel]]` at line 14, `body` from line 15.
fn with_channel(body: &str) -> String {
    base_with(&format!("\n[[channel]]\n{body}"))
}

/// [`BASE`] plus encoder "enc-c": `[[encoder]]` at line 14, its name at 15, `body` from 16.
fn with_encoder(body: &str) -> String {
    base_with(&format!("\n[[encoder]]\nname = \"enc-c\"\n{body}"))
}

#[test]
fn example_matches_the_contract() {
    let config = example();
    assert_eq!(config.ingest.interface, "eth0");
    assert_eq!(config.ingest.xdp_mode, XdpMode::Native);
    assert_eq!(
        config.ingest.metrics,
        "127.0.0.1:9464".parse::<SocketAddr>().unwrap()
    );

    assert_eq!(config.encoders.len(), 2);
    for (name, address) in [("enc-a", "10.200.1.2"), ("enc-b", "10.200.2.2")] {
        let encoder = config.encoder(name).expect(name);
        assert_eq!(encoder.address, address.parse::<IpAddr>().unwrap());
        assert_eq!(encoder.interface.as_deref(), Some(&*format!("nsf-{name}")));
        assert_eq!(encoder.netns.as_deref(), Some(name));
        assert!(encoder.is_local());
        assert_eq!(encoder.mac, None);
        assert_eq!(encoder.allow, ["10.200.9.1:443/tcp"]);
        assert_eq!(
            encoder.health,
            Health {
                kind: HealthKind::Udp,
                port: Some(9000),
                url: None,
                command: None,
                interval_ms: 100,
                timeout_ms: 100,
                rise: 3,
                fall: 3,
            }
        );
    }

    assert_eq!(config.channels.len(), 1);
    let cam1 = config.channel("cam1").expect("cam1");
    assert_eq!(
        cam1.listen,
        "10.200.0.1:5000".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(cam1.encoders, ["enc-a", "enc-b"]);
    assert_eq!(cam1.port, Some(5000));
    assert_eq!(cam1.encoder_port(), 5000);
    assert_eq!(cam1.failback, Failback::Manual);
    assert_eq!(cam1.hold_down_ms, 10_000);
    assert_eq!(cam1.protocol, Protocol::Udp);

    assert!(config.encoder("enc-z").is_none());
    assert!(config.channel("cam9").is_none());
    config.validate().expect("validate agrees with parse");
}

#[test]
fn defaults_are_applied() {
    let config = Config::parse(
        r#"
[ingest]
interface = "eth0"

[[encoder]]
name = "enc-a"
address = "10.200.1.2"
health = { port = 9000 }

[[channel]]
name = "cam1"
listen = "10.200.0.1:5000"
encoders = ["enc-a"]
"#,
        "t.toml",
    )
    .unwrap();
    assert_eq!(config.ingest.xdp_mode, XdpMode::Native);
    assert_eq!(
        config.ingest.metrics,
        "127.0.0.1:9464".parse::<SocketAddr>().unwrap()
    );
    let encoder = &config.encoders[0];
    assert_eq!(
        (encoder.interface.as_ref(), encoder.netns.as_ref()),
        (None, None)
    );
    assert!(!encoder.is_local());
    assert!(encoder.allow.is_empty());
    assert_eq!(
        encoder.health,
        Health {
            port: Some(9000),
            ..Health::default()
        }
    );
    assert_eq!(encoder.health.kind, HealthKind::Udp);
    assert_eq!(
        (
            encoder.health.interval_ms,
            encoder.health.timeout_ms,
            encoder.health.rise,
            encoder.health.fall
        ),
        (100, 100, 3, 3)
    );
    let channel = &config.channels[0];
    assert_eq!(channel.port, None);
    assert_eq!(channel.encoder_port(), 5000, "defaults to the listen port");
    assert_eq!(channel.failback, Failback::Manual);
    assert_eq!(channel.hold_down_ms, 10_000);
    assert_eq!(channel.protocol, Protocol::Udp);

    let empty = Config::parse("[ingest]\ninterface = \"eth0\"\n", "t.toml").unwrap();
    assert!(empty.encoders.is_empty() && empty.channels.is_empty());
}

#[test]
fn every_option_round_trips_through_toml() {
    let text = r#"
[ingest]
interface = "ens1f0"
xdp_mode = "auto"
metrics = "[::1]:9000"

[[encoder]]
name = "enc-a"
address = "10.200.1.2"
interface = "nsf-enc-a"
netns = "enc-a"
mac = "02:00:0A:C8:01:02"
allow = ["10.200.9.1:443/tcp", "10.0.0.0/8:1000-2000/udp", "10.1.1.1/icmp"]
health = { kind = "exec", command = ["pgrep", "ffmpeg"], interval_ms = 500, timeout_ms = 200, rise = 2, fall = 5 }

[[encoder]]
name = "remote_1"
address = "10.9.0.7"
health = { kind = "http", url = "http://10.9.0.7:8080/health" }

[[encoder]]
name = "enc.v6"
address = "fd00:200:3::2"
interface = "nsf-enc-v6"
allow = ["[fd00::/64]:53/udp", "fd00::1/icmp"]
health = { kind = "tcp", port = 9001 }

[[encoder]]
name = "enc-flow"
address = "10.200.4.2"
interface = "nsf-enc-flow"
health = { kind = "flow" }

[[channel]]
name = "cam1"
listen = "10.200.0.1:5000"
encoders = ["enc-a", "remote_1", "enc-flow"]
port = 6000
failback = "auto"
hold_down_ms = 30000
protocol = "srt"

[[channel]]
name = "cam2"
listen = "[fd00:200::1]:5000"
encoders = ["enc.v6"]
"#;
    let config = Config::parse(text, "t.toml").unwrap();
    assert_eq!(config.ingest.xdp_mode, XdpMode::Auto);
    assert_eq!(config.encoders.len(), 4);
    assert_eq!(
        config.encoder("enc-a").unwrap().mac_bytes(),
        Some([2, 0, 0x0a, 0xc8, 1, 2])
    );
    assert_eq!(config.encoder("remote_1").unwrap().mac_bytes(), None);
    assert_eq!(config.channel("cam1").unwrap().protocol, Protocol::Srt);
    assert_eq!(config.channel("cam1").unwrap().failback, Failback::Auto);
    assert_eq!(config.channel("cam1").unwrap().encoder_port(), 6000);
    assert_eq!(config.channel("cam2").unwrap().encoder_port(), 5000);

    let again = Config::parse(&config.to_toml(), "round-trip").unwrap();
    assert_eq!(again, config);
    let example = example();
    assert_eq!(
        Config::parse(&example.to_toml(), "round-trip").unwrap(),
        example
    );
}

#[test]
fn a_config_built_in_code_is_validated_without_a_location() {
    let mut config = example();
    config.channels.push(Channel {
        name: "cam2".into(),
        listen: "10.200.0.1:5002".parse().unwrap(),
        encoders: vec!["enc-b".into(), "enc-z".into()],
        port: None,
        failback: Failback::Auto,
        hold_down_ms: 5000,
        protocol: Protocol::Srt,
        sources: Vec::new(),
        srt_peer_limit: None,
    });
    let err = config.validate().unwrap_err();
    assert_eq!(err.location(), None);
    assert_eq!(
        err.to_string(),
        r#"channel "cam2" names unknown encoder "enc-z""#
    );

    config.channels[1].encoders.pop();
    config.validate().expect("valid once enc-z is gone");
    config.encoders.push(Encoder {
        name: "enc-a".into(),
        address: "10.200.3.2".parse().unwrap(),
        interface: None,
        netns: None,
        mac: None,
        allow: Vec::new(),
        health: Health {
            kind: HealthKind::Flow,
            ..Health::default()
        },
        spawn: None,
        restart: Default::default(),
        env: Default::default(),
        prefix: None,
    });
    assert_eq!(
        config.validate().unwrap_err().to_string(),
        r#"duplicate encoder name "enc-a""#
    );
}

#[test]
fn xdp_mode_maps_to_the_dataplane_setting() {
    // There is one XdpMode, the data plane's: the config's value is what attach takes.
    let config = example();
    let mode: nsfail::dataplane::XdpMode = config.ingest.xdp_mode;
    assert_eq!(mode, nsfail::XdpMode::Native);
    assert_eq!(XdpMode::Generic.to_string(), "generic");
    assert_eq!(HealthKind::Exec.as_str(), "exec");
}

#[test]
fn unreadable_file() {
    let path = example_path().with_file_name("no-such-nsfail.toml");
    let err = Config::load(&path).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{}: cannot read: ", path.display())),
        "{message}"
    );
}

#[test]
fn load_names_the_file() {
    let dir = std::env::temp_dir().join(format!("nsfail-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[ingest]\ninterface = \"eth0\"\nxdp_mode = 1\n").unwrap();
    let message = Config::load(&path).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        message.starts_with(&format!("{}:3:12: ", path.display())),
        "{message}"
    );
}

// ---- serde-level mistakes: syntax, unknown keys, types ----

#[test]
fn syntax_error() {
    assert_refused(
        "[ingest\ninterface = \"eth0\"\n",
        "t.toml:1:8:",
        "unclosed table",
    );
    assert_refused(
        "[ingest]\ninterface = \"eth0\"\ninterface = \"eth1\"\n",
        "t.toml:3:1:",
        "duplicate key",
    );
}

#[test]
fn unknown_field() {
    let text = base_with(
        r#"
[[encoder]]
name = "enc-c"
adress = "10.200.3.2"
"#,
    );
    assert_refused(
        &text,
        "t.toml:16:1:",
        "unknown field `adress`, expected one of `name`, `address`",
    );
    assert_refused(
        "[ingest]\ninterface = \"eth0\"\nmode = \"native\"\n",
        "t.toml:3:1:",
        "unknown field `mode`",
    );
    assert_refused(
        &with_encoder(
            r#"address = "10.200.3.2"
health = { kind = "udp", prot = 9 }
"#,
        ),
        "t.toml:17:26:",
        "unknown field `prot`",
    );
}

#[test]
fn missing_field() {
    assert_refused(
        &with_channel(
            r#"name = "cam1"
encoders = ["enc-a"]
"#,
        ),
        "t.toml:14:1:",
        "missing field `listen`",
    );
    assert_refused("", "t.toml", "missing field `ingest`");
}

#[test]
fn wrong_type() {
    let text = base_with(
        r#"
[[channel]]
name = "cam1"
listen = "10.200.0.1:5000"
encoders = ["enc-a"]
port = "5000"
"#,
    );
    assert_refused(&text, "t.toml:18:8:", "expected u16");
    assert_refused(
        &with_channel(
            r#"name = "cam1"
listen = "10.200.0.1:5000"
encoders = "enc-a"
"#,
        ),
        "t.toml:17:12:",
        "invalid type",
    );
    assert_refused(
        &with_channel(
            r#"name = "cam1"
listen = "10.200.0.1:5000"
encoders = ["enc-a"]
port = 70000
"#,
        ),
        "t.toml:18:8:",
        "70000",
    );
}

#[test]
fn invalid_socket_address() {
    let text = base_with(
        r#"
[[channel]]
name = "cam1"
listen = "10.200.0.1"
encoders = ["enc-a"]
"#,
    );
    assert_refused(
        &text,
        "t.toml:16:10:",
        r#"invalid socket address "10.200.0.1""#,
    );
    assert_refused(
        "[ingest]\ninterface = \"eth0\"\nmetrics = \"localhost:9464\"\n",
        "t.toml:3:11:",
        "invalid socket address",
    );
}

#[test]
fn invalid_ip_address() {
    assert_refused(
        &with_encoder("address = \"10.200.3.2:5000\"\n"),
        "t.toml:16:11:",
        r#"invalid IP address "10.200.3.2:5000""#,
    );
}

#[test]
fn unknown_variant() {
    assert_refused(
        "[ingest]\ninterface = \"eth0\"\nxdp_mode = \"driver\"\n",
        "t.toml:3:12:",
        "unknown variant `driver`, expected one of `native`, `generic`, `auto`",
    );
    assert_refused(
        &with_channel(
            r#"name = "cam1"
listen = "10.200.0.1:5000"
encoders = ["enc-a"]
failback = "never"
"#,
        ),
        "t.toml:18:12:",
        "unknown variant `never`",
    );
    assert_refused(
        &with_encoder(
            r#"address = "10.200.3.2"
health = { kind = "icmp" }
"#,
        ),
        "t.toml:17:19:",
        "unknown variant `icmp`",
    );
}

// ---- semantic mistakes ----

#[test]
fn duplicate_encoder_name() {
    let text = base_with(
        r#"
[[encoder]]
name = "enc-a"
address = "10.200.3.2"
health = { kind = "flow" }
"#,
    );
    assert_refused(
        &text,
        "t.toml:15:8:",
        r#"duplicate encoder name "enc-a" (first at line 5)"#,
    );
}

#[test]
fn duplicate_channel_name() {
    let text = base_with(
        r#"
[[channel]]
name = "cam1"
listen = "10.200.0.1:5000"
encoders = ["enc-a"]

[[channel]]
name = "cam1"
listen = "10.200.0.1:5002"
encoders = ["enc-b"]
"#,
    );
    assert_refused(
        &text,
        "t.toml:20:8:",
        r#"duplicate channel name "cam1" (first at line 15)"#,
    );
}

#[test]
fn channel_without_encoders() {
    let text = base_with(
        r#"
[[channel]]
name = "cam1"
listen = "10.200.0.1:5000"
encoders = []
"#,
    );
    assert_refused(&text, "t.toml:17:12:", r#"channel "cam1" has no encoders"#);
}

#[test]
fn unknown_encoder() {
    let text = base_with(
        r#"
[[channel]]
name = "cam1"
listen = "10.200.0.1:5000"
encoders = ["enc-a", "enc-z"]
"#,
    );
    assert_refused(
        &text,
        "t.toml:17:22:",
        r#"channel "cam1" names unknown encoder "enc-z""#,
    );
    let err = Config::parse(&text, "t.toml").unwrap_err();
    assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
    assert_eq!(
        err.location(),
        Some(Location {
            line: 17,
            column: 22
        })
    );
}

#[test]
fn encoder_twice_in_a_channel() {
    let text = base_with(
        r#"
[[channel]]
name = "cam1"
listen = "10.200.0.1:5000"
encoders = [
    "enc-a",
    "enc-b",
    "enc-a",
]
"#,
    );
    assert_refused(
        &text,
        "t.toml:20:5:",
        r#"channel "cam1" lists encoder "enc-a" twice"#,
    );
}

#[test]
fn port_zero() {
    assert_refused(
        &with_channel(
            r#"name = "cam1"
listen = "10.200.0.1:0"
encoders = ["enc-a"]
"#,
        ),
        "t.toml:16:10:",
        "port 0 is not a valid listen port",
    );
    assert_refused(
        &with_channel(
            r#"name = "cam1"
listen = "10.200.0.1:5000"
encoders = ["enc-a"]
port = 0
"#,
        ),
        "t.toml:18:8:",
        "port 0 is not a valid encoder-side port",
    );
    assert_refused(
        &with_encoder(
            r#"address = "10.200.3.2"
health = { kind = "tcp", port = 0 }
"#,
        ),
        "t.toml:17:33:",
        r#"encoder "enc-c": port 0 is not a valid health-check port"#,
    );
}

#[test]
fn same_listen_address_twice() {
    let text = base_with(
        r#"
[[channel]]
name = "cam1"
listen = "10.200.0.1:5000"
encoders = ["enc-a"]
port = 6000

[[channel]]
name = "cam2"
listen = "10.200.0.1:5000"
encoders = ["enc-b"]
"#,
    );
    assert_refused(
        &text,
        "t.toml:22:10:",
        r#"ingest address 10.200.0.1:5000 is used by channels "cam1" and "cam2""#,
    );
}

#[test]
fn listen_address_must_be_unicast() {
    assert_refused(
        &with_channel(
            r#"name = "cam1"
listen = "0.0.0.0:5000"
encoders = ["enc-a"]
"#,
        ),
        "t.toml:16:10:",
        "listen address 0.0.0.0 is not a unicast address",
    );
}

#[test]
fn address_family_mismatch() {
    let text = base_with(
        r#"
[[encoder]]
name = "enc-6"
address = "fd00:200:3::2"
health = { kind = "flow" }

[[channel]]
name = "cam1"
listen = "10.200.0.1:5000"
encoders = ["enc-a", "enc-6"]
"#,
    );
    assert_refused(
        &text,
        "t.toml:22:22:",
        r#"channel "cam1" listens on IPv4 10.200.0.1:5000 but encoder "enc-6" has IPv6 address fd00:200:3::2"#,
    );
}

#[test]
fn bad_encoder_names() {
    let snippet = |name: &str| {
        format!(
            r#"[ingest]
interface = "eth0"

[[encoder]]
name = "{name}"
address = "10.200.1.2"
health = {{ kind = "flow" }}
"#
        )
    };
    assert_refused(&snippet(""), "t.toml:5:8:", r#"encoder name "" is empty"#);
    let long = "e".repeat(32);
    assert_refused(
        &snippet(&long),
        "t.toml:5:8:",
        &format!("encoder name {long:?} is 32 bytes long, the limit is 31"),
    );
    Config::parse(&snippet(&"e".repeat(31)), "t.toml").expect("31 bytes is fine");
    assert_refused(
        &snippet("enc a"),
        "t.toml:5:8:",
        r#"encoder name "enc a" contains ' ': use only A-Z a-z 0-9 . _ -"#,
    );
    assert_refused(&snippet("enc/a"), "t.toml:5:8:", "contains '/'");
    // Multi-byte characters: columns count characters, lengths count bytes.
    assert_refused(&snippet("café"), "t.toml:5:8:", "contains 'é'");
}

#[test]
fn bad_channel_names() {
    let snippet = |name: &str| {
        with_channel(&format!(
            r#"name = "{name}"
listen = "10.200.0.1:5000"
encoders = ["enc-a"]
"#
        ))
    };
    assert_refused(&snippet(""), "t.toml:15:8:", r#"channel name "" is empty"#);
    assert_refused(
        &snippet(&"c".repeat(40)),
        "t.toml:15:8:",
        "is 40 bytes long, the limit is 31",
    );
    assert_refused(&snippet("cam:1"), "t.toml:15:8:", "contains ':'");
}

#[test]
fn two_channels_on_one_encoder_port() {
    // By default the encoder-side port is the listen port: the clash is blamed on `listen`.
    let text = base_with(
        r#"
[[channel]]
name = "cam1"
listen = "10.200.0.1:5000"
encoders = ["enc-a", "enc-b"]

[[channel]]
name = "cam2"
listen = "10.200.0.2:5000"
encoders = ["enc-b"]
"#,
    );
    assert_refused(
        &text,
        "t.toml:21:10:",
        r#"encoder "enc-b" would receive channels "cam1" and "cam2" on the same port 5000"#,
    );

    // An explicit `port` is blamed instead.
    let text = base_with(
        r#"
[[channel]]
name = "cam1"
listen = "10.200.0.1:5000"
encoders = ["enc-a"]

[[channel]]
name = "cam2"
listen = "10.200.0.1:5002"
encoders = ["enc-a"]
port = 5000
"#,
    );
    assert_refused(&text, "t.toml:23:8:", "replies could not be told apart");

    // Different ports on one encoder are fine.
    let text = base_with(
        r#"
[[channel]]
name = "cam1"
listen = "10.200.0.1:5000"
encoders = ["enc-a", "enc-b"]

[[channel]]
name = "cam2"
listen = "10.200.0.1:5002"
encoders = ["enc-b", "enc-a"]
"#,
    );
    Config::parse(&text, "t.toml").expect("distinct encoder-side ports");
}

#[test]
fn encoders_sharing_an_address_and_port() {
    // Two namespaces may reuse an address, but not on one port for two channels.
    let text = base_with(
        r#"
[[encoder]]
name = "enc-c"
address = "10.200.1.2"
interface = "nsf-enc-c"
health = { kind = "flow" }

[[channel]]
name = "cam1"
listen = "10.200.0.1:5000"
encoders = ["enc-a"]

[[channel]]
name = "cam2"
listen = "10.200.0.2:5000"
encoders = ["enc-c"]
"#,
    );
    assert_refused(
        &text,
        "t.toml:27:10:",
        r#"encoders "enc-a" (channel "cam1") and "enc-c" (channel "cam2") share address 10.200.1.2 and port 5000"#,
    );
}

/// An encoder at lines 14-17 whose health table is `health` (line 17).
fn with_health(health: &str) -> String {
    with_encoder(&format!("address = \"10.200.3.2\"\nhealth = {health}\n"))
}

#[test]
fn health_check_needs_its_settings() {
    assert_refused(
        &with_health(r#"{ kind = "udp" }"#),
        "t.toml:17:19:",
        r#"encoder "enc-c": health kind "udp" needs a port"#,
    );
    assert_refused(
        &with_health(r#"{ kind = "tcp", interval_ms = 50, timeout_ms = 50 }"#),
        "t.toml:17:19:",
        r#"health kind "tcp" needs a port"#,
    );
    // No health table at all: the default is udp, which needs a port; blamed on the encoder.
    assert_refused(
        &with_encoder(
            r#"address = "10.200.3.2"
"#,
        ),
        "t.toml:14:1:",
        r#"encoder "enc-c": health kind "udp" needs a port"#,
    );
    assert_refused(
        &with_health(r#"{ kind = "http" }"#),
        "t.toml:17:19:",
        r#"health kind "http" needs a url"#,
    );
    assert_refused(
        &with_health(r#"{ kind = "http", url = "https://10.200.3.2/health" }"#),
        "t.toml:17:33:",
        r#"health url "https://10.200.3.2/health" must start with http://"#,
    );
    assert_refused(
        &with_health(r#"{ kind = "exec" }"#),
        "t.toml:17:10:",
        r#"health kind "exec" needs a non-empty command"#,
    );
    assert_refused(
        &with_health(r#"{ kind = "exec", command = [] }"#),
        "t.toml:17:37:",
        "needs a non-empty command",
    );
    assert_refused(
        &with_health(r#"{ kind = "exec", command = [""] }"#),
        "t.toml:17:37:",
        "needs a non-empty command",
    );
}

#[test]
fn health_settings_the_kind_does_not_use() {
    assert_refused(
        &with_health(r#"{ kind = "udp", port = 9000, url = "http://10.200.3.2/" }"#),
        "t.toml:17:45:",
        r#"health kind "udp" does not use `url`"#,
    );
    assert_refused(
        &with_health(r#"{ kind = "flow", port = 9000 }"#),
        "t.toml:17:34:",
        r#"health kind "flow" does not use `port`"#,
    );
    assert_refused(
        &with_health(r#"{ kind = "http", url = "http://x/", command = ["true"] }"#),
        "t.toml:17:56:",
        "does not use `command`",
    );
}

#[test]
fn health_timing_must_be_positive() {
    for (key, col) in [("interval_ms", 41), ("rise", 34), ("fall", 34)] {
        assert_refused(
            &with_health(&format!("{{ kind = \"flow\", {key} = 0 }}")),
            &format!("t.toml:17:{col}:"),
            &format!(r#"encoder "enc-c": health {key} must be at least 1"#),
        );
    }
    assert_refused(
        &with_health(r#"{ kind = "flow", timeout_ms = 0 }"#),
        "t.toml:17:40:",
        "health timeout_ms must be at least 1",
    );
}

#[test]
fn health_timeout_must_not_exceed_interval() {
    assert_refused(
        &with_health(r#"{ kind = "flow", interval_ms = 100, timeout_ms = 250 }"#),
        "t.toml:17:59:",
        "health timeout_ms (250) must not exceed interval_ms (100)",
    );
    // The default interval is 100 ms.
    assert_refused(
        &with_health(r#"{ kind = "flow", timeout_ms = 101 }"#),
        "t.toml:17:40:",
        "must not exceed interval_ms (100)",
    );
    Config::parse(
        &with_health(r#"{ kind = "flow", interval_ms = 1000, timeout_ms = 1000 }"#),
        "t.toml",
    )
    .expect("timeout == interval is fine");
}

#[test]
fn columns_count_characters() {
    let line = r#"health = { kind = "exec", command = ["/opt/café/check"], timeout_ms = 500 }"#;
    let col = line[..line.find("500").unwrap()].chars().count() + 1;
    assert_ne!(
        col,
        line.find("500").unwrap() + 1,
        "the line has a multi-byte character"
    );
    let text = with_encoder(&format!("address = \"10.200.3.2\"\n{line}\n"));
    assert_refused(
        &text,
        &format!("t.toml:17:{col}:"),
        "must not exceed interval_ms",
    );
}

#[test]
fn invalid_mac() {
    let snippet = |mac: &str| {
        with_encoder(&format!(
            r#"address = "10.200.3.2"
mac = "{mac}"
health = {{ kind = "flow" }}
"#
        ))
    };
    for mac in [
        "02:00:00:00:00",
        "02:00:00:00:00:0g",
        "02-00-00-00-00-01",
        "02:00:00:00:00:01:02",
        "2:0:0:0:0:1",
    ] {
        assert_refused(
            &snippet(mac),
            "t.toml:17:7:",
            &format!(r#"encoder "enc-c": invalid mac "{mac}": expected six hex pairs"#),
        );
    }
    assert_refused(&snippet("01:00:5e:00:00:01"), "t.toml:17:7:", "multicast");
    assert_refused(&snippet("00:00:00:00:00:00"), "t.toml:17:7:", "all-zero");
    Config::parse(&snippet("02:AB:cd:00:00:01"), "t.toml").expect("either case");
}

#[test]
fn invalid_allow_rules() {
    let snippet = |rule: &str| {
        with_encoder(&format!(
            r#"address = "10.200.3.2"
allow = ["10.200.9.1:443/tcp", "{rule}"]
health = {{ kind = "flow" }}
"#
        ))
    };
    for (rule, why) in [
        ("10.200.9.1:443", "no protocol"),
        ("10.200.9.1:443/sctp", "unknown protocol \"sctp\""),
        ("10.200.9.1/33/udp", "prefix length 33 is longer than 32"),
        ("10.0.0.1/8/udp", "did you mean 10.0.0.0/8?"),
        ("10.0.0.0/8:0/udp", "port 0 is not a valid port"),
        (
            "10.0.0.0/8:2000-1000/udp",
            "port range 2000-1000 is reversed",
        ),
        ("10.0.0.0/8:http/tcp", "\"http\" is not a port"),
        ("10.1.1.1:53/icmp", "icmp has no ports"),
        ("eth0/udp", "\"eth0\" is not an IP address"),
        ("[fd00::1]53/udp", "unexpected \"53\" after ']'"),
        ("fd00::/129/udp", "prefix length 129 is longer than 128"),
    ] {
        let message = error(&snippet(rule));
        assert!(message.starts_with("t.toml:17:32:"), "{rule}: {message}");
        assert!(
            message.contains(&format!(r#"encoder "enc-c": invalid allow rule "{rule}""#)),
            "{rule}: {message}"
        );
        assert!(
            message.contains(why),
            "{rule}: expected {why:?} in {message}"
        );
    }
}

#[test]
fn allow_rules_parse() {
    let rule = |text: &str| text.parse::<AllowRule>().unwrap();
    assert_eq!(
        rule("10.200.9.1:443/tcp"),
        AllowRule {
            network: "10.200.9.1".parse().unwrap(),
            prefix_len: 32,
            ports: Some(443..=443),
            proto: AllowProto::Tcp,
        }
    );
    assert_eq!(
        rule("10.0.0.0/8:1000-2000/udp"),
        AllowRule {
            network: "10.0.0.0".parse().unwrap(),
            prefix_len: 8,
            ports: Some(1000..=2000),
            proto: AllowProto::Udp,
        }
    );
    assert_eq!(
        rule("10.1.1.1/icmp"),
        AllowRule {
            network: "10.1.1.1".parse().unwrap(),
            prefix_len: 32,
            ports: None,
            proto: AllowProto::Icmp,
        }
    );
    assert_eq!(
        rule("[fd00::/64]:53/udp"),
        AllowRule {
            network: "fd00::".parse().unwrap(),
            prefix_len: 64,
            ports: Some(53..=53),
            proto: AllowProto::Udp,
        }
    );
    assert_eq!(
        rule("fd00::1:53/udp").prefix_len,
        128,
        "no brackets: no port"
    );
    assert_eq!(rule("fd00::1:53/udp").ports, None);
    assert_eq!(rule("0.0.0.0/0/tcp").prefix_len, 0);
    assert_eq!(rule("::/0/icmp").prefix_len, 0);
    let encoder = example().encoders.remove(0);
    assert_eq!(encoder.allow_rules().unwrap(), [rule("10.200.9.1:443/tcp")]);
}

#[test]
fn bad_interfaces_and_namespaces() {
    assert_refused(
        "[ingest]\ninterface = \"\"\n",
        "t.toml:2:13:",
        "ingest.interface is empty",
    );
    assert_refused(
        "[ingest]\ninterface = \"a-very-long-ifname0\"\n",
        "t.toml:2:13:",
        "is longer than 15 bytes",
    );
    assert_refused(
        &with_encoder(
            r#"address = "10.200.3.2"
interface = "nsf enc"
health = { kind = "flow" }
"#,
        ),
        "t.toml:17:13:",
        r#"encoder "enc-c": interface "nsf enc" is not a valid interface name"#,
    );
    assert_refused(
        &with_encoder(
            r#"address = "10.200.3.2"
netns = "../enc"
health = { kind = "flow" }
"#,
        ),
        "t.toml:17:9:",
        "is not a network namespace name",
    );
}

#[test]
fn encoder_address_must_be_unicast() {
    assert_refused(
        &with_encoder(
            r#"address = "224.0.0.1"
health = { kind = "flow" }
"#,
        ),
        "t.toml:16:11:",
        r#"encoder "enc-c": address 224.0.0.1 is not a unicast address"#,
    );
}

#[test]
fn the_first_problem_in_the_file_is_reported() {
    // An unknown encoder at line 17 and a bad encoder name at line 20: line 17 wins although
    // encoders are checked before channels.
    let text = base_with(
        r#"
[[channel]]
name = "cam1"
listen = "10.200.0.1:5000"
encoders = ["enc-z"]

[[encoder]]
name = "bad name"
address = "10.200.3.2"
health = { kind = "flow" }
"#,
    );
    assert_refused(&text, "t.toml:17:13:", "unknown encoder \"enc-z\"");
}

#[test]
fn allow_rules_the_kernel_cannot_hold() {
    // The other address family than the encoder's.
    assert_refused(
        &with_encoder(
            "address = \"10.200.3.2\"\nhealth = { kind = \"flow\" }\nallow = [\"fd00::1/icmp\"]\n",
        ),
        "t.toml:18:",
        "other address family",
    );
    // More than the 16 rules a kernel policy holds.
    let rules: Vec<String> = (0..17).map(|i| format!("\"10.9.{i}.1:443/tcp\"")).collect();
    assert_refused(
        &with_encoder(&format!(
            "address = \"10.200.3.2\"\nhealth = {{ kind = \"flow\" }}\nallow = [{}]\n",
            rules.join(", ")
        )),
        "t.toml:18:",
        "at most 16",
    );
}

#[test]
fn managed_encoders_need_room_on_their_link() {
    assert_refused(
        &with_encoder(
            "address = \"10.200.3.1\"\nhealth = { kind = \"flow\" }\nspawn = { command = \"sleep\" }\n",
        ),
        "t.toml:16:",
        "first address",
    );
    assert_refused(
        &with_encoder("address = \"10.200.3.2\"\nhealth = { kind = \"flow\" }\nprefix = 24\n"),
        "t.toml:18:",
        "only for managed encoders",
    );
    let ok = with_encoder(
        "address = \"10.200.3.2\"\nhealth = { kind = \"flow\" }\nspawn = { command = \"sleep\", args = [\"9\"] }\n",
    );
    let config = Config::parse(&ok, "t.toml").expect("a managed encoder");
    let enc = config.encoder("enc-c").unwrap();
    assert_eq!(enc.host_interface().as_deref(), Some("nf-enc-c"));
    assert_eq!(enc.namespace().as_deref(), Some("nsf-enc-c"));
    assert_eq!(enc.link_prefix(), 30);
}

/// Two encoders on one interface, or a managed encoder's generated interface (`nf-` and ten
/// characters of its name) meeting another's, would share one TC link and one DEVMAP slot.
#[test]
fn interface_names_are_unique() {
    let managed = |name: &str, addr: &str| {
        format!(
            "\n[[encoder]]\nname = \"{name}\"\naddress = \"{addr}\"\n\
             spawn = {{ command = \"true\" }}\nhealth = {{ kind = \"flow\" }}\n"
        )
    };
    // enc-camera-1 and enc-camera-2 both make `nf-enc-camera`.
    let text = base_with(
        &(managed("enc-camera-1", "10.200.5.2") + &managed("enc-camera-2", "10.200.6.2")),
    );
    let line = text
        .lines()
        .position(|l| l.contains("enc-camera-2"))
        .unwrap()
        + 1;
    assert_refused(
        &text,
        &format!("t.toml:{line}:"),
        "\"nf-enc-camera\" is already encoder \"enc-camera-1\"'s",
    );
    let first = text
        .lines()
        .position(|l| l.contains("enc-camera-1"))
        .unwrap()
        + 1;
    assert!(error(&text).contains(&format!("(first at line {first})")));

    // A local encoder on the ingest interface.
    let text = with_encoder(
        "address = \"10.200.3.2\"\ninterface = \"eth0\"\nnetns = \"x\"\nhealth = { kind = \"flow\" }",
    );
    assert!(
        error(&text).contains("is already the ingest interface"),
        "{}",
        error(&text)
    );
}

#[test]
fn daemon_settings_and_env_are_read_and_checked() {
    let c = Config::parse(
        &base_with(
            "\n[daemon]\nsocket_group = \"nsfail\"\nevents_max_bytes = 4096\nevents_keep = 3\n",
        ),
        "t.toml",
    )
    .unwrap();
    assert_eq!(c.daemon.socket_group.as_deref(), Some("nsfail"));
    assert_eq!((c.daemon.events_max_bytes, c.daemon.events_keep), (4096, 3));
    let d = Config::parse(BASE, "t.toml").unwrap().daemon;
    assert_eq!(d.socket_group, None);
    assert_eq!(
        (d.events_max_bytes, d.events_keep),
        (
            nsfail::config::DEFAULT_EVENTS_MAX_BYTES,
            nsfail::config::DEFAULT_EVENTS_KEEP
        )
    );
    assert_refused(
        &base_with("\n[daemon]\nevents_max_bytes = 10\n"),
        "t.toml:15:",
        "below the minimum 1024",
    );
    assert_refused(
        &base_with("\n[daemon]\nevents_keep = 1000\n"),
        "t.toml:15:",
        "above the maximum 100",
    );
    assert_refused(
        &base_with("\n[daemon]\nsocket_group = \"a:b\"\n"),
        "t.toml:15:",
        "not a group name or ID",
    );

    let c = Config::parse(
        &with_encoder(
            "address = \"10.200.3.2\"\nhealth = { kind = \"flow\" }\nenv = { FOO = \"bar\" }\n",
        ),
        "t.toml",
    )
    .unwrap();
    assert_eq!(c.encoder("enc-c").unwrap().env["FOO"], "bar");
    assert_refused(
        &with_encoder(
            "address = \"10.200.3.2\"\nhealth = { kind = \"flow\" }\nenv = { \"A=B\" = \"x\" }\n",
        ),
        "t.toml:18:",
        "is not an environment variable name",
    );
}
