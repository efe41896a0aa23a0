//! Socket helpers shared by every module that opens sockets (the dialer,
//! the listeners, the demo's load driver): errno text for messages, and the
//! options socket2 has no setter for.

use std::io;
use std::os::fd::AsRawFd;

use socket2::Socket;

/// `EADDRNOTAVAIL (Cannot assign requested address)`: the symbolic name is
/// what operators grep for, the text is what they read.
pub fn errno_text(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL",
        Some(libc::EADDRINUSE) => "EADDRINUSE",
        Some(libc::ECONNREFUSED) => "ECONNREFUSED",
        Some(libc::ECONNRESET) => "ECONNRESET",
        Some(libc::ETIMEDOUT) => "ETIMEDOUT",
        Some(libc::ENETUNREACH) => "ENETUNREACH",
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH",
        Some(libc::EMFILE) => "EMFILE",
        Some(libc::ENFILE) => "ENFILE",
        Some(libc::EACCES) => "EACCES",
        Some(libc::EPERM) => "EPERM",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::EAFNOSUPPORT) => "EAFNOSUPPORT",
        _ => return e.to_string(),
    };
    let mut text = e.to_string();
    // io::Error's text ends in "(os error N)"; the name says it better.
    if let Some(i) = text.find(" (os error") {
        text.truncate(i);
    }
    format!("{name} ({text})")
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`, which socket2 has no setter for. Without
/// it, `bind(ip, 0)` reserves a port per socket across all destinations and
/// the pool of sources would exhaust itself.
pub fn set_bind_address_no_port(sock: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid fd owned by `sock`, and a c_int-sized option value.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
