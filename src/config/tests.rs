use super::*;

fn load(toml: &str) -> Result<Config, ConfigError> {
    load_str(toml, HashMap::new())
}

fn problems(toml: &str) -> String {
    match load(toml) {
        Ok(_) => panic!("config was accepted:\n{toml}"),
        Err(e) => e.to_string(),
    }
}

const MINIMAL: &str = r#"
[[listener]]
name = "a"
bind = "127.0.0.1:18080"
upstream = "u"

[[upstream]]
name = "u"
endpoints = ["127.0.0.1:9000"]
"#;

#[test]
fn minimal_config_gets_defaults() {
    let c = load(MINIMAL).unwrap();
    assert_eq!(c.listeners.len(), 1);
    assert!(c.listeners[0].mode.http().unwrap().client_keepalive);
    let u = &c.upstreams[0];
    assert_eq!(u.max_connections, defaults::MAX_CONNECTIONS);
    assert_eq!(u.queue_timeout, defaults::QUEUE_TIMEOUT);
    assert_eq!(u.host_header, HostHeader::Keep);
    assert!(u.source_addresses.is_empty());
}

#[test]
fn unknown_key_is_named() {
    let e = problems(&MINIMAL.replace("endpoints =", "max_conections = 3\nendpoints ="));
    assert!(e.contains("max_conections"), "{e}");
}

#[test]
fn bad_duration_is_named() {
    let e = problems(&format!("{MINIMAL}queue_timeout = \"5 parsecs\"\n"));
    assert!(e.contains("upstream[0].queue_timeout"), "{e}");
    let e = problems(&format!("{MINIMAL}idle_timeout = \"0s\"\n"));
    assert!(
        e.contains("upstream[0].idle_timeout: must be greater than zero"),
        "{e}"
    );
}

#[test]
fn bad_socket_address_is_named() {
    let e = problems(&MINIMAL.replace("127.0.0.1:18080", "localhost:http"));
    assert!(e.contains("listener[0].bind"), "{e}");
}

#[test]
fn bad_endpoint_is_named() {
    let e = problems(&MINIMAL.replace("127.0.0.1:9000", "no-port-here"));
    assert!(e.contains("upstream[0].endpoints[0]"), "{e}");
    let e = problems(&MINIMAL.replace("127.0.0.1:9000", "bad_host!:80"));
    assert!(e.contains("upstream[0].endpoints[0]"), "{e}");
}

#[test]
fn dns_and_v6_endpoints_parse() {
    assert_eq!(
        parse_endpoint("API.example.com:443").unwrap(),
        EndpointAddr::Name {
            host: "api.example.com".into(),
            port: 443
        }
    );
    assert_eq!(
        parse_endpoint("[::1]:80").unwrap(),
        EndpointAddr::Ip("[::1]:80".parse().unwrap())
    );
}

#[test]
fn missing_upstream_is_named() {
    let e = problems(&MINIMAL.replace("upstream = \"u\"", "upstream = \"nope\""));
    assert!(
        e.contains("listener[0].upstream: no [[upstream]] is named `nope`"),
        "{e}"
    );
}

#[test]
fn duplicate_names_and_binds_are_errors() {
    let twice = format!(
        "{MINIMAL}\n[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:18080\"\nupstream = \"u\"\n\n[[upstream]]\nname = \"u\"\nendpoints = [\"127.0.0.1:9001\"]\n"
    );
    let e = problems(&twice);
    assert!(e.contains("listener[1].name"), "{e}");
    assert!(e.contains("listener[1].bind"), "{e}");
    assert!(e.contains("upstream[1].name"), "{e}");
}

#[test]
fn remote_bind_needs_allow_remote() {
    let remote = MINIMAL.replace("127.0.0.1:18080", "0.0.0.0:18080");
    let e = problems(&remote);
    assert!(
        e.contains("listener[0].bind") && e.contains("allow_remote"),
        "{e}"
    );
    let allowed = remote.replace(
        "upstream = \"u\"\n",
        "upstream = \"u\"\nallow_remote = true\n",
    );
    assert!(load(&allowed).is_ok());
}

#[test]
fn bad_source_address_is_named() {
    let e = problems(&format!(
        "[egress]\nsource_addresses = [\"127.0.0.2\", \"nope\"]\n{MINIMAL}"
    ));
    assert!(e.contains("egress.source_addresses[1]"), "{e}");
}

#[test]
fn upstream_sources_override_egress() {
    let c = load(&format!(
        "[egress]\nsource_addresses = [\"127.0.0.2\"]\n{MINIMAL}source_addresses = [\"::1\"]\n"
    ))
    .unwrap();
    assert_eq!(
        c.upstreams[0].source_addresses,
        vec!["::1".parse::<std::net::IpAddr>().unwrap()]
    );
}

#[test]
fn unsupported_mode_is_named() {
    let e = problems(&MINIMAL.replace("upstream = \"u\"\n", "upstream = \"u\"\nmode = \"smtp\"\n"));
    assert!(e.contains("listener[0].mode"), "{e}");
}

#[test]
fn env_overrides_file() {
    let env = HashMap::from([
        (
            "LOOPMUX__ADMIN__BIND".to_string(),
            "127.0.0.1:9999".to_string(),
        ),
        (
            "LOOPMUX__EGRESS__SOURCE_ADDRESSES".to_string(),
            "127.0.0.5,127.0.0.6".to_string(),
        ),
        ("UNRELATED".to_string(), "x".to_string()),
    ]);
    let c = load_str(
        &format!("[admin]\nbind = \"127.0.0.1:9901\"\n{MINIMAL}"),
        env,
    )
    .unwrap();
    assert_eq!(c.admin.unwrap().bind, "127.0.0.1:9999".parse().unwrap());
    assert_eq!(c.upstreams[0].source_addresses.len(), 2);
}

#[test]
fn fixed_host_header() {
    let c = load(&format!("{MINIMAL}host_header = \"api.internal\"\n")).unwrap();
    assert_eq!(
        c.upstreams[0].host_header,
        HostHeader::Fixed(http::HeaderValue::from_static("api.internal"))
    );
}

#[test]
fn every_unknown_key_is_reported_with_its_dotted_path() {
    let toml = MINIMAL
        .replace("endpoints =", "max_conections = 4\nendpoints =")
        .replace("upstream = \"u\"\n", "upstream = \"u\"\nbnd = \"x\"\n")
        + "[listner]\nname = \"x\"\n";
    let e = problems(&toml);
    for key in ["upstream[0].max_conections", "listener[0].bnd", "listner"] {
        assert!(e.contains(&format!("{key}: unknown key")), "{key} in: {e}");
    }
}

#[test]
fn a_value_of_the_wrong_type_is_an_error_not_converted() {
    let toml = MINIMAL
        .replace(
            "upstream = \"u\"\n",
            "upstream = \"u\"\nclient_keepalive = \"no\"\nmax_clients = -3\n",
        )
        .replace("endpoints =", "max_connections = \"8\"\nendpoints =");
    let e = problems(&toml);
    for want in [
        "listener[0].client_keepalive: expected true or false, found the string \"no\"",
        "listener[0].max_clients: expected a whole number, found the integer -3",
        "upstream[0].max_connections: expected a whole number, found the string \"8\"",
    ] {
        assert!(e.contains(want), "{want} in: {e}");
    }
    let e = problems(&MINIMAL.replace("[\"127.0.0.1:9000\"]", "\"127.0.0.1:9000\""));
    assert!(
        e.contains("upstream[0].endpoints: expected a list of strings"),
        "{e}"
    );
}

#[test]
fn endpoint_port_zero_is_rejected_for_addresses_too() {
    let e = problems(&MINIMAL.replace("127.0.0.1:9000", "127.0.0.1:0"));
    assert!(e.contains("upstream[0].endpoints[0]: port 0"), "{e}");
}

#[test]
fn counts_have_sane_ranges() {
    let e = problems(&MINIMAL.replace(
        "upstream = \"u\"\n",
        "upstream = \"u\"\nmax_clients = 9223372036854775807\n",
    ));
    assert!(
        e.contains("listener[0].max_clients") && e.contains("out of range"),
        "{e}"
    );
    let e = problems(&MINIMAL.replace("endpoints =", "max_connections = 0\nendpoints ="));
    assert!(e.contains("upstream[0].max_connections"), "{e}");
}

#[test]
fn a_config_without_listeners_is_an_error() {
    for text in [
        "",
        "[[upstream]]\nname = \"u\"\nendpoints = [\"127.0.0.1:9000\"]\n",
    ] {
        let e = problems(text);
        assert!(
            e.contains("listener: at least one [[listener]] (or a [serve] section) is required"),
            "{e}"
        );
    }
}

#[test]
fn new_keys_parse_with_defaults() {
    let c = load(MINIMAL).unwrap();
    assert_eq!(
        c.listeners[0].mode.http().unwrap().request_buffer_bytes,
        defaults::REQUEST_BUFFER_BYTES
    );
    assert_eq!(
        c.listeners[0].mode.http().unwrap().body_timeout,
        defaults::BODY_TIMEOUT
    );
    assert_eq!(c.upstreams[0].body_timeout, defaults::BODY_TIMEOUT);
    let c = load(
        &MINIMAL
            .replace(
                "upstream = \"u\"\n",
                "upstream = \"u\"\nrequest_buffer_bytes = 0\nbody_timeout = \"5s\"\n",
            )
            .replace("endpoints =", "body_timeout = \"7s\"\nendpoints ="),
    )
    .unwrap();
    assert_eq!(c.listeners[0].mode.http().unwrap().request_buffer_bytes, 0);
    assert_eq!(
        c.listeners[0].mode.http().unwrap().body_timeout,
        std::time::Duration::from_secs(5)
    );
    assert_eq!(
        c.upstreams[0].body_timeout,
        std::time::Duration::from_secs(7)
    );
}

#[test]
fn env_values_are_checked_like_file_values() {
    let env =
        |v: &str| HashMap::from([("LOOPMUX__PROCESS__DRAIN_TIMEOUT".to_string(), v.to_string())]);
    let c = load_str(MINIMAL, env("5s")).unwrap();
    assert_eq!(c.drain_timeout, std::time::Duration::from_secs(5));
    let e = load_str(MINIMAL, env("banana")).unwrap_err().to_string();
    assert!(e.contains("process.drain_timeout"), "{e}");
}

#[test]
fn env_names_with_list_indexes_are_refused_not_expanded() {
    // Found by fuzzing: the config crate grew a list to this index.
    let env = HashMap::from([("LOOPMUX__a[79999999999]".to_string(), "1".to_string())]);
    let e = load_str(MINIMAL, env).unwrap_err().to_string();
    assert!(
        e.contains("environment variable LOOPMUX__a[79999999999]"),
        "{e}"
    );
    let env = HashMap::from([("LOOPMUX__NOPE".to_string(), "1".to_string())]);
    let e = load_str(MINIMAL, env).unwrap_err().to_string();
    assert!(e.contains("nope: unknown key"), "{e}");
}

#[test]
fn quoted_keys_with_brackets_are_refused_not_expanded() {
    // Found by fuzzing: the loader read this key as a list index.
    let e = problems("[\"51[1333333333333 ][-0][0]\"]\n");
    assert!(e.contains("is not a valid key name"), "{e}");
    let e = problems(&format!("{MINIMAL}\"a.b\" = 1\n"));
    assert!(e.contains("is not a valid key name"), "{e}");
}

const FORWARD: &str = r#"
[[listener]]
name = "f"
bind = "127.0.0.1:18081"
mode = "forward"
allow = ["api.example.com:80", "*.partner.net:443", "198.18.0.0/15:*"]
"#;

#[test]
fn a_forward_listener_needs_no_upstream_and_gets_template_defaults() {
    let c = load(FORWARD).unwrap();
    let l = &c.listeners[0];
    assert_eq!(l.mode.kind(), Mode::Forward);
    assert_eq!(l.mode.upstream(), None);
    let f = l.mode.forward().unwrap();
    assert_eq!(f.allow.len(), 3);
    assert_eq!(f.max_origins, defaults::MAX_ORIGINS);
    assert!(!f.via);
    assert_eq!(f.origin.max_connections, defaults::MAX_CONNECTIONS);
    assert!(f.origin.tls.is_none());
}

#[test]
fn forward_defaults_set_the_origin_pools() {
    let c = load(&format!(
        "{FORWARD}\n[forward_defaults]\nmax_connections = 2\nidle_timeout = \"5s\"\n"
    ))
    .unwrap();
    let f = c.listeners[0].mode.forward().unwrap();
    assert_eq!(f.origin.max_connections, 2);
    assert_eq!(f.origin.idle_timeout, std::time::Duration::from_secs(5));
}

#[test]
fn forward_mistakes_are_named() {
    let cases: &[(&str, &str)] = &[
        (
            "\n[forward_defaults]\nendpoints = [\"a:1\"]\n",
            "forward_defaults.endpoints: is not used here",
        ),
        (
            "\n[forward_defaults]\nmax_connections = 0\n",
            "forward_defaults.max_connections",
        ),
        (
            "\n[forward_defaults]\ntls = { server_name = \"x\" }\n",
            "forward_defaults.tls.server_name",
        ),
    ];
    for (extra, want) in cases {
        let e = problems(&format!("{FORWARD}{extra}"));
        assert!(e.contains(want), "{want}: {e}");
    }
    let listener_cases: &[(&str, &str, &str)] = &[
        ("allow = [", "allow = [\"nope\", ", "listener[0].allow[0]"),
        (
            "mode = \"forward\"\n",
            "mode = \"forward\"\nupstream = \"u\"\n",
            "listener[0].upstream: does not apply",
        ),
        (
            "mode = \"forward\"\n",
            "mode = \"forward\"\nmax_origins = 0\n",
            "listener[0].max_origins",
        ),
        (
            "mode = \"forward\"\n",
            "mode = \"forward\"\noriginate_tls = [\"a.b\"]\n",
            "listener[0].originate_tls[0]",
        ),
    ];
    for (from, to, want) in listener_cases {
        let e = problems(&FORWARD.replace(from, to));
        assert!(e.contains(want), "{want}: {e}");
    }
    let e = problems(&FORWARD.replace(
        "allow = [\"api.example.com:80\", \"*.partner.net:443\", \"198.18.0.0/15:*\"]",
        "allow = []",
    ));
    assert!(e.contains("listener[0].allow: is required"), "{e}");
    let e = problems(
        &FORWARD
            .replace("allow = [", "x = 1\nallow = [")
            .replace("mode = \"forward\"", "mode = \"forward\"\nvia = \"yes\""),
    );
    assert!(e.contains("listener[0].via: expected true or false"), "{e}");
    // Forward-only keys on an http listener.
    let e = problems(&MINIMAL.replace(
        "upstream = \"u\"\n",
        "upstream = \"u\"\nallow = [\"a.b:1\"]\n",
    ));
    assert!(e.contains("listener[0].allow: only applies"), "{e}");
}

#[test]
fn intercept_mistakes_are_named() {
    let base = |icpt: &str, extra: &str| {
        format!("[[listener]]\nname = \"i\"\nbind = \"127.0.0.1:15001\"\nmode = \"intercept\"\n{extra}\nintercept = {{ {icpt} }}\n")
    };
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    let ok = load(&base(
        "uids = [65534], destinations = [\"198.18.0.0/15:9000\"]",
        "",
    ))
    .unwrap();
    let l = &ok.listeners[0];
    assert_eq!(l.mode.kind(), Mode::Intercept);
    assert!(
        !l.mode.http().unwrap().client_keepalive,
        "loopmux closes first by default"
    );
    let cases = [
        (
            base("destinations = [\"198.18.0.2:9000\"]", ""),
            "intercept.uids: uids or cgroups",
        ),
        (
            base("uids = [65534]", ""),
            "intercept.destinations: is required",
        ),
        (
            base(
                &format!("uids = [{own}], destinations = [\"198.18.0.2:80\"]"),
                "",
            ),
            "loopmux's own uid",
        ),
        (
            base(
                "uids = [65534], destinations = [\"198.18.0.2:80\"]",
                "client_keepalive = true",
            ),
            "client_keepalive: must be false",
        ),
        (
            base(
                "uids = [65534], destinations = [\"198.18.0.2:80\"], opaque_ports = [0]",
                "",
            ),
            "opaque_ports[0]",
        ),
        (
            base("uids = [65534], destinations = [\"*.example.com:80\"]", ""),
            "not deny rules, wildcards",
        ),
        (
            base("uids = [65534], destinations = [\"[fd00::1]:80\"]", ""),
            "IPv6 destinations are not intercepted",
        ),
        (
            base("uids = [\"root\"], destinations = [\"198.18.0.2:80\"]", ""),
            "intercept.uids: expected a list of whole numbers",
        ),
    ];
    for (text, want) in cases {
        let e = problems(&text);
        assert!(e.contains(want), "{want}: {e}");
    }
}

#[test]
fn process_threads_is_checked() {
    let c = load(&format!("{MINIMAL}\n[process]\nthreads = 1\n")).unwrap();
    assert_eq!(c.threads, 1);
    assert_eq!(load(MINIMAL).unwrap().threads, defaults::THREADS);
    let e = problems(&format!("{MINIMAL}\n[process]\nthreads = 5000\n"));
    assert!(e.contains("process.threads: 5000 is out of range"), "{e}");
    let e = problems(&format!("{MINIMAL}\n[process]\nthreads = \"auto\"\n"));
    assert!(
        e.contains("process.threads: expected a whole number"),
        "{e}"
    );
}

/// `half_close_timeout`: raw relays only (tcp, tunnel, forward's CONNECT,
/// intercept, `[serve]`), default 60 s, a positive duration.
#[test]
fn half_close_timeout_is_checked_where_it_applies() {
    let cfg =
        load(&MINIMAL.replace("upstream = \"u\"\n", "upstream = \"u\"\nmode = \"tcp\"\n")).unwrap();
    assert_eq!(
        cfg.listeners[0].mode.half_close_timeout().unwrap(),
        std::time::Duration::from_secs(60)
    );
    let cfg = load(&MINIMAL.replace(
        "upstream = \"u\"\n",
        "upstream = \"u\"\nmode = \"tcp\"\nhalf_close_timeout = \"5s\"\n",
    ))
    .unwrap();
    assert_eq!(
        cfg.listeners[0].mode.half_close_timeout().unwrap(),
        std::time::Duration::from_secs(5)
    );
    let cfg = load(&FORWARD.replace(
        "mode = \"forward\"\n",
        "mode = \"forward\"\nhalf_close_timeout = \"2s\"\n",
    ))
    .unwrap();
    assert_eq!(
        cfg.listeners[0].mode.half_close_timeout().unwrap(),
        std::time::Duration::from_secs(2)
    );
    let e = problems(&MINIMAL.replace(
        "upstream = \"u\"\n",
        "upstream = \"u\"\nhalf_close_timeout = \"5s\"\n",
    ));
    assert!(
        e.contains("listener[0].half_close_timeout: only applies to raw relays"),
        "{e}"
    );
    let e = problems(&MINIMAL.replace(
        "upstream = \"u\"\n",
        "upstream = \"u\"\nmode = \"tcp\"\nhalf_close_timeout = \"0s\"\n",
    ));
    assert!(
        e.contains("listener[0].half_close_timeout: must be greater than zero"),
        "{e}"
    );
}

/// A valid `[serve]` section: a self-signed certificate (its own client
/// CA too) written to a fresh directory, which the caller removes.
fn serve_section(extra: &str) -> (std::path::PathBuf, String) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "loopmux-config-tests-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    let toml = format!(
        "[serve]\nbind = \"127.0.0.1:0\"\nallow = [\"a.b:1\"]\n{extra}\n\
         tls = {{ cert = \"{c}\", key = \"{k}\", client_ca = \"{c}\" }}\n",
        c = c.display(),
        k = k.display()
    );
    (dir, toml)
}

#[test]
fn serve_handshakes_are_a_limit_of_their_own() {
    let (dir, toml) = serve_section("");
    let c = load(&toml).unwrap();
    let (dir2, toml2) = serve_section("max_connections = 3\nmax_handshakes = 5");
    let c2 = load(&toml2);
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(dir2).unwrap();
    let s = serve_of(&c.listeners[0]);
    // The README's defaults.
    assert_eq!((s.max_connections, s.max_handshakes), (1024, 1024));
    assert_eq!(c.listeners[0].max_clients, 2048);
    // The accept loop bounds the serve role's sockets: both limits.
    let c2 = c2.unwrap();
    let s2 = serve_of(&c2.listeners[0]);
    assert_eq!((s2.max_connections, s2.max_handshakes), (3, 5));
    assert_eq!(c2.listeners[0].max_clients, 8);
}

#[test]
fn serve_max_handshakes_is_checked() {
    // Without tls the section fails too, but every key's own problem is
    // still named.
    let serve = "[serve]\nbind = \"127.0.0.1:0\"\nallow = [\"a.b:1\"]\n";
    for (bad, want) in [
        (
            "max_handshakes = 0",
            "serve.max_handshakes: 0 is out of range",
        ),
        (
            "max_handshakes = 1000001",
            "serve.max_handshakes: 1000001 is out of range",
        ),
        ("max_handshakes = \"64\"", "serve.max_handshakes: expected"),
    ] {
        let e = problems(&format!("{serve}{bad}\n"));
        assert!(e.contains(want), "{bad}: {e}");
    }
    let e = problems(&format!("{serve}max_handshakes = 64\n"));
    assert!(!e.contains("max_handshakes"), "{e}");
}

fn serve_of(l: &super::ListenerConfig) -> &super::ServeConfig {
    match &l.mode {
        super::ModeConfig::Serve(s) => s,
        other => panic!("not the serve listener: {other:?}"),
    }
}
