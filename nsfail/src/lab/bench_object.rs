//! The reference programs of `cargo xtask bench` (nsfail-ebpf's `nsfail-bench` object: an
//! `XDP_PASS` program, a bare DEVMAP redirect, a live-frames generator and a counting sink).
//! Built by build.rs beside the production object, which it leaves unchanged; nsfail itself
//! never loads it.

/// The `nsfail-bench` eBPF object.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nsfail-bench"));
