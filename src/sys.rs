//! The two OS calls the supervisor needs that std and tokio do not wrap.
#![allow(unsafe_code)]

/// Signals the supervisor sends its children.
#[derive(Debug, Clone, Copy)]
pub enum Sig {
    Term,
    Kill,
    Hup,
}

/// Send `sig` to process `pid`. A process that is already gone is fine.
pub fn signal(pid: u32, sig: Sig) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    let sig = match sig {
        Sig::Term => libc::SIGTERM,
        Sig::Kill => libc::SIGKILL,
        Sig::Hup => libc::SIGHUP,
    };
    // SAFETY: kill(2) has no memory-safety preconditions; a stale pid only
    // yields ESRCH.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Make the child receive SIGTERM when the supervisor dies, even by
/// SIGKILL, so no Envoy or service outlives `clawgress up`.
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// For commands that print and exit: a closed pipe (`clawgress … | head`)
/// ends the process quietly, as it does any Unix filter, instead of a
/// panic in `println!`. Servers keep Rust's default (SIGPIPE ignored).
pub fn quiet_sigpipe() {
    // SAFETY: setting a signal's disposition to the default action has no
    // preconditions and is done before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Files and sockets this process (and its children) create are its
/// owner's alone unless shared explicitly.
pub fn private_umask() {
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}
