//! Giving freed memory back to the operating system. glibc's allocator keeps what a burst of
//! frees released (a million expired sessions: over a gigabyte) for later reuse, so RSS would
//! stay at its peak; `malloc_trim` returns the free pages. Elsewhere this does nothing.

/// Return free heap memory to the system (glibc `malloc_trim(0)`). Costs a walk of the heap:
/// call it off the async threads, after large frees.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only releases memory the allocator holds free; it has no
        // preconditions and is thread-safe.
        unsafe {
            malloc_trim(0);
        }
    }
}
