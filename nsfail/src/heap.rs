//! The daemon's heap: one malloc arena, and freed memory given back to the system after the
//! work that builds large transient values (the config's parse at start-up, a `status` or a
//! scrape of 100,000 channels: tens of MB that live only until they are sent). glibc keeps
//! such memory otherwise, and resident memory would show the largest answer ever built
//! rather than what the daemon keeps.

/// One malloc arena for the whole process (glibc gives threads their own otherwise, and
/// [`trim`] can then give back what any thread freed). Nothing in nsfail allocates often
/// enough for the shared arena's lock to matter. Call before any other thread exists.
pub fn one_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
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
