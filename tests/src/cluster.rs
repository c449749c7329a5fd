//! etcd for the cluster tests (issue 17): Debian's `etcd` started by the test in a namespace
//! of its own, linked by a veth to each ingest namespace that needs it, and a client of it for
//! writing keys as another host (or a vandal) would. Everything is undone on drop, panics
//! included: the etcd process (by its PID), its data directory, the namespace and its veths.

pub mod srt_freeze;
pub mod two_hosts;

use std::{collections::BTreeSet, fs, path::Path, time::Duration};

use etcd_client::{Client, EventType, PutOptions, WatchOptions};

use crate::{
    ChildGuard, Entered, Netns, PinDir,
    daemon::{Daemon, TempDir, cli, placement, status},
    hosts::{TABLE, anycast_birds, exec, next_hops, router_xdp, wire},
    ip_in,
    traffic::{Echo, Receiver, send_burst, spawn_burst},
    unique, wait_for,
};

/// etcd's client port, on every address of its namespace.
pub const PORT: u16 = nsfail::lab::etcd::PORT;

/// An etcd in its own namespace. Fields drop in order: the process, then its data, then the
/// namespace (which takes the veths with it).
pub struct Etcd {
    process: Option<ChildGuard>,
    data: TempDir,
    pub ns: Netns,
}

impl Etcd {
    /// The namespace, not yet running etcd (see [`Etcd::start`]).
    pub fn new() -> Self {
        let ns = Netns::new("etcd");
        ip_in(&ns.name, &["link", "set", "lo", "up"]);
        Self {
            process: None,
            data: TempDir::new(),
            ns,
        }
    }

    /// Links the namespace `other` to etcd's with a veth on `10.79.N.0/24` (etcd `.1`,
    /// `other` `.2`); returns the endpoint `other` reaches etcd at.
    pub fn link(&self, other: &str, n: u8) -> String {
        let (ours, theirs) = (unique("et"), unique("et"));
        crate::run(
            "ip",
            &[
                "-n",
                &self.ns.name,
                "link",
                "add",
                &ours,
                "type",
                "veth",
                "peer",
                "name",
                &theirs,
                "netns",
                other,
            ],
        );
        ip_in(
            &self.ns.name,
            &["addr", "add", &format!("10.79.{n}.1/24"), "dev", &ours],
        );
        ip_in(&self.ns.name, &["link", "set", &ours, "up"]);
        ip_in(
            other,
            &["addr", "add", &format!("10.79.{n}.2/24"), "dev", &theirs],
        );
        ip_in(other, &["link", "set", &theirs, "up"]);
        format!("http://10.79.{n}.1:{PORT}")
    }

    /// Starts etcd (a 50 ms heartbeat, as the cluster's hosts expect) and waits until it
    /// answers (10 s at most).
    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// [`Etcd::start`] with more of etcd's flags (`--quota-backend-bytes=N`, say).
    pub fn start_with(&mut self, extra: &[&str]) {
        let command = nsfail::lab::etcd::command(&self.data.path.join("etcd"));
        let args: Vec<&str> = command[1..]
            .iter()
            .map(String::as_str)
            .chain(extra.iter().copied())
            .collect();
        let child = crate::spawn_in(&self.ns, &command[0], &args);
        self.process = Some(child);
        let up = wait_for(Duration::from_secs(10), || {
            self.client_blocking(|mut c| async move { c.status().await.map(|_| ()) })
                .ok()
        });
        assert!(up.is_some(), "etcd did not answer in {}", self.ns.name);
    }

    /// Stops etcd (SIGKILL, by its PID); its data stays for a restart.
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// Runs `f` with a client of this etcd, on a runtime of this thread inside etcd's
    /// namespace (the connection is made there), 10 s at most.
    pub fn client_blocking<T, F>(&self, f: impl FnOnce(Client) -> F) -> Result<T, String>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let _inside = Entered::new(&self.ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let attempt = async {
                let c = Client::connect([format!("http://127.0.0.1:{PORT}")], None).await?;
                f(c).await
            };
            match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("no answer within 10 s".into()),
            }
        })
    }

    /// Puts `key` = `value`, with a lease of `lease_s` seconds that is never kept alive
    /// when given (a host that stops at once).
    pub fn put(&self, key: &str, value: &[u8], lease_s: Option<i64>) {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.client_blocking(|mut c| async move {
            let options = match lease_s {
                Some(ttl) => {
                    Some(PutOptions::new().with_lease(c.lease_grant(ttl, None).await?.id()))
                }
                None => None,
            };
            c.put(key, value, options).await.map(|_| ())
        })
        .expect("etcd put");
    }

    /// The value of `key`, if any.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let key = key.to_owned();
        self.client_blocking(|mut c| async move {
            Ok(c.get(key, None)
                .await?
                .kvs()
                .first()
                .map(|kv| kv.value().to_vec()))
        })
        .expect("etcd get")
    }

    /// Every value ever put under `prefix` (etcd's history, oldest first; nothing is compacted
    /// in a test's etcd): replayed by a watch from revision 1, read until it is quiet for
    /// 500 ms.
    pub fn history(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let prefix = prefix.to_owned();
        self.client_blocking(|mut c| async move {
            let options = WatchOptions::new().with_prefix().with_start_revision(1);
            let (_watcher, mut stream) = c.watch(prefix, Some(options)).await?;
            let mut out = Vec::new();
            while let Ok(msg) =
                tokio::time::timeout(Duration::from_millis(500), stream.message()).await
            {
                let Some(resp) = msg? else { break };
                for ev in resp.events() {
                    if let (EventType::Put, Some(kv)) = (ev.event_type(), ev.kv()) {
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        out.push((key, kv.value().to_vec()));
                    }
                }
            }
            Ok(out)
        })
        .expect("etcd history")
    }

    /// Runs `nsfail ARGS...` (the CLI) inside etcd's namespace, where the cluster's etcd is
    /// `http://127.0.0.1:2379`.
    /// Writes `config` (a seed file: `[cluster]` included) to `path` and writes its channels
    /// to etcd with `nsfail apply`, which must succeed.
    pub fn seed(&self, path: &Path, config: &str) {
        fs::write(path, config).expect("seed file");
        let applied = self.nsfail(&["apply", "--config", path.to_str().expect("utf-8")]);
        assert_eq!(applied.code, 0, "apply: {}", applied.stderr);
    }

    pub fn nsfail(&self, args: &[&str]) -> crate::daemon::CliOut {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .arg(crate::daemon::nsfail_bin())
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run nsfail");
        out.into()
    }
}

impl Default for Etcd {
    fn default() -> Self {
        Self::new()
    }
}

/// The `[cluster]` section of a host.
pub fn cluster_section(name: &str, host: &str, endpoint: &str) -> String {
    format!(
        "\n[cluster]\nname = \"{name}\"\nhost = \"{host}\"\netcd = [\"{endpoint}\"]\nlease_s = 1\n"
    )
}

/// `config` without its `[[channel]]` tables (a cluster host's file: channels live in etcd).
pub fn without_channels(config: &str) -> String {
    match config.find("[[channel]]") {
        Some(at) => config[..at].to_owned(),
        None => config.to_owned(),
    }
}

/// Whether XDP is attached to `ifname` in namespace `ns`.
pub fn xdp_attached(ns: &str, ifname: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-d", "link", "show", ifname])
        .output()
        .expect("ip link show");
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

/// The daemon's log so far.
pub fn log_of(config: &Path) -> String {
    std::fs::read_to_string(config.with_extension("log")).unwrap_or_default()
}

/// Two ingest hosts behind a router, as `tests/tests/cross_host.rs` builds them, with etcd
/// linked to both hosts (`10.79.1.0/24` to A, `10.79.2.0/24` to B):
///
/// ```text
///  cl 10.71.1.2 --- rt --- 10.71.2.2 ha [XDP on ua] --- va/ea 10.71.5.2
///                   |
///                   +----- 10.71.3.2 hb [XDP on ub] --- vb/eb 10.71.4.2
/// ```
///
/// The router sends the ingest address [`ROUTED_INGEST`] to host A and B's encoder network to
/// host B; neither host forwards IP. Fields drop in order, the namespaces last.
pub struct RoutedWorld {
    /// An XDP_PASS program on the router's side of A's uplink (veth delivers an XDP_TX only
    /// to a peer with an XDP program).
    _router_xdp: aya::Ebpf,
    pub etcd: Etcd,
    pub cl: Netns,
    pub rt: Netns,
    pub ha: Netns,
    pub hb: Netns,
    pub ea: Netns,
    pub eb: Netns,
    /// etcd as host A and host B reach it.
    pub endpoints: [String; 2],
}

/// The ingest address of [`RoutedWorld`].
pub const ROUTED_INGEST: &str = "203.0.113.77";

impl RoutedWorld {
    pub fn new() -> Self {
        Self::build(true)
    }

    /// [`RoutedWorld::new`] without the router's route to the ingest address: BGP gives it
    /// (see [`AnycastCluster`]), spreading flows over the hosts by the L4 hash.
    pub fn anycast() -> Self {
        let w = Self::build(false);
        exec(
            &w.rt,
            &["sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1"],
        );
        w
    }

    fn build(router_routes_ingest: bool) -> Self {
        let (cl, rt, ha, hb, ea, eb) = (
            Netns::new("ccl"),
            Netns::new("crt"),
            Netns::new("cha"),
            Netns::new("chb"),
            Netns::new("cea"),
            Netns::new("ceb"),
        );
        exec(&rt, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        // Replies leave B from the ingest address, which the router routes to A.
        exec(&rt, &["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"]);
        exec(&rt, &["sysctl", "-qw", "net.ipv4.conf.default.rp_filter=0"]);
        for h in [&ha, &hb] {
            exec(h, &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
        }
        wire(&rt, "rc", "10.71.1.1", &cl, "c0", "10.71.1.2");
        wire(&rt, "ra", "10.71.2.1", &ha, "ua", "10.71.2.2");
        wire(&rt, "rb", "10.71.3.1", &hb, "ub", "10.71.3.2");
        wire(&ha, "va", "10.71.5.1", &ea, "a0", "10.71.5.2");
        wire(&hb, "vb", "10.71.4.1", &eb, "b0", "10.71.4.2");
        // The caller's checksums complete, as from a wire.
        exec(&cl, &["ethtool", "-K", "c0", "tx", "off"]);
        exec(&rt, &["ethtool", "-K", "rb", "gro", "on"]);
        let router_xdp = router_xdp(&rt, "ra");
        ip_in(&cl.name, &["route", "add", "default", "via", "10.71.1.1"]);
        ip_in(&ha.name, &["route", "add", "default", "via", "10.71.2.1"]);
        ip_in(&hb.name, &["route", "add", "default", "via", "10.71.3.1"]);
        ip_in(&ea.name, &["route", "add", "default", "via", "10.71.5.1"]);
        ip_in(&eb.name, &["route", "add", "default", "via", "10.71.4.1"]);
        if router_routes_ingest {
            ip_in(
                &rt.name,
                &["route", "add", ROUTED_INGEST, "via", "10.71.2.2"],
            );
        }
        ip_in(
            &rt.name,
            &["route", "add", "10.71.4.0/24", "via", "10.71.3.2"],
        );
        ip_in(
            &rt.name,
            &["route", "add", "10.71.5.0/24", "via", "10.71.2.2"],
        );
        let etcd = Etcd::new();
        let endpoints = [etcd.link(&ha.name, 1), etcd.link(&hb.name, 2)];
        Self {
            _router_xdp: router_xdp,
            etcd,
            cl,
            rt,
            ha,
            hb,
            ea,
            eb,
            endpoints,
        }
    }

    /// Host A's (`a`: true) or B's config: its ingest interface and its one encoder, with
    /// `[cluster]` `name`.
    pub fn host_config(&self, a: bool, name: &str) -> String {
        let (host, uplink, ns, enc, addr, veth, enc_ns, endpoint) = if a {
            (
                "ha",
                "ua",
                &self.ha,
                "ea",
                "10.71.5.2",
                "va",
                &self.ea,
                &self.endpoints[0],
            )
        } else {
            (
                "hb",
                "ub",
                &self.hb,
                "eb",
                "10.71.4.2",
                "vb",
                &self.eb,
                &self.endpoints[1],
            )
        };
        format!(
            "[ingest]\ninterface = \"{uplink}\"\nnetns = \"{}\"\nxdp_mode = \"native\"\n\
             metrics = \"127.0.0.1:9464\"\n\n[[encoder]]\nname = \"{enc}\"\naddress = \"{addr}\"\n\
             interface = \"{veth}\"\nnetns = \"{}\"\n\
             health = {{ kind = \"udp\", port = 9000, fall = 5 }}\n",
            ns.name, enc_ns.name
        ) + &cluster_section(name, host, endpoint)
    }
}

impl Default for RoutedWorld {
    fn default() -> Self {
        Self::new()
    }
}

/// Two clustered daemons on [`RoutedWorld`]: host A (`ea`, the leader) and host B (`eb`),
/// channel cam1 (`eb` then `ea`) on the leader's choice `eb`, reached from A through B.
pub struct RoutedCluster {
    // Fields drop in this order: the daemons before their pins, the world last.
    pub b: Daemon,
    pub a: Daemon,
    pub echoes: [Echo; 2],
    pub pins: (PinDir, PinDir),
    pub sock_a: std::path::PathBuf,
    pub sock_b: std::path::PathBuf,
    pub cfg_a: std::path::PathBuf,
    pub cfg_b: std::path::PathBuf,
    pub prefix: String,
    _dir: TempDir,
    pub w: RoutedWorld,
}

pub fn routed_cluster() -> RoutedCluster {
    routed_cluster_of("udp")
}

/// [`routed_cluster`] with cam1 of `protocol` (`udp` or `srt`).
pub fn routed_cluster_of(protocol: &str) -> RoutedCluster {
    routed_cluster_in(RoutedWorld::new(), protocol, "")
}

/// [`routed_cluster_of`] on `w`, with `cluster_extra` (lines of `[cluster]`) in both hosts'
/// files.
fn routed_cluster_in(mut w: RoutedWorld, protocol: &str, cluster_extra: &str) -> RoutedCluster {
    let echoes = [
        Echo::start(&w.ea, sa("10.71.5.2:9000")),
        Echo::start(&w.eb, sa("10.71.4.2:9000")),
    ];
    w.etcd.start();
    let name = unique("c");
    let prefix = format!("/nsfail/{name}/");
    let dir = TempDir::new();
    w.etcd.seed(
        &dir.path.join("seed.toml"),
        &(format!(
            "[ingest]\ninterface = \"seed\"\n\
             [[encoder]]\nname = \"ea\"\naddress = \"10.71.5.2\"\nmac = \"02:00:00:00:00:01\"\n\
             health = {{ kind = \"udp\", port = 9000 }}\n\
             [[encoder]]\nname = \"eb\"\naddress = \"10.71.4.2\"\nmac = \"02:00:00:00:00:02\"\n\
             health = {{ kind = \"udp\", port = 9000 }}\n\
             [[channel]]\nname = \"cam1\"\nlisten = \"{ROUTED_INGEST}:5000\"\n\
             encoders = [\"eb\", \"ea\"]\nport = 7000\nprotocol = \"{protocol}\"\n"
        ) + &cluster_section(&name, "seed", "http://127.0.0.1:2379")),
    );
    let (cfg_a, cfg_b) = (dir.path.join("ha.toml"), dir.path.join("hb.toml"));
    fs::write(&cfg_a, w.host_config(true, &name) + cluster_extra).unwrap();
    fs::write(&cfg_b, w.host_config(false, &name) + cluster_extra).unwrap();
    let (pins_a, pins_b) = (PinDir::new(), PinDir::new());
    let (sock_a, sock_b) = (dir.path.join("ha.sock"), dir.path.join("hb.sock"));
    let a = Daemon::start(&cfg_a, &sock_a, &pins_a);
    let led = wait_for(Duration::from_secs(5), || {
        (cluster_of(&sock_a)["leading"] == true).then_some(())
    });
    assert!(led.is_some(), "ha leads:\n{}", log_of(&cfg_a));
    let b = Daemon::start(&cfg_b, &sock_b, &pins_b);
    // Both hosts know the channel and both encoders healthy; the leader puts it on eb.
    let ready = wait_for(Duration::from_secs(10), || {
        let st = status(&sock_a);
        let healthy = st["encoders"]
            .as_array()?
            .iter()
            .filter(|e| e["healthy"] == true)
            .count();
        (healthy == 2 && !placement(&sock_b).is_empty()).then_some(())
    });
    assert!(ready.is_some(), "{}\n{}", log_of(&cfg_a), log_of(&cfg_b));
    let remap = cli(&sock_a, &["remap", "cam1", "eb"]);
    assert_eq!(remap.code, 0, "{}", remap.stderr);
    let on_b = wait_for(Duration::from_secs(5), || {
        (placement(&sock_b) == [("cam1".to_owned(), "eb".to_owned())]).then_some(())
    });
    assert!(on_b.is_some(), "hb follows: {:?}", placement(&sock_b));
    assert!(
        !log_of(&cfg_a).contains("no route to encoder eb"),
        "eb is routed from ha:\n{}",
        log_of(&cfg_a)
    );

    RoutedCluster {
        b,
        a,
        echoes,
        pins: (pins_a, pins_b),
        sock_a,
        sock_b,
        cfg_a,
        cfg_b,
        prefix,
        _dir: dir,
        w,
    }
}

/// [`RoutedCluster`] under anycast (issue 17): both hosts' daemons announce
/// [`ROUTED_INGEST`] in their announce table ([`TABLE`]), each host's BIRD exports it to the
/// router's over BGP with BFD (`bfd`: the options of every session), and the router spreads
/// flows over the hosts by the L4 hash (ECMP). cam1's encoder is eb on host B: a flow through
/// A reaches it by A's routed encoder and B's transit entry.
pub struct AnycastCluster {
    // Fields drop in order: the BIRDs first, then the daemons, their pins and the world.
    _birds: [ChildGuard; 3],
    pub c: RoutedCluster,
    pub bird_dir: TempDir,
}

impl AnycastCluster {
    pub fn new(bfd: &str) -> Self {
        let c = routed_cluster_in(
            RoutedWorld::anycast(),
            "udp",
            &format!("announce_table = {TABLE}\n"),
        );
        let dir = TempDir::new();
        let w = &c.w;
        let birds = anycast_birds(&w.rt, &w.ha, &w.hb, &dir, bfd);
        let lab = Self {
            _birds: birds,
            c,
            bird_dir: dir,
        };
        let up = wait_for(Duration::from_secs(30), || {
            (lab.next_hops() == hops(&[A_HOP, B_HOP])).then_some(())
        });
        assert!(
            up.is_some(),
            "router's next hops {:?}; its log: {}",
            lab.next_hops(),
            fs::read_to_string(lab.bird_dir.path.join("r.log")).unwrap_or_default()
        );
        lab
    }

    /// The router's next hops for the ingest address.
    pub fn next_hops(&self) -> BTreeSet<String> {
        next_hops(&self.c.w.rt, ROUTED_INGEST)
    }
}

/// Host A's and host B's address on their uplinks: the router's next hops.
pub const A_HOP: &str = "10.71.2.2";
pub const B_HOP: &str = "10.71.3.2";

/// A set of next hops.
pub fn hops(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// What freezing host B did to a stream on cam1.
#[derive(Debug)]
pub struct ActiveFreeze {
    /// Of the 100 packets sent before: how many reached eb on B.
    pub before: usize,
    pub sent: u32,
    pub lost: u32,
    /// Lost packets times the send interval.
    pub gap_ms: f64,
    /// Whether the stream's last 500 packets arrived at ea on A.
    pub ended_at_a: bool,
}

/// Host B frozen by [`RoutedCluster::freeze_host_b`]; its daemon is continued on drop (its
/// uplink stays cut off).
pub struct FrozenB(nix::unistd::Pid);

impl Drop for FrozenB {
    fn drop(&mut self) {
        // The daemon may have died meanwhile: then there is nothing to continue.
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

impl RoutedCluster {
    /// Freezes host B: its daemon stopped (SIGSTOP) and everything to and from its uplink
    /// dropped at the router, the link up, so that only its lease can tell.
    pub fn freeze_host_b(&self) -> FrozenB {
        let pid = nix::unistd::Pid::from_raw(self.b.child.pid());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP hb");
        let frozen = FrozenB(pid);
        crate::run(
            "ip",
            &[
                "netns",
                "exec",
                &self.w.rt.name,
                "nft",
                "add table netdev freeze; add chain netdev freeze in { type filter hook \
                 ingress device \"rb\" priority 0; policy drop; }; add chain netdev freeze out \
                 { type filter hook egress device \"rb\" priority 0; policy drop; }",
            ],
        );
        frozen
    }

    /// 4,000 packets to cam1 at 1 a ms; 500 ms in, host B freezes: its daemon stopped
    /// (SIGSTOP, continued after the burst) and everything to and from its uplink dropped at
    /// the router, the link up.
    pub fn freeze_b(&self) -> ActiveFreeze {
        let channel = sa(&format!("{ROUTED_INGEST}:5000"));
        let caller = sa("10.71.1.2:40000");
        let rx_a = Receiver::start(&self.w.ea, sa("10.71.5.2:7000"));
        let rx_b = Receiver::start(&self.w.eb, sa("10.71.4.2:7000"));
        send_burst(
            &self.w.cl,
            caller,
            channel,
            0..100,
            Duration::from_millis(1),
            Duration::from_secs(2),
        );
        let before = rx_b.settled().len();
        let n = 4000u32;
        let burst = spawn_burst(
            &self.w.cl.name,
            caller,
            channel,
            1000..1000 + n,
            Duration::from_millis(1),
            Duration::from_secs(2),
        );
        std::thread::sleep(Duration::from_millis(500));
        let frozen = self.freeze_host_b();
        let sent = burst.join().expect("burst thread");
        drop(frozen);
        let (on_a, on_b) = (rx_a.settled(), rx_b.settled());
        let range = 1000..1000 + n;
        let arrived = range
            .clone()
            .filter(|s| on_a.contains(s) || on_b.contains(s))
            .count() as u32;
        let tail = range.rev().take(500).filter(|s| on_a.contains(s)).count();
        let lost = n - arrived;
        ActiveFreeze {
            before,
            sent: n,
            lost,
            gap_ms: sent.sending.as_secs_f64() * 1e3 * f64::from(lost) / f64::from(n - 1),
            ended_at_a: tail == 500,
        }
    }
}

impl RoutedCluster {
    /// 4,000 packets to cam1 at 1 a ms; 500 ms in, encoder eb on host B dies (its receiver
    /// and its health responder stop; its host lives): host B judges it down, the leader on
    /// A moves the stream to ea. Returns the gap (lost packets times the send interval) and
    /// whether the stream's last 500 packets arrived at ea.
    pub fn kill_eb(&mut self) -> (f64, bool) {
        let channel = sa(&format!("{ROUTED_INGEST}:5000"));
        let caller = sa("10.71.1.2:40001");
        let rx_a = Receiver::start(&self.w.ea, sa("10.71.5.2:7000"));
        let mut rx_b = Receiver::start(&self.w.eb, sa("10.71.4.2:7000"));
        let n = 4000u32;
        let burst = spawn_burst(
            &self.w.cl.name,
            caller,
            channel,
            0..n,
            Duration::from_millis(1),
            Duration::from_secs(2),
        );
        std::thread::sleep(Duration::from_millis(500));
        // What eb received up to its death counts: read before the receiver goes.
        let on_b = rx_b.seen();
        rx_b.kill();
        self.echoes[1].stop();
        let sent = burst.join().expect("burst thread");
        let on_b: std::collections::BTreeSet<u32> = on_b.union(&rx_b.seen()).copied().collect();
        let on_a = rx_a.settled();
        let arrived = (0..n)
            .filter(|s| on_a.contains(s) || on_b.contains(s))
            .count() as u32;
        let tail = (0..n).rev().take(500).filter(|s| on_a.contains(s)).count();
        let lost = n - arrived;
        (
            sent.sending.as_secs_f64() * 1e3 * f64::from(lost) / f64::from(n - 1),
            tail == 500,
        )
    }
}

fn sa(s: &str) -> std::net::SocketAddr {
    s.parse().expect("address")
}

/// The `cluster` object of a daemon's status.
pub fn cluster_of(socket: &Path) -> serde_json::Value {
    status(socket)["cluster"].clone()
}
