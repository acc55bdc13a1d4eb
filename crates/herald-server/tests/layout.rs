//! The source layout keeps its promise (docs/architecture.md): no file of `herald-server`
//! imports, directly or through others, a module that imports it back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`http::tls`) → source text without its unit-test module.
fn modules(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src dir")
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let path = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            let mut p = prefix.to_vec();
            p.push(name);
            modules(&path, &p, out);
        } else if let Some(stem) = name.strip_suffix(".rs") {
            let mut p = prefix.to_vec();
            if !matches!(stem, "mod" | "lib" | "main") {
                p.push(stem.to_string());
            }
            let mut src = std::fs::read_to_string(&path).expect("read source");
            if let Some(i) = src.find("#[cfg(test)]\nmod tests") {
                src.truncate(i);
            }
            out.insert(p.join("::"), src);
        }
    }
}

/// The longest known module that `path` (`a::b::Item`) starts with.
fn resolve(path: &str, known: &BTreeMap<String, String>) -> Option<String> {
    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    (1..=segs.len())
        .rev()
        .map(|k| segs[..k].join("::"))
        .find(|c| known.contains_key(c))
}

/// Paths after `marker` (`crate::` or `super::`), including `{a, b}` groups.
fn paths_after(src: &str, marker: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in src.match_indices(marker) {
        let before = src[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &src[i + marker.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            out.extend(
                group[..end]
                    .split(',')
                    .map(|s| s.trim().split(" as ").next().unwrap_or("").to_string()),
            );
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            out.push(rest[..end].to_string());
        }
    }
    out
}

#[test]
fn no_source_file_is_in_an_import_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut known = BTreeMap::new();
    modules(&src, &[], &mut known);
    assert!(known.len() > 20, "found only {} modules", known.len());

    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in &known {
        let parent = module.rsplit_once("::").map(|(p, _)| p).unwrap_or("");
        let mut deps = BTreeSet::new();
        for p in paths_after(text, "crate::") {
            deps.extend(resolve(&p, &known));
        }
        for p in paths_after(text, "super::") {
            let full = if parent.is_empty() {
                p
            } else {
                format!("{parent}::{p}")
            };
            deps.extend(resolve(&full, &known).or_else(|| Some(parent.to_string())));
        }
        deps.remove(module);
        graph.insert(module.clone(), deps);
    }

    // Depth-first search with colours: grey on the stack, black done.
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for d in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(cycle) = visit(n, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
    // The check sees real edges: state depends on config, the MQTT front end on state.
    assert!(graph["state"].contains("config"), "{:?}", graph["state"]);
    assert!(graph["mqtt"].contains("state"), "{:?}", graph["mqtt"]);
}
