use which::which;

/// The eBPF object depends on the `bpf-linker` binary, which cargo does not know about: rebuild
/// when it changes (as aya-template does).
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not on PATH: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
