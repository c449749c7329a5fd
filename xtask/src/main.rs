//! Build, run and test orchestration for nsfail.
//!
//! `setup` installs what the build and the tests need and a fresh machine lacks (nightly
//! rust-src, bpf-linker, a bpffs mount, Debian packages); every other subcommand runs it first,
//! then wraps the cargo invocations that the eBPF crate makes unusual: userspace builds exclude
//! `nsfail-ebpf` (nsfail/build.rs builds it), and the kernel side is linted with nightly.

use std::{
    convert::Infallible,
    env,
    ffi::{OsStr, OsString},
    fs, iter,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{Command, ExitCode, ExitStatus, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// The bpf-linker release that loads the nightly's own LLVM 22 (`rust-llvm-22`); newer releases
/// want a system LLVM 23.
const BPF_LINKER_VERSION: &str = "0.10.4";
const BPF_LINKER_INSTALL: &[&str] = &[
    "+nightly",
    "install",
    "bpf-linker",
    "--version",
    BPF_LINKER_VERSION,
    "--locked",
    "--no-default-features",
    "--features",
    "rust-llvm-22",
];
const BPFFS: &str = "/sys/fs/bpf";
/// cargo-deb builds the Debian package (`cargo xtask package`).
const CARGO_DEB_VERSION: &str = "3.8.0";
/// Tools the integration tests, the demo lab and the benchmarks run (nftables: the DNAT
/// variant of `bench forward`; systemd: `systemd-analyze verify` of the unit file; bpftool:
/// the fault test that writes the pinned maps as a second, foreign writer would; bird2: the
/// anycast test).
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "srt-tools",
    "ffmpeg",
    "socat",
    "tcpdump",
    "iputils-ping",
    "curl",
    "nftables",
    "systemd",
    "bpftool",
    // protoc: the etcd v3 client (`etcd-client`) compiles etcd's protobuf files at build time.
    "protobuf-compiler",
    // etcd itself, for the cluster tests and `nsfail lab cluster` (issue 17).
    "etcd-server",
    // BIRD 2, for the anycast tests and `nsfail lab cluster` (issue 17): hosts announcing
    // the ingest addresses to a router over BGP with BFD.
    "bird2",
];
/// Userspace crates only: a bare `--workspace` would also build the eBPF crate for the host.
const USERSPACE: &[&str] = &["--workspace", "--exclude", "nsfail-ebpf"];

#[derive(Parser)]
#[command(about = "Set up, build, run, test and lint nsfail")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (nightly rust-src, bpf-linker, bpffs mount, Debian packages).
    Setup,
    /// Set up, then build the workspace; nsfail/build.rs builds the eBPF object.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Set up, then run every test (needs root); ARGS go to the test binaries.
    Test {
        /// Arguments for the test binaries (a name filter, --nocapture, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Set up, build, then run nsfail with ARGS (default: `lab run`, the demo lab).
    Run {
        /// Arguments for nsfail; put them after `--` when they start with `-`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Check formatting and run clippy on the userspace crates and on the eBPF crate.
    Lint,
    /// Set up, build (release) and make the Debian package with cargo-deb: the binary, the
    /// systemd unit, an example config, shell completions and the man page; written to
    /// target/debian/ unless --output says otherwise.
    Package {
        /// The cargo profile to package (`dev`: the debug build, for tests).
        #[arg(long, default_value = "release")]
        profile: String,
        /// Package the binary already built with that profile; build nothing.
        #[arg(long)]
        no_build: bool,
        /// The package's version, with its revision (default: the crate's, revision 1).
        #[arg(long)]
        deb_version: Option<String>,
        /// Where to write the .deb (a file or a directory).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Set up, then run the benchmarks (needs root) in a release build; prints a table and
    /// writes NAME.json and NAME.svg under target/bench/.
    Bench {
        /// The benchmark to run: prog, scale, forward, controller, failover, all (default: all),
        /// or controller-startup or cluster (not in all).
        name: Option<String>,
        /// Repetitions per figure (at least 5; default 7).
        #[arg(long)]
        reps: Option<u32>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    try_main(cli).unwrap_or_else(|err| {
        // One line with the whole context chain; a backtrace would only bury it.
        eprintln!("error: {err:#}");
        ExitCode::FAILURE
    })
}

fn try_main(cli: Cli) -> Result<ExitCode> {
    let xtask = Xtask::new()?;
    match cli.command {
        Cmd::Setup => xtask.setup()?,
        Cmd::Build { release } => {
            xtask.setup()?;
            xtask.build(release)?;
        }
        Cmd::Test { args } => return xtask.test(&args),
        Cmd::Run { args } => match xtask.run_nsfail(&args)? {},
        Cmd::Lint => {
            xtask.setup()?;
            xtask.lint()?;
        }
        Cmd::Bench { name, reps } => return xtask.bench(name.as_deref(), reps),
        Cmd::Package {
            profile,
            no_build,
            deb_version,
            output,
        } => xtask.package(
            &profile,
            no_build,
            deb_version.as_deref(),
            output.as_deref(),
        )?,
    }
    Ok(ExitCode::SUCCESS)
}

struct Xtask {
    /// The workspace root, where every cargo command runs.
    root: PathBuf,
    /// PATH for child processes: the caller's, with cargo's bin directory first, so that the
    /// bpf-linker that setup installs there is found (and wins) even in a shell without it.
    path: OsString,
}

impl Xtask {
    fn new() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest directory has no parent")?
            .to_path_buf();
        let cargo_bin = cargo_home()?.join("bin");
        let current = env::var_os("PATH").unwrap_or_default();
        let path = if env::split_paths(&current).next().as_ref() == Some(&cargo_bin) {
            current
        } else {
            env::join_paths(iter::once(cargo_bin).chain(env::split_paths(&current)))
                .context("building PATH with cargo's bin directory")?
        };
        Ok(Self { root, path })
    }

    /// A command that runs in the workspace root with our PATH.
    fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.root).env("PATH", &self.path);
        cmd
    }

    fn cargo<'a>(&self, args: impl IntoIterator<Item = &'a str>) -> Command {
        let mut cmd = self.cmd("cargo");
        cmd.args(args);
        cmd
    }

    fn find(&self, program: &str) -> Option<PathBuf> {
        which::which_in(program, Some(&self.path), &self.root).ok()
    }

    fn setup(&self) -> Result<()> {
        self.nightly().context("setting up the nightly toolchain")?;
        self.bpf_linker().context("setting up bpf-linker")?;
        self.bpffs().context("mounting bpffs")?;
        self.debian_packages()
            .context("installing Debian packages")?;
        self.cargo_deb().context("setting up cargo-deb")?;
        Ok(())
    }

    /// cargo-deb, for `cargo xtask package` and the package test.
    fn cargo_deb(&self) -> Result<()> {
        let what = format!("cargo-deb {CARGO_DEB_VERSION}");
        if let Some(version) = probe(self.cmd("cargo-deb").arg("--version")) {
            report(&what, &format!("present ({})", version.trim()));
            return Ok(());
        }
        report(&what, "missing, installing (takes a few minutes)");
        run(&mut self.cargo([
            "install",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
            "--locked",
        ]))
    }

    /// The Debian package: builds (unless `no_build`), generates the completions and the man
    /// page with the built binary itself (so they are what it accepts), then runs cargo-deb,
    /// whose asset paths under target/release/ stand for the profile's directory.
    fn package(
        &self,
        profile: &str,
        no_build: bool,
        deb_version: Option<&str>,
        output: Option<&Path>,
    ) -> Result<()> {
        if no_build {
            self.cargo_deb()?;
        } else {
            self.setup()?;
            run(&mut self.cargo([
                "build",
                "--profile",
                profile,
                "-p",
                "nsfail",
                "--bin",
                "nsfail",
            ]))?;
        }
        let dir = self
            .target_dir()?
            .join(if profile == "dev" { "debug" } else { profile });
        let binary = dir.join("nsfail");
        let generated = dir.join("package");
        fs::create_dir_all(&generated)
            .with_context(|| format!("creating {}", generated.display()))?;
        for (shell, file) in [
            ("bash", "nsfail.bash"),
            ("zsh", "_nsfail"),
            ("fish", "nsfail.fish"),
        ] {
            let script = capture(self.cmd(&binary).args(["completions", shell]))?;
            fs::write(generated.join(file), script)?;
        }
        let man = generated.join("nsfail.1");
        fs::write(&man, capture_bytes(self.cmd(&binary).arg("man"))?)?;
        // -n: no name or time stamp inside, so the same page compresses the same.
        run(self.cmd("gzip").args(["-9nf"]).arg(&man))?;
        let mut cmd = self.cargo(["deb", "-p", "nsfail", "--no-build", "--profile", profile]);
        if profile == "dev" {
            // A test's package: quick to compress.
            cmd.arg("--fast");
        }
        if let Some(v) = deb_version {
            cmd.args(["--deb-version", v]);
        }
        if let Some(out) = output {
            cmd.arg("--output").arg(out);
        }
        run(&mut cmd)
    }

    /// The eBPF crate is built with nightly's `-Z build-std=core`, which needs rust-src.
    fn nightly(&self) -> Result<()> {
        let toolchains = capture(self.cmd("rustup").args(["toolchain", "list"]))
            .context("rustup is required (https://rustup.rs)")?;
        if toolchains.lines().any(is_nightly) {
            report("nightly toolchain", "present");
        } else {
            report("nightly toolchain", "missing, installing");
            run(self.cmd("rustup").args(["toolchain", "install", "nightly"]))?;
        }

        let components = capture(self.cmd("rustup").args([
            "component",
            "list",
            "--toolchain",
            "nightly",
            "--installed",
        ]))?;
        let has_rust_src = components
            .lines()
            .any(|line| line.split_whitespace().next() == Some("rust-src"));
        if has_rust_src {
            report("rust-src (nightly)", "present");
        } else {
            report("rust-src (nightly)", "missing, installing");
            run(self.cmd("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))?;
        }
        Ok(())
    }

    fn bpf_linker(&self) -> Result<()> {
        let what = format!("bpf-linker {BPF_LINKER_VERSION}");
        let state = match self.bpf_linker_version() {
            Some((path, Some(version))) if version == BPF_LINKER_VERSION => {
                report(&what, &format!("present ({})", path.display()));
                return Ok(());
            }
            Some((path, Some(version))) => format!("found {version} at {}", path.display()),
            Some((path, None)) => format!("{} does not report a version", path.display()),
            None => "missing".to_owned(),
        };
        report(&what, &format!("{state}, installing (takes a few minutes)"));
        run(&mut self.cargo(BPF_LINKER_INSTALL.iter().copied()))?;
        match self.bpf_linker_version() {
            Some((_, Some(version))) if version == BPF_LINKER_VERSION => Ok(()),
            Some((path, version)) => bail!(
                "after installing, {} reports version {}, not {BPF_LINKER_VERSION}: it shadows \
                 the one in cargo's bin directory on PATH",
                path.display(),
                version.as_deref().unwrap_or("(none)")
            ),
            None => bail!("bpf-linker is still not on PATH after installing it"),
        }
    }

    /// Where bpf-linker is on our PATH and the version it reports (`bpf-linker 0.10.4`).
    fn bpf_linker_version(&self) -> Option<(PathBuf, Option<String>)> {
        let path = self.find("bpf-linker")?;
        let version = probe(self.cmd(&path).arg("--version"))
            .and_then(|out| out.split_whitespace().nth(1).map(str::to_owned));
        Some((path, version))
    }

    /// nsfail pins its maps and links in bpffs, and the tests do too.
    fn bpffs(&self) -> Result<()> {
        let what = format!("bpffs at {BPFFS}");
        let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
        // The last mount on a mount point is the one that is visible there.
        let fstype = mounts
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let (_device, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
                (target == BPFFS).then_some(fstype)
            })
            .next_back();
        if fstype == Some("bpf") {
            report(&what, "mounted");
            return Ok(());
        }
        if !is_root() {
            report(&what, "NOT mounted; mounting needs root, skipped");
            return Ok(());
        }
        report(&what, "not mounted, mounting");
        run(self.cmd("mount").args(["-t", "bpf", "bpf", BPFFS]))
    }

    fn debian_packages(&self) -> Result<()> {
        let what = format!("Debian packages ({})", DEBIAN_PACKAGES.join(" "));
        if self.find("dpkg").is_none() {
            report(
                &what,
                "no dpkg here (not Debian?), install them yourself; skipped",
            );
            return Ok(());
        }
        let missing: Vec<&str> = DEBIAN_PACKAGES
            .iter()
            .copied()
            .filter(|package| !self.dpkg_installed(package))
            .collect();
        if missing.is_empty() {
            report(&what, "present");
            return Ok(());
        }
        let missing_list = missing.join(" ");
        if !is_root() {
            report(
                &what,
                &format!("{missing_list} missing; installing needs root, skipped"),
            );
            return Ok(());
        }
        report(&what, &format!("{missing_list} missing, installing"));
        let apt_get = || {
            let mut cmd = self.cmd("apt-get");
            cmd.env("DEBIAN_FRONTEND", "noninteractive");
            cmd
        };
        run(apt_get().arg("update"))?;
        run(apt_get()
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing))
    }

    /// `dpkg -s` also succeeds for removed packages whose config files remain: read the status.
    fn dpkg_installed(&self, package: &str) -> bool {
        probe(self.cmd("dpkg").args(["-s", package])).is_some_and(|out| {
            out.lines()
                .any(|line| line.trim() == "Status: install ok installed")
        })
    }

    fn build(&self, release: bool) -> Result<()> {
        let mut cmd = self.cargo(iter::once("build").chain(USERSPACE.iter().copied()));
        if release {
            cmd.arg("--release");
        }
        run(&mut cmd)
    }

    fn test(&self, args: &[OsString]) -> Result<ExitCode> {
        if !is_root() {
            bail!(
                "the tests create network namespaces and load BPF programs, so they need root: \
                 run `cargo xtask test` as root"
            );
        }
        self.setup()?;
        let mut cmd = self.cargo(
            iter::once("test")
                .chain(USERSPACE.iter().copied())
                .chain(["--", "--test-threads=2"]),
        );
        cmd.args(args);
        Ok(exit_code(status(&mut cmd)?))
    }

    /// Runs nsfail-bench (release build: debug numbers would mean nothing) and passes its exit
    /// status on: 1 only when a benchmark could not run, never for a missed target.
    fn bench(&self, name: Option<&str>, reps: Option<u32>) -> Result<ExitCode> {
        if !is_root() {
            bail!(
                "the benchmarks create network namespaces and load BPF programs, so they need \
                 root: run `cargo xtask bench` as root"
            );
        }
        self.setup()?;
        // The failover and controller benchmarks run the daemon itself: its release binary.
        status(&mut self.cargo(["build", "--release", "-p", "nsfail", "--bin", "nsfail"]))?;
        let out = self.target_dir()?.join("bench");
        let mut cmd = self.cargo([
            "run",
            "--release",
            "-p",
            "nsfail-tests",
            "--bin",
            "nsfail-bench",
            "--",
        ]);
        cmd.args(name);
        if let Some(reps) = reps {
            cmd.args(["--reps", &reps.to_string()]);
        }
        cmd.arg("--out").arg(&out);
        Ok(exit_code(status(&mut cmd)?))
    }

    fn target_dir(&self) -> Result<PathBuf> {
        Ok(cargo_metadata::MetadataCommand::new()
            .current_dir(&self.root)
            .no_deps()
            .exec()
            .context("reading the target directory from cargo metadata")?
            .target_directory
            .into_std_path_buf())
    }

    /// Replaces this process with nsfail (cargo runs xtask the same way), so nsfail's exit
    /// status is ours and Ctrl-C reaches it directly. Returns only on failure.
    fn run_nsfail(&self, args: &[OsString]) -> Result<Infallible> {
        self.setup()?;
        self.build(false)?;
        let binary = self.target_dir()?.join("debug").join("nsfail");
        // Unlike cargo, nsfail runs in the caller's directory: relative paths (--config) mean
        // what the caller meant.
        let mut cmd = Command::new(&binary);
        cmd.env("PATH", &self.path);
        if args.is_empty() {
            cmd.args(["lab", "run"]);
        } else {
            cmd.args(args);
        }
        eprintln!("+ {}", show(&cmd));
        Err(cmd.exec()).with_context(|| format!("running {}", binary.display()))
    }

    /// Runs every check, then fails if any failed, so one run shows all problems.
    fn lint(&self) -> Result<()> {
        let checks: [&[&str]; 3] = [
            &["fmt", "--all", "--", "--check"],
            &[
                "clippy",
                "--workspace",
                "--exclude",
                "nsfail-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            &[
                "+nightly",
                "clippy",
                "-p",
                "nsfail-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
                "--",
                "-D",
                "warnings",
            ],
        ];
        let mut failed = Vec::new();
        for check in checks {
            let mut cmd = self.cargo(check.iter().copied());
            if !status(&mut cmd)?.success() {
                failed.push(show(&cmd));
            }
        }
        if !failed.is_empty() {
            bail!("lint failed:\n  {}", failed.join("\n  "));
        }
        Ok(())
    }
}

fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(home.into());
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// A `rustup toolchain list` line naming the plain `nightly` channel (not a dated nightly).
fn is_nightly(line: &str) -> bool {
    let name = line.split_whitespace().next().unwrap_or_default();
    name == "nightly"
        || name
            .strip_prefix("nightly-")
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn report(what: &str, state: &str) {
    eprintln!("setup: {what}: {state}");
}

/// The command line as a shell user would type it (without the environment).
fn show(cmd: &Command) -> String {
    iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with inherited stdio after echoing it.
fn status(cmd: &mut Command) -> Result<ExitStatus> {
    eprintln!("+ {}", show(cmd));
    cmd.status()
        .with_context(|| format!("failed to start `{}`", show(cmd)))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// The stdout of a query command that must succeed.
fn capture(cmd: &mut Command) -> Result<String> {
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("failed to start `{}`", show(cmd)))?;
    if !output.status.success() {
        bail!("`{}` failed ({})", show(cmd), output.status);
    }
    String::from_utf8(output.stdout).with_context(|| format!("output of `{}`", show(cmd)))
}

/// The stdout, as bytes, of a command that must succeed.
fn capture_bytes(cmd: &mut Command) -> Result<Vec<u8>> {
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("failed to start `{}`", show(cmd)))?;
    if !output.status.success() {
        bail!("`{}` failed ({})", show(cmd), output.status);
    }
    Ok(output.stdout)
}

/// The stdout of a probe, or None when it cannot start or fails (the thing probed is absent).
fn probe(cmd: &mut Command) -> Option<String> {
    let output = cmd.stderr(Stdio::null()).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The child's exit status as ours; a child killed by a signal gives 128 + signal, as in a shell.
fn exit_code(status: ExitStatus) -> ExitCode {
    let code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
