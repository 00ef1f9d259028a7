//! The few operating-system calls std does not offer. The only `unsafe` in sluice.

/// Sets the calling thread's nice value (0 normal, 19 lowest), so background work such as
/// the log writer yields to request handling. Best effort: `false` if refused (lowering it
/// again needs `CAP_SYS_NICE` or `RLIMIT_NICE`), or on other systems.
#[allow(unsafe_code)]
pub fn set_thread_nice(nice: i32) -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority only reads its integer arguments. On Linux, PRIO_PROCESS with
        // who = 0 applies to the calling thread alone.
        let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
        if result != 0 {
            tracing::debug!("cannot set a thread's nice value to {nice}");
        }
        result == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = nice;
        false
    }
}

/// Whether a thread may lower its nice value from `from` back to `to` (a thread of this
/// process tries it, then ends).
pub fn can_lower_nice(from: i32, to: i32) -> bool {
    std::thread::Builder::new()
        .name("sluice-nice-probe".into())
        .spawn(move || set_thread_nice(from) && set_thread_nice(to))
        .ok()
        .and_then(|probe| probe.join().ok())
        .unwrap_or(false)
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

/// Raises the soft limit on open files to the hard limit: each proxied stream holds two
/// sockets, and the usual soft limit (1024) would cap a gateway at a few hundred streams.
/// Returns the limit in force.
#[allow(unsafe_code)]
// `rlim_t` is not `u64` on every platform.
#[allow(clippy::useless_conversion)]
pub fn raise_open_files_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit read and write only the struct passed to them.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return None;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        Some(u64::try_from(limit.rlim_cur).unwrap_or(u64::MAX))
    }
    #[cfg(not(unix))]
    None
}
