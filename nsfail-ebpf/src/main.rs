//! nsfail's kernel programs: the XDP ingest redirector and the TC return path.
//!
//! Map contents and layouts are defined in `nsfail-common`; the userspace `Dataplane` type is
//! the only writer of configuration maps. Counters are per CPU and summed by userspace.
#![no_std]
#![no_main]

mod egress;
mod ingress;
mod maps;
mod srt;
mod trace;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
