//! The daemon's heap: one malloc arena, and freed memory given back to the system after the
//! work that builds large transient values (the config's parse at start-up, a `status` or a
//! scrape of 100,000 channels: tens of MB that live only until they are sent). glibc keeps
//! such memory otherwise, and resident memory would show the largest answer ever built
//! rather than what the daemon keeps.

/// Blocks this large or larger are mapped on their own, and unmapped when freed.
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: libc::c_int = 256 << 10;

/// One malloc arena for the whole process (glibc gives threads their own otherwise, and
/// [`trim`] can then give back what any thread freed). Nothing in nsfail allocates often
/// enough for the shared arena's lock to matter. Call before any other thread exists.
///
/// Large blocks (an answer of tens of MB, a map's table) are mapped on their own, always:
/// glibc otherwise raises that threshold to 32 MiB as such blocks are freed, and from then
/// on builds them in the heap, where growing one copies it and the freed copies wait for a
/// [`trim`] (each `status` of 100,000 channels raised the peak by another 20 MiB).
pub fn one_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Gives the heap's free memory back to the system.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
