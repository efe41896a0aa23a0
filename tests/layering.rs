//! The module map of DESIGN §3 as a test: it reads `src/`, takes every
//! `crate::module` a file names, and fails on an import its layer may not
//! make, unless that import is in `KNOWN` (the debt issue 18 pays off:
//! each entry says why it is still there). An entry that no longer
//! exists fails too, so the list only shrinks. Without the known
//! entries the graph must have no circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module of the library and its layer.
const LAYERS: &[(&str, &str)] = &[
    ("main", "entry"),
    ("lib", "entry"),
    ("app", "assembly"),
    ("demo", "demo"),
    ("http", "exchange"),
    ("forward", "modes"),
    ("tcp", "modes"),
    ("intercept", "modes"),
    ("serve", "modes"),
    ("listener", "accept"),
    ("upstream", "way-out"),
    ("metrics", "observe"),
    ("admin", "observe"),
    ("status", "observe"),
    ("sockopt", "net"),
    ("stall", "net"),
    ("relay", "net"),
    ("prefixed", "net"),
    ("shutdown", "net"),
    ("systemd", "net"),
    ("allow", "policy"),
    ("config", "config"),
    ("tls", "tls"),
    ("diagnose", "diagnose"),
];

/// Which layers a layer may import (its own layer's other modules are
/// allowed only where listed here too).
const MAY_IMPORT: &[(&str, &[&str])] = &[
    (
        "entry",
        &[
            "assembly", "demo", "modes", "exchange", "accept", "way-out", "observe", "net",
            "policy", "config", "tls", "diagnose",
        ],
    ),
    (
        "assembly",
        &[
            "modes", "exchange", "accept", "way-out", "observe", "net", "policy", "config", "tls",
            "diagnose",
        ],
    ),
    (
        "demo",
        &[
            "assembly", "modes", "exchange", "accept", "way-out", "observe", "net", "policy",
            "config", "tls", "diagnose",
        ],
    ),
    // A mode never imports another mode.
    (
        "modes",
        &[
            "exchange", "accept", "way-out", "observe", "net", "policy", "config", "tls",
        ],
    ),
    // The HTTP/1 exchange (client side, request path, answers, access
    // log) that http, forward and intercept listeners share; where a
    // request goes is a `Router` a mode implements, so it names none.
    (
        "exchange",
        &[
            "accept", "way-out", "observe", "net", "policy", "config", "tls",
        ],
    ),
    ("accept", &["net", "observe", "config"]),
    ("way-out", &["net", "policy", "observe", "config", "tls"]),
    ("observe", &["observe", "net", "config"]),
    ("net", &[]),
    ("policy", &[]),
    ("config", &["policy", "tls"]),
    // TLS settings and configs: what rustls needs, nothing of loopmux's.
    ("tls", &[]),
    ("diagnose", &["config"]),
];

/// Imports the map forbids that are still there, each with its reason.
const KNOWN: &[(&str, &str, &str)] = &[];

fn layer(module: &str) -> &'static str {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, l)| *l)
        .unwrap_or_else(|| panic!("src/{module}: not in LAYERS; give the new module its layer"))
}

fn may(from: &str, to: &str) -> bool {
    let (lf, lt) = (layer(from), layer(to));
    MAY_IMPORT
        .iter()
        .find(|(l, _)| *l == lf)
        .is_some_and(|(_, ok)| ok.contains(&lt))
}

/// The top-level module a file under `src/` belongs to.
fn module_of(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Every `crate::name` in `text`, outside line comments.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
            rest = after;
        }
        // `use crate::{a, b}` at the top level.
        if let Some(i) = code.find("crate::{") {
            let inner = &code[i + "crate::{".len()..];
            for part in inner.split([',', '}']) {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn edges() -> BTreeSet<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "src/ has only {} .rs files", files.len());
    let mut edges = BTreeSet::new();
    for f in files {
        let from = module_of(f.strip_prefix(&src).unwrap());
        let text = std::fs::read_to_string(&f).unwrap();
        for to in crate_refs(&text) {
            if to != from && LAYERS.iter().any(|(m, _)| *m == to) {
                edges.insert((from.clone(), to));
            }
        }
    }
    edges
}

#[test]
fn imports_follow_the_module_map() {
    let edges = edges();
    let known: BTreeSet<(String, String)> = KNOWN
        .iter()
        .map(|(a, b, _)| (a.to_string(), b.to_string()))
        .collect();
    let forbidden: BTreeSet<_> = edges.iter().filter(|(a, b)| !may(a, b)).cloned().collect();
    let new: Vec<_> = forbidden.difference(&known).collect();
    assert!(
        new.is_empty(),
        "imports the module map (DESIGN §3) forbids: {new:?}; move the code to the right layer"
    );
    let gone: Vec<_> = known.difference(&forbidden).collect();
    assert!(
        gone.is_empty(),
        "KNOWN lists imports that are gone (or now allowed): {gone:?}; remove them from the list"
    );
}

#[test]
fn no_import_circle_without_the_known_debt() {
    let known: BTreeSet<(String, String)> = KNOWN
        .iter()
        .map(|(a, b, _)| (a.to_string(), b.to_string()))
        .collect();
    let mut graph: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (a, b) in edges().into_iter().filter(|e| !known.contains(e)) {
        graph.entry(a).or_default().push(b);
    }
    // Depth-first search with colours: grey on the stack means a circle.
    fn visit(
        n: &str,
        g: &BTreeMap<String, Vec<String>>,
        colour: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        colour.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match colour.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|p| p == m).unwrap_or(0);
                    let mut c = path[start..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, g, colour, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        colour.insert(n.to_string(), 2);
        None
    }
    let mut colour = BTreeMap::new();
    for n in graph.keys() {
        if colour.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, &graph, &mut colour, &mut Vec::new()) {
                panic!("import circle: {}", c.join(" -> "));
            }
        }
    }
}

#[test]
fn the_reader_sees_imports_in_every_form() {
    let refs = crate_refs(
        "use crate::allow::Host;\nuse crate::{config, metrics::X};\nlet a = crate::forward::is_self(x); // crate::nope\n",
    );
    let want: BTreeSet<String> = ["allow", "config", "metrics", "forward"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(refs, want);
}
