//! How the C library's allocator treats the large buffers of imaging (camera frames and
//! pixels, 2 to 10 MB each): set once at process start, before any thread is spawned.
//!
//! glibc serves a block at least as large as its mmap threshold with a mapping of its own,
//! which goes back to the kernel when freed. By default that threshold moves: every freed
//! mapping raises it to its own size (up to 32 MiB), so after the first frame every pixel
//! buffer comes from the per-thread heaps (arenas) instead. Those keep freed blocks for
//! later, and with eight camera threads and the imaging workers each holding blocks of a
//! slightly different size, the resident set of an 8 x 12 MP inspection ends up about
//! 15 MB above what is alive at any moment (`cargo bench --bench peak_memory`). A fixed
//! threshold keeps every large buffer in a mapping of its own: resident only while alive.
//! The price is that the kernel zeroes fresh pages for every frame (a few ms of CPU a frame).

/// The fixed mmap threshold: every block of 512 KiB or more is a mapping of its own. Well below
/// every frame and pixel buffer, and within the upper limit mallopt(3) documents for 32-bit
/// systems such as armv7 (512 KiB; 32 MiB on 64-bit ones).
pub const MMAP_THRESHOLD: usize = 512 << 10;

/// Fixes the allocator's mmap threshold at [`MMAP_THRESHOLD`]. Call it first thing in `main`
/// (and in a benchmark that stands for the daemon), before any thread is spawned. Returns
/// whether the setting took; on a C library other than glibc it does nothing and returns
/// false.
pub fn keep_large_buffers_apart() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let threshold = libc::c_int::try_from(MMAP_THRESHOLD).expect("512 KiB fits a C int");
        // SAFETY: mallopt only changes a setting of the allocator and reports whether it took;
        // M_MMAP_THRESHOLD takes a byte count.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, threshold) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_c_library_of_every_board_accepts_the_fixed_threshold() {
        assert!(keep_large_buffers_apart(), "mallopt refused an mmap threshold of {MMAP_THRESHOLD} bytes");
    }
}
