//! The few operating-system calls std does not offer. The only `unsafe` in sluice.

/// Lowers the calling thread's scheduling priority (nice 10), so background work such as
/// the log writer yields the core to request handling under load. Best effort: on other
/// systems, or if refused, nothing changes.
#[allow(unsafe_code)]
pub fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority only reads its integer arguments. On Linux, PRIO_PROCESS with
        // who = 0 applies to the calling thread alone.
        let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
        if result != 0 {
            tracing::debug!("cannot lower the log writer's priority");
        }
    }
}

/// Returns freed heap memory to the operating system (glibc keeps it otherwise, so a
/// gateway's resident size would stay at its peak after a burst of streams). Cheap when
/// there is nothing to return.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes an integer and touches only the allocator's own state.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
