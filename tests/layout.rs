//! The code's shape, checked: no module imports, directly or through others, a module
//! that imports it back. A cycle is how a log writer ends up knowing the proxy; this test
//! names it the day it appears.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/` (but `main.rs`, the binary) as its module path
/// (`src/store/sqlite.rs` → `store::sqlite`, `src/admin/mod.rs` → `admin`).
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("under src");
            let mut parts: Vec<String> = relative
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let name = parts.join("::");
            if name == "main" || name == "lib" {
                continue;
            }
            found.insert(name, path);
        }
    }
    found
}

/// The modules a file names through `crate::…` paths (in `use` lines and in code alike),
/// resolved to the longest known module prefix. Test modules are left out: a test may
/// reach anywhere.
fn imports(text: &str, known: &BTreeMap<String, PathBuf>) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut found = BTreeSet::new();
    let mut add = |path: &str| {
        let segments: Vec<&str> = path.split("::").collect();
        for len in (1..=segments.len()).rev() {
            let candidate = segments[..len].join("::");
            if known.contains_key(&candidate) {
                found.insert(candidate);
                return;
            }
        }
    };
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let path: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let path = path.trim_end_matches(':');
        // `use crate::{a, b::c}` names several.
        if rest[path.len()..].starts_with("::{") || (path.is_empty() && rest.starts_with('{')) {
            let open = at + "crate::".len() + rest.find('{').unwrap_or(0);
            let close = code[open..].find('}').map_or(code.len(), |c| open + c);
            for item in code[open + 1..close].split(',') {
                let item = item.trim().trim_start_matches("self::");
                let joined = if path.is_empty() {
                    item.to_string()
                } else {
                    format!("{path}::{item}")
                };
                add(joined.split_whitespace().next().unwrap_or(""));
            }
        } else {
            add(path);
        }
    }
    found
}

/// A cycle in `graph`, if there is one, as the modules around it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_string(), Mark::Open);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let known = modules(&src);
    known
        .iter()
        .map(|(name, path)| {
            let text = std::fs::read_to_string(path).expect("read module");
            let mut uses = imports(&text, &known);
            uses.remove(name);
            // A parent module declaring its children is not an import.
            uses.retain(|used| !used.starts_with(&format!("{name}::")));
            (name.clone(), uses)
        })
        .collect()
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = import_graph();
    assert!(graph.len() > 10, "modules found: {:?}", graph.keys());
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}", cycle.join(" → "));
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(str::to_string).collect()))
    .collect();
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let known: BTreeMap<String, PathBuf> = ["x", "y::z", "y"]
        .into_iter()
        .map(|m| (m.to_string(), PathBuf::new()))
        .collect();
    let found = imports(
        "use crate::{x::Thing, y::z::Other};\nfn f() { crate::y::helper(); }\n#[cfg(test)]\nuse crate::w;",
        &known,
    );
    assert_eq!(
        found,
        ["x", "y", "y::z"].into_iter().map(str::to_string).collect()
    );
}
