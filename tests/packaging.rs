//! What can be tested of the packaging without systemd, dpkg or Docker
//! running it: the Kubernetes manifests parse and their config passes
//! `loopmux check`; the unit file names what the README promises.

mod support;

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn sidecar_manifests_parse_and_their_config_checks() {
    let text = std::fs::read_to_string(root().join("packaging/kubernetes/sidecar.yaml")).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .collect();
    assert_eq!(docs.len(), 2);
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("a ConfigMap");
    let toml = cm["data"]["loopmux.toml"]
        .as_str()
        .expect("loopmux.toml in the ConfigMap");
    let dir = std::env::temp_dir().join(format!("loopmux-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("loopmux.toml");
    std::fs::write(&file, toml).unwrap();
    support::assert_check_passes(&file);
    std::fs::remove_dir_all(&dir).unwrap();

    let dep = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    let pod = &dep["spec"]["template"];
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    let containers = pod["spec"]["containers"].as_sequence().unwrap();
    let lmx = containers
        .iter()
        .find(|c| c["name"] == "loopmux")
        .expect("loopmux container");
    assert_eq!(lmx["readinessProbe"]["httpGet"]["path"], "/readyz");
    let admin_port = lmx["ports"][0]["containerPort"].as_u64().unwrap();
    assert!(
        toml.contains(&format!(":{admin_port}\"")),
        "admin bind matches the probe port"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        admin_port.to_string().as_str()
    );
    let vol = &pod["spec"]["volumes"][0]["configMap"]["name"];
    assert_eq!(vol, &cm["metadata"]["name"]);
}

#[test]
fn unit_file_is_notify_hardened_and_reloads_with_sighup() {
    let unit = std::fs::read_to_string(root().join("packaging/loopmux.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "DynamicUser=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "CapabilityBoundingSet=",
        "LimitNOFILE=1048576",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing `{line}`");
    }
}

#[test]
fn the_interception_drop_in_adds_only_what_interception_needs() {
    let d = std::fs::read_to_string(root().join("packaging/intercept.conf")).unwrap();
    for line in [
        "[Service]",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "AmbientCapabilities=CAP_NET_ADMIN",
        "ExecStopPost=-/usr/bin/loopmux intercept --remove",
    ] {
        assert!(d.lines().any(|l| l == line), "missing `{line}`");
    }
    // The default unit stays without capabilities.
    let unit = std::fs::read_to_string(root().join("packaging/loopmux.service")).unwrap();
    assert!(!unit.contains("CAP_NET_ADMIN"));
}
