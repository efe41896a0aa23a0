//! `loopmux diagnose` on arbitrary `/proc` text. Input: up to six lines of
//! sysctls (ip_local_port_range, ip_local_reserved_ports, tcp_tw_reuse,
//! tcp_timestamps, tcp_fin_timeout, tcp_max_tw_buckets), a blank line, then
//! a `/proc/net/tcp{,6}` table. The whole pipeline runs: parse, analyze,
//! render. Must never panic.

use loopmux::diagnose::{analyze, parse_table, Sysctls};

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (sys, table) = text.split_once("\n\n").unwrap_or(("", &text));
    let lines: Vec<&str> = sys.lines().collect();
    let line = |i: usize| lines.get(i).map(|s| s.to_string());
    let sysctls = Sysctls::parse(lines.first().copied().unwrap_or(""), |name| match name {
        "ip_local_reserved_ports" => line(1),
        "tcp_tw_reuse" => line(2),
        "tcp_timestamps" => line(3),
        "tcp_fin_timeout" => line(4),
        "tcp_max_tw_buckets" => line(5),
        _ => None,
    });
    let _ = sysctls.usable_ports();
    let entries = parse_table(table);
    let report = analyze(&entries, sysctls);
    let _ = report.render(10);
}
