//! The module graph read from the code's own paths (`crate::...` and `super::...`, outside
//! unit-test modules): no module under `src/` may be part of an import cycle, the session layer
//! must not know the store, and the folders keep the order the README's Architecture section
//! states. Run with `--nocapture` to print the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, lowest first: a module may use its own layer and those before it. An entry names
/// a folder or a module; the longest entry that is a prefix of a module's path decides. The
/// acceptors (`net::server`) sit with the admin listener they start, above the connection task.
const LAYERS: &[&[&str]] = &[
    &["config", "stats", "shutdown", "memory"],
    &["wire"],
    &["auth", "transport"],
    &["session"],
    &["routing"],
    &["store"],
    &["broker"],
    &["cluster"],
    &["net"],
    &["ops", "net::server"],
];

type Graph = BTreeMap<String, BTreeSet<String>>;

fn modules(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_stem().expect("name").to_string_lossy().to_string();
        if p.is_dir() {
            let mut sub = prefix.to_vec();
            sub.push(name);
            modules(&p, &sub, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let mut path = prefix.to_vec();
            if name != "mod" {
                path.push(name);
            }
            let key = path.join("::");
            if !matches!(key.as_str(), "lib" | "main" | "testutil") && !key.ends_with("tests") {
                out.insert(key, std::fs::read_to_string(&p).expect("read"));
            }
        }
    }
}

/// The code outside `#[cfg(test)] mod tests { ... }` and comments.
fn code(src: &str) -> String {
    let src = match src.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &src[..i],
        None => src,
    };
    src.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Paths starting at each occurrence of `anchor` ("crate::" or "super::"), with `{a, b}`
/// groups expanded one level.
fn paths(code: &str, anchor: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(anchor) {
        let before = rest[..i].chars().last();
        rest = &rest[i + anchor.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let base = rest[..end].trim_end_matches(':').to_string();
        if rest[end..].starts_with('{') && rest[..end].ends_with("::") {
            let close = rest[end..].find('}').map_or(rest.len(), |j| end + j);
            for item in rest[end + 1..close].split(',') {
                let item = item.split_whitespace().next().unwrap_or("");
                if !item.is_empty() && item != "self" {
                    out.push(format!("{base}::{item}"));
                }
            }
        }
        out.push(base);
    }
    out
}

fn graph() -> Graph {
    let mut mods = BTreeMap::new();
    modules(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src").as_path(),
        &[],
        &mut mods,
    );
    // Re-exports of a folder's mod.rs (`pub use machine::{Session, ...}`): a path through the
    // folder depends on the module that defines the item.
    let mut reexports = BTreeMap::new();
    for (m, src) in &mods {
        for line in code(src).split(';') {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("pub use ") {
                if let Some((child, items)) = rest.split_once("::") {
                    for item in items.trim_matches(|c| c == '{' || c == '}').split(',') {
                        let item = item.trim();
                        if !item.is_empty() {
                            reexports.insert(format!("{m}::{item}"), format!("{m}::{child}"));
                        }
                    }
                }
            }
        }
    }
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").collect();
        (1..=parts.len()).rev().find_map(|k| {
            let m = parts[..k].join("::");
            if !mods.contains_key(&m) {
                return None;
            }
            match parts.get(k) {
                Some(item) => Some(reexports.get(&format!("{m}::{item}")).cloned().unwrap_or(m)),
                None => Some(m),
            }
        })
    };
    let mut g = Graph::new();
    for (m, src) in &mods {
        let code = code(src);
        let parent = m.rsplit_once("::").map_or("", |p| p.0);
        let mut targets: Vec<String> = paths(&code, "crate::");
        for p in paths(&code, "super::") {
            targets.push(if parent.is_empty() {
                p
            } else {
                format!("{parent}::{p}")
            });
        }
        let deps = g.entry(m.clone()).or_default();
        for t in targets {
            if let Some(r) = resolve(&t) {
                if &r != m && !r.starts_with(&format!("{m}::")) {
                    deps.insert(r);
                }
            }
        }
    }
    g
}

/// Modules on a cycle (strongly connected components of more than one module).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(v) = todo.pop() {
            for w in g.get(&v).into_iter().flatten() {
                if seen.insert(w.clone()) {
                    todo.push(w.clone());
                }
            }
        }
        seen
    };
    let mut out: Vec<Vec<String>> = Vec::new();
    for m in g.keys() {
        let r = reach(m);
        if r.contains(m) {
            let comp: Vec<String> = g
                .keys()
                .filter(|o| r.contains(*o) && reach(o).contains(m))
                .cloned()
                .collect();
            if !out.contains(&comp) {
                out.push(comp);
            }
        }
    }
    out
}

fn layer(m: &str) -> usize {
    let covers = |e: &str| m == e || m.starts_with(&format!("{e}::"));
    LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, l)| l.iter().filter(|e| covers(e)).map(move |e| (e.len(), i)))
        .max()
        .map(|(_, i)| i)
        .unwrap_or_else(|| panic!("module {m} is in no layer of LAYERS"))
}

#[test]
fn no_module_is_part_of_an_import_cycle() {
    let g = graph();
    for (m, deps) in &g {
        println!(
            "{m}: {}",
            deps.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    assert!(g.len() > 40, "the graph reader found too few modules");
    assert!(
        g["net::connection"].contains("broker"),
        "the graph reader misses real edges"
    );
    assert_eq!(cycles(&g), Vec::<Vec<String>>::new(), "import cycles");
}

#[test]
fn folders_use_only_the_layers_below_them() {
    let g = graph();
    let mut wrong = Vec::new();
    for (m, deps) in &g {
        for d in deps {
            if layer(d) > layer(m) {
                wrong.push(format!("{m} -> {d}"));
            }
        }
    }
    assert_eq!(wrong, Vec::<String>::new(), "edges against the layer order");
}

#[test]
fn the_session_layer_does_not_know_the_store() {
    let g = graph();
    for (m, deps) in &g {
        if m.starts_with("session") || m.starts_with("config") || m.starts_with("routing") {
            assert!(
                !deps.iter().any(|d| d.starts_with("store")),
                "{m} uses the store: {deps:?}"
            );
        }
    }
}
