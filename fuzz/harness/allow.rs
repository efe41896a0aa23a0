//! Allow lists and forward-proxy targets: the first line is the rules
//! (tab-separated, as written in `allow = [...]`); every further line is a
//! request target, tried as an absolute-form URI, as a CONNECT authority,
//! as a bare host and as a resolved address, and decided by the list.
//! Must never panic, and a decision must not depend on letter case.

use std::net::IpAddr;

use loopmux::allow::target::{of_connect, of_request};
use loopmux::allow::{parse_host, AllowList};

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (rules, targets) = text.split_once('\n').unwrap_or((&text, ""));
    let rules: Vec<String> = rules.split('\t').map(str::to_string).collect();
    let list = match AllowList::parse(&rules) {
        Ok(l) => l,
        Err(errors) => {
            for (i, reason) in errors {
                assert!(i <= rules.len(), "error index {i} out of range");
                let _ = reason;
            }
            return;
        }
    };
    let _ = list.denies_addresses();
    for line in targets.lines() {
        if let Ok(uri) = line.parse::<http::Uri>() {
            for t in [of_request(&uri), of_connect(&uri)].into_iter().flatten() {
                let verdict = list.check(&t.host, t.port);
                let _ = verdict.as_ref().map_err(ToString::to_string);
                let _ = t.to_string();
            }
        }
        if let Ok(h) = parse_host(line) {
            let lower = list.check(&h, 80).is_ok();
            if let Ok(h2) = parse_host(&line.to_ascii_uppercase()) {
                assert_eq!(
                    lower,
                    list.check(&h2, 80).is_ok(),
                    "case changed the verdict for {line:?}"
                );
            }
        }
        if let Ok(ip) = line.trim().parse::<IpAddr>() {
            let _ = list.check_resolved(ip, 443).map_err(|d| d.to_string());
        }
    }
}
