//! Reads the kernel's socket tables (`/proc/net/tcp{,6}`) to count sockets
//! by state and destination: how the lab measures TIME_WAIT, and the base
//! of the `diagnose` report.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// TCP states as numbered in `include/net/tcp_states.h`.
pub const ESTABLISHED: u8 = 0x01;
pub const TIME_WAIT: u8 = 0x06;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
}

fn parse_addr(hex: &str) -> Option<SocketAddr> {
    let (ip, port) = hex.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        // The kernel prints each 32-bit word in host (little-endian) order.
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_le_bytes(),
        )),
        32 => {
            let mut b = [0u8; 16];
            for w in 0..4 {
                let word = u32::from_str_radix(&ip[w * 8..w * 8 + 8], 16).ok()?;
                b[w * 4..w * 4 + 4].copy_from_slice(&word.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Parses the text of `/proc/net/tcp` or `/proc/net/tcp6`; malformed lines
/// are skipped.
pub fn parse_table(text: &str) -> Vec<SockEntry> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _sl = f.next()?;
            let local = parse_addr(f.next()?)?;
            let remote = parse_addr(f.next()?)?;
            let state = u8::from_str_radix(f.next()?, 16).ok()?;
            Some(SockEntry {
                local,
                remote,
                state,
            })
        })
        .collect()
}

/// Reads both tables of the calling thread's network namespace.
pub fn read_sockets() -> std::io::Result<Vec<SockEntry>> {
    let mut all = parse_table(&std::fs::read_to_string("/proc/thread-self/net/tcp")?);
    if let Ok(t6) = std::fs::read_to_string("/proc/thread-self/net/tcp6") {
        all.extend(parse_table(&t6));
    }
    Ok(all)
}

/// Sockets in `state` whose remote end is `remote`.
pub fn count_toward(entries: &[SockEntry], remote: SocketAddr, state: u8) -> usize {
    entries
        .iter()
        .filter(|e| e.remote == remote && e.state == state)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v4_and_v6_lines() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0B0012C6:9C41 020012C6:2329 06 00000000:00000000 03:00000F9E 00000000     0        0 0 3 0000000000000000\n";
        let e = parse_table(v4);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].local, "198.18.0.11:40001".parse().unwrap());
        assert_eq!(e[0].remote, "198.18.0.2:9001".parse().unwrap());
        assert_eq!(
            count_toward(&e, "198.18.0.2:9001".parse().unwrap(), TIME_WAIT),
            1
        );
        let v6 = "  sl  local_address                         remote_address                        st\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:D431 01 0\n";
        let e = parse_table(v6);
        assert_eq!(e[0].local, "[::1]:8080".parse().unwrap());
        assert_eq!(e[0].state, ESTABLISHED);
    }
}
