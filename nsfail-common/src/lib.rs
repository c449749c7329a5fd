//! Types and pure packet logic shared by the kernel programs (`nsfail-ebpf`) and userspace
//! (`nsfail`). Everything here is `no_std`, allocation free, and unit-tested on the host.
#![no_std]

pub mod csum;
pub mod egress;
pub mod maps;
pub mod rewrite;
pub mod srt;

pub use egress::*;
pub use maps::*;
