//! `nsfail doctor`: checks a host before anything runs, one line per check, each failure
//! with what is wrong and how to fix it. It only reads: nothing is mounted, repaired or
//! attached (the receive check is [`receive::check`], not the daemon's `ensure`).

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
};

use serde::Serialize;

use crate::{
    config::{Config, Encoder, XdpMode},
    net::{netns, receive},
    paths::{self, Pins},
};

/// The oldest kernel nsfail runs on: TCX links and the netdev `xdp-features` it relies on.
const MIN_KERNEL: (u32, u32) = (6, 6);
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// One check's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub check: String,
    /// `ok`, `fail`, or `skip` (not applicable here, e.g. no config given).
    pub status: &'static str,
    /// What was found.
    pub detail: String,
    /// How to fix it, for a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            status: "ok",
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            status: "fail",
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn skip(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            status: "skip",
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn failed(&self) -> bool {
        self.status == "fail"
    }

    /// The human line: `ok    kernel: 6.18.0`, `FAIL  bpffs: ... (fix: ...)`.
    pub fn line(&self) -> String {
        let mark = match self.status {
            "ok" => "ok  ",
            "fail" => "FAIL",
            _ => "skip",
        };
        match &self.fix {
            Some(fix) => format!("{mark}  {}: {} (fix: {fix})", self.check, self.detail),
            None => format!("{mark}  {}: {}", self.check, self.detail),
        }
    }
}

/// Every check, in order. `config`: the config file the daemon would run with.
pub fn run(config: Option<&Path>, pins: &Pins, socket: &Path) -> Vec<Check> {
    let mut out = vec![
        kernel(),
        btf(),
        bpffs(),
        tcx(),
        leftover_pins(pins),
        socket_mode(socket),
    ];
    let Some(path) = config else {
        out.push(Check::skip(
            "config",
            "no --config given: the ingest interface and encoders are not checked",
        ));
        return out;
    };
    let cfg = match Config::load(path) {
        Ok(cfg) => cfg,
        Err(e) => {
            out.push(Check::fail(
                "config",
                e.to_string(),
                "correct the file (`nsfail check --config FILE` says the same)",
            ));
            return out;
        }
    };
    out.push(Check::ok("config", format!("{} parses", path.display())));
    out.push(in_ingest_netns(&cfg, ingest_xdp));
    for e in cfg.encoders.iter().filter(|e| e.is_local()) {
        let e2 = e.clone();
        out.push(in_ingest_netns(&cfg, move |_| encoder_receives(&e2)));
        out.push(icmp_rate(e));
    }
    out
}

fn kernel() -> Check {
    let release = match nix::sys::utsname::uname() {
        Ok(u) => u.release().to_string_lossy().into_owned(),
        Err(e) => return Check::fail("kernel", format!("uname: {e}"), "check /proc"),
    };
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version >= MIN_KERNEL {
        Check::ok("kernel", format!("{release} (>= 6.6)"))
    } else {
        Check::fail(
            "kernel",
            format!("{release} is older than 6.6 (no TCX links)"),
            "boot a kernel 6.6 or newer",
        )
    }
}

fn btf() -> Check {
    if Path::new(paths::KERNEL_BTF).is_file() {
        Check::ok("btf", format!("{} present", paths::KERNEL_BTF))
    } else {
        Check::fail(
            "btf",
            format!("{} is missing: the kernel has no BTF", paths::KERNEL_BTF),
            "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's are)",
        )
    }
}

fn bpffs() -> Check {
    match nix::sys::statfs::statfs(paths::BPFFS) {
        Ok(s) if s.filesystem_type().0 == BPF_FS_MAGIC => {
            Check::ok("bpffs", format!("mounted at {}", paths::BPFFS))
        }
        Ok(_) => Check::fail(
            "bpffs",
            format!(
                "{} is not a bpffs mount: pins would not persist",
                paths::BPFFS
            ),
            format!(
                "mount -t bpf bpf {} (systemd mounts it at boot; `nsfail run` mounts it when \
                 absent)",
                paths::BPFFS
            ),
        ),
        Err(e) => Check::fail(
            "bpffs",
            format!("{}: {e}", paths::BPFFS),
            format!("mount -t bpf bpf {}", paths::BPFFS),
        ),
    }
}

/// TCX (BPF links for TC, kernel 6.6): present when the kernel's BTF has its types.
fn tcx() -> Check {
    let fix = "boot a kernel 6.6 or newer (TCX)";
    match fs::read(paths::KERNEL_BTF) {
        Ok(btf) if contains(&btf, b"\0tcx_entry\0") => {
            Check::ok("tcx", "the kernel has TCX (tcx_entry in its BTF)")
        }
        Ok(_) => Check::fail("tcx", "the kernel's BTF has no tcx_entry: no TCX", fix),
        Err(e) => Check::fail(
            "tcx",
            format!("cannot tell without BTF ({}: {e})", paths::KERNEL_BTF),
            fix,
        ),
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Pins with no daemon holding the pin directory's lock: a data plane that forwards with
/// nobody to fail it over.
fn leftover_pins(pins: &Pins) -> Check {
    let root = pins.root();
    let entries = fs::read_dir(root).map(|d| d.count()).unwrap_or(0);
    if entries == 0 {
        return Check::ok("pins", format!("nothing pinned at {}", root.display()));
    }
    match daemon_holding(pins) {
        Some(holder) => Check::ok(
            "pins",
            format!("{} is served by a daemon ({holder})", root.display()),
        ),
        None => Check::fail(
            "pins",
            format!(
                "a data plane is pinned at {} and no daemon serves it: it forwards, but nothing \
                 fails its channels over",
                root.display()
            ),
            format!(
                "start the daemon (`systemctl start nsfail` or `nsfail run --config FILE --pins \
                 {0}`, which adopts it), or remove it with `nsfail teardown --pins {0}`",
                root.display()
            ),
        ),
    }
}

/// What the daemon holding the pin directory's lock wrote (its PID and socket), or `None`
/// when no daemon holds it.
fn daemon_holding(pins: &Pins) -> Option<String> {
    let path = pins.lock_file();
    let file = fs::File::open(&path).ok()?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
        // Nobody holds it; the shared lock goes when this returns.
        Ok(_) => None,
        Err((_, _)) => Some(
            fs::read_to_string(&path)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
        ),
    }
}

fn socket_mode(socket: &Path) -> Check {
    let Ok(meta) = fs::metadata(socket) else {
        return Check::ok(
            "socket",
            format!(
                "{} absent (no daemon; `nsfail run` creates it 0600)",
                socket.display()
            ),
        );
    };
    let mode = meta.permissions().mode() & 0o777;
    let dir_open = socket
        .parent()
        .and_then(|d| fs::metadata(d).ok())
        .is_some_and(|d| d.permissions().mode() & 0o002 != 0);
    if mode & 0o077 != 0 || meta.uid() != 0 || dir_open {
        Check::fail(
            "socket",
            format!(
                "{} is mode {mode:o}, owner uid {}{}: other users could steer the daemon",
                socket.display(),
                meta.uid(),
                if dir_open {
                    ", in a world-writable directory"
                } else {
                    ""
                }
            ),
            format!(
                "chown root {0} && chmod 600 {0} (or restart the daemon, which makes it so)",
                socket.display()
            ),
        )
    } else {
        Check::ok(
            "socket",
            format!("{} is 0600, owned by root", socket.display()),
        )
    }
}

/// Runs `f` inside the ingest namespace (the config's `ingest.netns`), where the ingest
/// interface and local encoders' veths live.
fn in_ingest_netns(cfg: &Config, f: impl FnOnce(&Config) -> Check + Send + 'static) -> Check {
    let cfg2 = cfg.clone();
    match &cfg.ingest.netns {
        None => f(&cfg2),
        Some(ns) => netns::in_netns(ns, move || f(&cfg2)).unwrap_or_else(|e| {
            Check::fail(
                "ingest",
                format!("ingest namespace {ns}: {e}"),
                format!("create it (ip netns add {ns}) or correct ingest.netns"),
            )
        }),
    }
}

fn ingest_xdp(cfg: &Config) -> Check {
    let ifname = &cfg.ingest.interface;
    let name = format!("ingest {ifname}");
    match receive::native_xdp(ifname) {
        Ok(true) => Check::ok(name, "its driver runs XDP natively"),
        Ok(false) if cfg.ingest.xdp_mode == XdpMode::Generic => Check::ok(
            name,
            "no native XDP; the config asks for generic mode (slower)",
        ),
        Ok(false) => Check::fail(
            name,
            "its driver has no native XDP",
            "use a NIC whose driver supports XDP, or set ingest.xdp_mode = \"generic\" (slower)",
        ),
        Err(e) => Check::fail(
            name,
            e.to_string(),
            "correct ingest.interface (and ingest.netns), or create the interface",
        ),
    }
}

fn encoder_receives(e: &Encoder) -> Check {
    let name = format!("encoder {}", e.name);
    let Some(ifname) = e.host_interface() else {
        return Check::skip(name, "remote encoder");
    };
    let ns = e.namespace();
    if e.spawn.is_some() && netns::link(&ifname).is_err() {
        return Check::skip(name, format!("managed: `nsfail run` creates {ifname}"));
    }
    if netns::link(&ifname).is_err() {
        return Check::fail(
            name,
            format!("interface {ifname} does not exist in the ingest namespace"),
            format!("create the encoder's veth, or correct its `interface` ({ifname})"),
        );
    }
    let verdict = receive::check(&ifname, ns.as_deref());
    if verdict.can_receive {
        return Check::ok(name, verdict.reason);
    }
    let fix = match receive::peer_name(&ifname, ns.as_deref()) {
        Ok((peer, desc)) => match desc.strip_prefix("namespace ") {
            Some(ns) => format!(
                "ip netns exec {ns} ethtool -K {peer} gro on, and bring both ends up \
                 (`nsfail run` turns GRO on itself)"
            ),
            None => format!(
                "turn GRO on at {peer} in {desc}, and bring both ends up (`nsfail run` does it \
                 itself)"
            ),
        },
        Err(_) => format!("bring {ifname} and its peer up, with GRO on at the peer"),
    };
    Check::fail(name, verdict.reason, fix)
}

/// An encoder probed by UDP (or SRT) is failed over fast when its namespace answers a probe
/// of a dead port with a port unreachable at once: the kernel's default ICMP rate limit (one
/// error a second per destination) withholds most of those answers.
fn icmp_rate(e: &Encoder) -> Check {
    let name = format!("icmp {}", e.name);
    if !matches!(e.health.kind.as_str(), "udp" | "srt") {
        return Check::skip(name, "its probe does not rely on ICMP refusals");
    }
    let Some(ns) = e.namespace() else {
        return Check::skip(name, "no named namespace to read its limits in");
    };
    let v6 = e.address.is_ipv6();
    let read = move || -> Result<(u64, u64), String> {
        let get = |p: &str| {
            fs::read_to_string(p)
                .map_err(|x| format!("{p}: {x}"))
                .and_then(|s| s.trim().parse::<u64>().map_err(|x| format!("{p}: {x}")))
        };
        let limit = if v6 {
            get("/proc/sys/net/ipv6/icmp/ratelimit")?
        } else {
            get("/proc/sys/net/ipv4/icmp_ratelimit")?
        };
        Ok((limit, get("/proc/sys/net/ipv4/icmp_msgs_per_sec")?))
    };
    let interval = e.health.interval_ms.max(1);
    let sysctl = if v6 {
        "net.ipv6.icmp.ratelimit"
    } else {
        "net.ipv4.icmp_ratelimit"
    };
    if e.spawn.is_some() && !paths::netns(&ns).exists() {
        return Check::skip(name, format!("managed: `nsfail run` creates {ns}"));
    }
    match netns::in_netns(&ns, read) {
        Err(x) => Check::fail(name, x.to_string(), format!("create namespace {ns}")),
        Ok(Err(x)) => Check::fail(name, x, "check /proc/sys/net in the namespace"),
        Ok(Ok((limit, _))) if limit > interval => Check::fail(
            name,
            format!(
                "{sysctl} = {limit} ms in {ns}, above the probe interval ({interval} ms): a dead \
                 port is refused only now and then, and fails over by timeout instead"
            ),
            format!("ip netns exec {ns} sysctl -w {sysctl}=10"),
        ),
        Ok(Ok((_, per_sec))) if per_sec * interval < 1000 => Check::fail(
            name,
            format!("net.ipv4.icmp_msgs_per_sec = {per_sec} in {ns}, fewer than one per probe"),
            format!("ip netns exec {ns} sysctl -w net.ipv4.icmp_msgs_per_sec=1000"),
        ),
        Ok(Ok((limit, _))) => Check::ok(
            name,
            format!("{sysctl} = {limit} ms in {ns} (probes every {interval} ms)"),
        ),
    }
}
